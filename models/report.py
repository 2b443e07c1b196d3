"""What batch_scoring.py writes beside the scores: both protocols side by side, event-level figures of the
live alarm, pixel-level AUROC where masks exist, and the sawtooth check.

The two protocols:
- **offline** (the published one, for comparison with the literature): the PSNR regularity, averaged over
  `smooth` centred frames and min-max scaled within each video; it needs the whole video in advance.
- **live**: the calibrated score of `models.calibration` (causal, one threshold for all videos).
Each is given for the model and for the copy-last-frame baseline scored the same way.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from models.alarms import event_metrics
from models.scoring import evaluate, side_by_side

MAX_ALARMS_LISTED = 50  # metrics.md lists this many alarms at most; alarms.csv has them all


def count(n: int, noun: str) -> str:
    """The count and the noun: 1 video, 2 videos."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def protocol_columns(smooth: int) -> dict[str, tuple[str, str]]:
    """Protocol name -> (model column, copy column)."""
    offline = f"regularity_smooth{smooth}" if smooth > 1 else "regularity"
    return {
        f"offline: regularity, {smooth}-frame centred mean, min-max per video": (
            f"model_{offline}",
            f"copy_{offline}",
        ),
        "offline, unsmoothed: regularity, min-max per video": ("model_regularity", "copy_regularity"),
        "offline, SRC: summed L2 error of the window ending at the frame, 1 - (e - min) / max per video": (
            "model_src_regularity",
            "copy_src_regularity",
        ),
        "live: calibrated score, causal, one threshold": ("model_score", "copy_score"),
    }


def protocol_table(df: pd.DataFrame, smooth: int) -> pd.DataFrame:
    """Frame-level micro and macro AUC of each protocol, model and copy baseline."""
    rows = {}
    for name, (model, copy) in protocol_columns(smooth).items():
        if model not in df or copy not in df:
            continue
        res = evaluate(df, [model, copy])
        rows[name] = {
            "model_auc": res.loc[model, "micro_auc"],
            "copy_auc": res.loc[copy, "micro_auc"],
            "model_macro_auc": res.loc[model, "macro_auc"],
            "copy_macro_auc": res.loc[copy, "macro_auc"],
        }
    return pd.DataFrame(rows).T


def event_table(df: pd.DataFrame, fps: float) -> pd.DataFrame:
    """Event-level figures of the live alarm of the model (`alarm`) and of the baseline (`copy_alarm`)."""
    return pd.DataFrame({"model": event_metrics(df, "alarm", fps), "copy": event_metrics(df, "copy_alarm", fps)}).T


def sawtooth(values: np.ndarray, contexts: np.ndarray, mask: np.ndarray) -> float:
    """How much a score follows the frame's position in its scoring window, over the frames in `mask`: the
    one-way ANOVA F statistic of the score grouped by context length (about 1 when the position explains no
    more than chance; a period-`per_window` sawtooth gives far more)."""
    from scipy.stats import f_oneway

    v, c = np.asarray(values, float)[mask], np.asarray(contexts)[mask]
    keep = np.isfinite(v)
    v, c = v[keep], c[keep]
    # A context that occurs once (the first frames of a single video) has no spread of its own: left out.
    groups = [g for g in (v[c == k] for k in np.unique(c)) if len(g) >= 2]
    if len(groups) < 2 or np.concatenate(groups).std() == 0:
        return float("nan")
    return float(f_oneway(*groups).statistic)


def sawtooth_table(df: pd.DataFrame) -> dict[str, float]:
    """`sawtooth` of the raw PSNR, of the context-corrected one and of the live score on the normal scored
    frames, the first window of each video included (where the context grows from 1: the start-up spike)."""
    mask = df["predictable"].to_numpy(copy=True)
    if "y" in df:
        mask &= df["y"].to_numpy() == 0
    contexts = df["context"].to_numpy()
    columns = ["model_psnr", "model_psnr_ctx", "model_score", "copy_psnr"]
    return {col: sawtooth(df[col].to_numpy(), contexts, mask) for col in columns if col in df}


def _rates(fps: dict[str, float]) -> str:
    """'10 frames/s', or each video's rate where they differ."""
    rates = sorted(set(fps.values()))
    if len(rates) == 1:
        return f"{rates[0]:g} frames/s"
    return "frames/s: " + ", ".join(f"{name} {rate:g}" for name, rate in fps.items())


def markdown(
    title: str,
    df: pd.DataFrame,
    protocols,
    events,
    saw,
    pixel,
    threshold: float,
    fps: dict[str, float],
    metrics=None,
    alarms: pd.DataFrame | None = None,
    settings: dict | None = None,
) -> str:
    """metrics.md: the protocols, the live alarm's events and its alarms (`alarms.csv`'s rows), pixel AUROC, the
    sawtooth, every metric's AUC, and the run's settings."""
    lines = [f"# {title}", ""]
    lines.append(
        f"{len(df)} frames of {count(df['video'].nunique(), 'video')}, {int(df['predictable'].sum())} scored"
        + (f", {int(df['y'].sum())} anomalous." if "y" in df else ", no labels.")
    )
    lines += ["", "## Frame-level AUC, both protocols", ""]
    lines.append(protocols.round(4).to_markdown() if protocols is not None else "No labels with both classes.")
    lines += [
        "",
        f"## Live alarm at the calibrated threshold (score >= {threshold:.2f}, {_rates(fps)})",
        "",
        events.round(3).to_markdown() if events is not None else "No labels: no event figures.",
    ]
    if alarms is not None:
        shown = alarms.head(MAX_ALARMS_LISTED)
        more = f" (the first {len(shown)}; all in alarms.csv)" if len(alarms) > len(shown) else " (alarms.csv)"
        lines += ["", f"{count(len(alarms), 'alarm')}{more}" + (":" if len(alarms) else "."), ""]
        if len(alarms):
            lines.append(shown.round(2).to_markdown(index=False))
    if pixel:
        lines += ["", "## Pixel-level AUROC of the heat maps (frames with masks)", ""]
        lines += [f"- {k}: {v:.4f}" for k, v in pixel.items()]
    if saw:
        lines += [
            "",
            "## Sawtooth: F statistic of each score by frames of context in its window (about 1: none; far above: "
            "the score depends on the frame's place in its window, docs/anomaly_detection.md)",
            "",
        ]
        lines += [f"- {k}: {v:.3f}" if np.isfinite(v) else f"- {k}: too few normal frames" for k, v in saw.items()]
    if metrics is not None:
        lines += ["", "## Every metric: frame-level AUC and EER, model and copy-last-frame baseline", ""]
        lines.append(side_by_side(metrics).round(4).to_markdown())
    if settings:
        lines += ["", "## Settings", ""]
        lines += [f"- {k}: {_rates(v) if k == 'fps' else v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"
