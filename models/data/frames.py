"""Decoding and resizing frames, one video per worker process."""

from __future__ import annotations

import ctypes
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


def detect_channels(image: Image.Image) -> int:
    """1 for grey sources (also grey stored as RGB, as in re-encoded UCSD copies), else 3."""
    if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return 1
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    spread = np.abs(rgb[..., 0] - rgb[..., 1]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean()
    return 1 if spread < 2.0 else 3


def _to_array(image: Image.Image, size: tuple[int, int], channels: int, resample) -> np.ndarray:
    image = image.convert("L" if channels == 1 else "RGB")
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


def _iter_video_file(path: Path):
    import imageio.v2 as imageio

    try:
        reader = imageio.get_reader(str(path), "ffmpeg")
    except Exception as err:  # imageio raises several types for unreadable files
        raise PipelineError(f"Cannot open video file {path}: {err}") from None
    try:
        yield from reader
    except Exception as err:
        raise PipelineError(f"Cannot decode video file {path}: {err}") from None
    finally:
        reader.close()


def read_video(video: Video, size: tuple[int, int], channels: int) -> np.ndarray:
    """All frames of one video, resized to `size` (height, width): uint8 (n, height, width, channels).

    Raises:
        PipelineError: a frame that cannot be decoded, or frames of different sizes within the video.
    """
    if video.frames is not None:
        images = ((path, _open(path)) for path in video.frames)
    else:
        images = ((video.path, Image.fromarray(f)) for f in _iter_video_file(video.path))
    out, first_size, first_path = [], None, None
    for path, image in images:
        if first_size is None:
            first_size, first_path = image.size, path
        elif image.size != first_size:
            raise PipelineError(
                f"Frames of different sizes in video {video.name}: {first_path} is {first_size[0]}x{first_size[1]}, "
                f"{path} is {image.size[0]}x{image.size[1]} (width x height)."
            )
        out.append(_to_array(image, size, channels, Image.Resampling.BILINEAR))
    if not out:
        raise PipelineError(f"Video {video.name} ({video.path}) has no frames.")
    return np.stack(out)


def read_masks(video: Video, size: tuple[int, int]) -> np.ndarray:
    """The video's pixel masks, resized with nearest neighbours: uint8 0/1 (n, height, width)."""
    masks = [_to_array(_open(p), size, 1, Image.Resampling.NEAREST)[..., 0] for p in video.mask_frames]
    return (np.stack(masks) > 127).astype(np.uint8)


def _read_one(args):
    video, size, channels = args
    return read_video(video, size, channels)


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


def read_videos(videos: list[Video], size: tuple[int, int], channels: int, workers: int | None = None, progress=None):
    """Reads many videos in parallel processes, yielding (video, frames) in the given order.

    Args:
        videos: the videos to read.
        size: (height, width) to resize to.
        channels: 1 or 3.
        workers: processes to use; all cores by default. They end with the run, however it ends.
        progress: an optional tqdm bar, advanced by each video's frame count.
    """
    workers = min(workers or os.cpu_count() or 1, len(videos))
    jobs = [(v, size, channels) for v in videos]
    pool, finished = None, False
    others = set(multiprocessing.active_children())
    try:
        if workers > 1:
            pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(os.getpid(),))
        results = pool.map(_read_one, jobs) if pool is not None else map(_read_one, jobs)
        for video, frames in zip(videos, results, strict=True):
            if progress is not None:
                progress.update(len(frames))
            yield video, frames
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
