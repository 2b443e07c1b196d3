"""Figures of the scoring stage: scores over time with the ground truth, ROC curves, error frames."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from models.data.index import label_ranges  # noqa: E402
from models.io import atomic_file  # noqa: E402
from models.scoring import anomaly_score  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def plot_scores(df: pd.DataFrame, columns: list[str], path: Path, n_videos: int | None = None) -> None:
    """Anomaly score (1 - regularity, or the raw metric) over time per video, anomalous frames shaded."""
    videos = list(dict.fromkeys(df["video"]))[:n_videos]
    fig, axes = plt.subplots(len(videos), 1, figsize=(9, 1.8 * len(videos)), squeeze=False, sharex=False)
    for ax, video in zip(axes[:, 0], videos, strict=True):
        g = df[df["video"] == video]
        if "y" in g:
            for s, e in label_ranges(g["y"].to_numpy()):
                ax.axvspan(s - 0.5, e + 0.5, color="red", alpha=0.15, lw=0)
        for col in columns:
            score = anomaly_score(g, col)
            lo, hi = score.min(), score.max()
            ax.plot(g["frame"], (score - lo) / (hi - lo if hi > lo else 1), label=col, lw=1)
        ax.set_ylabel(video, fontsize=8)
        ax.set_ylim(-0.05, 1.05)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    axes[0, 0].set_title("anomaly score per video (min-max scaled), ground truth shaded", fontsize=9)
    axes[-1, 0].set_xlabel("frame")
    _save(fig, path)


def plot_roc(df: pd.DataFrame, columns: list[str], path: Path, aucs: dict[str, float]) -> None:
    data = df[df["predictable"]]
    fig, ax = plt.subplots(figsize=(5, 5))
    for col in columns:
        valid = data[data[col].notna()]
        fpr, tpr, _ = roc_curve(valid["y"], anomaly_score(valid, col))
        ax.plot(fpr, tpr, label=f"{col} (AUC {aucs[col]:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="frame-level ROC (micro)")
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def error_frames(frames: np.ndarray, predictions: np.ndarray) -> list[Image.Image]:
    """Frame | prediction | error map side by side, as grey images."""
    err = np.abs(frames.astype(np.float32) - predictions).mean(axis=-1)
    err = err / max(float(err.max()), 1e-6)
    images = []
    for f, p, e in zip(frames, predictions, err, strict=True):
        row = np.concatenate([f.mean(axis=-1), p.mean(axis=-1), e], axis=1)
        images.append(Image.fromarray((np.clip(row, 0, 1) * 255).astype(np.uint8)))
    return images


def save_gif(images: list[Image.Image], path: Path, fps: int = 10) -> None:
    with atomic_file(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def plot_importances(table: pd.DataFrame, path: Path) -> None:
    """Horizontal bars of the impurity and permutation importances of each feature."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.3 * len(table) + 1.5), sharey=True)
    for ax, col in zip(axes, table.columns, strict=True):
        ax.barh(table.index[::-1], table[col][::-1])
        ax.set_title(col, fontsize=9)
    _save(fig, path)


def plot_live_scores(df: pd.DataFrame, path: Path, threshold: float, smooth: int, n_videos: int | None = None) -> None:
    """Per video: the live score (left axis, calibrated: 2 = 1 normal frame in 100) with its threshold and
    alarms, and the offline score (right axis: 1 - the smoothed regularity, scaled within the video)."""
    videos = list(dict.fromkeys(df["video"]))[:n_videos]
    offline = f"model_regularity_smooth{smooth}" if smooth > 1 else "model_regularity"
    labelled = "y" in df
    fig, axes = plt.subplots(len(videos), 1, figsize=(9, 1.9 * len(videos) + 0.6), squeeze=False)
    top = max(float(np.nanmax(df["score"].to_numpy(float), initial=0.0)), threshold) * 1.1 + 0.1
    twins = []
    for ax, video in zip(axes[:, 0], videos, strict=True):
        g = df[df["video"] == video]
        frames = g["frame"].to_numpy()
        if labelled:
            for s, e in label_ranges(g["y"].to_numpy()):
                ax.axvspan(frames[s - 1] - 0.5, frames[e - 1] + 0.5, color="red", alpha=0.12, lw=0)
        for s, e in label_ranges(g["alarm"].to_numpy()):
            ax.axvspan(frames[s - 1] - 0.5, frames[e - 1] + 0.5, ymin=0.92, ymax=1.0, color="darkorange", lw=0)
        ax.plot(frames, g["score"], color="tab:blue", lw=1.2, label="live score (left axis)")
        ax.axhline(threshold, color="red", ls="--", lw=0.9, label=f"threshold {threshold:.1f}")
        ax.set_ylim(0, top)
        ax.set_ylabel(f"{video}\nscore", fontsize=8)
        ax.tick_params(labelsize=7)
        if offline in g:
            twin = ax.twinx()
            twins.append(twin)
            twin.plot(frames, 1 - g[offline], color="tab:green", lw=0.9, alpha=0.8, label="offline score (right axis)")
            twin.set_ylim(-0.05, 1.05)
            twin.set_ylabel("offline", fontsize=7)
            twin.tick_params(labelsize=7)
        ax.set_xlim(frames[0] - 0.5, frames[-1] + 0.5)
    first = axes[0, 0]
    legend_axes = [first] + twins[:1]
    handles = [h for a in legend_axes for h in a.get_legend_handles_labels()[0]]
    labels = [lbl for a in legend_axes for lbl in a.get_legend_handles_labels()[1]]
    handles.append(plt.Rectangle((0, 0), 1, 1, color="darkorange"))
    labels.append("alarm")
    if labelled:
        handles.append(plt.Rectangle((0, 0), 1, 1, color="red", alpha=0.12))
        labels.append("labelled anomalous")
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=7, frameon=False)
    what = "" if labelled else " (no labels)"
    axes[0, 0].set_title(
        f"live score: causal, calibrated on normal video; offline: {smooth}-frame centred mean, min-max per video"
        + what,
        fontsize=8,
        pad=14,
    )
    axes[-1, 0].set_xlabel("frame")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
