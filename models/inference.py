"""Running a trained PredNet over whole videos: one prediction per frame, from earlier frames only.

There is one scoring path: `score_videos` runs the trained layer itself (no copy of its weights) over the
windows that score each frame (`window_rows`), and computes each frame's error metrics on the device
(`device_metrics`: the numbers of `models.scoring.error_metrics` and `models.calibration.local_errors`, for the
model and the copy-last-frame baseline), so that only they come back, not the predicted frames (those only
when asked: `maps`). `predict_videos` is the same run returning the predictions.
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path

import numpy as np

from models.data.store import video_slices
from models.errors import PipelineError
from models.io import read_json, read_marker

# Frames ahead that batch_scoring.py predicts each frame from by default: the next frame, the task PredNet
# is trained on. On Ped2 at 128x192 it beat 2 frames ahead (the model's own prediction standing in for the
# frame between) in the smoothed regularity for each of three fully trained models (0.982-0.986 against
# 0.976-0.979) and in the forest, and only it lets a window score several frames (`default_per_window`);
# 2 ahead won the unsmoothed regularity for two of the three (docs/results.md).
DEFAULT_HORIZON = 1


# The scorers built so far, per trained PredNet layer (weakly: they go with it) and (window, per_window).
# Each runs the layer itself, so it follows the layer's weights without a copy, and compiles once.
_SCORERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
METRICS = ("mse", "p_50", "p_75", "p_90", "p_95", "p_99", "std", "psnr", "patch_max")  # scoring.error_metrics


def default_per_window(window: int | None, horizon: int) -> int:
    """Frames scored per window by default: half the window when predicting the next frame, so that each
    frame is predicted from window // 2 to window - 1 frames before it, at 2 model steps per frame instead
    of `window` (on Ped2 at 32x48 and 64x96, within 0.004 AUC of one frame per window for five models,
    and the same smoothed AUC at 128x192; docs/results.md); 1 otherwise."""
    return max(window // 2, 1) if window and horizon == 1 else 1


def check_model_dir(model_dir: str | Path) -> Path:
    """`model_dir` if it is a folder train.py wrote (it holds config.json); else a PipelineError saying what it is."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise PipelineError(f"Model folder {model_dir} does not exist; run train.py first.")
    if not (model_dir / "config.json").is_file():
        marker = read_marker(model_dir)
        what = f"the output of {marker['stage']}, not a model folder" if marker else "not a model folder"
        raise PipelineError(f"{model_dir} is {what} (no config.json); pass the folder train.py wrote.")
    return model_dir


def load_predictor(model_dir: str | Path, output_mode: str = "all"):
    """The trained model of `model_dir` as a predicting model that outputs `output_mode` (the trained layer
    itself, run with those outputs: `models.prednet.predictor`), that layer, and its config.json.

    A folder holding another model than PredNet (config.json's `model`) gives that model's frame model
    (`models.registry`) and its trained core layer instead."""
    from models.prednet import find_prednet, load_model, predictor
    from models.registry import DEFAULT_MODEL, load_frame_model, model_name

    model_dir = check_model_dir(model_dir)
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
        model: a predicting model (`predictor(..., "all")`).
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
        predicted each frame, and frames per second. (`score_videos` with `maps`: scoring itself needs
        only the metrics.)
    """
    if hasattr(model, "predict_videos"):  # another model's frame model (models.registry)
        _check(window, horizon, per_window)
        return model.predict_videos(X, sources, batch_size, window, horizon, per_window, progress)
    out = score_videos(model, X, sources, batch_size, window, horizon, per_window, maps=True, progress=progress)
    return out["prediction"], out["error"], out["fps"]


def _check(window, horizon, per_window):
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


def score_videos(
    model,
    X: np.ndarray,
    sources: np.ndarray,
    batch_size: int = 4,
    window: int | None = None,
    horizon: int = 1,
    per_window: int = 1,
    cell: int | None = None,
    patch: int = 16,
    maps: bool = False,
    progress=None,
) -> dict:
    """Scores every frame of every video from earlier frames of the same video only, on the device.

    Args: as `predict_videos`, and
        cell: side of the cells of the local errors (default: `models.calibration.default_cell`).
        patch: side of the patches of `patch_max`.
        maps: also return the predicted frames (float32, (n, h, w, c)): error maps, GIFs.

    Returns:
        A dict of per-frame arrays aligned with X: `error` (n, layers), the layer errors of the step that
        predicted the frame; `model` and `copy`, dicts of the `METRICS` of the model's prediction and of the
        previous frame's (the first frame of a video: itself), as `models.scoring.error_metrics`;
        `model_cells` and `copy_cells` (n, gh, gw), as `models.calibration.local_errors`; with `maps`,
        `prediction`; and `fps`, frames scored per second.
    """
    from models.calibration import default_cell

    window = window or 0
    _check(window, horizon, per_window)
    cell = cell or default_cell(X.shape[1])
    if hasattr(model, "predict_videos"):  # another model's frame model (models.registry): metrics on the host
        return _host_scores(model, X, sources, batch_size, window, horizon, per_window, cell, patch, maps, progress)
    scorer = _scorers(model, window, per_window).get(cell, patch, maps)
    start = time.perf_counter()
    out = _run_rows(scorer, X, sources, batch_size, window, horizon, per_window, maps, progress)
    out["fps"] = len(X) / max(time.perf_counter() - start, 1e-9)
    return out


def _host_scores(model, X, sources, batch_size, window, horizon, per_window, cell, patch, maps, progress) -> dict:
    """`score_videos`'s dict from a frame model's `predict_videos`, the metrics computed in NumPy."""
    from models.calibration import copy_predictions, local_errors
    from models.scoring import error_metrics

    predictions, errors, fps = model.predict_videos(X, sources, batch_size, window, horizon, per_window, progress)
    frames, copy = X.astype(np.float32) / 255.0, copy_predictions(X, sources)
    return {
        "error": errors,
        "model": error_metrics(frames, predictions, patch),
        "copy": error_metrics(frames, copy, patch),
        "model_cells": local_errors(frames, predictions, cell),
        "copy_cells": local_errors(frames, copy, cell),
        **({"prediction": predictions} if maps else {}),
        "fps": fps,
    }


def _whole_rows(sources):
    """Whole videos as rows: start, stop and every step (-1 past the video's end, for `_run_rows`)."""
    videos = video_slices(sources)
    length = max(sl.stop - sl.start for _, sl in videos)
    starts = np.array([sl.start for _, sl in videos], np.int64)
    stops = np.array([sl.stop for _, sl in videos], np.int64)
    steps = np.where(np.arange(length) < (stops - starts)[:, None], np.arange(length), -1)
    return starts, stops, steps


def padded_rows(rows: int, batch_size: int) -> int:
    """The rows a windowed call of `rows` rows is padded to: the next power of two, at least 8, at most
    `batch_size` (a handful of shapes to compile, and a short clip is not scored as a whole batch)."""
    return min(batch_size, max(8, 1 << max(rows - 1, 0).bit_length()))


def _run_rows(scorer, X, sources, batch_size, window, horizon, per_window, maps, progress=None):
    """Frame t from the frames of its video in the row (window, or whole video) that scores it, read at its
    step; padded at the end (the model is causal, so padding never changes a step before it). With horizon
    > 1 (one frame per window) the model's own prediction replaces the frame at the steps after
    t - horizon, in the same call (closed loop), except at t itself, whose frame stays in so that the layer
    errors of its step compare it with its prediction (which does not depend on it). Rows travel as uint8,
    and a windowed call's rows are padded to a power of two from 8 up to `batch_size` (`padded_rows`), so the
    scorer compiles a few times at most and a short clip costs a few windows, not a whole batch; whole videos
    are padded to the longest of their call."""
    if window:
        starts, stops, picked = window_rows(sources, window, per_window)
        length = window
    else:
        starts, stops, picked = _whole_rows(sources)
        length = picked.shape[1]
    results: dict = {}
    for i in range(0, len(starts), batch_size):
        start, stop, step = starts[i : i + batch_size], stops[i : i + batch_size], picked[i : i + batch_size]
        steps = np.arange(length if window else step.max() + 1)
        index = start[:, None] + steps
        inside = index < stop[:, None]
        frames = np.where(inside[..., None, None, None], X[np.minimum(index, stop[:, None] - 1)], 0).astype(np.uint8)
        step = step[:, : len(steps)]
        last = step.max(axis=1)[:, None]  # with horizon > 1, the one step scored
        fed = ((steps > last - horizon) & (steps < last)).astype(np.float32)
        pick = (step[..., None] == steps).astype(np.float32)
        pad = padded_rows(len(start), batch_size) - len(start) if window else 0
        if pad:
            frames, fed, pick = (
                np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in (frames, fed, pick)
            )
        out = scorer.predict_on_batch([frames, fed, pick])
        valid = step >= 0
        rows = (start[:, None] + step)[valid]
        for name, value in out.items():
            value = np.asarray(value, np.float32)[: len(start)][valid]
            if name not in results:
                results[name] = np.zeros((len(X), *value.shape[1:]), np.float32)
            results[name][rows] = value
        if progress is not None:
            progress.update(len(rows))
    return {
        "error": results["error"],
        "model": dict(zip(METRICS, np.moveaxis(results["model"], -1, 0), strict=True)),
        "copy": dict(zip(METRICS, np.moveaxis(results["copy"], -1, 0), strict=True)),
        "model_cells": results["model_cells"],
        "copy_cells": results["copy_cells"],
        **({"prediction": results["prediction"]} if maps else {}),
    }


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


class _Scorers:
    """The compiled scorers of one trained layer and window shape, per metric settings (cell, patch, maps)."""

    def __init__(self, layer, window: int, per_window: int):
        self.layer, self.window, self.per_window = layer, window, per_window
        self.models: dict = {}

    def get(self, cell: int, patch: int, maps: bool):
        key = (cell, patch, maps)
        if key not in self.models:
            self.models[key] = metric_scorer(self.layer, self.window, self.per_window, cell, patch, maps)
        return self.models[key]


def _scorers(model, window: int, per_window: int) -> _Scorers:
    """The scorers of `model`'s trained PredNet layer for this window, built on first use and kept while the
    layer lives. They run the layer itself, so a model trained further is scored as it is now."""
    from models.prednet import find_prednet

    layer = find_prednet(model)
    scorers = _SCORERS.setdefault(layer, {})
    if (window, per_window) not in scorers:
        scorers[(window, per_window)] = _Scorers(layer, window, per_window)
    return scorers[(window, per_window)]


def metric_scorer(layer, window: int, per_window: int, cell: int, patch: int, maps: bool = False):
    """`window_scorer` with the frames' error metrics computed on the device (`device_metrics`).

    Takes [frames, fed, pick] as `window_scorer` (window 0: whole videos, any length, pick one-hot per
    step); returns `error`, `model` and `copy` (batch, per_window, len(METRICS)), `model_cells` and
    `copy_cells` (batch, per_window, gh, gw), and with `maps` the `prediction`s.
    """
    import keras
    from keras import ops

    from models.prednet import PredNetRun
    from models.prednet.model import pick_steps

    length = window or None
    frames = keras.Input((length, *layer.frame_shape), dtype="uint8", name="frames")
    fed = keras.Input((length,), name="fed")
    pick = keras.Input((per_window if window else None, length), name="pick")
    x = ops.cast(frames, "float32") / 255.0
    out = pick_steps(pick, PredNetRun(layer, "all", name="prednet_all")([x, fed]))
    # The previous frame of each picked step (step 0, a video's first frame: itself), for the baseline.
    previous = ops.concatenate([pick[..., :1] + pick[..., 1:2], pick[..., 2:], ops.zeros_like(pick[..., :1])], -1)
    truth = ops.einsum("bsk,bkhwc->bshwc", pick, x)
    metrics = _DeviceMetrics(cell, patch, name="metrics")
    model_metrics, model_cells = metrics(truth, out["prediction"])
    copy_metrics, copy_cells = metrics(truth, ops.einsum("bsk,bkhwc->bshwc", previous, x))
    outputs = {
        "error": out["error"],
        "model": model_metrics,
        "copy": copy_metrics,
        "model_cells": model_cells,
        "copy_cells": copy_cells,
    }
    if maps:
        outputs["prediction"] = out["prediction"]
    return keras.Model([frames, fed, pick], outputs, name="prednet_metric_scorer")


def _DeviceMetrics(cell: int, patch: int, name: str):
    """`device_metrics` as a Keras layer, so that it sees the tensors' actual batch size."""
    import keras

    class DeviceMetrics(keras.layers.Layer):
        def call(self, frames, predictions):
            return device_metrics(frames, predictions, cell, patch)

    return DeviceMetrics(name=name, dtype="float32")


def device_metrics(frames, predictions, cell: int, patch: int):
    """`models.scoring.error_metrics` and `models.calibration.local_errors` in `keras.ops`, for the device.

    Args:
        frames, predictions: (batch, steps, h, w, c) float32 in [0, 1].

    Returns:
        metrics (batch, steps, len(METRICS)) and the log cell errors (batch, steps, gh, gw).
    """
    from keras import ops

    from models.calibration import EPS
    from models.scoring import PERCENTILES

    h, w = frames.shape[2], frames.shape[3]
    lead = ops.shape(frames)[:2]
    se = ops.mean(ops.square(frames - predictions), axis=-1)  # (batch, steps, h, w)
    flat = ops.reshape(se, (-1, h * w))
    mse = ops.mean(flat, axis=-1)
    quantiles = ops.quantile(flat, [q / 100 for q in PERCENTILES], axis=-1)  # (5, rows)
    std = ops.std(flat, axis=-1)
    psnr = 10 * ops.log10(1.0 / ops.maximum(mse, 1e-10))
    ph, pw = min(patch, h), min(patch, w)
    blocks = ops.reshape(se[:, :, : h // ph * ph, : w // pw * pw], (-1, h // ph, ph, w // pw, pw))
    patch_max = ops.max(ops.mean(blocks, axis=(2, 4)), axis=(1, 2))
    metrics = ops.stack([mse, *[quantiles[i] for i in range(len(PERCENTILES))], std, psnr, patch_max], axis=-1)
    gh, gw = max(h // cell, 1), max(w // cell, 1)
    ch, cw = h // gh, w // gw
    cells = ops.reshape(se[:, :, : gh * ch, : gw * cw], (-1, gh, ch, gw, cw))
    cells = ops.log(ops.mean(cells, axis=(2, 4)) + EPS)
    return (
        ops.reshape(metrics, (lead[0], lead[1], len(METRICS))),
        ops.reshape(cells, (lead[0], lead[1], gh, gw)),
    )


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
