"""Figures of the pipeline: training history, scores over time with the alarms and the labels, ROC curves,
error frames, and the anomaly classifiers' feature importances. Every figure names its axes and units, in
type readable at the size written (`DPI`)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from models.data.index import label_ranges  # noqa: E402
from models.io import atomic_file  # noqa: E402
from models.scoring import anomaly_score  # noqa: E402

DPI = 100
METRICS = {
    "mse": "MSE",
    "std": "SD of squared error",
    "psnr": "PSNR",
    "psnr_ctx": "PSNR, context-corrected",
    "patch_max": "worst-patch MSE",
    "regularity": "regularity",
    "score": "live score",
    "local": "local error level",
    "live": "live error",
}
SOURCES = {"model": "model", "copy": "copy last frame"}


def readable(column: str, source: bool = True) -> str:
    """A metric column's name for a figure: 'model_p_99' -> '99th-percentile squared error (model)',
    'copy_regularity_smooth15' -> 'regularity, 15-frame mean (copy last frame)'; `source=False` leaves out
    the part in brackets."""
    prefix, _, metric = column.partition("_")
    if prefix not in SOURCES:
        prefix, metric = "", column
    smooth = re.search(r"_smooth(\d+)$", metric)
    if smooth:
        metric = metric[: smooth.start()]
    percentile = re.fullmatch(r"p_(\d+)", metric)
    layer = re.fullmatch(r"E(\d+)", metric)
    if percentile:
        name = f"{percentile.group(1)}th-percentile squared error"
    elif layer:
        name = f"layer {layer.group(1)} error"
    else:
        name = METRICS.get(metric, metric.replace("_", " "))
    if smooth:
        name += f", {smooth.group(1)}-frame mean"
    return f"{name} ({SOURCES[prefix]})" if source and prefix else name


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)


def plot_roc(df: pd.DataFrame, columns: list[str], path: Path, aucs: dict[str, float]) -> None:
    """Frame-level ROC curves (all test frames pooled) of `columns`, each labelled with its AUC."""
    data = df[df["predictable"]]
    fig, ax = plt.subplots(figsize=(6.4, 6))
    for col in columns:
        valid = data[data[col].notna()]
        fpr, tpr, _ = roc_curve(valid["y"], anomaly_score(valid, col))
        style = "-" if col.startswith("model_") else "--"
        ax.plot(fpr, tpr, style, lw=1.5, label=f"{readable(col)}: AUC {aucs[col]:.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="chance: AUC 0.5")
    ax.set(
        xlabel="false positive rate (share of normal frames flagged)",
        ylabel="true positive rate (share of anomalous frames flagged)",
        title="Frame-level ROC, all test frames pooled",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def error_frames(frames: np.ndarray, predictions: np.ndarray, min_height: int = 240) -> list[Image.Image]:
    """Frame | prediction | error map side by side, as grey images under a strip that names each panel and
    the frame number; scaled up by a whole factor (nearest pixel) to at least `min_height` pixels of frame.
    The error map is |frame - prediction|, scaled to the largest error of the whole video (white)."""
    from PIL import ImageDraw, ImageFont

    err = np.abs(frames.astype(np.float32) - predictions).mean(axis=-1)
    err = err / max(float(err.max()), 1e-6)
    h, w = err.shape[1:]
    k = max(1, -(-min_height // h))
    strip = max(16, h * k // 10)
    font = ImageFont.load_default(size=int(strip * 0.7))
    images = []
    for t, (f, p, e) in enumerate(zip(frames, predictions, err, strict=True)):
        row = np.concatenate([f.mean(axis=-1), p.mean(axis=-1), e], axis=1)
        row = np.repeat(np.repeat(np.clip(row, 0, 1), k, axis=0), k, axis=1)
        image = Image.new("L", (row.shape[1], row.shape[0] + strip), 0)
        image.paste(Image.fromarray((row * 255).astype(np.uint8)), (0, strip))
        draw = ImageDraw.Draw(image)
        for i, label in enumerate((f"frame {t + 1}", "prediction", "|error|, video max = white")):
            draw.text(((i + 0.5) * w * k, strip / 2), label, fill=255, font=font, anchor="mm")
        images.append(image)
    return images


def save_gif(images: list[Image.Image], path: Path, fps: int = 10) -> None:
    with atomic_file(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def plot_importances(table: pd.DataFrame, path: Path, classifier: str, folds: int) -> None:
    """Horizontal bars of each feature's held-out permutation importance (`models.anoms.held_out_importances`:
    the drop in ROC AUC when the feature is shuffled among held-out videos), with its spread over folds."""
    order = table.sort_values("permutation_auc_drop")
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(order) + 1.8))
    spread = order["permutation_auc_drop_std"].fillna(0) if "permutation_auc_drop_std" in order else None
    names = [readable(f, source=False) for f in order.index]
    ax.barh(names, order["permutation_auc_drop"], xerr=spread, color="tab:blue", ecolor="0.3", capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("drop in ROC AUC when the feature is shuffled (held-out videos)")
    note = " (each fold's training videos pick its metric)" if classifier == "best_single_metric" else ""
    ax.set_title(
        f"Held-out permutation importance, {classifier.replace('_', ' ')}\nmean \u00b1 SD over {folds} folds by "
        f"video{note}",
        fontsize=10,
    )
    ax.tick_params(axis="y", labelsize=9)
    _save(fig, path)


def plot_history(history_csv: Path, out_png: Path, copy_loss: float | None = None, title: str = "PredNet") -> None:
    """Training and validation loss per epoch, the best validation epoch, and the loss of copying the last
    frame on the validation windows (`copy_loss`, on the loss's own scale; None where the loss counts layers
    above the pixels, which copying has no value for, or is another model's)."""
    hist = pd.read_csv(history_csv)
    epochs = hist["epoch"] + 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = {"loss": "training windows", "val_loss": "validation windows"}
    style = "o-" if len(hist) <= 60 else "-"  # markers hide the curve over hundreds of epochs
    for col, name in names.items():
        if col in hist:
            ax.plot(epochs, hist[col], style, ms=3, lw=1.5, label=name)
    losses = hist[[c for c in names if c in hist]].to_numpy(float)
    losses = losses[np.isfinite(losses) & (losses > 0)]
    if len(losses) and losses.max() > 10 * losses.min():  # the first epochs would flatten the rest
        ax.set_yscale("log")
    if "val_loss" in hist and hist["val_loss"].notna().any():
        best = int(hist["val_loss"].idxmin())
        ax.axvline(epochs[best], color="0.5", ls=":", lw=1, label=f"best validation epoch ({epochs[best]})")
    if copy_loss is not None:
        ax.axhline(copy_loss, color="tab:red", ls="--", lw=1.2, label="copy last frame (validation windows)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    prednet = title == "PredNet"
    ax.set(
        xlabel="epoch",
        ylabel="loss: half the mean absolute pixel error\n(pixels in [0, 1]; weighted by layer)"
        if prednet
        else "loss: reconstruction error of the window\n(pixels in [0, 1])",
        title=f"{title} training: "
        + ("next-frame prediction error per epoch" if prednet else "reconstruction error per epoch"),
    )
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: never over a curve
    _save(fig, out_png)


def plot_live_scores(df: pd.DataFrame, path: Path, threshold: float, smooth: int, n_videos: int | None = None) -> None:
    """Per video: the live score (left axis, calibrated: 2 = an estimated rate of 1 normal frame in 100) with
    its threshold and alarms, the offline score (right axis: 1 - the regularity averaged over `smooth` centred
    frames, the score the README headlines; the regularity is scaled within each video) and, with labels, the
    anomalous frames shaded."""
    videos = list(dict.fromkeys(df["video"]))[:n_videos]
    offline = f"model_regularity_smooth{smooth}" if smooth > 1 else "model_regularity"
    labelled = "y" in df
    fig, axes = plt.subplots(len(videos), 1, figsize=(10, 2.1 * len(videos) + 0.9), squeeze=False)
    offline_name = f"1 - regularity, {smooth}-frame centred mean" if smooth > 1 else "1 - regularity"
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
        ax.plot(frames, g["score"], color="tab:blue", lw=1.3, label="live score (left axis)")
        ax.axhline(threshold, color="red", ls="--", lw=0.9, label=f"threshold {threshold:.1f}")
        ax.set_ylim(0, top)
        ax.set_ylabel(f"{video}\nlive score", fontsize=9)
        ax.tick_params(labelsize=8)
        if offline in g:
            twin = ax.twinx()
            twins.append(twin)
            twin.plot(
                frames,
                1 - g[offline],
                color="tab:green",
                lw=1.1,
                alpha=0.85,
                label=f"offline: {offline_name} (right axis)",
            )
            twin.set_ylim(-0.05, 1.05)
            twin.set_ylabel("offline\n1 - regularity", fontsize=8)
            twin.tick_params(labelsize=8)
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
    fig.legend(handles, labels, loc="upper center", ncol=3, fontsize=8, frameon=False)
    what = "" if labelled else " (no labels)"
    axes[0, 0].set_title(
        "live score: causal, calibrated on normal video (2 = an estimated 1 normal frame in 100); offline: "
        "regularity scaled within each video" + what,
        fontsize=9,
    )
    axes[-1, 0].set_xlabel("frame number", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / fig.get_figheight()))
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
