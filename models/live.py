"""Live scoring: a trained model's per-frame metrics, its calibrated live score and alarms, for any frames.

`score_frames` is the one way a score is computed, for a prepared test set, for video files
(`batch_scoring.py --input`) and for the web service; `calibrate` fits a `Calibration` on normal video with
the same predictions. Both predict each frame from earlier frames of its video only, in the windows the
calibration names (`models.inference.predict_videos`).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from models.alarms import AlarmRule, alarm_states
from models.calibration import (
    DEFAULT_FPR,
    DEFAULT_SMOOTH,
    Calibration,
    apply_calibration,
    copy_predictions,
    default_cell,
    fit_calibration,
    local_errors,
)
from models.data.store import video_slices
from models.inference import frame_contexts, score_videos

log = logging.getLogger(__name__)

# Normal calibration frames expected over the threshold, at least, for its false-alarm rate to be measured
# rather than guessed (10 at a false-positive rate of 0.01: 1000 frames, under 2 minutes at 10 frames/s).
MIN_FRAMES_OVER_THRESHOLD = 10


def predictable_mask(sources: np.ndarray, first_scored: int) -> np.ndarray:
    """False for the first `first_scored` frames of each video (at least the first: nothing precedes it)."""
    mask = np.ones(len(sources), bool)
    for _, sl in video_slices(sources):
        mask[sl.start : sl.start + max(first_scored, 1)] = False
    return mask


def scoring_settings(
    config: dict, window: int | None = None, per_window: int | None = None, warmup: int = 1, horizon: int = 1
) -> dict:
    """Window, frames per window, horizon and first scored frame: the model's training window and the
    defaults of batch_scoring.py unless given."""
    from models.registry import get, model_name

    window = config.get("arguments", {}).get("nt", 0) if window is None else window
    return {
        "window": int(window),
        "per_window": int(per_window or get(model_name(config)).default_per_window(window, horizon)),
        "horizon": horizon,
        "first_scored": int(warmup + horizon - 1),
    }


def _local(X, sources, predictions, cell):
    """The local errors of the model's predictions and of the copy baseline, in NumPy (`score_videos`
    computes the same on the device)."""
    return {"model": local_errors(X, predictions, cell), "copy": local_errors(X, copy_predictions(X, sources), cell)}


def calibrate(
    model,
    X: np.ndarray,
    sources: np.ndarray,
    tail_videos,
    settings: dict,
    smooth: int = DEFAULT_SMOOTH,
    fpr: float = DEFAULT_FPR,
    batch_size: int = 64,
    fitted_on: dict | None = None,
    progress=None,
) -> Calibration:
    """Fits the live score's calibration on normal frames.

    Args:
        model: a predicting model (`load_predictor`).
        X, sources: normal frames (uint8, the model's size) and the video of each.
        tail_videos: the videos whose live values set the exceedance (held-out normal video; all if None).
        settings: `scoring_settings`.
        smooth: frames of the trailing mean.
        fpr: the default alarm's false-positive rate on normal frames.
    """
    cell = default_cell(X.shape[1])
    out = score_videos(
        model, X, sources, batch_size, settings["window"], settings["horizon"], settings["per_window"], cell,
        progress=progress,
    )  # fmt: skip
    contexts = frame_contexts(sources, settings["window"], settings["per_window"], settings["horizon"])
    predictable = predictable_mask(sources, settings["first_scored"])
    tail = np.ones(len(X), bool) if tail_videos is None else np.isin(sources, list(tail_videos))
    scored = int((tail & predictable).sum())
    if scored * fpr < MIN_FRAMES_OVER_THRESHOLD:
        log.warning(
            "the alarm threshold rests on %d scored normal frames: at a false-positive rate of %g about %.1f of "
            "them lie over it, too few to trust that rate; calibrate on a few minutes of normal footage (%d frames "
            "or more)",
            scored,
            fpr,
            scored * fpr,
            int(np.ceil(MIN_FRAMES_OVER_THRESHOLD / fpr)),
        )
    return fit_calibration(
        {"model": out["model_cells"], "copy": out["copy_cells"]},
        contexts,
        predictable,
        sources,
        tail,
        {**settings, "cell": cell, "smooth": smooth, "fpr": fpr, "fitted_on": fitted_on or {}},
    )


def score_frames(
    model,
    X: np.ndarray,
    sources: np.ndarray,
    calibration: Calibration,
    y: np.ndarray | None = None,
    batch_size: int = 64,
    patch: int = 16,
    rule: AlarmRule | None = None,
    progress=None,
    maps: bool = False,
):
    """Scores every frame: the metrics of `models.scoring.frame_table`, and the live columns.

    The metrics are computed on the device (`models.inference.score_videos`); the predicted frames come back
    only with `maps`.

    Returns:
        df: one row per frame with `model_local`, `model_live`, `model_score` (and `copy_*` for the baseline),
            `score` (= model_score, the live anomaly score) and `alarm` (0/1, by `rule`, default the
            calibration's threshold).
        heats: source -> (n, gh, gw) heat maps (NaN where not scored).
        predictions: (n, h, w, c) the model's predictions with `maps`, else None.
        fps: frames scored per second.
    """
    from models.scoring import add_regularity, add_src, frame_table

    c = calibration
    out = score_videos(model, X, sources, batch_size, c.window, c.horizon, c.per_window, c.cell, patch, maps, progress)
    df = frame_table(sources, y, out, out["error"], c.first_scored, getattr(model, "error_names", None))
    contexts = frame_contexts(sources, c.window, c.per_window, c.horizon)
    local = {"model": out["model_cells"], "copy": out["copy_cells"]}
    columns, heats = apply_calibration(c, local, contexts, df["predictable"].to_numpy(), sources)
    for source in heats:  # the PSNR without its dependence on the context (`Calibration.psnr_offset`)
        columns[f"{source}_psnr_ctx"] = df[f"{source}_psnr"].to_numpy() + c.psnr_offset(source, contexts)
    df = pd.concat([df, pd.DataFrame(columns, index=df.index)], axis=1)
    df = add_regularity(df)
    df = add_src(df, c.window or 1, int(np.prod(X.shape[1:])))
    df["context"] = contexts
    df["score"] = df["model_score"]
    rule = rule or AlarmRule(c.threshold)
    df["alarm"] = alarm_states(df["score"].to_numpy(), sources, rule)
    df["copy_alarm"] = alarm_states(df["copy_score"].to_numpy(), sources, rule)
    return df, heats, out.get("prediction"), out["fps"]
