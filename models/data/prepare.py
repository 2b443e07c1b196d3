"""Stage 1: videos on disk -> resized uint8 arrays, split by video, in the preprocessed store."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.cli import package_versions, progress
from models.data import frames as frame_io
from models.data.index import Video, build_index, labels_for
from models.data.store import dump
from models.errors import PipelineError
from models.io import atomic_dir, write_json
from models.shapes import check_frame_size

log = logging.getLogger(__name__)


@dataclass
class PrepareConfig:
    """Settings of one data preparation run (see data_preparation.py for their meaning)."""

    size: tuple[int, int] = (152, 232)
    n_layers: int = 4
    channels: str = "auto"
    val_fraction: float = 0.15
    seed: int = 0
    compression: str | None = "gzip"
    workers: int | None = None
    allow_truncated: bool = False


def split_videos(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Splits normal videos into train and val videos, seeded; val gets at least one when asked for any."""
    if not 0 <= val_fraction < 1:
        raise PipelineError(f"val_fraction must be in [0, 1). Received: {val_fraction}")
    n_val = 0 if val_fraction == 0 or len(names) < 2 else max(1, round(val_fraction * len(names)))
    order = np.random.default_rng(seed).permutation(len(names))
    val = sorted(names[i] for i in order[:n_val])
    return [n for n in names if n not in val], val


def read_folders(root: str | Path) -> list[Path]:
    """What preparing the dataset at `root` reads, which its output must not be, hold or lie inside: the split
    folders (videos, masks and label files). Beside them, `root` may hold the output."""
    return [Path(root) / "Train", Path(root) / "Test"]


def _channels(videos: list[Video], setting: str) -> int:
    if setting in ("1", "3"):
        return int(setting)
    if setting != "auto":
        raise PipelineError(f"channels must be auto, 1 or 3. Received: {setting!r}")
    return frame_io.detect_channels(frame_io.first_image(videos[0]))


def prepare(root: str | Path, out_dir: str | Path, config: PrepareConfig, overwrite: bool = False, argv=None) -> dict:
    """Reads every video under `root`, resizes, splits by video and writes the store to `out_dir`.

    Args:
        root: the dataset folder (see `models.data.index`).
        out_dir: the store to write; it must not be, hold or lie inside what is read (`read_folders`).
        config: the settings.
        overwrite: replace an `out_dir` that an earlier data preparation wrote (never anything else).
        argv: the command line, recorded in the metadata.

    Returns:
        The metadata written to `out_dir/metadata.json`.

    Raises:
        PipelineError: on any bad input, or an `out_dir` that may not be written (`models.io.check_output`);
            `out_dir` is then left as it was.
    """
    check_frame_size(*config.size, config.n_layers)
    videos = build_index(root)
    channels = _channels(videos, config.channels)
    train_names, val_names = split_videos(
        [v.name for v in videos if v.split == "train"], config.val_fraction, config.seed
    )
    split_of = {n: "train" for n in train_names} | {n: "val" for n in val_names}
    split_of |= {v.name: "test" for v in videos if v.split == "test"}

    start = time.perf_counter()
    arrays = {s: ([], []) for s in ("train", "val", "test")}
    labels, masks, truncated = [], [], {}
    test_has_labels = all(v.ranges is not None for v in videos if v.split == "test")
    with atomic_dir(out_dir, overwrite, stage="data_preparation", inputs=read_folders(root)) as tmp:
        with (
            progress(total=None, unit="frame", desc="frames") as bar,
            # closed on leaving: an error or Ctrl-C in this loop stops the decoding processes at once
            contextlib.closing(
                frame_io.read_videos(videos, config.size, channels, config.workers, bar, config.allow_truncated)
            ) as decoded,
        ):
            for video, X, lost in decoded:
                if lost:
                    truncated[video.name] = {"frames_kept": len(X), "frames_lost": lost}
                    log.warning(
                        "video file %s is truncated: %d of its %d frames lost, %d kept (--allow_truncated)",
                        video.path,
                        lost,
                        len(X) + lost,
                        len(X),
                    )
                split = split_of[video.name]
                arrays[split][0].append(X)
                arrays[split][1].append(np.full(len(X), video.name))
                if split == "test":
                    if test_has_labels:
                        labels.append(labels_for(video, len(X)))
                    if video.mask_frames:
                        if len(video.mask_frames) != len(X):
                            raise PipelineError(
                                f"Mask folder {video.mask_dir} has {len(video.mask_frames)} masks for {len(X)} frames."
                            )
                        masks.append(frame_io.read_masks(video, config.size))
        seconds = time.perf_counter() - start
        counts = {}
        for split, (xs, srcs) in arrays.items():
            X = np.concatenate(xs) if xs else np.zeros((0, *config.size, channels), np.uint8)
            src = np.concatenate(srcs) if srcs else np.array([], dtype="U1")
            dump(X, tmp / f"X_{split}.hkl", config.compression)
            dump(src, tmp / f"sources_{split}.hkl")
            counts[split] = {str(n): int((src == n).sum()) for n in dict.fromkeys(src.tolist())}
        if labels:
            dump(np.concatenate(labels), tmp / "y_test.hkl")
        n_train, n_val = sum(counts["train"].values()), sum(counts["val"].values())
        if n_val > max(2 * config.val_fraction, 0.3) * (n_train + n_val):
            log.warning(
                "the val videos hold %d%% of the normal frames (%d of %d videos, split by video): training sees %d "
                "frames; pass more normal videos, or --val_fraction 0 (then early stopping and the calibration use "
                "the train videos)",
                round(100 * n_val / (n_train + n_val)),
                len(counts["val"]),
                len(counts["train"]) + len(counts["val"]),
                n_train,
            )
        n_test = sum(counts["test"].values())
        if masks and sum(len(m) for m in masks) == n_test:
            dump(np.concatenate(masks), tmp / "masks_test.hkl", config.compression)
        n_frames = sum(sum(c.values()) for c in counts.values())
        metadata = {
            "source": str(Path(root).resolve()),
            "height": config.size[0],
            "width": config.size[1],
            "channels": channels,
            "n_layers_checked": config.n_layers,
            "val_fraction": config.val_fraction,
            "seed": config.seed,
            "compression": config.compression,
            "videos": {split: counts[split] for split in counts},
            "frames": {split: sum(c.values()) for split, c in counts.items()},
            "test_labels": bool(labels),
            "anomalous_test_frames": int(np.concatenate(labels).sum()) if labels else None,
            "masks": (tmp / "masks_test.hkl").exists(),
            "truncated_videos": truncated,
            "seconds": round(seconds, 2),
            "frames_per_second": round(n_frames / max(seconds, 1e-9), 1),
            "arguments": argv,
            "versions": package_versions(),
        }
        write_json(tmp / "metadata.json", metadata)
    return metadata
