"""Video sent over the network, turned into the frames batch scoring reads: a video file's bytes, an archive
of frame files, or one encoded frame of a stream.

Uploads are bytes, never paths. A video file is written to a private temporary folder that this module
creates and deletes (ffmpeg reads files), and decoded with the reader of `batch_scoring.py --input`
(`models.data.inputs` and `models.data.frames`), so the frames are the same arrays. Archive members are read
in memory and never extracted: names that would leave a folder (absolute, `..`), links and special files
are refused all the same. Every limit is checked while reading, and each refusal is an `UploadError` that
names its limit.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import lzma
import re
import shutil
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from models.data import frames as frame_io
from models.data.index import FRAME_SUFFIXES, VIDEO_SUFFIXES, Video
from models.data.inputs import DEFAULT_FPS, video_fps
from models.errors import PipelineError

if TYPE_CHECKING:
    from PIL import Image

VIDEO_TYPES = {
    "video/mp4": ".mp4",
    "video/x-msvideo": ".avi",
    "video/avi": ".avi",
    "video/msvideo": ".avi",
    "video/quicktime": ".mov",
    "video/x-matroska": ".mkv",
    "video/webm": ".webm",
    "video/x-ms-wmv": ".wmv",
    "video/mpeg": ".mpg",
}
ZIP_TYPES = ("application/zip", "application/x-zip-compressed")
TAR_TYPES = (
    "application/x-tar",
    "application/gzip",
    "application/x-gzip",
    "application/x-gtar",
    "application/x-bzip2",
    "application/x-xz",
)
SNIFF_TYPES = ("application/octet-stream", "")
ACCEPTED = (*VIDEO_TYPES, *ZIP_TYPES, *TAR_TYPES, "application/octet-stream")


class UploadError(PipelineError):
    """A request the service refuses: `status` is its HTTP status, `limit` the setting it ran into."""

    def __init__(self, message: str, status: int = 422, limit: str | None = None):
        super().__init__(message)
        self.status, self.limit = status, limit


@dataclass
class Limits:
    """What one request may ask of the service (`serve.py` sets them)."""

    max_upload_mb: float = 100.0
    max_frames: int = 3000
    max_streams: int = 16
    request_timeout_s: float = 60.0
    max_pixels: int = 4096 * 4096  # per frame, checked before an image is decoded

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class Deadline:
    """The time left to one request; `check` raises a 408 once it has passed. Doubles as the `progress`
    bar of `score_frames`, so a model run stops between two calls when the request is out of time."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> UploadError:
        return UploadError(
            f"The request took longer than request_timeout_s = {self.seconds:g} s.", 408, "request_timeout_s"
        )

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise self.expired()

    def update(self, n: int = 1) -> None:
        self.check()


def media_type(content_type: str | None) -> str:
    """'Video/MP4; codecs=...' -> 'video/mp4'."""
    return (content_type or "").split(";")[0].strip().lower()


def upload_kind(content_type: str | None, filename: str | None, data: bytes) -> tuple[str, str]:
    """What the bytes hold: ('video', suffix), ('zip', '') or ('tar', ''), from the file name's suffix, then
    the content type, then (for application/octet-stream) the first bytes.

    Raises:
        UploadError: 415 for a content type that is none of these.
    """
    name = (filename or "").lower()
    for suffix in VIDEO_SUFFIXES:
        if name.endswith(suffix):
            return "video", suffix
    if name.endswith(".zip"):
        return "zip", ""
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")):
        return "tar", ""
    kind = media_type(content_type)
    if kind in VIDEO_TYPES:
        return "video", VIDEO_TYPES[kind]
    if kind in ZIP_TYPES:
        return "zip", ""
    if kind in TAR_TYPES:
        return "tar", ""
    if kind in SNIFF_TYPES:
        if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            return "zip", ""
        if data[:2] == b"\x1f\x8b" or data[:3] == b"BZh" or data[:6] == b"\xfd7zXZ\x00" or data[257:262] == b"ustar":
            return "tar", ""
        return "video", ".mp4"  # ffmpeg finds the container from its content, whatever the suffix
    raise UploadError(
        f"Unsupported content type {kind!r}: send a video file ({', '.join(VIDEO_TYPES)}), a zip or tar archive "
        "of frames, or multipart/form-data with the file in the field `file`.",
        415,
    )


def safe_name(name: str | None, default: str = "upload") -> str:
    """A video name for the response, never used as a path: letters, digits, '_', '-', '.' only."""
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", name or "").strip("._")[:100]
    return clean or default


def _too_many_frames(limits: Limits) -> UploadError:
    return UploadError(f"The video has more than max_frames = {limits.max_frames} frames.", 413, "max_frames")


def _collect(frames: Iterator[np.ndarray], limits: Limits, deadline: Deadline) -> np.ndarray:
    out = []
    for frame in frames:
        deadline.check()
        if len(out) >= limits.max_frames:
            raise _too_many_frames(limits)
        out.append(frame)
    if not out:
        raise UploadError("The upload holds no frames.")
    return np.stack(out)


@dataclass
class Upload:
    """An upload's frames (n, h, w, c) at the model's size, their rate, the name its archive folder gives the
    video (None: the top, or a video file), and how many frames short of its container's count a video file
    decoded to (a file cut off, or an audio track that outlasts the video: the frames that decode are scored)."""

    frames: np.ndarray
    fps: float
    folder: str | None = None
    frames_lost: int = 0


def read_video_bytes(
    data: bytes, suffix: str, channels: int, size: tuple[int, int], limits: Limits, deadline: Deadline
) -> Upload:
    """The frames of a video file's bytes at the model's `size`, its frames per second, and the frames lost.

    Raises:
        UploadError: not a video, too many frames or pixels, or out of time.
    """
    folder = Path(tempfile.mkdtemp(prefix="prednet-upload-"))  # mode 0700: this process alone
    path = folder / f"upload{suffix}"
    frames = None
    try:
        path.write_bytes(data)
        video, meta = Video("upload", "test", path), {}
        images = frame_io.frame_images(video, meta)
        frames = frame_io.frame_arrays(_limit_pixels(images, limits), "upload", channels, size)
        X = _collect(frames, limits, deadline)
        lost = frame_io.frames_lost(len(X), frame_io.reported_frame_count(path, meta))
        return Upload(X, video_fps(video, meta=meta), None, lost)
    except UploadError:
        raise
    except PipelineError as err:
        message = str(err).replace(f"video file {path}", "the uploaded video")
        raise UploadError(message.replace(str(path), "the uploaded video")) from None
    finally:
        if frames is not None:
            frames.close()  # closes the ffmpeg reader before its file goes
        shutil.rmtree(folder, ignore_errors=True)


def decode_frame(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """An encoded frame of an upload or a stream (`frame_io.decode_image`).

    Raises:
        UploadError: not an image (422), or over `max_pixels` (413, before it is decoded).
    """
    try:
        return frame_io.decode_image(data, name, max_pixels)
    except frame_io.TooManyPixels as err:
        raise UploadError(str(err), 413, "max_pixels") from None
    except PipelineError as err:
        raise UploadError(str(err)) from None


def _limit_pixels(images, limits: Limits):
    for path, image in images:
        if image.size[0] * image.size[1] > limits.max_pixels:
            raise UploadError(
                f"Frames of {image.size[0]}x{image.size[1]} pixels are over the limit of {limits.max_pixels} "
                "pixels per frame.",
                413,
                "max_pixels",
            )
        yield path, image


def _unsafe(name: str) -> bool:
    """A member name that would leave the folder it is extracted to (we never extract; we refuse them)."""
    posix = name.replace("\\", "/")
    return posix.startswith("/") or bool(re.match(r"^[A-Za-z]:", posix)) or ".." in PurePosixPath(posix).parts


def _is_frame(name: str) -> bool:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    masks = any(p.endswith("_gt") for p in parts[:-1])
    return bool(parts) and not hidden and not masks and PurePosixPath(parts[-1]).suffix.lower() in FRAME_SUFFIXES


def archive_members(data: bytes, kind: str, limits: Limits, deadline: Deadline) -> list[tuple[str, bytes]]:
    """The frame files of a zip or tar archive, read in memory: (name, bytes), sorted by name as a folder
    of frames is.

    Raises:
        UploadError: a broken archive, a member that is a link or whose path leaves the archive, frames in
            several folders, more frames than max_frames, more bytes than max_upload_mb uncompressed.
    """
    try:
        members = _zip_members(data, limits, deadline) if kind == "zip" else _tar_members(data, limits, deadline)
    except (zipfile.BadZipFile, tarfile.TarError, lzma.LZMAError, EOFError, OSError, ValueError) as err:
        raise UploadError(f"Cannot read the {kind} archive: {err}") from None
    if not members:
        raise UploadError(f"The {kind} archive holds no frame files ({', '.join(FRAME_SUFFIXES)}).")
    folders = {str(PurePosixPath(n.replace("\\", "/")).parent) for n, _ in members}
    if len(folders) > 1:
        raise UploadError(
            f"The archive holds frames in {len(folders)} folders ({', '.join(sorted(folders)[:5])}): send one "
            "video (one folder of frames) per request."
        )
    return sorted(members)


class _Budget:
    def __init__(self, limits: Limits, deadline: Deadline):
        self.limits, self.deadline, self.bytes, self.frames = limits, deadline, 0, 0

    def take(self, name: str, size: int) -> None:
        self.deadline.check()
        if _unsafe(name):
            raise UploadError(f"Archive member {name!r} has a path that leaves the archive; refused.")
        self.frames += 1
        if self.frames > self.limits.max_frames:
            raise _too_many_frames(self.limits)
        self.skip(size)

    def skip(self, size: int) -> None:
        """Counts `size` bytes the archive must be read through (a tar's other files too: a compressed
        tar is decompressed to reach the next member), before they are read."""
        self.bytes += size
        if self.bytes > self.limits.max_bytes:
            raise UploadError(
                f"The archive is over max_upload_mb = {self.limits.max_upload_mb:g} MB uncompressed.",
                413,
                "max_upload_mb",
            )


def _zip_members(data: bytes, limits: Limits, deadline: Deadline) -> list[tuple[str, bytes]]:
    budget, out = _Budget(limits, deadline), []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if _unsafe(info.filename):
                raise UploadError(f"Archive member {info.filename!r} has a path that leaves the archive; refused.")
            if info.is_dir():
                continue
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise UploadError(f"Archive member {info.filename!r} is a symbolic link; refused.")
            if not _is_frame(info.filename):
                continue
            budget.take(info.filename, info.file_size)
            out.append((info.filename, archive.read(info)))  # zipfile stops at file_size and checks the CRC
    return out


class _Counted(io.RawIOBase):
    """A decompressed stream whose every byte counts against the upload's budget before it is used: a tar's
    headers too (a GNU long name or a pax header is read whole into memory before its member is seen)."""

    def __init__(self, raw, budget: _Budget, limit: int):
        self.raw, self.budget, self.limit, self.read_bytes = raw, budget, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.budget.deadline.check()
        n = self.raw.readinto(buffer)
        self.read_bytes += n
        if self.read_bytes > self.limit:
            raise UploadError(
                f"The archive is over max_upload_mb = {self.budget.limits.max_upload_mb:g} MB uncompressed.",
                413,
                "max_upload_mb",
            )
        return n


def _decompressor(data: bytes):
    """The tar archive inside `data`: gzip, bzip2 and xz are undone as the archive is read, never at once."""
    raw = io.BytesIO(data)
    if data[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw)
    if data[:3] == b"BZh":
        return bz2.BZ2File(raw)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw)
    return raw


def _tar_members(data: bytes, limits: Limits, deadline: Deadline) -> list[tuple[str, bytes]]:
    budget, out = _Budget(limits, deadline), []
    # Headers, padding and the members the budget counts: a little more than the files themselves.
    stream = _Counted(_decompressor(data), budget, limits.max_bytes + 1024 * 1024)
    with tarfile.open(fileobj=io.BufferedReader(stream), mode="r|") as archive:
        for member in archive:  # one header at a time: stops at the first limit, however long the archive
            deadline.check()
            if _unsafe(member.name):
                raise UploadError(f"Archive member {member.name!r} has a path that leaves the archive; refused.")
            if member.isdir():
                continue
            if not member.isfile():
                raise UploadError(f"Archive member {member.name!r} is a link or a special file; refused.")
            if not _is_frame(member.name):
                budget.skip(member.size)  # the next header lies beyond its data
                continue
            budget.take(member.name, member.size)
            out.append((member.name, archive.extractfile(member).read()))
    return out


def read_archive_bytes(
    data: bytes, kind: str, channels: int, size: tuple[int, int], limits: Limits, deadline: Deadline
) -> tuple[np.ndarray, str | None]:
    """Frames (n, h, w, c) of an archive of frame files at the model's `size`, decoded in memory as
    batch scoring reads a folder of frames, and the name of the folder that held them (None: the top)."""
    members = archive_members(data, kind, limits, deadline)
    images = ((name, decode_frame(content, name, limits.max_pixels)) for name, content in members)
    try:
        X = _collect(frame_io.frame_arrays(images, "upload", channels, size), limits, deadline)
    except UploadError:
        raise
    except PipelineError as err:
        raise UploadError(str(err)) from None
    folder = PurePosixPath(members[0][0].replace("\\", "/")).parent.name
    return X, folder or None


def read_upload(
    data: bytes,
    content_type: str | None,
    filename: str | None,
    channels: int,
    size: tuple[int, int],
    limits: Limits,
    deadline: Deadline,
    fps: float | None = None,
) -> Upload:
    """The frames of any upload at the model's size, their rate, the name it gives its video, frames lost.
    The rate is `fps` if given (the client's word: a raw camera stream's container names none, and ffmpeg
    then assumes 25), else a video file's own, or 10 for an archive (as `batch_scoring.py --fps` for folders
    of frames).

    Raises:
        UploadError: with the status to answer and the limit, if any.
    """
    if not data:
        raise UploadError("The request body is empty: send a video file or an archive of frames.")
    kind, suffix = upload_kind(content_type, filename, data)
    if kind == "video":
        upload = read_video_bytes(data, suffix, channels, size, limits, deadline)
        return dataclasses.replace(upload, fps=fps) if fps else upload
    X, folder = read_archive_bytes(data, kind, channels, size, limits, deadline)
    return Upload(X, fps or DEFAULT_FPS, folder)


class FrameDecoder:
    """The frames of one stream: each message's image decoded and resized as a folder of frames would be,
    all of one size (the first frame's)."""

    def __init__(self, channels: int, size: tuple[int, int], max_pixels: int):
        self.channels, self.size, self.max_pixels = channels, size, max_pixels
        self.native: tuple[int, int] | None = None

    def decode(self, data: bytes, name: str) -> np.ndarray:
        """uint8 (h, w, c) at the model's size.

        Raises:
            UploadError: bytes that are not an image, too many pixels, or another size than the first frame.
        """
        if not data:
            raise UploadError(f"{name} is empty: send each frame as an encoded image (PNG or JPEG).")
        image = decode_frame(data, name, self.max_pixels)
        if self.native is not None and image.size != self.native:
            raise UploadError(
                f"{name} is {image.size[0]}x{image.size[1]} pixels but the stream's frames are "
                f"{self.native[0]}x{self.native[1]} (width x height); frame dropped."
            )
        frame = next(frame_io.frame_arrays([(name, image)], "stream", self.channels, self.size))
        self.native = image.size
        return frame
