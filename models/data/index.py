"""Index of a video anomaly dataset on disk: which videos, which frames, which labels.

UCSD layout (Ped1, Ped2; https://www.svcl.ucsd.edu/projects/anomaly/dataset.htm)::

    UCSD_Anomaly_Dataset.v1p2/
        UCSDped2/
            Train/
                Train001/001.tif 002.tif ...     normal videos, one folder of frames each
            Test/
                Test001/001.tif ...               test videos
                Test001_gt/001.bmp ...            optional pixel masks of the anomalies
                UCSDped2.m                        frame-level ground truth, one line per test video:
                                                  TestVideoFile{end+1}.gt_frame = [61:180];

Custom layout: the same `Train/` and `Test/` folders, where each video is either a folder of frames
(any format Pillow reads: .tif, .jpg, .png, .bmp) or a video file (.mp4, .avi, .mov, .mkv), and the
test labels are a UCSD-style `.m` file (entries in the videos' natural order) or `Test/labels.csv`::

    video,start_frame,end_frame        1-based and inclusive; several rows per video allowed;
    cam_03,61,180                      a test video without rows is all normal

Rules kept everywhere: names starting with '.' (macOS `._001.jpg`, `.DS_Store`) are skipped; the frames
(and masks) of a folder are ordered by the numbers in their names (`frame_2.png` before `frame_10.png`),
and a folder whose names differ in more than their numbers, or share a number, is refused; video names
(folder names and file names without their suffix) are unique across `Train/` and `Test/`.

`build_index` turns such a tree into a list of `Video` records that the rest of the code consumes.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.errors import PipelineError

log = logging.getLogger(__name__)

FRAME_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".bmp")
VIDEO_SUFFIXES = (
    ".mp4",
    ".avi",
    ".mov",
    ".mkv",
    ".webm",
    ".wmv",
    ".mpg",
    ".mpeg",
)  # those imageio's ffmpeg reader opens
UCSD_URL = "http://www.svcl.ucsd.edu/projects/anomaly/dataset.htm"
EXPECTED_TREE = (
    "<raw_data>/UCSD_Anomaly_Dataset.v1p2/<dataset>/Train/Train001/001.tif, .../Test/Test001/001.tif and "
    ".../Test/<dataset>.m (docs/data_preparation.md)"
)


@dataclass
class Video:
    """One video of the dataset.

    Attributes:
        name: unique name, e.g. 'Train001' or 'cam_03'.
        split: 'train' (normal videos, later split into train and val) or 'test'.
        path: the frame folder or the video file.
        frames: the frame files in order, or None for a video file.
        ranges: anomalous frame ranges (1-based, inclusive) of a test video with labels, else None.
        mask_dir: folder of per-frame pixel masks, if the dataset has one.
    """

    name: str
    split: str
    path: Path
    frames: list[Path] | None = None
    ranges: list[tuple[int, int]] | None = None
    mask_dir: Path | None = None
    mask_frames: list[Path] = field(default_factory=list)


def _strip_matlab_comments(text: str) -> str:
    """MATLAB source without its comments (`% ...` to the end of a line, `%{ ... %}` blocks) and with
    `...` line continuations joined."""
    lines, in_block = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped == "%{":
            in_block = True
        elif stripped == "%}" and in_block:
            in_block = False
        elif not in_block:
            lines.append(line.split("%", 1)[0])
    return "\n".join(lines).replace("...", " ")


def parse_m_file(path: str | Path) -> list[list[tuple[int, int]]]:
    """Parses UCSD ground truth: one list of (start, end) ranges per `gt_frame` entry, in file order.

    Accepts several ranges and single frames per entry, e.g. `[1:52, 65:115]` or `[5 7:9]`; MATLAB
    comments (`% ...`, `%{ ... %}`) are ignored.
    """
    path = Path(path)
    text = _strip_matlab_comments(path.read_text(errors="replace"))
    entries = re.findall(r"gt_frame\s*=\s*\[([^\]]*)\]", text)
    if not entries:
        raise PipelineError(f"No 'gt_frame = [...]' entries found in label file {path}.")
    result = []
    for i, body in enumerate(entries, 1):
        ranges = []
        for token in re.split(r"[\s,;]+", body.strip()):
            if not token:
                continue
            m = re.fullmatch(r"(\d+)(?::(\d+))?", token)
            if not m:
                raise PipelineError(f"Entry {i} of {path} has an unreadable range {token!r}.")
            start = int(m.group(1))
            end = int(m.group(2) or start)
            if start < 1 or end < start:
                raise PipelineError(f"Entry {i} of {path} has an invalid range {token!r} (1-based, start <= end).")
            ranges.append((start, end))
        result.append(ranges)
    return result


def parse_labels_csv(path: str | Path) -> dict[str, list[tuple[int, int]]]:
    """Parses `video,start_frame,end_frame` rows (1-based, inclusive) into ranges per video.

    The file must be UTF-8 (a byte-order mark, as Excel writes, is fine); blank lines are skipped.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise PipelineError(
            f"Label file {path} is not UTF-8 text (byte {err.object[err.start : err.start + 1]!r} at offset "
            f"{err.start}); save it as UTF-8 (CSV UTF-8 in Excel)."
        ) from None
    ranges: dict[str, list[tuple[int, int]]] = {}
    reader = csv.DictReader(io.StringIO(text, newline=""))
    reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
    missing = {"video", "start_frame", "end_frame"} - set(reader.fieldnames)
    if missing:
        raise PipelineError(
            f"Label file {path} lacks the column(s) {sorted(missing)}; expected video,start_frame,end_frame."
        )
    for row in reader:
        if not any(isinstance(v, str) and v.strip() for v in row.values()):
            continue  # a blank line, or one of commas only
        line = reader.line_num
        try:
            start, end = int(row["start_frame"]), int(row["end_frame"])
        except (TypeError, ValueError):
            raise PipelineError(f"Line {line} of {path}: frame numbers must be integers. Received: {row}") from None
        if start < 1 or end < start:
            raise PipelineError(f"Line {line} of {path}: invalid range {start}-{end} (1-based, start <= end).")
        if not (row["video"] or "").strip():
            raise PipelineError(f"Line {line} of {path}: no video name. Received: {row}")
        ranges.setdefault(row["video"].strip(), []).append((start, end))
    return ranges


def resolve_root(raw_data: str | Path, dataset: str) -> Path:
    """Finds the dataset folder: `<raw_data>/<dataset>` or `<raw_data>/UCSD_Anomaly_Dataset.v1p2/<dataset>`."""
    raw_data = Path(raw_data)
    for candidate in (raw_data / dataset, raw_data / "UCSD_Anomaly_Dataset.v1p2" / dataset):
        if (candidate / "Train").is_dir() or (candidate / "Test").is_dir():
            return candidate
    raise PipelineError(
        f"Dataset {dataset!r} not found under {raw_data}: no Train/ or Test/ folder in {raw_data / dataset} "
        f"or {raw_data / 'UCSD_Anomaly_Dataset.v1p2' / dataset}. Get UCSD from {UCSD_URL}, unpack it into "
        f"{raw_data} so that it holds {EXPECTED_TREE}, or make the synthetic dataset with --make_synthetic."
    )


def raw_datasets(raw_data: str | Path) -> list[str]:
    """The datasets `resolve_root` can find under `raw_data`: folders holding Train/ or Test/, directly or in
    UCSD_Anomaly_Dataset.v1p2/."""
    raw_data = Path(raw_data)
    names = set()
    for parent in (raw_data, raw_data / "UCSD_Anomaly_Dataset.v1p2"):
        if parent.is_dir():
            names |= {p.name for p in parent.iterdir() if (p / "Train").is_dir() or (p / "Test").is_dir()}
    return sorted(names)


def _visible(folder: Path) -> list[Path]:
    """The entries of `folder`, without hidden ones (names starting with '.', as macOS's `._001.jpg`)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def natural_key(name: str) -> tuple:
    """Sort key that reads the numbers in a name as numbers: 'Test2' before 'Test10'."""
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p), name


def order_frames(folder: Path, files: list[Path]) -> list[Path]:
    """The frame files of one folder in the order of the numbers in their names (`2.png` before `10.png`).

    The names (without their suffix) must differ in their numbers only, with one number sequence each:
    `001.tif 002.tif`, `frame_1.jpg ... frame_19.jpg` and `cam2_f1.png cam2_f2.png` are fine; `a1.jpg b2.jpg`
    (different text), `1.jpg 01.jpg` (the same number) and `frame.jpg frame_1.jpg` are refused, since no
    order of them can be trusted. A folder of one frame needs no number.

    Raises:
        PipelineError: naming the folder and two files that cannot be ordered.
    """
    if len(files) < 2:
        return list(files)
    keys = {}
    for path in files:
        parts = re.split(r"(\d+)", path.stem)
        keys[path] = (tuple(parts[0::2]), tuple(int(n) for n in parts[1::2]))
    first = files[0]
    hint = "name the frames of a video alike, numbered: 001.png 002.png ... or frame_1.jpg frame_2.jpg ..."
    for path in files:
        if not keys[path][1]:
            raise PipelineError(f"Cannot order the frames of {folder}: {path.name!r} has no frame number; {hint}")
        if keys[path][0] != keys[first][0]:
            raise PipelineError(
                f"Cannot order the frames of {folder}: {first.name!r} and {path.name!r} differ in more than their "
                f"numbers; {hint}"
            )
    seen: dict[tuple[int, ...], Path] = {}
    for path in files:
        other = seen.setdefault(keys[path][1], path)
        if other is not path:
            raise PipelineError(
                f"Cannot order the frames of {folder}: {other.name!r} and {path.name!r} have the same number; {hint}"
            )
    return sorted(files, key=lambda p: keys[p][1])


def listed(names, most: int = 10) -> str:
    """Names for a message: the first `most`, comma-separated, then ', ...' if there are more."""
    names = list(names)
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def _frame_files(folder: Path) -> list[Path]:
    """The frame files of `folder` in frame order; what else it holds is warned of when it has frames."""
    entries = _visible(folder)
    files = [p for p in entries if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
    others = sorted(p.name for p in entries if p not in files)
    if files and others:
        log.warning(
            "skipped %d entries of frame folder %s that are not frames (%s): %s",
            len(others),
            folder,
            ", ".join(FRAME_SUFFIXES),
            listed(others),
        )
    return order_frames(folder, sorted(files))


def _list_videos(split_dir: Path, split: str) -> list[Video]:
    videos = []
    for entry in sorted(_visible(split_dir), key=lambda p: natural_key(p.name)):
        if entry.is_dir():
            if entry.name.endswith("_gt"):
                continue
            frames = _frame_files(entry)
            if not frames:
                raise PipelineError(f"Video folder {entry} has no frames ({', '.join(FRAME_SUFFIXES)}).")
            video = Video(entry.name, split, entry, frames=frames)
            gt = split_dir / f"{entry.name}_gt"
            if gt.is_dir():
                video.mask_dir, video.mask_frames = gt, _frame_files(gt)
            videos.append(video)
        elif entry.suffix.lower() in VIDEO_SUFFIXES:
            videos.append(Video(entry.stem, split, entry))
    return videos


def _attach_labels(test_dir: Path, videos: list[Video]) -> None:
    m_files = sorted(p for p in _visible(test_dir) if p.suffix == ".m" and p.is_file())
    csv_file = test_dir / "labels.csv"
    if csv_file.is_file():
        table = parse_labels_csv(csv_file)
        unknown = sorted(set(table) - {v.name for v in videos})
        if unknown:
            raise PipelineError(f"Label file {csv_file} names videos that are not in {test_dir}: {unknown}.")
        for v in videos:
            v.ranges = table.get(v.name, [])
    elif m_files:
        if len(m_files) > 1:
            raise PipelineError(f"Several .m label files in {test_dir}: {[p.name for p in m_files]}; keep one.")
        entries = parse_m_file(m_files[0])
        if len(entries) != len(videos):
            raise PipelineError(
                f"Label file {m_files[0]} has {len(entries)} entries but {test_dir} has {len(videos)} test "
                f"videos ({', '.join(v.name for v in videos)}); they must match one to one, in that order."
            )
        for v, ranges in zip(videos, entries, strict=True):
            v.ranges = ranges


def build_index(root: str | Path) -> list[Video]:
    """Lists every video under `root/Train` and `root/Test`, with the test labels when there are any.

    Raises:
        PipelineError: no videos, an empty video folder, frames that cannot be ordered, two videos of one
            name, or labels that do not match the test videos.
    """
    root = Path(root)
    videos = []
    for split, sub in (("train", "Train"), ("test", "Test")):
        if (root / sub).is_dir():
            videos += _list_videos(root / sub, split)
    by_name: dict[str, Video] = {}
    for video in videos:
        other = by_name.setdefault(video.name, video)
        if other is not video:
            raise PipelineError(
                f"Two videos named {video.name!r}: {other.path} and {video.path}; video names must be unique "
                "across Train/ and Test/ (frames and labels are kept by name), so rename one."
            )
    if (root / "Test").is_dir():
        _attach_labels(root / "Test", [v for v in videos if v.split == "test"])
    if not any(v.split == "train" for v in videos):
        raise PipelineError(f"No training videos in {root / 'Train'}; expected {EXPECTED_TREE}.")
    return videos


def labels_for(video: Video, n_frames: int):
    """0/1 per frame from the video's ranges, checking that no range runs past the video's end."""
    y = np.zeros(n_frames, dtype=np.uint8)
    for start, end in video.ranges or []:
        if end > n_frames:
            raise PipelineError(
                f"Label range {start}:{end} of test video {video.name} runs past its last frame ({n_frames})."
            )
        y[start - 1 : end] = 1
    return y


def label_ranges(y: np.ndarray) -> list[tuple[int, int]]:
    """1-based inclusive ranges of the runs of ones in `y`: the inverse of `labels_for`."""
    padded = np.concatenate([[0], y.astype(int), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return [(int(s) + 1, int(e)) for s, e in zip(edges[::2], edges[1::2], strict=True)]
