"""Atomic outputs: nothing half-written is ever left where a user looks for results."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from models.errors import PipelineError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside `dest` that becomes `dest` only if the block succeeds.

    Args:
        dest: the folder to create.
        overwrite: replace an existing `dest`. Without it an existing folder is an error, raised before
            any work is done, so that nothing a user made is lost by accident.

    Raises:
        PipelineError: `dest` exists and `overwrite` is false.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise PipelineError(f"Output folder {dest} already exists; pass --overwrite to replace it.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `dest` that is renamed to `dest` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", suffix=dest.suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dest)


def write_json(path: str | Path, obj) -> None:
    """Writes `obj` as indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> dict:
    """Reads a JSON file, with a clear error naming the file when it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"Missing file {path}.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path} is not valid JSON: {err}") from err
