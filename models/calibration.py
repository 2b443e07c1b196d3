"""Calibration on normal video: what the prediction error looks like at each place of the frame, and how
often normal frames reach a given score, so that a live score means the same in every video.

The live score of a frame, for a source of predictions (the model, or copying the last frame):

1. `local_errors`: the squared prediction error averaged over the cells of a grid (8 rows by default, cells
   `cell` pixels square), in log: L[t, p] = log(mse of cell p + eps).
2. The normal level of each cell and of each context length: a frame scored with c frames of context in its
   window (`frame_contexts`) is predicted worse when c is small, so L[t, p] ~ mu[p] + delta[c] on normal
   video, fitted on normal frames (the training videos and the val videos: many frames per place).
   `heat` = L - mu - delta: the log of how many times the normal error of that place the error is (1: e
   times, 2.3: ten times); removing delta[c] removes the period-`per_window` sawtooth of windowed scoring
   and the higher error at each video's start. (Dividing by each cell's normal spread as well, a z-score, was
   measured and is worse: cells where normal error hardly varies, such as empty background, then turn
   small changes of light or camera noise in new video into large scores; docs/experiments.md.)
3. `local` = the largest heat of the frame (where the frame is least normal), and `live` its mean over the
   last `smooth` frames (trailing: no look-ahead). The first frames of a video have fewer frames to average,
   and a mean of fewer frames strays further: its distance from the normal median is scaled by the normal
   spread of `smooth`-frame means over that of k-frame means (`NormalTail.spread`, measured on the same
   normal frames; the tail is fitted to the values so scaled), so that the start of a video or a stream
   reaches a score about as often as any other frame. This assumes that means of fewer frames differ in
   scale only: exact for Gaussian values; for skewed ones the first frames still reach a score up to about
   twice as often (simulated: 0.97% against 0.60% for Gumbel values, 1.35% against 0.72% for lognormal,
   where unscaled they reached it 8.5% and 5.9% of the time).
4. `score` = -log10 of the fraction of normal frames whose live value is at least as high, estimated on the
   normal val videos (held out from training, so their errors are those of new normal video), with an
   exponential tail above their 90th percentile: a score of 2 is where this estimate puts 1 normal frame in
   100, on one scale for every video (an estimate from a sample of normal frames: other normal video reaches
   it more or less often); the default alarm threshold is the score of a false-positive rate (`fpr`, 1%).

`Calibration` is stored as `calibration.json` in the model folder (train.py writes it at the end of
training); `batch_scoring.py --calibrate_on` fits a new one from a camera's normal footage.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from models.errors import PipelineError
from models.io import read_json, write_json

FILENAME = "calibration.json"
EPS = 1e-5  # squared error floor of a cell (PSNR 50 dB): copying a static background errs by exactly 0
DEFAULT_FPR = 0.01
DEFAULT_SMOOTH = 5
GRID_ROWS = 8
TAIL_QUANTILE = 0.9
MAX_NORMAL_VALUES = 20000
SOURCES = ("model", "copy")


def default_cell(height: int) -> int:
    """Cell side in pixels: an 8-row grid (16 pixels at 128x192, 4 at 32x48)."""
    return max(1, height // GRID_ROWS)


def local_errors(frames: np.ndarray, predictions: np.ndarray, cell: int) -> np.ndarray:
    """log(mean squared error + EPS) of each `cell`-pixel square cell: (n, h // cell, w // cell).

    Args:
        frames: (n, h, w, c) uint8 frames, or floats in [0, 1].
        predictions: (n, h, w, c) predictions in [0, 1].
        cell: cell side in pixels.
    """
    x = frames.astype(np.float32) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float32)
    se = ((x - predictions.astype(np.float32)) ** 2).mean(axis=-1)
    n, h, w = se.shape
    gh, gw = max(h // cell, 1), max(w // cell, 1)
    ch, cw = h // gh, w // gw
    cells = se[:, : gh * ch, : gw * cw].reshape(n, gh, ch, gw, cw).mean(axis=(2, 4))
    return np.log(cells + EPS).astype(np.float32)


def copy_predictions(frames: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """The copy-last-frame baseline's prediction of each frame, in [0, 1] (a video's first frame: itself)."""
    from models.data.store import video_slices

    x = frames.astype(np.float32) / 255.0
    previous = np.empty_like(x)
    for _, sl in video_slices(sources):
        previous[sl.start] = x[sl.start]
        previous[sl.start + 1 : sl.stop] = x[sl.start : sl.stop - 1]
    return previous


@dataclass
class LocalNorm:
    """The normal log error of each cell (mu), and two offsets per context length: of the frame's largest
    cell (delta, taken out of the heat maps and so of the live score) and of the frame's log mean squared
    error (delta_mse, taken out of the PSNR of the offline score)."""

    mu: list
    delta: list
    delta_mse: list

    @classmethod
    def fit(cls, errors: np.ndarray, contexts: np.ndarray, n_contexts: int, iterations: int = 3) -> LocalNorm:
        """Fits mu[p] + delta[c] to normal log errors (n, gh, gw) with contexts (n,) in [0, n_contexts).

        mu comes from the frames with their context's offset of the mean log cell error taken out; each
        offset is a median over the normal frames of that context, relative to the median frame (the
        common contexts carry none), so that a handful of frames per context (the first frames of each
        video) is enough.
        """
        if len(errors) < 2:
            raise PipelineError(f"Calibration needs at least 2 scored normal frames. Received: {len(errors)}")
        flat = errors.reshape(len(errors), -1)
        seen = np.isin(np.arange(n_contexts), contexts)
        delta = np.zeros(n_contexts, np.float64)
        for _ in range(iterations):
            mu = (errors - delta[contexts][:, None, None]).mean(axis=0)
            delta = _context_offsets(flat.mean(axis=1) - mu.mean(), contexts, n_contexts)
        peak = (flat - mu.reshape(-1)).max(axis=1)
        log_mse = np.log(np.maximum(np.exp(flat).mean(axis=1) - EPS, EPS))
        return cls(
            mu.tolist(),
            _fill_unseen(_context_offsets(peak, contexts, n_contexts), seen).tolist(),
            _fill_unseen(_context_offsets(log_mse, contexts, n_contexts), seen).tolist(),
        )

    def heat(self, errors: np.ndarray, contexts: np.ndarray) -> np.ndarray:
        """errors - mu - delta[context]: the log of each cell's error over its normal error, (n, gh, gw)."""
        mu, delta = (np.asarray(v, np.float32) for v in (self.mu, self.delta))
        if errors.shape[1:] != mu.shape:
            raise PipelineError(f"Calibration is for a {mu.shape} grid of cells; the frames give {errors.shape[1:]}.")
        c = np.clip(contexts, 0, len(delta) - 1)
        return errors - mu[None] - delta[c][:, None, None]


def _context_offsets(values: np.ndarray, contexts: np.ndarray, n_contexts: int) -> np.ndarray:
    """The median of `values` over the frames of each context, less their median over all frames."""
    out = np.zeros(n_contexts, np.float64)
    for c in np.unique(contexts):
        out[c] = np.median(values[contexts == c])
    return out - np.median(out[contexts])


def _fill_unseen(values: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Contexts never seen in the normal frames take the value of the nearest one seen."""
    if seen.all() or not seen.any():
        return values
    idx = np.flatnonzero(seen)
    nearest = idx[np.abs(np.arange(len(values))[:, None] - idx[None]).argmin(axis=1)]
    return values[nearest]


def trailing_mean(values: np.ndarray, videos: np.ndarray, window: int) -> np.ndarray:
    """Mean over the last `window` frames of the same video with a value (NaN frames skipped and kept NaN)."""
    series = pd.Series(values, dtype=float)
    out = series.groupby(np.asarray(videos)).transform(lambda v: v.rolling(window, min_periods=1).mean())
    return np.where(np.isnan(values), np.nan, out.to_numpy())


def trailing_count(values: np.ndarray, videos: np.ndarray, window: int) -> np.ndarray:
    """How many values `trailing_mean` averages at each frame (0 where it is NaN)."""
    series = pd.Series(values, dtype=float)
    out = series.groupby(np.asarray(videos)).transform(lambda v: v.rolling(window, min_periods=1).count())
    return np.where(np.isnan(values), 0, out.to_numpy()).astype(int)


def mean_spreads(values: np.ndarray, videos: np.ndarray, window: int) -> list[float]:
    """The standard deviation of the means of k consecutive values of the same video, for k = 1 ... `window`
    (on normal frames: how far a mean of k frames strays). Empty (no scaling of shorter means) when the
    videos are too short for two full means of `window` values, or those do not vary: nothing to scale to."""
    groups, spreads = pd.Series(values, dtype=float).groupby(np.asarray(videos)), []
    for k in range(window, 0, -1):
        means = groups.transform(lambda v, k=k: v.rolling(k).mean()).to_numpy()
        means = means[np.isfinite(means)]
        spread = float(np.std(means, ddof=1)) if len(means) > 1 else 0.0
        if not spread > 0:
            if not spreads:
                return []
            spread = spreads[-1]  # a longer mean's: no scaling for this k
        spreads.append(spread)
    return spreads[::-1]


@dataclass
class NormalTail:
    """The distribution of a live value on normal frames, as sorted values, turned into -log10 exceedance."""

    values: list
    frames: int = 0  # normal frames fitted on (`values` keeps at most MAX_NORMAL_VALUES quantiles of them)
    # The normal spread of means of k frames, k = 1 ... smooth (`mean_spreads`); empty in calibrations written
    # before 2026-12-03, whose first frames of each video are scored like the others.
    spread: list = field(default_factory=list)

    @classmethod
    def fit(cls, values: np.ndarray, spread: list[float] | None = None) -> NormalTail:
        values = np.sort(np.asarray(values, np.float64)[np.isfinite(values)])
        if len(values) < 10:
            raise PipelineError(f"Calibration needs at least 10 scored normal frames. Received: {len(values)}")
        frames = len(values)
        if len(values) > MAX_NORMAL_VALUES:
            values = np.quantile(values, np.linspace(0, 1, MAX_NORMAL_VALUES))
        return cls(values.tolist(), frames, list(spread or []))

    def as_full_mean(self, live: np.ndarray, counts: np.ndarray | None) -> np.ndarray:
        """Live values that are means of `counts` frames, fewer than `smooth` at a video's start, moved toward
        the normal median by the ratio of the normal spreads of full means and of means of that many frames
        (never away from it), so that they are as rare as full means."""
        live = np.asarray(live, np.float64)
        if counts is None or len(self.spread) < 2:
            return live
        spread = np.asarray(self.spread, np.float64)
        ratio = np.minimum(spread[-1] / spread, 1.0)[np.clip(np.asarray(counts), 1, len(spread)) - 1]
        center = float(np.median(self.values))
        return np.where(ratio < 1, center + (live - center) * ratio, live)

    @property
    def observed_fpr(self) -> float:
        """The smallest false-positive rate the normal frames show directly (1 / (frames + 1)); a smaller one
        is read off the exponential tail fitted beyond the data."""
        return 1.0 / ((self.frames or len(self.values)) + 1)

    def score(self, live: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
        """-log10 P(normal live value >= live): 2 means an estimated 1 normal value in 100 is as high. `counts`:
        how many frames each live value averages (`as_full_mean`); None: all of them."""
        live = self.as_full_mean(live, counts)
        normal = np.asarray(self.values)
        n = len(normal)
        exceed = (n - np.arange(n)) / (n + 1)  # the share of normal values >= each sorted value
        q = float(np.quantile(normal, TAIL_QUANTILE))
        p_q = float(np.interp(q, normal, exceed))
        above = normal[normal > q]
        scale = max(float((above - q).mean()) if len(above) else 0.0, 1e-6)
        body = np.interp(live, normal, exceed, left=1.0)
        tail = p_q * np.exp(-np.maximum(live - q, 0.0) / scale)
        p = np.where(live > q, tail, body)
        return np.where(np.isfinite(live), -np.log10(np.clip(p, 1e-300, 1.0)), np.nan)


@dataclass
class Calibration:
    """Everything the live score needs; stored as calibration.json (plain JSON)."""

    cell: int
    window: int
    per_window: int
    horizon: int
    first_scored: int
    smooth: int
    fpr: float
    norms: dict  # source -> LocalNorm
    tails: dict  # source -> NormalTail
    fitted_on: dict = field(default_factory=dict)
    version: int = 1

    @property
    def threshold(self) -> float:
        return threshold_for(self.fpr)

    def extrapolated_fpr_note(self) -> str | None:
        """What to say when the false-positive rate is rarer than the calibration frames can show (its
        threshold then comes from the fitted tail alone), else None."""
        tail = self.tails["model"]
        if self.fpr >= tail.observed_fpr:
            return None
        return (
            f"--fpr {self.fpr:g} is below 1 in {tail.frames or len(tail.values)} scored normal calibration frames: its "
            "threshold is extrapolated from the fitted tail; calibrate on more normal video to measure it"
        )

    def psnr_offset(self, source: str, contexts: np.ndarray) -> np.ndarray:
        """dB to add to the PSNR of frames predicted with these contexts to take out the context's effect on
        the error (10 log10(e) delta_mse[c]): the offline regularity made of it has no sawtooth and no spike at a
        video's start either."""
        delta = np.asarray(self.norms[source].delta_mse, np.float64)
        return 10.0 / np.log(10.0) * delta[np.clip(contexts, 0, len(delta) - 1)]

    def save(self, path: str | Path) -> None:
        data = asdict(self)
        data["threshold"] = self.threshold
        write_json(path, data)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Reads calibration.json, checking every field (it may have been edited by hand).

        Raises:
            PipelineError: one line naming the file and the field at fault.
        """
        data = read_json(path)
        data.pop("threshold", None)  # derived from fpr
        missing = [k for k in _FIELDS if k not in data]
        if missing:
            raise PipelineError(f"{path} is not a calibration file: it has no {', '.join(missing)}.")
        unknown = sorted(set(data) - set(_FIELDS) - {"fitted_on", "version"})
        if unknown:
            raise PipelineError(f"{path} is not a calibration file: unknown fields {unknown}.")
        if data.get("version", 1) != 1:
            raise PipelineError(f"{path} is calibration version {data['version']!r}; this pipeline reads version 1.")
        for name, low in _INTS.items():
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PipelineError(f"{path}: {name} must be a whole number, {low} or more. Received: {value!r}")
        if data["window"] and data["per_window"] > data["window"]:
            raise PipelineError(f"{path}: per_window must be at most the window ({data['window']}).")
        fpr = data["fpr"]
        if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 < fpr < 1:
            raise PipelineError(f"{path}: fpr must be a number in (0, 1). Received: {fpr!r}")
        for group, kind in (("norms", LocalNorm), ("tails", NormalTail)):
            entries = data[group]
            if not isinstance(entries, dict) or set(entries) != set(SOURCES):
                raise PipelineError(f"{path}: {group} must hold one entry for each of {list(SOURCES)}.")
            try:
                data[group] = {k: kind(**v) for k, v in entries.items()}
            except TypeError as err:
                raise PipelineError(f"{path}: {group} is not as calibration writes it: {err}") from None
            for source, entry in data[group].items():
                for field_name, value in vars(entry).items():
                    if field_name == "frames":  # NormalTail's count of the normal frames fitted on
                        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                            raise PipelineError(
                                f"{path}: {group}.{source}.frames must be a whole number, 0 or more. "
                                f"Received: {value!r}"
                            )
                        continue
                    try:
                        values = np.asarray(value, np.float64)
                    except (TypeError, ValueError):
                        values = None
                    if field_name == "spread":  # NormalTail's: empty (an earlier calibration), or one per frame
                        if values is None or values.ndim != 1 or values.size not in (0, data["smooth"]):
                            raise PipelineError(
                                f"{path}: {group}.{source}.spread must hold {data['smooth']} numbers (smooth), or none."
                            )
                        if not (np.isfinite(values) & (values > 0)).all():
                            raise PipelineError(f"{path}: {group}.{source}.spread must hold positive numbers.")
                        continue
                    if values is None or values.size == 0 or not np.isfinite(values).all():
                        raise PipelineError(
                            f"{path}: {group}.{source}.{field_name} must be a non-empty array of finite numbers."
                        )
        return cls(**data)


# calibration.json's fields, and the least value of each whole number among them
_FIELDS = ("cell", "window", "per_window", "horizon", "first_scored", "smooth", "fpr", "norms", "tails")
_INTS = {"cell": 1, "window": 0, "per_window": 1, "horizon": 1, "first_scored": 0, "smooth": 1}


def threshold_for(fpr: float) -> float:
    """The score over which a share `fpr` of normal frames lies."""
    if not 0 < fpr < 1:
        raise PipelineError(f"The false-positive rate must be in (0, 1). Received: {fpr}")
    return -math.log10(fpr)


def live_values(heat: np.ndarray, predictable: np.ndarray, videos: np.ndarray, smooth: int):
    """`local` (the largest heat of each frame, NaN where not predictable), `live` (its trailing mean) and how
    many frames that averages."""
    peak = np.nan_to_num(heat.reshape(len(heat), -1), nan=-np.inf).max(axis=1, initial=-np.inf)
    local = np.where(predictable & np.isfinite(peak), peak, np.nan)
    return local, trailing_mean(local, videos, smooth), trailing_count(local, videos, smooth)


def fit_calibration(
    local_by_source: dict[str, np.ndarray],
    contexts: np.ndarray,
    predictable: np.ndarray,
    videos: np.ndarray,
    tail_mask: np.ndarray,
    settings: dict,
) -> Calibration:
    """Fits the local norms on every predictable normal frame given and the tails on those in `tail_mask`.

    Args:
        local_by_source: source name -> `local_errors` (n, gh, gw) of normal frames.
        contexts: (n,) frames of context of each frame's prediction (`frame_contexts`).
        predictable: (n,) frames that have a score.
        videos: (n,) the video of each frame.
        tail_mask: (n,) frames whose live values set the exceedance (the held-out normal videos).
        settings: cell, window, per_window, horizon, first_scored, smooth, fpr and fitted_on.
    """
    n_contexts = max(int(contexts.max()) + 1, settings["window"] or 1)
    norms, tails = {}, {}
    for source, errors in local_by_source.items():
        norm = LocalNorm.fit(errors[predictable], contexts[predictable], n_contexts)
        heat = norm.heat(errors, contexts)
        local, live, counts = live_values(heat, predictable, videos, settings["smooth"])
        held_out = tail_mask & predictable
        spread = mean_spreads(local[held_out], videos[held_out], settings["smooth"])
        unscaled = NormalTail.fit(live[held_out], spread)  # its median: the centre the scaling moves toward
        tail = NormalTail.fit(unscaled.as_full_mean(live[held_out], counts[held_out]), spread)
        norms[source], tails[source] = norm, tail
    return Calibration(norms=norms, tails=tails, **settings)


def apply_calibration(
    calibration: Calibration,
    local_by_source: dict[str, np.ndarray],
    contexts: np.ndarray,
    predictable: np.ndarray,
    videos: np.ndarray,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Columns `<source>_local`, `<source>_live`, `<source>_score` for each source, and its heat maps."""
    columns, heats = {}, {}
    for source, errors in local_by_source.items():
        heat = calibration.norms[source].heat(errors, contexts)
        heat[~predictable] = np.nan
        local, live, counts = live_values(heat, predictable, videos, calibration.smooth)
        columns[f"{source}_local"] = local
        columns[f"{source}_live"] = live
        columns[f"{source}_score"] = calibration.tails[source].score(live, counts)
        heats[source] = heat
    return columns, heats
