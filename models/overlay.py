"""Where in the frame: overlay videos of the model's unusual error, and pixel-level AUROC of those maps.

The heat map given to this module is already expressed against normal video: per patch cell, the log of
the error over the normal error at that place (0 = as normal video there, 2.3 = ten times it, NaN = no
score; `models.calibration`). Only cells above a floor (7 times the normal error) are coloured, so busy but
normal places stay as they are. Each output frame reads, top to
bottom:

    +------------------------------------------------------------+
    | title  frame 123          score 0.87 / thr 0.75  [ ALARM ] |   header strip
    +------------------------------------------------------------+
    |                                                            |
    |    the frame (grey stays grey), heat where error > 7x normal|   red border while the alarm is on
    |    upscaled to at least 480 px wide                        |
    |                                                            |
    +------------------------------------------------------------+
    | score, last 100 frames  ~~~~/\\~~~ - - thr - -  7x [###] 90x |   curve strip, alarm frames shaded
    +------------------------------------------------------------+

Text and curve are drawn with Pillow at the output resolution, so they stay sharp; colour mapping and
blending are vectorised numpy.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models.io import atomic_file

# On Ped2 (32x48 model), 99% of the cells of normal test frames stay below 1.9 (7 times the normal error of
# their place) and the largest cell of half the anomalous frames is above 3.5.
Z_FLOOR = 2.0  # heat (log error ratio to normal) at or below this is left uncoloured: 7x the normal error
Z_CAP = 4.5  # heat at which colour and opacity stop rising: 90x the normal error
MAX_ALPHA = 0.75  # opacity of the heat map at the cap
WINDOW = 100  # frames shown in the running score curve
MIN_WIDTH = 480  # narrower inputs are upscaled by the smallest integer factor that reaches this width
COLORMAP = "inferno"
COLORMAP_RANGE = (0.3, 1.0)  # skip inferno's near-black end, which would read as a shadow over the frame
MAX_AUROC_PIXELS = 5_000_000

_HEADER_BG = (28, 28, 28)
_STRIP_BG = (18, 18, 18)
_TEXT = (235, 235, 235)
_DIM = (150, 150, 150)
_RED = (225, 30, 30)
_GREEN = (40, 125, 65)
_GREY = (85, 85, 85)
_THRESHOLD = (255, 175, 0)
_ALARM_SHADE = (95, 22, 22)


# ---------------------------------------------------------------------------------------------- upsampling


@functools.lru_cache(maxsize=64)
def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) interpolation matrix; cell i's centre lands on output pixel (i + 0.5) * n_out / n_in - 0.5."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).astype(np.float32)
    w = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(w, (rows, lo), 1 - frac)
    np.add.at(w, (rows, hi), frac)
    w.flags.writeable = False
    return w


def upsample(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of cell maps to pixels, ignoring NaN cells.

    Cells tile the frame: the centre of cell (i, j) of a (gh, gw) grid falls on the centre of its block of
    pixels, and the map is held constant beyond the outer cell centres. A NaN cell does not spread: each
    pixel averages the valid cells around it with their bilinear weights, and is NaN only where none is.

    Args:
        heat: (..., gh, gw) float map(s); leading dimensions (frames) are kept.
        size: (height, width) of the output.

    Returns:
        float32 (..., height, width).
    """
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim < 2:
        raise ValueError(f"heat must have at least 2 dimensions (..., gh, gw). Received: heat.shape={heat.shape}")
    wy = _bilinear_weights(heat.shape[-2], int(size[0]))
    wx = _bilinear_weights(heat.shape[-1], int(size[1]))
    return _resample(heat, wy, wx)


def _resample(heat: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    valid = np.isfinite(heat)
    if valid.all():
        return wy @ heat @ wx.T
    num = wy @ np.where(valid, heat, 0.0) @ wx.T
    den = wy @ valid.astype(np.float32) @ wx.T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-6, num / den, np.nan).astype(np.float32)


# -------------------------------------------------------------------------------------------- pixel AUROC


def pixel_auroc(heat: np.ndarray, masks: np.ndarray, max_pixels: int = MAX_AUROC_PIXELS, seed: int = 0) -> float:
    """Pixel-level AUROC of heat maps against ground-truth masks.

    Each map is upsampled (bilinear) to the masks' size; every pixel of every frame that has a score (not
    all-NaN heat) counts once. Above `max_pixels` pixels, the same number of pixels is drawn from each frame,
    reproducibly from `seed`.

    Args:
        heat: float (n, gh, gw) maps, larger = more anomalous; an all-NaN frame has no score.
        masks: (n, H, W) 0/1 (or bool) anomaly masks of the same frames.
        max_pixels: the most pixels passed to roc_auc_score.
        seed: seed of the subsample.

    Returns:
        The AUROC, or NaN when the scored pixels hold one class only (or no frame has a score).
    """
    from sklearn.metrics import roc_auc_score

    heat = np.asarray(heat, dtype=np.float32)
    masks = np.asarray(masks)
    if heat.ndim != 3 or masks.ndim != 3 or len(heat) != len(masks):
        raise ValueError(
            f"heat must be (n, gh, gw) and masks (n, H, W) with the same n. "
            f"Received: heat.shape={heat.shape}, masks.shape={masks.shape}"
        )
    scored = np.flatnonzero(~np.isnan(heat).all(axis=(1, 2)))
    if len(scored) == 0:
        return float("nan")
    size = masks.shape[1:]
    n_pix = size[0] * size[1]
    per_frame = n_pix if len(scored) * n_pix <= max_pixels else max(1, max_pixels // len(scored))
    rng = np.random.default_rng(seed)
    labels, values = [], []
    for start in range(0, len(scored), 32):
        idx = scored[start : start + 32]
        up = upsample(heat[idx], size).reshape(len(idx), -1)
        y = masks[idx].reshape(len(idx), -1) > 0
        if per_frame < n_pix:
            pick = np.stack([rng.choice(n_pix, per_frame, replace=False) for _ in idx])
            up, y = np.take_along_axis(up, pick, axis=1), np.take_along_axis(y, pick, axis=1)
        keep = np.isfinite(up)
        labels.append(y[keep])
        values.append(up[keep])
    y, s = np.concatenate(labels), np.concatenate(values)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


# ---------------------------------------------------------------------------------------------- one frame


@dataclass(frozen=True)
class OverlayLayout:
    """Where things are in an overlay frame of a (height, width) input; all sizes in output pixels.

    The frame occupies rows `frame_top : frame_top + frame_height` and columns `0 : frame_width`; the header
    is above it, the curve strip below it. `width` and `height` are even (H.264 needs it): an odd frame width
    leaves one dark column on the right.
    """

    scale: int
    width: int
    height: int
    header_height: int
    frame_top: int
    frame_height: int
    frame_width: int
    curve_top: int
    curve_height: int
    border: int


def overlay_layout(height: int, width: int) -> OverlayLayout:
    """The layout of the overlay frames of a (height, width) input."""
    scale = math.ceil(MIN_WIDTH / width) if width < MIN_WIDTH else 1
    fh, fw = height * scale, width * scale
    out_w = fw + fw % 2
    header = max(32, out_w // 18)
    header += header % 2
    curve = max(72, out_w // 7)
    curve += (header + fh + curve) % 2
    return OverlayLayout(
        scale=scale,
        width=out_w,
        height=header + fh + curve,
        header_height=header,
        frame_top=header,
        frame_height=fh,
        frame_width=fw,
        curve_top=header + fh,
        curve_height=curve,
        border=max(3, out_w // 120),
    )


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=4)
def _lut(name: str) -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[name](np.linspace(*COLORMAP_RANGE, 256))[:, :3] * 255).astype(np.float32)


def _tint(rgb: np.ndarray, heat: np.ndarray | None, z_floor: float, z_cap: float) -> np.ndarray:
    """Blends the colour-mapped z over `rgb` (uint8 (h, w, 3)) where z > z_floor; opacity rises with z."""
    if heat is None:
        return rgb
    heat = np.asarray(heat, dtype=np.float32)
    hot = heat > z_floor  # NaN compares False
    if not hot.any():
        return rgb
    # Only pixels within one cell of a hot cell can be coloured: resample that box alone.
    wy = _bilinear_weights(heat.shape[0], rgb.shape[0])
    wx = _bilinear_weights(heat.shape[1], rgb.shape[1])
    rows, cols = np.flatnonzero(hot.any(axis=1)), np.flatnonzero(hot.any(axis=0))
    ys = np.flatnonzero(wy[:, rows[0] : rows[-1] + 1].any(axis=1))
    xs = np.flatnonzero(wx[:, cols[0] : cols[-1] + 1].any(axis=1))
    y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
    z = _resample(heat, wy[y0:y1], wx[x0:x1])
    t = np.clip((np.nan_to_num(z, nan=z_floor) - z_floor) / (z_cap - z_floor), 0.0, 1.0)
    alpha = (MAX_ALPHA * np.sqrt(t))[..., None]  # visible soon above the floor, no hard edge at it
    colour = _lut(COLORMAP)[(t * 255).astype(np.uint8)]
    out = rgb.copy()
    out[y0:y1, x0:x1] = (rgb[y0:y1, x0:x1] * (1 - alpha) + colour * alpha + 0.5).astype(np.uint8)
    return out


def _fmt(value: float) -> str:
    return f"{value:.2f}" if np.isfinite(value) else "--"


def _header_font(draw, lay: OverlayLayout, frame_number: int, threshold: float) -> ImageFont.FreeTypeFont:
    """The largest font (up to 55% of the strip) that fits frame number, score, threshold and badge."""
    size = max(10, round(lay.header_height * 0.55))
    # A score wider than most, so the size does not change from frame to frame.
    template = f"frame {frame_number}  score -{_fmt(threshold)}0 / thr {_fmt(threshold)}  no score"
    pad = max(4, lay.header_height // 4)
    while size > 8 and draw.textlength(template, font=_font(size)) + 5 * pad > lay.width:
        size -= 1
    return _font(size)


def _draw_header(draw, lay: OverlayLayout, frame_number: int, score: float, threshold: float, alarm, title):
    h, w = lay.header_height, lay.width
    draw.rectangle((0, 0, w - 1, h - 1), fill=_HEADER_BG)
    font = _header_font(draw, lay, frame_number, threshold)
    pad = max(4, h // 4)
    # The badge keeps one width whatever it says, so the text beside it does not jump between frames.
    label, fill = ("ALARM", _RED) if alarm else ("normal", _GREEN) if np.isfinite(score) else ("no score", _GREY)
    badge_w = max(draw.textlength(s, font=font) for s in ("ALARM", "normal", "no score")) + 2 * pad
    bx0 = w - pad - badge_w
    draw.rounded_rectangle((bx0, 3, w - pad, h - 4), radius=h // 5, fill=fill)
    draw.text(((bx0 + w - pad) / 2, h / 2), label, font=font, fill=(255, 255, 255), anchor="mm")
    score_text = f"score {_fmt(score)} / thr {_fmt(threshold)}"
    draw.text((bx0 - pad, h / 2), score_text, font=font, anchor="rm", fill=_RED if alarm else _TEXT)
    left = f"frame {frame_number}"
    if title:
        room = bx0 - 3 * pad - draw.textlength(score_text, font=font)
        text, cut = f"{title}  {left}", title
        while cut and draw.textlength(text, font=font) > room:
            cut = cut[:-1]
            text = f"{cut}…  {left}" if cut else left
        left = text
    draw.text((pad, h / 2), left, font=font, anchor="lm", fill=_TEXT)


def _dashed_hline(draw, x0: float, x1: float, y: float, fill, width: int, dash: int) -> None:
    x = x0
    while x < x1:
        draw.line((x, y, min(x + dash, x1), y), fill=fill, width=width)
        x += 2 * dash


def _draw_curve(draw, lay: OverlayLayout, scores, alarms, threshold, score_range, window, z_floor, z_cap, image):
    top, h, w = lay.curve_top, lay.curve_height, lay.width
    draw.rectangle((0, top, w - 1, top + h - 1), fill=_STRIP_BG)
    small = _font(max(12, round(h * 0.16)))
    pad = max(4, h // 10)
    # Colour key on the right: the heat colours from the floor to the cap.
    key_w = max(40, w // 8)
    lo_text, hi_text = f"{math.exp(z_floor):.0f}x", f"{math.exp(z_cap):.0f}x"
    kx1 = w - pad - small.getbbox(hi_text)[2] - pad // 2
    kx0 = kx1 - key_w
    ky0, ky1 = top + h // 2 - h // 8, top + h // 2 + h // 8
    ramp = _lut(COLORMAP)[np.linspace(0, 255, key_w).astype(int)].astype(np.uint8)
    image.paste(Image.fromarray(np.repeat(ramp[None], ky1 - ky0, axis=0)), (kx0, ky0))
    draw.text((kx0 - pad // 2, (ky0 + ky1) / 2), lo_text, font=small, anchor="rm", fill=_DIM)
    draw.text((kx1 + pad // 2, (ky0 + ky1) / 2), hi_text, font=small, anchor="lm", fill=_DIM)
    draw.text((kx0 + key_w / 2, ky0 - 2), "error / normal", font=small, anchor="mb", fill=_DIM)
    # Plot area.
    x0 = pad
    x1 = kx0 - draw.textlength(lo_text, font=small) - 3 * pad
    y0 = top + pad + small.size + 2
    y1 = top + h - pad
    draw.text((x0, top + pad // 2), f"score, last {window} frames", font=small, anchor="la", fill=_DIM)
    draw.rectangle((x0, y0, x1, y1), outline=(60, 60, 60))
    lo, hi = score_range
    span = hi - lo if hi > lo else 1.0
    step = (x1 - x0) / max(window - 1, 1)
    xs = x0 + step * np.arange(len(scores))
    ys = y1 - (np.clip(scores, lo, hi) - lo) / span * (y1 - y0)
    for i in np.flatnonzero(alarms):
        draw.rectangle((xs[i] - step / 2, y0 + 1, xs[i] + step / 2, y1 - 1), fill=_ALARM_SHADE)
    if np.isfinite(threshold):
        ty = y1 - (min(max(threshold, lo), hi) - lo) / span * (y1 - y0)
        _dashed_hline(draw, x0 + 1, x1 - 1, ty, _THRESHOLD, max(1, h // 60), max(4, w // 120))
        above = ty - y0 > small.size + 2  # label above the line unless that would leave the plot
        ty_label, anchor = (ty - 2, "rb") if above else (ty + 3, "rt")
        draw.text((x1 - 2, ty_label), f"thr {_fmt(threshold)}", font=small, anchor=anchor, fill=_THRESHOLD)
    line_w = max(1, h // 40)
    finite = np.isfinite(ys)
    # Draw each run of scored frames as one polyline, so NaN frames leave a gap.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], finite.astype(np.int8), [0]])))
    for s, e in zip(edges[::2], edges[1::2], strict=True):
        pts = list(zip(xs[s:e].tolist(), ys[s:e].tolist(), strict=True))
        if len(pts) > 1:
            draw.line(pts, fill=_TEXT, width=line_w, joint="curve")
    if len(scores) and finite[-1]:
        r = max(2, h // 25)
        cx, cy = xs[-1], ys[-1]
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_RED if alarms[-1] else _TEXT)


def curve_range(scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """The curve's vertical range: all finite scores and the threshold, with a 5% margin."""
    values = np.asarray(scores, dtype=np.float64)
    values = np.concatenate([values[np.isfinite(values)], [threshold] if np.isfinite(threshold) else []])
    if len(values) == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    margin = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.5
    return lo - margin, hi + margin


def overlay_frame(
    frame: np.ndarray,
    heat: np.ndarray | None,
    scores: np.ndarray | float,
    threshold: float,
    alarms: np.ndarray | int,
    frame_number: int,
    title: str | None = None,
    score_range: tuple[float, float] | None = None,
    window: int = WINDOW,
    z_floor: float = Z_FLOOR,
    z_cap: float = Z_CAP,
) -> np.ndarray:
    """Composes one overlay frame: header, frame with heat map (red border while alarmed), score curve.

    Args:
        frame: uint8 (H, W), (H, W, 1) or (H, W, 3) at the input's native resolution.
        heat: (gh, gw) log error ratios to normal video, or None / all-NaN for no heat map.
        scores: the live score of this frame and the ones before it, this frame last (NaN = no score); the
            curve shows the last `window` of them. A single number shows a curve of one point.
        threshold: the alarm threshold on the score.
        alarms: 0/1 alarm state aligned with `scores`, this frame last.
        frame_number: the number shown in the header (1-based by convention).
        title: shown at the left of the header (e.g. the video's name), shortened to fit.
        score_range: (low, high) of the curve's vertical axis; by default that of `scores` and `threshold`.
            Pass the whole video's range (`curve_range(scores, threshold)`) for a steady axis.
        window: frames shown by the curve.
        z_floor: z at or below which nothing is coloured.
        z_cap: z at which colour and opacity stop rising.

    Returns:
        uint8 (height, width, 3) RGB, sized as `overlay_layout(H, W)` says.
    """
    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.ndim != 3 or frame.shape[-1] not in (1, 3):
        raise ValueError(f"frame must be (H, W), (H, W, 1) or (H, W, 3). Received: frame.shape={frame.shape}")
    if heat is not None and np.ndim(heat) != 2:
        raise ValueError(f"heat must be one frame's (gh, gw) map. Received: heat.shape={np.shape(heat)}")
    if not z_cap > z_floor:
        raise ValueError(f"z_cap must be above z_floor. Received: z_floor={z_floor}, z_cap={z_cap}")
    scores = np.atleast_1d(np.asarray(scores, dtype=np.float64))[-window:]
    alarms = np.atleast_1d(np.asarray(alarms)).astype(bool)[-window:]
    if len(scores) != len(alarms):
        raise ValueError(f"scores and alarms must align. Received: {len(scores)} scores, {len(alarms)} alarms")
    lay = overlay_layout(*frame.shape[:2])
    rgb = np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame  # grey stays grey
    picture = Image.fromarray(_tint(rgb, heat, z_floor, z_cap))
    if lay.scale > 1:  # tinted at the native size (fewer pixels), then upscaled: the heat is smooth anyway
        picture = picture.resize((lay.frame_width, lay.frame_height), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (lay.width, lay.height))
    canvas.paste(picture, (0, lay.frame_top))
    draw = ImageDraw.Draw(canvas)
    alarm = bool(alarms[-1])
    if alarm:
        draw.rectangle((0, lay.frame_top, lay.frame_width - 1, lay.curve_top - 1), outline=_RED, width=lay.border)
    _draw_header(draw, lay, frame_number, float(scores[-1]), threshold, alarm, title)
    rng = score_range if score_range is not None else curve_range(scores, threshold)
    _draw_curve(draw, lay, scores, alarms, threshold, rng, window, z_floor, z_cap, canvas)
    return np.asarray(canvas)


# ---------------------------------------------------------------------------------------------- the video


def write_overlay(
    path: str | Path,
    frames: np.ndarray | Iterable[np.ndarray],
    heat: np.ndarray | None,
    scores: np.ndarray,
    threshold: float,
    alarms: np.ndarray,
    fps: float = 10.0,
    frame_numbers: np.ndarray | None = None,
    title: str | None = None,
    quality: float = 6,
    z_floor: float = Z_FLOOR,
    z_cap: float = Z_CAP,
) -> None:
    """Writes the overlay video of one input video as H.264 .mp4, atomically.

    Args:
        path: the .mp4 to write; it appears only once complete.
        frames: uint8 (n, H, W, c) at the input's native resolution (c = 1 or 3), or any iterable of such
            frames (e.g. a video reader), so a long video need not sit in memory.
        heat: float (n, gh, gw) log error ratios to normal video per patch cell (NaN = no score), or None.
        scores: float (n,) live anomaly score (NaN = none).
        threshold: the alarm threshold on the score.
        alarms: 0/1 (n,) alarm state.
        fps: frame rate of the output.
        frame_numbers: (n,) numbers shown in the header; 1..n by default.
        title: shown at the left of each header (e.g. the video's name).
        quality: imageio's 1-10 quality of the H.264 stream (6 is x264's CRF 20).
        z_floor: z at or below which nothing is coloured.
        z_cap: z at which colour and opacity stop rising.

    Raises:
        ValueError: arrays of different lengths, or `frames` yielding another number of frames.
    """
    import imageio.v2 as imageio
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    scores = np.asarray(scores, dtype=np.float64).ravel()
    alarms = np.asarray(alarms).astype(bool).ravel()
    n = len(scores)
    frame_numbers = np.arange(1, n + 1) if frame_numbers is None else np.asarray(frame_numbers).ravel()
    lengths = {"scores": n, "alarms": len(alarms), "frame_numbers": len(frame_numbers)}
    if heat is not None:
        heat = np.asarray(heat, dtype=np.float32)
        if heat.ndim != 3:
            raise ValueError(f"heat must be (n, gh, gw). Received: heat.shape={heat.shape}")
        lengths["heat"] = len(heat)
    if hasattr(frames, "__len__"):
        lengths["frames"] = len(frames)
    if len(set(lengths.values())) != 1:
        raise ValueError(f"write_overlay needs one entry per frame in each input. Received lengths: {lengths}")
    axis = curve_range(scores, threshold)
    with atomic_file(path) as tmp:
        writer = imageio.get_writer(
            str(tmp),
            format="FFMPEG",
            fps=fps,
            codec="libx264",
            quality=quality,
            macro_block_size=1,  # overlay_layout keeps both sides even; no resizing by imageio
            ffmpeg_log_level="error",
            ffmpeg_params=["-preset", "veryfast", "-movflags", "+faststart"],
        )
        count = 0
        # The per-frame products are small: BLAS threads only contend with ffmpeg and anything else running.
        with contextlib.closing(writer), threadpool_limits(1, user_api="blas"):
            for i, frame in enumerate(frames):
                if i >= n:
                    raise ValueError(f"frames holds more than the {n} frames of scores.")
                start = max(0, i + 1 - WINDOW)
                writer.append_data(
                    overlay_frame(
                        frame,
                        None if heat is None else heat[i],
                        scores[start : i + 1],
                        threshold,
                        alarms[start : i + 1],
                        int(frame_numbers[i]),
                        title=title,
                        score_range=axis,
                        z_floor=z_floor,
                        z_cap=z_cap,
                    )
                )
                count += 1
        if count != n:
            raise ValueError(f"frames held {count} frames, scores {n}.")
