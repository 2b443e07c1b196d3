"""Running a trained PredNet over whole videos: one prediction per frame, from earlier frames only."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from models.data.store import video_slices
from models.errors import PipelineError
from models.io import read_json

# Frames ahead that batch_scoring.py predicts each frame from by default (the model's own prediction stands
# in for the frame in between): on Ped2 at 128x192 the best or within 0.005 of the best of 1-4 for each
# fully trained model, and clearly better than 1 for a shorter-trained one; 1 is 0.006-0.008 better for the
# smoothed regularity (docs/results.md).
DEFAULT_HORIZON = 2


def default_horizon(window: int | None) -> int:
    """DEFAULT_HORIZON, at most window - 1 frames ahead; 1 (the next frame) for whole videos."""
    return max(min(DEFAULT_HORIZON, window - 1), 1) if window else 1


def load_predictor(model_dir: str | Path, output_mode: str = "all"):
    """The trained model of `model_dir`, turned into one that outputs `output_mode`, and its config.json."""
    from models.prednet import find_prednet, load_model, predictor

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise PipelineError(f"Model folder {model_dir} does not exist; run train.py first.")
    config = read_json(model_dir / "config.json")
    trained = find_prednet(load_model(model_dir / "model.keras"))
    return predictor(trained, output_mode), trained, config


def predict_videos(
    model, X: np.ndarray, sources: np.ndarray, batch_size: int = 4, window: int | None = None, horizon: int = 1
):
    """Predicts every frame of every video from earlier frames of the same video only.

    Args:
        model: a predicting model (`predictor(..., "all")`).
        X: (n, h, w, c) uint8 frames, the frames of each video contiguous.
        sources: the video of each frame.
        batch_size: sequences per model call (videos, or windows when `window` is set).
        window: None or 0 to run each video as one sequence (the prediction of frame t then depends on
            every frame before it); k to run the model over the k frames ending at frame t alone, as it saw
            sequences in its k-frame training windows (k times the compute).
        horizon: predict frame t from the frames up to t - horizon: for the horizon - 1 frames in between
            the model is fed its own predictions, in the same model call (needs a window longer than the
            horizon). 1: the next frame, from every frame before it.

    Returns:
        predictions (n, h, w, c) in [0, 1] aligned with X (frames with no frame `horizon` steps before them
        get the model's output before it saw any frame), layer errors (n, layers) of the step that
        predicted each frame, and frames per second.
    """
    if window is not None and window < 0:
        raise PipelineError(f"window must be 0 (whole videos) or a number of frames. Received: {window}")
    if horizon < 1:
        raise PipelineError(f"horizon must be 1 (the next frame) or more frames ahead. Received: {horizon}")
    if horizon > 1 and (not window or window <= horizon):
        raise PipelineError(
            f"predicting {horizon} frames ahead needs a window longer than that (at least {horizon + 1} "
            f"frames). Received window: {window}"
        )
    start = time.perf_counter()
    if window:
        predictions, errors = _predict_windows(model, X, sources, batch_size, window, horizon)
    else:
        predictions, errors = _predict_whole(model, X, sources, batch_size)
    seconds = time.perf_counter() - start
    return predictions, errors, len(X) / max(seconds, 1e-9)


def _outputs(model, batch) -> tuple[np.ndarray, np.ndarray]:
    out = model.predict_on_batch(batch)
    return np.asarray(out["prediction"], np.float32), np.asarray(out["error"], np.float32)


def _predict_whole(model, X, sources, batch_size):
    """Several videos per call, padded at the end to one length: padding at the end never changes
    earlier predictions, since the model is causal in time."""
    videos = video_slices(sources)
    predictions, errors = np.zeros(X.shape, np.float32), None
    for i in range(0, len(videos), batch_size):
        group = videos[i : i + batch_size]
        length = max(sl.stop - sl.start for _, sl in group)
        batch = np.zeros((len(group), length, *X.shape[1:]), np.float32)
        for j, (_, sl) in enumerate(group):
            batch[j, : sl.stop - sl.start] = X[sl] / 255.0
        pred, err = _outputs(model, batch)
        if errors is None:
            errors = np.zeros((len(X), err.shape[-1]), np.float32)
        for j, (_, sl) in enumerate(group):
            predictions[sl] = pred[j, : sl.stop - sl.start]
            errors[sl] = err[j, : sl.stop - sl.start]
    return predictions, errors


def _predict_windows(model, X, sources, batch_size, window, horizon):
    """Frame t from the window of frames max(first, t - window + 1) .. t of its video, read at the
    window's last step; windows at the start of a video are shorter and padded at the end. At the window's
    steps after t - horizon the model's own prediction replaces the frame (closed loop, in the same call),
    except at t itself, whose frame stays in so that the layer errors of its step compare it with its
    prediction (which does not depend on it). Windows travel as uint8 and only the step of t comes back
    (`window_scorer`); every call has the same shape (the last one padded), so the model compiles once."""
    from models.prednet import find_prednet, window_scorer

    scorer = window_scorer(find_prednet(model), window)
    first = np.zeros(len(X), np.int64)
    for _, sl in video_slices(sources):
        first[sl] = sl.start
    steps = np.arange(window)
    predictions, errors = np.zeros(X.shape, np.float32), None
    for i in range(0, len(X), batch_size):
        rows = np.arange(i, min(i + batch_size, len(X)))
        start = np.maximum(first[rows], rows - window + 1)
        last = rows - start  # the step of frame t in its window
        index = start[:, None] + steps
        inside = steps <= last[:, None]
        frames = np.where(inside[..., None, None, None], X[np.minimum(index, rows[:, None])], 0).astype(np.uint8)
        fed = ((steps > last[:, None] - horizon) & (steps < last[:, None])).astype(np.float32)
        pick = (steps == last[:, None]).astype(np.float32)
        pad = batch_size - len(rows)
        if pad:
            frames, fed, pick = (
                np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in (frames, fed, pick)
            )
        pred, err = _outputs(scorer, [frames, fed, pick])
        if errors is None:
            errors = np.zeros((len(X), err.shape[-1]), np.float32)
        predictions[rows] = pred[: len(rows)]
        errors[rows] = err[: len(rows)]
    return predictions, errors
