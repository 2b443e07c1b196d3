"""Running a trained PredNet over whole videos: one prediction per frame, from earlier frames only."""

from __future__ import annotations

import time
import weakref
from pathlib import Path

import numpy as np

from models.data.store import video_slices
from models.errors import PipelineError
from models.io import read_json

# Frames ahead that batch_scoring.py predicts each frame from by default: the next frame, the task PredNet
# is trained on. On Ped2 at 128x192 it beat 2 frames ahead (the model's own prediction standing in for the
# frame between) in the smoothed regularity for each of three fully trained models (0.982-0.986 against
# 0.976-0.979) and in the forest, and only it lets a window score several frames (`default_per_window`);
# 2 ahead won the unsmoothed regularity for two of the three (docs/results.md).
DEFAULT_HORIZON = 1


# Window scorers built so far, per trained PredNet layer and (window, per_window). Each is a new Keras model
# that compiles on its first call, so building one per `predict_videos` call compiled it again every time.
_SCORERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def default_per_window(window: int | None, horizon: int) -> int:
    """Frames scored per window by default: half the window when predicting the next frame, so that each
    frame is predicted from window // 2 to window - 1 frames before it, at 2 model steps per frame instead
    of `window` (on Ped2 at 32x48 and 64x96, within 0.004 AUC of one frame per window for five models,
    and the same smoothed AUC at 128x192; docs/results.md); 1 otherwise."""
    return max(window // 2, 1) if window and horizon == 1 else 1


def load_predictor(model_dir: str | Path, output_mode: str = "all"):
    """The trained model of `model_dir`, turned into one that outputs `output_mode`, and its config.json.

    A folder holding another model than PredNet (config.json's `model`) gives that model's frame model
    (`models.registry`) and its trained core layer instead."""
    from models.prednet import find_prednet, load_model, predictor
    from models.registry import DEFAULT_MODEL, load_frame_model, model_name

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise PipelineError(f"Model folder {model_dir} does not exist; run train.py first.")
    config = read_json(model_dir / "config.json")
    if model_name(config) != DEFAULT_MODEL:
        return (*load_frame_model(model_dir, config), config)
    trained = find_prednet(load_model(model_dir / "model.keras"))
    return predictor(trained, output_mode), trained, config


def predict_videos(
    model,
    X: np.ndarray,
    sources: np.ndarray,
    batch_size: int = 4,
    window: int | None = None,
    horizon: int = 1,
    per_window: int = 1,
    progress=None,
):
    """Predicts every frame of every video from earlier frames of the same video only.

    Args:
        model: a predicting model (`predictor(..., "all")`), or another model's frame model, which scores
            the frames its own way (`models.registry`).
        X: (n, h, w, c) uint8 frames, the frames of each video contiguous.
        sources: the video of each frame.
        batch_size: sequences per model call (videos, or windows when `window` is set).
        window: None or 0 to run each video as one sequence (the prediction of frame t then depends on
            every frame before it); k to run the model over k-frame windows, as it saw sequences in training:
            frame t from the frames of the window ending at it alone (k times the compute; see per_window).
        horizon: predict frame t from the frames up to t - horizon: for the horizon - 1 frames in between
            the model is fed its own predictions, in the same model call (needs a window longer than the
            horizon). 1: the next frame, from every frame before it.
        per_window: with horizon 1, score this many frames per window: the last `per_window` steps of
            windows `per_window` frames apart, so that each frame is predicted from the last
            window - per_window to window - 1 frames before it, for window / per_window model steps per
            frame instead of window (the first `window` frames of a video share its first window).
        progress: an optional tqdm bar, advanced by the frames scored in each model call.

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
    if per_window != 1 and not (window and horizon == 1 and 1 <= per_window < window):
        raise PipelineError(
            f"scoring {per_window} frames per window needs windowed scoring of the next frame (horizon 1) and "
            f"fewer frames per window than the window ({window}). Received: per_window {per_window}, horizon "
            f"{horizon}"
        )
    if hasattr(model, "predict_videos"):  # another model's frame model (models.registry)
        return model.predict_videos(X, sources, batch_size, window, horizon, per_window, progress)
    start = time.perf_counter()
    if window:
        predictions, errors = _predict_windows(model, X, sources, batch_size, window, horizon, per_window, progress)
    else:
        predictions, errors = _predict_whole(model, X, sources, batch_size, progress)
    seconds = time.perf_counter() - start
    return predictions, errors, len(X) / max(seconds, 1e-9)


def _outputs(model, batch) -> tuple[np.ndarray, np.ndarray]:
    out = model.predict_on_batch(batch)
    return np.asarray(out["prediction"], np.float32), np.asarray(out["error"], np.float32)


def _predict_whole(model, X, sources, batch_size, progress=None):
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
        if progress is not None:
            progress.update(sum(sl.stop - sl.start for _, sl in group))
    return predictions, errors


def window_rows(sources: np.ndarray, window: int, per_window: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The windows that score every frame once: first frame, end of the video, and the steps each scores.

    A video's first `window` frames are scored in the window that starts at its first frame (`per_window`
    steps per row); each later frame t in the last `per_window` steps of the window that ends at t or up
    to per_window - 1 frames after it. Which window scores a frame depends on its position alone, never on
    the video's length (at a video's end the window runs on into padding, which never changes an earlier
    step of the causal model), so a stream scored frame by frame gets the same predictions. Returns start
    (rows,), stop (rows,) (the video's end: later steps are padding) and steps (rows, per_window) (-1: no
    frame, at a video's end).
    """
    starts, stops, steps = [], [], []
    for _, sl in video_slices(sources):
        n = sl.stop - sl.start
        head = min(window, n)
        chunks = [(0, np.arange(u, min(u + per_window, head))) for u in range(0, head, per_window)]
        for u in range(window, n, per_window):
            start = u + per_window - window
            chunks.append((start, np.arange(u, min(u + per_window, n)) - start))
        for offset, chunk in chunks:
            starts.append(sl.start + offset)
            stops.append(sl.stop)
            steps.append(np.pad(chunk, (0, per_window - len(chunk)), constant_values=-1))
    return np.array(starts, np.int64), np.array(stops, np.int64), np.array(steps, np.int64).reshape(-1, per_window)


def _predict_windows(model, X, sources, batch_size, window, horizon, per_window, progress=None):
    """Frame t from the frames of its video in the window that scores it (`window_rows`), read at its step;
    the window of frame t at the start of a video starts at the video's first frame, padded at the end
    (the model is causal, so padding never changes a step before it). With horizon > 1 (one frame per
    window) the model's own prediction replaces the frame at the steps after t - horizon, in the same call
    (closed loop), except at t itself, whose frame stays in so that the layer errors of its step compare
    it with its prediction (which does not depend on it). Windows travel as uint8 and only the scored
    steps come back (`window_scorer`); every call has the same shape (the last one padded), so the model
    compiles once, on the first `predict_videos` call for this model and window (`_window_scorer`)."""
    scorer = _window_scorer(model, window, per_window)
    starts, stops, picked = window_rows(sources, window, per_window)
    steps = np.arange(window)
    predictions, errors = np.zeros(X.shape, np.float32), None
    for i in range(0, len(starts), batch_size):
        start, stop, step = starts[i : i + batch_size], stops[i : i + batch_size], picked[i : i + batch_size]
        index = start[:, None] + steps
        inside = index < stop[:, None]
        frames = np.where(inside[..., None, None, None], X[np.minimum(index, stop[:, None] - 1)], 0).astype(np.uint8)
        last = step.max(axis=1)[:, None]  # with horizon > 1, the one step scored
        fed = ((steps > last - horizon) & (steps < last)).astype(np.float32)
        pick = (step[..., None] == steps).astype(np.float32)
        pad = batch_size - len(start)
        if pad:
            frames, fed, pick = (
                np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in (frames, fed, pick)
            )
        pred, err = _outputs(scorer, [frames, fed, pick])
        if errors is None:
            errors = np.zeros((len(X), err.shape[-1]), np.float32)
        valid = step >= 0
        rows = (start[:, None] + step)[valid]
        predictions[rows] = pred[: len(start)][valid]
        errors[rows] = err[: len(start)][valid]
        if progress is not None:
            progress.update(len(rows))
    return predictions, errors


def _window_scorer(model, window: int, per_window: int):
    """The `window_scorer` of `model`'s PredNet layer, built on first use and kept while that layer lives;
    later calls copy the layer's current weights into it, so that a model trained further is scored as it
    is now."""
    from models.prednet import find_prednet, window_scorer

    layer = find_prednet(model)
    scorers = _SCORERS.setdefault(layer, {})
    scorer = scorers.get((window, per_window))
    if scorer is None:
        scorer = scorers[(window, per_window)] = window_scorer(layer, window, per_window)
    else:
        find_prednet(scorer).set_weights(layer.get_weights())
    return scorer


def frame_contexts(sources: np.ndarray, window: int | None, per_window: int = 1, horizon: int = 1) -> np.ndarray:
    """Frames of context each frame is predicted from by `predict_videos` with these settings: its step in
    the window that scores it (`window_rows`), or its index in its video with whole-video scoring (capped at
    `WHOLE_VIDEO_CONTEXTS` - 1); minus horizon - 1 frames fed back. Calibration removes the error's
    dependence on it (`models.calibration`)."""
    contexts = np.zeros(len(sources), np.int64)
    if window:
        starts, _, steps = window_rows(sources, window, per_window)
        for start, row in zip(starts, steps, strict=True):
            row = row[row >= 0]
            contexts[start + row] = row
    else:
        for _, sl in video_slices(sources):
            contexts[sl] = np.minimum(np.arange(sl.stop - sl.start), WHOLE_VIDEO_CONTEXTS - 1)
    return np.maximum(contexts - (horizon - 1), 0)


WHOLE_VIDEO_CONTEXTS = 20
