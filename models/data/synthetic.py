"""A synthetic UCSD-like dataset: a walkway filmed from above, written in the exact UCSD layout.

    <root>/UCSD_Anomaly_Dataset.v1p2/<name>/
        Train/Train001/001.tif ...       normal videos: people walking along the walkway
        Test/Test001/001.tif ...         each test video holds one kind of anomaly
        Test/Test001_gt/001.bmp ...      pixel masks of the anomalous objects
        Test/<name>.m                    frame-level ground truth in the UCSD syntax

Normal: people (small dark blobs) walk left or right along the paved walkway at walking speed, swaying a
little. Anomalies, labelled on exactly the frames where any of their pixels is visible:

- bike: a fast, elongated object on the walkway (about 3.5 times walking speed);
- cart: a large box moving at walking speed;
- lawn: a person crossing the lawn, perpendicular to the walkway;
- appearance: a bright, striped object at walking speed, about as much frame difference as a person
  makes, so a frame-difference baseline cannot catch it well.

Everything is drawn from `seed`; sizes are configurable down to a few pixels for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.data.index import label_ranges
from models.errors import PipelineError

ANOMALY_KINDS = ("bike", "cart", "lawn", "appearance")
MIN_FRAMES = 3  # a test video's anomaly starts between its first fifth and its middle
MIN_SIDE = 8  # pixels


@dataclass
class SyntheticSpec:
    """Shape of the synthetic dataset."""

    height: int = 120
    width: int = 180
    train_videos: int = 8
    test_videos: int = 4
    frames: int = 120
    seed: int = 0


@dataclass
class _Obj:
    kind: str
    x: float
    y: float
    vx: float
    vy: float
    length: float  # along the direction of motion
    breadth: float
    tone: float
    phase: float
    anomalous: bool = False


class _Scene:
    def __init__(self, spec: SyntheticSpec, rng: np.random.Generator, background: np.ndarray):
        self.h, self.w = spec.height, spec.width
        self.rng = rng
        self.bg = background
        self.walk_top, self.walk_bottom = 0.35 * self.h, 0.65 * self.h
        self.speed = self.w / 110.0  # crossing the frame takes about 110 frames
        self.yy, self.xx = np.mgrid[0 : self.h, 0 : self.w].astype(np.float32)
        self.objects: list[_Obj] = []
        self.t = 0

    def person(self, x=None, anomalous_kind=None) -> _Obj:
        direction = self.rng.choice([-1.0, 1.0])
        speed = self.speed * self.rng.uniform(0.8, 1.2)
        if x is None:
            x = -0.03 * self.w if direction > 0 else 1.03 * self.w
        y = self.rng.uniform(self.walk_top + 0.04 * self.h, self.walk_bottom - 0.04 * self.h)
        return _Obj(
            "person",
            x,
            y,
            direction * speed,
            0.0,
            0.07 * self.h,
            0.05 * self.h,
            self.rng.uniform(0.12, 0.3),
            self.rng.uniform(0, 6.28),
        )

    def anomaly(self, kind: str) -> _Obj:
        o = self.person()
        o.anomalous, o.kind = True, kind
        if kind == "bike":
            o.vx *= 3.5
            o.length, o.breadth, o.tone = 0.16 * self.h, 0.04 * self.h, 0.1
        elif kind == "cart":
            o.length, o.breadth, o.tone = 0.2 * self.h, 0.16 * self.h, 0.3
        elif kind == "lawn":
            o.x = self.rng.uniform(0.2, 0.8) * self.w
            o.y = -0.05 * self.h
            o.vx, o.vy = 0.0, abs(o.vx) * self.h / self.w * 1.4
        elif kind == "appearance":
            o.length, o.breadth, o.tone = 0.1 * self.h, 0.07 * self.h, 0.92
        return o

    def _mask(self, o: _Obj) -> np.ndarray:
        """Soft mask of one object, with a sway of the position for people."""
        sway = 0.012 * self.h * np.sin(0.5 * self.t + o.phase) if o.kind in ("person", "lawn") else 0.0
        horizontal = abs(o.vx) >= abs(o.vy)
        half_x = (o.length if horizontal else o.breadth) / 2
        half_y = (o.breadth if horizontal else o.length) / 2
        dx = (self.xx - o.x) / max(half_x, 0.5)
        dy = (self.yy - o.y - (sway if horizontal else 0)) / max(half_y, 0.5)
        d = np.maximum(np.abs(dx), np.abs(dy)) if o.kind == "cart" else np.sqrt(dx**2 + dy**2)  # box or ellipse
        edge = 1.5 / max(min(half_x, half_y), 1.0)
        return np.clip((1 - d) / edge + 0.5, 0, 1)

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        img = self.bg.copy()
        anomaly_mask = np.zeros((self.h, self.w), dtype=bool)
        for o in self.objects:
            m = self._mask(o)
            tone = o.tone
            if o.kind == "appearance":
                tone = np.where(((self.xx - o.x) // max(1.0, 0.025 * self.h)) % 2 == 0, 0.95, 0.55)
            img = img * (1 - m) + tone * m
            if o.anomalous:
                anomaly_mask |= m > 0.25
        img += self.rng.normal(0, 0.01, img.shape)
        return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), anomaly_mask

    def visible(self, o: _Obj) -> bool:
        margin = max(o.length, o.breadth)
        return -margin < o.x < self.w + margin and -margin < o.y < self.h + margin

    def step(self) -> None:
        for o in self.objects:
            o.x += o.vx + self.rng.normal(0, 0.04 * self.speed)
            o.y += o.vy + self.rng.normal(0, 0.02 * self.speed)
            o.y = (
                o.y
                if o.anomalous
                else float(np.clip(o.y, self.walk_top + 0.03 * self.h, self.walk_bottom - 0.03 * self.h))
            )
        self.objects = [o for o in self.objects if self.visible(o) or (o.anomalous and self._entering(o))]
        self.t += 1

    def _entering(self, o: _Obj) -> bool:
        return (o.vx > 0 and o.x < 0) or (o.vx < 0 and o.x > self.w) or (o.vy > 0 and o.y < 0)


def make_background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Lawn with a grainy texture, a paved walkway across the middle, a few fixed dark bushes."""
    texture = rng.normal(0, 1, (h, w))
    kernel = np.ones(3) / 3
    for axis in (0, 1):
        texture = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), axis, texture)
    bg = 0.42 + 0.05 * texture
    top, bottom = int(0.35 * h), int(0.65 * h)
    walk = 0.68 + 0.02 * texture[top:bottom]
    step = max(2, w // 18)
    walk[:, ::step] -= 0.06  # paving joints
    bg[top:bottom] = walk
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(3):
        cy = rng.choice([rng.uniform(0.05, 0.25), rng.uniform(0.75, 0.95)]) * h
        cx, r = rng.uniform(0, w), rng.uniform(0.04, 0.08) * h
        bg[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 0.25
    return bg.astype(np.float32)


def _simulate(scene: _Scene, n_frames: int, anomaly_kind: str | None, rng: np.random.Generator):
    """Frames, per-frame labels and masks of one video."""
    for _ in range(rng.integers(2, 5)):
        scene.objects.append(scene.person(x=rng.uniform(0, scene.w)))
    starts = []
    if anomaly_kind is not None:
        first = int(rng.integers(int(0.2 * n_frames), int(0.45 * n_frames)))
        starts = [first] + ([first + n_frames // 3] if anomaly_kind == "bike" else [])
    frames, masks = [], []
    for t in range(n_frames):
        if rng.random() < 0.045:
            scene.objects.append(scene.person())
        if t in starts:
            scene.objects.append(scene.anomaly(anomaly_kind))
        img, mask = scene.render()
        frames.append(img)
        masks.append(mask)
        scene.step()
    masks = np.stack(masks)
    return np.stack(frames), masks.any(axis=(1, 2)).astype(np.uint8), masks


def _write_frames(folder: Path, frames: np.ndarray, suffix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames, 1):
        Image.fromarray(frame).save(folder / f"{i:03d}{suffix}")


def make_synthetic(root: str | Path, name: str = "Synthetic", spec: SyntheticSpec | None = None) -> Path:
    """Writes the dataset to `<root>/UCSD_Anomaly_Dataset.v1p2/<name>` and returns that folder."""
    spec = spec or SyntheticSpec()
    too_small = spec.frames < MIN_FRAMES or min(spec.height, spec.width) < MIN_SIDE
    if too_small or min(spec.train_videos, spec.test_videos) < 1:
        raise PipelineError(
            f"A synthetic dataset needs {MIN_FRAMES} or more frames per video, frames of {MIN_SIDE}x{MIN_SIDE} pixels "
            f"or more, and 1 or more train and test videos. Received: {spec}"
        )
    rng = np.random.default_rng(spec.seed)
    background = make_background(spec.height, spec.width, rng)
    out = Path(root) / "UCSD_Anomaly_Dataset.v1p2" / name
    lines = ["TestVideoFile = {};", ""]
    for split, count in (("Train", spec.train_videos), ("Test", spec.test_videos)):
        for i in range(1, count + 1):
            kind = ANOMALY_KINDS[(i - 1) % len(ANOMALY_KINDS)] if split == "Test" else None
            frames, y, masks = _simulate(_Scene(spec, rng, background), spec.frames, kind, rng)
            _write_frames(out / split / f"{split}{i:03d}", frames, ".tif")
            if split == "Test":
                _write_frames(out / split / f"{split}{i:03d}_gt", masks.astype(np.uint8) * 255, ".bmp")
                ranges = ", ".join(f"{s}:{e}" for s, e in label_ranges(y))
                lines.append(f"TestVideoFile{{end+1}}.gt_frame = [{ranges}];")
    (out / "Test").mkdir(parents=True, exist_ok=True)
    (out / "Test" / f"{name}.m").write_text("\n".join(lines) + "\n")
    return out
