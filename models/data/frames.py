"""Decoding and resizing frames, one video per worker process.

Every frame becomes uint8. Frames of more than 8 bits are scaled, never clipped: 16-bit frames (Pillow
modes I;16, I;16B, and I, the 32-bit integers some TIFFs hold, read as 16-bit) by 255/65535, rounded to
the nearest (65535 -> 255, 257 * k -> k); float frames (mode F) must lie in [0, 1] and are scaled by 255,
rounded half up (0.5 -> 128). Values outside those ranges are refused, naming the frame.

A video file that decodes to fewer frames than its container reports (an AVI's header, or the duration
times the frame rate) by more than 1 frame and 1% is truncated: refused, or kept with a warning giving
the frames lost.
"""

from __future__ import annotations

import ctypes
import io
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.data.index import Video
from models.errors import PipelineError

GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def detect_channels(image: Image.Image) -> int:
    """1 for grey sources (also grey stored as RGB, as in re-encoded UCSD copies), else 3."""
    if image.mode in GREY_MODES:
        return 1
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    spread = np.abs(rgb[..., 0] - rgb[..., 1]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean()
    return 1 if spread < 2.0 else 3


def to_8bit(image: Image.Image, path: str | Path = "") -> Image.Image:
    """A 16-bit, 32-bit integer or float grey frame as an 8-bit one ('L'), scaled as the module says;
    other frames as they are.

    Raises:
        PipelineError: integer values outside 0-65535 or float values outside [0, 1], naming `path`.
    """
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (np.isfinite(values).all() and low >= -1e-6 and high <= 1 + 1e-6):
            raise PipelineError(
                f"Float frame {path} has values in [{low:g}, {high:g}]; float frames must lie in [0, 1] "
                "(or save them as 8- or 16-bit integers)."
            )
        return Image.fromarray(np.floor(np.clip(values, 0, 1) * 255 + 0.5).astype(np.uint8))
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise PipelineError(
                f"Frame {path} holds integers in [{values.min()}, {values.max()}]; integer frames of more than "
                "8 bits are read as 16-bit (0-65535)."
            )
        return Image.fromarray(((values + 128) // 257).astype(np.uint8))
    return image


def _to_array(image: Image.Image, size: tuple[int, int], channels: int, resample, path: str | Path = "") -> np.ndarray:
    image = to_8bit(image, path).convert("L" if channels == 1 else "RGB")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), resample)
    arr = np.asarray(image, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


def first_image(video: Video) -> Image.Image:
    """The first frame of a video, for sniffing its size and channels."""
    if video.frames is not None:
        return _open(video.frames[0])
    for frame in _iter_video_file(video.path):
        return Image.fromarray(frame)
    raise PipelineError(f"Video file {video.path} has no frames.")


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise PipelineError(f"Cannot read frame {path}: {err}") from None
    return image


class TooManyPixels(PipelineError):
    """A frame over the pixel limit `decode_image` was given (checked before it is decoded)."""


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """An encoded frame (PNG, JPEG, TIFF, BMP bytes) decoded in memory, as `_open` reads a frame file.

    Args:
        data: the encoded image.
        name: what to call it in error messages.
        max_pixels: refuse images with more pixels than this, before decoding them.

    Raises:
        PipelineError: bytes that are not an image, a truncated image, or one over `max_pixels`
            (`TooManyPixels`).
    """
    try:
        image = Image.open(io.BytesIO(data))
        if max_pixels is not None and image.size[0] * image.size[1] > max_pixels:
            raise TooManyPixels(
                f"Frame {name} is {image.size[0]}x{image.size[1]} pixels, over the limit of {max_pixels} pixels."
            )
        image.load()
    except UnidentifiedImageError:
        raise PipelineError(f"Cannot read frame {name}: not an image of a known format.") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise PipelineError(f"Cannot read frame {name}: {err}") from None
    return image


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def avi_frame_count(path: str | Path) -> int | None:
    """The frame count an AVI file's header states (OpenDML `dmlh`, else the video stream's `strh`
    length, else `avih`), or None when the file is no AVI. The header comes first in the file, so it
    survives a truncation that the index at the end does not."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head[:4] != b"RIFF" or head[8:12] != b"AVI ":
        return None
    counts: dict[str, int] = {}

    def u32(at: int) -> int:
        return int.from_bytes(head[at : at + 4], "little")

    def walk(pos: int, end: int) -> None:
        while pos + 8 <= min(end, len(head)):
            fourcc, size, body = head[pos : pos + 4], u32(pos + 4), pos + 8
            if fourcc == b"LIST" and head[body : body + 4] in (b"hdrl", b"strl", b"odml"):
                walk(body + 4, body + size)
            elif fourcc == b"LIST" and head[body : body + 4] == b"movi":
                return
            elif fourcc == b"avih" and size >= 20:
                counts.setdefault("avih", u32(body + 16))
            elif fourcc == b"strh" and size >= 36 and head[body : body + 4] == b"vids":
                counts.setdefault("strh", u32(body + 32))
            elif fourcc == b"dmlh" and size >= 4:
                counts.setdefault("dmlh", u32(body))
            pos = body + size + (size & 1)

    walk(12, len(head))
    for key in ("dmlh", "strh", "avih"):
        if counts.get(key):
            return counts[key]
    return None


def reported_frame_count(path: str | Path, meta: dict) -> int | None:
    """Frames a video file's container says it holds: an AVI's header count, else its duration times its
    frame rate (as ffmpeg reports them), or None when it says nothing usable."""
    if Path(path).suffix.lower() == ".avi":
        count = avi_frame_count(path)
        if count:
            return count
    duration, fps = meta.get("duration"), meta.get("fps")
    try:
        frames = float(duration) * float(fps)
    except (TypeError, ValueError):
        return None
    return round(frames) if math.isfinite(frames) and frames > 0 else None


def lost_frames_note(decoded: int, lost: int) -> str:
    """What the frames missing from a video file (`frames_lost`) say, for a warning."""
    return (
        f"{decoded} frames decoded but its container reports {decoded + lost} (a file cut off, or an audio track "
        "that outlasts the video)"
    )


def frames_lost(decoded: int, reported: int | None) -> int:
    """Frames missing from a decoded video file: 0 unless it is short of its container's count by more than
    1 frame and 1% (container durations are rounded, and an audio track may outlast the video a little)."""
    if reported is None:
        return 0
    lost = reported - decoded
    return lost if lost > max(1, reported // 100) else 0


def _iter_video_file(path: Path, meta: dict | None = None):
    """Yields the frames of a video file as arrays, as they are stored (a variable-rate file's too: ffmpeg
    would otherwise repeat frames to fill its gaps at the stream's nominal rate, which the rate reported for
    it, the average, does not count); fills `meta` with the reader's metadata first."""
    import imageio.v2 as imageio

    try:
        reader = imageio.get_reader(str(path), "ffmpeg", output_params=["-fps_mode", "passthrough"])
    except Exception as err:  # imageio raises several types for unreadable files
        raise PipelineError(
            f"Cannot open video file {path}: {_first_line(err)} (not a video, or truncated before its index)"
        ) from None
    if meta is not None:
        meta.update(reader.get_meta_data())
    try:
        yield from reader
    except Exception as err:
        raise PipelineError(f"Cannot decode video file {path}: {_first_line(err)}") from None
    finally:
        reader.close()


def read_video(video: Video, size: tuple[int, int], channels: int, allow_truncated: bool = False) -> np.ndarray:
    """All frames of one video, resized to `size` (height, width): uint8 (n, height, width, channels).

    Raises:
        PipelineError: a frame that cannot be decoded, frames of different sizes within the video, or a
            truncated video file without `allow_truncated`.
    """
    return decode_video(video, size, channels, allow_truncated)[0]


def decode_video(
    video: Video, size: tuple[int, int], channels: int, allow_truncated: bool = False, meta: dict | None = None
) -> tuple[np.ndarray, int]:
    """`read_video`, also returning the number of frames lost: how many fewer a video file decoded to than
    its container reports (0 for frame folders and complete files; see `frames_lost`). A video file's
    reader's metadata fills `meta` if given (for `video_fps`)."""
    meta = {} if meta is None else meta
    out = list(frame_arrays(frame_images(video, meta), video.name, channels, size))
    if not out:
        raise PipelineError(f"Video {video.name} ({video.path}) has no frames.")
    lost = 0 if video.frames is not None else frames_lost(len(out), reported_frame_count(video.path, meta))
    if lost and not allow_truncated:
        raise PipelineError(
            f"Video file {video.path} is truncated: {len(out)} frames decoded but its container reports "
            f"{len(out) + lost}; re-encode it, or keep the {len(out)} frames with --allow_truncated (data preparation)."
        )
    return np.stack(out), lost


def frame_images(video: Video, meta: dict | None = None):
    """(path, image) of each frame of a video, decoded one at a time: its frame files, or its video file
    (whose reader's metadata fills `meta`, for `reported_frame_count`)."""
    if video.frames is not None:
        return ((path, _open(path)) for path in video.frames)
    return ((video.path, Image.fromarray(f)) for f in _iter_video_file(video.path, meta))


def frame_arrays(images, name: str, channels: int, size: tuple[int, int] | None = None):
    """uint8 (height, width, channels) arrays of (path, image) pairs, one at a time, resized to `size`
    (height, width) if given.

    Raises:
        PipelineError: frames of different sizes within the video, or values `to_8bit` refuses.
    """
    first_size, first_path = None, None
    for path, image in images:
        if first_size is None:
            first_size, first_path = image.size, path
        elif image.size != first_size:
            raise PipelineError(
                f"Frames of different sizes in video {name}: {first_path} is {first_size[0]}x{first_size[1]}, "
                f"{path} is {image.size[0]}x{image.size[1]} (width x height)."
            )
        yield _to_array(image, size or (image.size[1], image.size[0]), channels, Image.Resampling.BILINEAR, path)


def read_masks(video: Video, size: tuple[int, int]) -> np.ndarray:
    """The video's pixel masks, resized with nearest neighbours: uint8 0/1 (n, height, width)."""
    masks = [_to_array(_open(p), size, 1, Image.Resampling.NEAREST, p)[..., 0] for p in video.mask_frames]
    return (np.stack(masks) > 127).astype(np.uint8)


def _read_one(args):
    return decode_video(*args)


def _orphaned(parent: int) -> bool:
    """Whether the run that started this worker has died. A forked worker's parent is the run itself, which
    may be dead but not yet reaped (so still signalable): a new parent id says it. Otherwise (forkserver) the
    run's id is checked."""
    if multiprocessing.get_start_method() == "fork" and os.getppid() != parent:
        return True
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _worker_init(parent: int) -> None:
    """Ties a decoding worker to the run that started it.

    Killed, the run cannot tell its workers to stop, and they would wait for work forever (each holds the
    others' end of the task queue open). So a worker dies with its parent: on Linux the kernel sends it
    SIGKILL (PR_SET_PDEATHSIG), elsewhere a thread checks every second. Ctrl-C is left to the parent, which
    stops the pool and prints one line.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watched = False
    if sys.platform.startswith("linux"):
        try:
            watched = ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) == 0  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            watched = False
    if _orphaned(parent):  # the parent died before the worker was tied to it
        os._exit(1)
    if not watched:

        def watch():
            while not _orphaned(parent):
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


def read_videos(
    videos: list[Video],
    size: tuple[int, int],
    channels: int,
    workers: int | None = None,
    progress=None,
    allow_truncated: bool = False,
):
    """Reads many videos in parallel processes, yielding (video, frames, frames lost) in the given order
    (see `decode_video`).

    Args:
        videos: the videos to read.
        size: (height, width) to resize to.
        channels: 1 or 3.
        workers: processes to use; all cores by default. They end with the run, however it ends.
        progress: an optional tqdm bar, advanced by each video's frame count.
        allow_truncated: keep truncated video files (see `read_video`) instead of refusing them.
    """
    workers = min(workers or os.cpu_count() or 1, len(videos))
    jobs = [(v, size, channels, allow_truncated) for v in videos]
    pool, finished = None, False
    others = set(multiprocessing.active_children())
    try:
        if workers > 1:
            pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(os.getpid(),))
        results = pool.map(_read_one, jobs) if pool is not None else map(_read_one, jobs)
        for video, (frames, lost) in zip(videos, results, strict=True):
            if progress is not None:
                progress.update(len(frames))
            yield video, frames, lost
        finished = True
    finally:
        if pool is not None:
            manager = getattr(pool, "_executor_manager_thread", None)
            starting = manager is None or not manager.is_alive()
            if not finished and starting:
                # Interrupted (Ctrl-C) while the pool was starting its workers: no thread of the pool would ever
                # tell them to stop. (Once it runs, workers are never killed: one killed while sending its frames
                # would leave the pool waiting for the rest of them.)
                for process in set(multiprocessing.active_children()) - others:
                    process.kill()
            # On an error or Ctrl-C the videos not yet started are dropped; the workers finish their current one.
            pool.shutdown(wait=not starting, cancel_futures=True)
