"""Videos to score as they come: video files, folders of frames, or folders of either; no dataset layout.

    batch_scoring.py --input cam1.mp4 cam2.avi frames_of_cam3/ folder_of_clips/

A file with a video suffix (.mp4, .avi, .mov, .mkv, ...) is one video, named by its stem; a folder that
holds frame files is one video, named by the folder; any other folder is searched one level down for both,
and for video files in its folders (a folder per camera; hidden entries and `*_gt` mask folders are
skipped). Videos of one name in different folders are named after their folder as well (cam1/today.mp4 ->
cam1_today), files of one name in one folder after their suffix (clip.avi, clip.webm -> clip_avi, clip_webm).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from models.data.index import (
    FRAME_SUFFIXES,
    VIDEO_SUFFIXES,
    Video,
    _frame_files,
    labels_for,
    listed,
    natural_key,
    parse_labels_csv,
    parse_m_file,
)
from models.errors import PipelineError

log = logging.getLogger(__name__)

DEFAULT_FPS = 10.0  # UCSD's frame rate, for folders of frames


def _as_video(path: Path) -> Video | None:
    if path.name.startswith("."):
        return None
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        return Video(path.stem, "test", path)
    if path.is_dir() and not path.name.endswith("_gt"):
        frames = _frame_files(path)
        if frames:
            video = Video(path.name, "test", path, frames=frames)
            gt = path.with_name(f"{path.name}_gt")
            if gt.is_dir():
                video.mask_dir, video.mask_frames = gt, _frame_files(gt)
            return video
    return None


def find_inputs(paths, known=()) -> list[Video]:
    """The videos named by `paths` (files, frame folders, or folders holding them), in the order given. Other
    entries of a folder are skipped with a warning, except the files in `known` (read for another purpose:
    the labels).

    Raises:
        PipelineError: a path that does not exist, holds no video, or two videos with one name.
    """
    videos, known = [], {Path(k).resolve() for k in known if k}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise PipelineError(f"Input {path} does not exist.")
        video = _as_video(path)
        if video is not None:
            videos.append(video)
            continue
        if path.is_file():
            raise PipelineError(
                f"Input {path} is not a video file ({', '.join(VIDEO_SUFFIXES)}) or a folder of frames "
                f"({', '.join(FRAME_SUFFIXES)})."
            )
        entries = sorted(path.iterdir())
        found = []
        for entry in entries:
            video = _as_video(entry)
            if video is not None:
                found.append(video)
            elif entry.is_dir() and not entry.name.startswith("."):  # a camera's folder of video files
                found += [v for v in map(_as_video, sorted(entry.iterdir())) if v is not None and v.frames is None]
        if not found:
            raise PipelineError(f"Input folder {path} holds no video files, frames or folders of frames.")
        used = {v.path for v in found} | {v.mask_dir for v in found} | {v.path.parent for v in found}
        skipped = [p.name for p in entries if p not in used and not p.name.startswith(".") and p.resolve() not in known]
        if skipped:
            log.warning(
                "skipped %d entries of %s that are not video files (%s) or folders of frames: %s",
                len(skipped),
                path,
                ", ".join(VIDEO_SUFFIXES),
                listed(skipped),
            )
        videos += found
    return _unique_names(videos)


def _unique_names(videos: list[Video]) -> list[Video]:
    """The videos, those of one name in different folders (cam1/today.mp4, cam2/today.mp4) named after their
    folder as well (cam1_today, cam2_today), and files of one name in one folder after their suffix too
    (clip.avi, clip.webm: clip_avi, clip_webm).

    Raises:
        PipelineError: a video given twice, or names that stay the same.
    """
    paths: dict[Path, Path] = {}
    for v in videos:
        if v.path.resolve() in paths:
            raise PipelineError(f"Input {v.path} is given twice (as {paths[v.path.resolve()]} before).")
        paths[v.path.resolve()] = v.path
    names = [v.name for v in videos]
    for name in {n for n in names if names.count(n) > 1}:
        group = [v for v in videos if v.name == name]
        folders = {v.path.parent for v in group}
        for v in group:
            beside = sum(u.path.parent == v.path.parent for u in group) > 1  # in one folder: by suffix
            suffix = v.path.suffix.lstrip(".").lower()
            folder = f"{v.path.parent.name}_" if len(folders) > 1 else ""
            v.name = f"{folder}{name}" + (f"_{suffix}" if beside and suffix else "")
    renamed = sorted({v.name for v, old in zip(videos, names, strict=True) if v.name != old})
    if renamed:
        log.info("inputs of one name, named after their folder or their suffix too: %s", listed(renamed))
    seen: dict[str, Path] = {}
    for v in videos:
        if v.name in seen:
            raise PipelineError(f"Two inputs are both named {v.name!r}: {seen[v.name]} and {v.path}; rename one.")
        seen[v.name] = v.path
    return videos


def video_fps(video: Video, default: float = DEFAULT_FPS, meta: dict | None = None) -> float:
    """Frames per second of a video file (its container's rate), or `default` for a folder of frames.
    `meta`: the metadata its reader gave when it was decoded (`frames.decode_video`), so that the file is
    not opened again."""
    if video.frames is not None:
        return default
    if not meta:
        import imageio.v2 as imageio

        try:
            with imageio.get_reader(str(video.path), "ffmpeg") as reader:
                meta = reader.get_meta_data()
        except Exception as err:  # imageio raises several types for unreadable files
            raise PipelineError(f"Cannot open video file {video.path}: {err}") from None
    try:
        fps = float(meta.get("fps") or default)
    except (TypeError, ValueError):
        return default
    return fps if math.isfinite(fps) and fps > 0 else default


def frame_step(fps: float, sample_fps: float | None) -> int:
    """Every how many frames a video of `fps` frames/s is scored to be scored at about `sample_fps` (1: all)."""
    return max(1, round(fps / sample_fps)) if sample_fps else 1


def input_labels(
    videos: list[Video], lengths: dict[str, int], labels_csv: str | Path, steps: dict[str, int] | None = None
) -> np.ndarray:
    """0/1 per frame of the videos, in order, from a `video,start_frame,end_frame` CSV (a video without rows
    is all normal), or from a UCSD `.m` file, whose entries belong to the videos in their names' natural
    order (Test001, Test002, ...), one to one; of every `steps[video]`-th frame only, where given (the frames
    scored: `batch_scoring.py --sample_fps`). `lengths`: each video's frame count.

    Raises:
        PipelineError: the CSV names a video that is not among the inputs, the `.m` file has another number
            of entries than there are videos, or a range lies past a video's end.
    """
    if Path(labels_csv).suffix == ".m":
        entries = parse_m_file(labels_csv)
        ordered = sorted((v.name for v in videos), key=natural_key)
        if len(entries) != len(ordered):
            raise PipelineError(
                f"Label file {labels_csv} has {len(entries)} entries but there are {len(ordered)} input videos "
                f"({listed(ordered)}); they must match one to one, in the names' order."
            )
        table = dict(zip(ordered, entries, strict=True))
    else:
        table = parse_labels_csv(labels_csv)
    unknown = sorted(set(table) - {v.name for v in videos})
    if unknown:
        raise PipelineError(
            f"Label file {labels_csv} names videos that are not among the inputs: {unknown} (the inputs: "
            f"{listed(v.name for v in videos)})."
        )
    out = []
    for v in videos:
        v.ranges = table.get(v.name, [])
        out.append(labels_for(v, lengths[v.name])[:: (steps or {}).get(v.name, 1)])
    return np.concatenate(out) if out else np.zeros(0, np.uint8)
