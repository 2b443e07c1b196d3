"""Stage 3: per-frame prediction-error metrics and their frame-level evaluation against labels.

Every frame of every test video gets a row. A frame is predicted only from earlier frames of the same
video. The first frame of each video cannot be predicted, and the next few are not scored when a
prediction must have seen more frames (batch_scoring.py --warmup, --horizon): such frames are kept with
`predictable = False` and NaN metrics, and left out of the evaluation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from models.data.store import video_slices

PERCENTILES = (50, 75, 90, 95, 99)
# Metrics where a larger value means a more normal frame; evaluation negates them.
HIGHER_IS_NORMAL = ("psnr", "psnr_ctx", "regularity", "src_regularity")


def error_metrics(frames: np.ndarray, predictions: np.ndarray, patch: int = 16) -> dict[str, np.ndarray]:
    """Metrics of the squared prediction error of each frame.

    Args:
        frames: (n, h, w, c) true frames in [0, 1].
        predictions: (n, h, w, c) predicted frames in [0, 1].
        patch: side of the square patches for `patch_max` (clipped to the frame).

    Returns:
        Arrays of length n: `mse`, `p_50` ... `p_99` (percentiles of the per-pixel squared error), `std`,
        `psnr` (dB, peak 1), and `patch_max` (the largest mean squared error of a patch).
    """
    se = ((frames.astype(np.float32) - predictions.astype(np.float32)) ** 2).mean(axis=-1)  # (n, h, w)
    n, h, w = se.shape
    flat = se.reshape(n, -1)
    out = {"mse": flat.mean(axis=1)}
    for q, values in zip(PERCENTILES, np.percentile(flat, PERCENTILES, axis=1), strict=True):
        out[f"p_{q}"] = values
    out["std"] = flat.std(axis=1)
    out["psnr"] = 10 * np.log10(1.0 / np.maximum(out["mse"], 1e-10))
    ph, pw = min(patch, h), min(patch, w)
    blocks = se[:, : h // ph * ph, : w // pw * pw].reshape(n, h // ph, ph, w // pw, pw).mean(axis=(2, 4))
    out["patch_max"] = blocks.reshape(n, -1).max(axis=1)
    return out


def min_max_per_video(values: pd.Series, videos: pd.Series) -> pd.Series:
    """(v - min) / (max - min) within each video (the regularity score of Liu et al. 2018 when v is PSNR)."""
    grouped = values.groupby(videos)
    lo, hi = grouped.transform("min"), grouped.transform("max")
    return (values - lo) / (hi - lo).replace(0, np.nan)


def regularity_source(df: pd.DataFrame, prefix: str) -> str:
    """The PSNR the regularity is made of: the context-corrected one (`<prefix>_psnr_ctx`, written by live
    scoring) when the table has it, else the raw PSNR."""
    return f"{prefix}_psnr_ctx" if f"{prefix}_psnr_ctx" in df else f"{prefix}_psnr"


def add_regularity(df: pd.DataFrame, prefixes=("model", "copy")) -> pd.DataFrame:
    for prefix in prefixes:
        df[f"{prefix}_regularity"] = min_max_per_video(df[regularity_source(df, prefix)], df["video"])
    return df


def src_regularity(values: pd.Series, videos: pd.Series) -> pd.Series:
    """1 - (e - min) / max within each video: the regularity of a sequence reconstruction cost e as in
    Chong & Tay 2017 and the seed (divided by the video's largest cost, not by its range)."""
    grouped = values.groupby(videos)
    lo, hi = grouped.transform("min"), grouped.transform("max")
    scaled = (values - lo) / hi.replace(0, np.nan)
    return 1 - scaled.where(hi != 0, 0.0).where(values.notna())  # a video with no cost at all: regular


def add_src(df: pd.DataFrame, window: int, pixels: int, prefixes=("model", "copy")) -> pd.DataFrame:
    """Adds `<prefix>_src` where missing and `<prefix>_src_regularity`: the sequence reconstruction cost
    (SRC) of the `window` frames ending at each frame, and its regularity per video (`src_regularity`).

    A model that reconstructs whole windows gives its own SRC (`model_src`: the summed L2 norm of the
    errors of one reconstruction of the window). For a source of one frame at a time (PredNet's
    predictions, the copy baseline) it is the trailing sum over the window of each frame's L2 error norm,
    sqrt(mse * pixels); frames with no score add nothing. Every frame of the sum is at or before the frame
    scored, but the per-video scaling needs the whole video: an offline score.
    """
    for prefix in prefixes:
        column = f"{prefix}_src"
        if column not in df:
            norms = pd.Series(np.sqrt(df[f"{prefix}_mse"].to_numpy() * pixels), index=df.index)
            summed = norms.groupby(df["video"]).transform(lambda v: v.rolling(window, min_periods=1).sum())
            df[column] = summed.where(df["predictable"])
        df[f"{prefix}_src_regularity"] = src_regularity(df[column], df["video"])
    return df


def smooth(df: pd.DataFrame, features: list[str], window: int) -> pd.DataFrame:
    """Centred rolling mean of each feature over `window` neighbouring frames of the same video (it looks
    window // 2 frames ahead, so it suits offline scoring, not a live alarm)."""
    if window <= 1:
        return df
    out = df.copy()
    out[features] = df.groupby("video")[features].transform(
        lambda v: v.rolling(window, center=True, min_periods=1).mean()
    )
    return out


def add_smoothed(df: pd.DataFrame, window: int, prefixes=("model", "copy")) -> pd.DataFrame:
    """Adds `<prefix>_regularity_smooth<window>` and `<prefix>_patch_max_smooth<window>` (nothing when
    window <= 1).

    The smoothed regularity is the regularity of the smoothed PSNR: the rolling mean comes first and the
    per-video min-max last, so that each video's final score spans [0, 1] as the unsmoothed one does
    (smoothing an already normalised score shrinks each video's range by a different amount).
    """
    if window <= 1:
        return df
    columns = [c for p in prefixes for c in (regularity_source(df, p), f"{p}_patch_max")]
    smoothed = smooth(df[["video", *columns]], columns, window)
    if "predictable" in df:  # frames with no score get no smoothed score either
        smoothed.loc[~df["predictable"], columns] = np.nan
    for prefix in prefixes:
        psnr = smoothed[regularity_source(df, prefix)]
        df[f"{prefix}_regularity_smooth{window}"] = min_max_per_video(psnr, df["video"])
        df[f"{prefix}_patch_max_smooth{window}"] = smoothed[f"{prefix}_patch_max"]
    return df


def frame_table(sources, y, metrics: dict, layer_errors, first_scored: int = 1, error_names=None) -> pd.DataFrame:
    """One row per test frame: video, frame (1-based), label, predictable, model and baseline metrics.

    `metrics`: source ('model', 'copy') -> the arrays of `error_metrics` (computed on the device by
    `models.inference.score_videos`). The first `first_scored` frames of each video (at least the first,
    which nothing precedes) are kept with `predictable = False` and NaN metrics: the model had too little of
    the video to predict them from. The model's own errors per frame (`layer_errors`, n x k) become columns
    `model_<name>` for `error_names` (default: PredNet's layer errors, E0, E1, ...)."""
    predictable = np.ones(len(sources), bool)
    frame_no = np.zeros(len(sources), int)
    for _, sl in video_slices(sources):
        predictable[sl.start : sl.start + max(first_scored, 1)] = False
        frame_no[sl] = np.arange(1, sl.stop - sl.start + 1)
    df = pd.DataFrame({"video": sources, "frame": frame_no})
    if y is not None:
        df["y"] = y.astype(int)
    df["predictable"] = predictable
    columns = {f"model_{k}": np.where(predictable, v, np.nan) for k, v in metrics["model"].items()}
    names = error_names or [f"E{l}" for l in range(layer_errors.shape[1])]
    for l, name in enumerate(names):
        columns[f"model_{name}"] = np.where(predictable, layer_errors[:, l], np.nan)
    columns |= {f"copy_{k}": np.where(predictable, v, np.nan) for k, v in metrics["copy"].items()}
    df = pd.concat([df, pd.DataFrame(columns)], axis=1)
    return add_regularity(df)


def number_in_video(df: pd.DataFrame, steps: dict[str, int]) -> None:
    """Gives each row of `frame_table` its frame's number in its video when 1 frame in `steps[video]` was scored
    (`batch_scoring.py --sample_fps`): the k-th frame scored is frame 1 + (k - 1) * step."""
    if steps:
        df["frame"] = 1 + (df["frame"] - 1) * df["video"].map(steps).fillna(1).astype(int).to_numpy()


def portable(df: pd.DataFrame) -> pd.DataFrame:
    """Plain-object strings in the labels and columns, so that a pickle written where pandas stores strings
    in pyarrow (a GPU machine, say) loads where pyarrow is not installed."""
    df = df.copy()
    df.columns = pd.Index([str(c) for c in df.columns], dtype=object)
    for col in df.columns:
        if pd.api.types.is_string_dtype(df[col]) and df[col].dtype != object:
            df[col] = df[col].astype(object)
    return df


def anomaly_score(df: pd.DataFrame, column: str) -> pd.Series:
    """The column oriented so that larger means more anomalous."""
    base = column.split("_", 1)[1] if "_" in column else column
    base = base.split("_smooth", 1)[0]  # a smoothed score keeps the orientation of its metric
    return -df[column] if base in HIGHER_IS_NORMAL else df[column]


def equal_error_rate(y: np.ndarray, score: np.ndarray) -> float:
    """The error rate where the false positive rate equals the false negative rate."""
    fpr, tpr, _ = roc_curve(y, score)
    fnr = 1 - tpr
    i = int(np.nanargmin(np.abs(fnr - fpr)))
    return float((fpr[i] + fnr[i]) / 2)


def evaluate(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Frame-level ROC AUC (micro: all frames together; macro: mean over videos with both classes) and EER.

    Only predictable frames with labels count.
    """
    rows = []
    data = df[df["predictable"]]
    for col in columns:
        valid = data[data[col].notna()]
        y, score = valid["y"].to_numpy(), anomaly_score(valid, col).to_numpy()
        if len(np.unique(y)) < 2:
            rows.append({"metric": col, "micro_auc": np.nan, "macro_auc": np.nan, "eer": np.nan})
            continue
        per_video = [
            roc_auc_score(g["y"], anomaly_score(g, col)) for _, g in valid.groupby("video") if g["y"].nunique() == 2
        ]
        rows.append(
            {
                "metric": col,
                "micro_auc": roc_auc_score(y, score),
                "macro_auc": float(np.mean(per_video)) if per_video else np.nan,
                "eer": equal_error_rate(y, score),
            }
        )
    return pd.DataFrame(rows).set_index("metric")


def side_by_side(results: pd.DataFrame) -> pd.DataFrame:
    """Model and copy-last-frame metrics in one row per metric name, for the printed table."""
    table = {}
    for col, row in results.iterrows():
        source, name = col.split("_", 1)
        for k, v in row.items():
            table.setdefault(name, {})[f"{source}_{k}"] = v
    return pd.DataFrame(table).T


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The score columns of the model and the baseline (not their 0/1 alarm states)."""
    return [c for c in df.columns if c.startswith(("model_", "copy_")) and not c.endswith("_alarm")]
