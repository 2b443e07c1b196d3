"""Outputs and their rules: nothing half-written is left, and nothing the pipeline did not write is replaced.

The rule, kept by every stage through this module:

- Every output folder carries a marker, `.prednet-output.json`, that names the stage that wrote it and lists
  the files it wrote, with the SHA-256 of each. A folder is built in a temporary folder beside its target
  and renamed into place (swapped atomically with the old one where the system allows), so a kill leaves
  the target either as it was or complete.
- `--overwrite` replaces only a folder whose marker names the same stage and that holds no file the marker
  does not list (or that carries its own marker, as `fit_anoms.py --apply`'s `anomaly_scores.csv` does) and
  no listed file changed since (a user's edit is theirs). A folder without a marker is the user's, and is
  never replaced.
- A target may never be, hold, or lie inside an input of the run (paths compared resolved).
- One run at a time per target: an exclusive lock, `.<name>.lock` beside the target; a second run refuses
  at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

from models.errors import PipelineError

log = logging.getLogger(__name__)

MARKER = ".prednet-output.json"
MARKER_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sibling(dest: str | Path, suffix: str) -> Path:
    """A hidden path beside `dest` that belongs to it: `.<name><suffix>` (locks, temporary and staging folders).

    Beside `dest` itself, not beside what a link at `dest` points to, so that renames stay in one folder.
    """
    dest = Path(dest)
    if dest.name in ("", ".", ".."):
        dest = dest.resolve()
    return dest.parent.resolve() / f".{dest.name}{suffix}"


# --- markers ---------------------------------------------------------------------------------------------


def read_marker(folder: str | Path) -> dict | None:
    """The marker of an output folder, or None when it has none (or an unreadable one): then it is not ours."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("stage"), str) else None


def _files(folder: Path) -> list[str]:
    """Every file under `folder` (links included, folders not), as sorted relative POSIX paths, less the marker."""
    out = []
    for path in folder.rglob("*"):
        if path.is_symlink() or not path.is_dir():
            rel = path.relative_to(folder).as_posix()
            if rel != MARKER:
                out.append(rel)
    return sorted(out)


def _folders(folder: Path) -> list[str]:
    """Every folder under `folder` (not links), as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_dir() and not p.is_symlink())


def _stamp(stage: str) -> dict:
    """What every marker begins with: the stage that wrote, when, and the markers' version."""
    return {"stage": stage, "created": datetime.now(UTC).isoformat(timespec="seconds"), "version": MARKER_VERSION}


def write_marker(folder: str | Path, stage: str, complete: bool = True, **fields) -> None:
    """Marks `folder` as the output of `stage` (with `fields` besides); a complete folder's marker also lists
    the files in it, and the SHA-256 of each (links: none), so that a later run can tell a file the user
    changed."""
    folder = Path(folder)
    marker = {**_stamp(stage), "complete": complete, **fields}
    if complete:
        marker["files"] = _files(folder)
        marker["sha256"] = {rel: _sha256(folder / rel) for rel in marker["files"] if not (folder / rel).is_symlink()}
        marker["folders"] = _folders(folder)
    write_json(folder / MARKER, marker)


def _file_marker(path: Path) -> Path:
    return path.with_name(f".{path.name}{MARKER}")


def mark_file(path: str | Path, stage: str, content: str | Path | None = None) -> None:
    """Marks the file `path` as `stage`'s: its own marker beside it, with the SHA-256 of its content (or of the
    file `content`, which is about to become it)."""
    path = Path(path)
    write_json(_file_marker(path), {**_stamp(stage), "sha256": _sha256(Path(content or path))})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_is_ours(path: Path, stage: str | None = None) -> bool:
    """Whether `path` carries a file marker (of `stage`, if given) whose hash matches its content."""
    try:
        marker = json.loads(_file_marker(path).read_text())
        return (stage is None or marker["stage"] == stage) and marker["sha256"] == _sha256(path)
    except (OSError, ValueError, KeyError, TypeError):
        return False


# What a killed run of this module can leave in a folder: an (empty) lock file, an `atomic_file` temporary file.
_LOCK = re.compile(r"\..+\.lock")
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-[a-z0-9_]{8}(?P<suffix>\.[A-Za-z0-9]+)?")


def temporary_file_of(name: str) -> str | None:
    """The file an `atomic_file` temporary file named `name` stands for (`.<file>.tmp-<8 random><file's
    suffix>`), or None for any other name."""
    match = _TEMPORARY.fullmatch(name)
    if match is None or match["name"] in (".", "..") or (match["suffix"] or "") != Path(match["name"]).suffix:
        return None
    return match["name"]


def _leftover(path: Path, listed: set[str], folder: Path) -> bool:
    """A killed run's leftover: an empty lock file, or the temporary file of a file the marker lists or that
    lies beside it (a user's file of a look-alike name stays theirs)."""
    if path.is_symlink() or not path.is_file():
        return False
    if _LOCK.fullmatch(path.name):
        return path.stat().st_size == 0
    of = temporary_file_of(path.name)
    if of is None:
        return False
    target = path.with_name(of)
    return target.is_file() or target.relative_to(folder).as_posix() in listed


def _foreign_files(folder: Path, marker: dict) -> list[str]:
    """Entries of a marked folder that are not as the pipeline wrote them: files neither listed in its marker,
    nor self-marked, nor a lock or temporary file of this module's making; listed files changed since (a
    marker from before the markers held hashes lists names only); folders it did not list (an empty one
    too; markers from before they listed folders are not asked)."""
    listed = set(marker.get("files") or ())
    hashes = marker.get("sha256") if isinstance(marker.get("sha256"), dict) else {}
    foreign = []
    if isinstance(marker.get("folders"), list):
        known = set(marker["folders"])
        foreign += [f"{rel}/" for rel in _folders(folder) if rel not in known]
    for rel in _files(folder):
        path = folder / rel
        if rel in listed:
            if rel in hashes and (path.is_symlink() or _sha256(path) != hashes[rel]):
                foreign.append(rel)
            continue
        if _leftover(path, listed, folder):
            continue
        if path.name.startswith(".") and path.name.endswith(MARKER) and len(path.name) > len(MARKER) + 1:
            owner = path.with_name(path.name[1 : -len(MARKER)])
            if owner.is_file():  # the file it marks is judged (and named) itself
                continue
        elif _file_is_ours(path):
            continue
        foreign.append(rel)
    return foreign


# --- checks ----------------------------------------------------------------------------------------------


def check_inputs(dest: str | Path, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuses a target that is, holds or lies inside one of the run's inputs (resolved paths compared).

    Raises:
        PipelineError: naming the target and the input.
    """
    target = Path(dest).resolve()
    for given in inputs:
        if given is None or str(given) == "":
            continue
        source = Path(given).resolve()
        if target == source:
            why = f"is the input {given} of this run"
        elif source in target.parents:
            why = f"lies inside the input {given} of this run"
        elif target in source.parents:
            why = f"holds the input {given} of this run"
        else:
            continue
        raise PipelineError(f"Refusing to write {dest}: it {why}; choose another output.")


def _nearest_existing(path: Path) -> Path:
    """`path`'s nearest folder that exists (itself, or a parent)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(dest: Path, replacing: bool) -> None:
    """Refuses, before any work, a target whose folder this process may not write in (nor, when `replacing`
    it, the folder itself and every folder in it, whose files go with it)."""
    folders = [_nearest_existing(dest.absolute().parent)]
    if replacing and dest.is_dir():
        folders += [Path(root) for root, _, _ in os.walk(dest)]
    for folder in folders:
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise PipelineError(f"Cannot write {dest}: no permission to write in {folder}; choose another output.")


def check_output(
    dest: str | Path, stage: str, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()
) -> None:
    """Checks, before any work, that `stage` may write the folder `dest` (see the module docstring).

    Args:
        dest: the output folder.
        stage: the stage writing it, e.g. "data_preparation".
        overwrite: whether an existing folder written by the same stage may be replaced.
        inputs: the run's inputs (folders or files), which `dest` must not be, hold, or lie inside.

    Raises:
        PipelineError: a one-line message naming the folder and why it is refused.
    """
    dest = Path(dest)
    check_inputs(dest, inputs)
    if dest.is_symlink():
        raise PipelineError(
            f"Output {dest} is a symbolic link (to {os.readlink(dest)}); name the folder itself, or another output."
        )
    if not dest.exists():
        _check_writable(dest, replacing=False)
        return
    if not dest.is_dir():
        raise PipelineError(f"Output {dest} exists and is not a folder; choose another output.")
    marker = read_marker(dest)
    if marker is None:
        raise PipelineError(
            f"Refusing to replace {dest}: it was not written by this pipeline (no {MARKER} in it); "
            "move it away or choose another output."
        )
    if marker["stage"] != stage:
        raise PipelineError(f"Refusing to replace {dest}: it holds the output of {marker['stage']}, not of {stage}.")
    foreign = _foreign_files(dest, marker)
    if foreign:
        more = f" and {len(foreign) - 1} more were" if len(foreign) > 1 else " was"
        raise PipelineError(
            f"Refusing to replace {dest}: {os.path.join(dest, foreign[0])}{more} not written by this pipeline, "
            "or changed since; move it away first."
        )
    if not overwrite:
        raise PipelineError(f"Output folder {dest} already exists; pass --overwrite to replace it.")
    _check_writable(dest, replacing=True)


def check_output_file(
    dest: str | Path, stage: str, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()
) -> None:
    """Like `check_output`, for a single file that carries its own marker, `.<name>.prednet-output.json`.

    A file is replaced only with `overwrite`, and only if its marker names `stage` and its content is still
    what the pipeline wrote (same SHA-256).
    """
    dest = Path(dest)
    check_inputs(dest, inputs)
    if not (dest.exists() or dest.is_symlink()):
        _check_writable(dest, replacing=False)
        return
    if not dest.is_file():
        raise PipelineError(f"Output {dest} exists and is not a file; choose another output.")
    if not _file_is_ours(dest, stage):
        raise PipelineError(
            f"Refusing to replace {dest}: it was not written by {stage} (or was changed since); move it away first."
        )
    if not overwrite:
        raise PipelineError(f"Output file {dest} already exists; pass --overwrite to replace it.")
    _check_writable(dest, replacing=False)


# --- locks -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def output_lock(dest: str | Path) -> Iterator[Path]:
    """Holds the exclusive lock of the output `dest`, `.<name>.lock` beside it, or refuses at once.

    The lock is the kernel's (flock, through `filelock`), so a killed run releases it. The lock file is
    removed on release while still held, so that nothing is left behind after a clean run; a run that
    opened it just before gets no lock (filelock refuses a locked file that has lost its name), and
    refuses like any run that finds the lock taken.

    Raises:
        PipelineError: another run holds the lock.
    """
    path = sibling(dest, ".lock")
    if path.is_symlink() or (path.exists() and (not path.is_file() or path.stat().st_size > 0)):
        raise PipelineError(
            f"{path} is in the way of the lock of {dest} (this pipeline's lock files are empty: it is yours); "
            "move it away."
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, timeout=0)
        lock.acquire(blocking=False)
    except Timeout:
        raise PipelineError(
            f"Another run is writing {dest} (it holds the lock {path}); wait for it to end or choose another output."
        ) from None
    except PermissionError:
        raise PipelineError(
            f"Cannot write {dest}: no permission to write in {_nearest_existing(path.parent)}."
        ) from None
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            if path.stat().st_size == 0:  # written to since: not removed
                path.unlink()
        lock.release()


# --- atomic folders --------------------------------------------------------------------------------------


def remove_output(path: str | Path) -> None:
    """Deletes a folder the pipeline wrote, its marker last, so that a kill midway leaves it recognisable."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.exists():
        return
    for child in path.iterdir():
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (path / MARKER).unlink(missing_ok=True)
    path.rmdir()


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_dir(src: str | Path, dest: str | Path) -> None:
    """Puts the finished folder `src` at `dest`, replacing what is there in one step, then deletes the old one.

    Where the swap is not available the old folder is first renamed aside, which leaves a moment without
    `dest`; the old folder then waits under a `.tmp-` name beside it.
    """
    src, dest = Path(src), Path(dest)
    if not (dest.exists() or dest.is_symlink()):
        src.rename(dest)
        return
    if _exchange(src, dest):
        _remove_replaced(src, dest)
        return
    old = src.with_name(src.name + ".old")
    dest.rename(old)
    src.rename(dest)
    _remove_replaced(old, dest)


def _remove_replaced(old: Path, dest: Path) -> None:
    """Deletes the folder a new `dest` replaced; one it may not delete (made read-only meanwhile) stays, said."""
    try:
        remove_output(old)
    except OSError as err:
        log.warning(
            "%s is in place; the folder it replaced, now %s, could not be deleted (%s): delete it by hand",
            dest,
            old,
            err,
        )


def commit_dir(src: str | Path, dest: str | Path, stage: str, overwrite: bool) -> None:
    """`replace_dir`, after checking `dest` again (`check_output`): a file the user put or changed in it while
    the run worked (a note, an annotated alarms.csv), or a folder that appeared at `dest` meanwhile without
    `overwrite`, keeps it as it is, and the finished `src` is set aside beside it, as `<name>.new-<time>`,
    instead of being lost.

    Raises:
        PipelineError: `dest` changed during the run; naming it and where the run's output is.
    """
    src, dest = Path(src), Path(dest)
    try:
        check_output(dest, stage, overwrite)
    except Exception as err:  # a PipelineError; anything else must not lose the output either
        kept = dest.with_name(f"{dest.name}.new-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        src.rename(kept)
        why = str(err).removeprefix(f"Refusing to replace {dest}: ").removesuffix("; move it away first.")
        raise PipelineError(
            f"{dest} changed while this run worked ({why}), so it is left as it is; this run's output is in {kept}."
        ) from None
    replace_dir(src, dest)


def clean_leftovers(dest: Path) -> None:
    """Removes the temporary folders of killed runs beside `dest` (only those this module made)."""
    pattern = glob.escape(str(sibling(dest, ".tmp-"))) + "*"
    for leftover in map(Path, glob.glob(pattern)):
        if leftover.is_dir() and not leftover.is_symlink():
            if read_marker(leftover) is not None:
                try:
                    remove_output(leftover)
                except OSError as err:  # a folder made read-only: it stays, and the run goes on
                    log.warning("cannot remove %s, which a killed run left: %s; remove it by hand", leftover, err)
            else:
                with contextlib.suppress(OSError):
                    leftover.rmdir()  # empty: killed before its marker was written


def temporary_dir(prefix: str, parent: str | Path) -> Path:
    """A new folder `<prefix>*` in `parent`, with the permissions of any folder made (mkdtemp's are 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def new_dir_beside(dest: str | Path, stage: str) -> Path:
    """A new temporary folder `.<name>.tmp-*` beside `dest`, marked as `stage`'s (incomplete) output."""
    base = sibling(dest, ".tmp-")
    tmp = temporary_dir(base.name, base.parent)
    write_marker(tmp, stage, complete=False)
    return tmp


@contextlib.contextmanager
def atomic_dir(
    dest: str | Path, overwrite: bool = False, *, stage: str, inputs: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """Yields a temporary folder beside `dest` that becomes `dest` only if the block succeeds.

    Holds the lock of `dest` throughout and checks it first (`check_output`): nothing a user made is
    replaced, and a second run into the same folder refuses at once. The folder is marked as `stage`'s
    output, listing the files the block wrote.

    Args:
        dest: the folder to create.
        overwrite: replace an existing `dest` that an earlier run of `stage` wrote.
        stage: the stage writing it, e.g. "batch_scoring".
        inputs: the run's inputs, which `dest` must not be, hold, or lie inside.

    Raises:
        PipelineError: `dest` is refused (see `check_output`) or locked by another run.
    """
    dest = Path(dest)
    inputs = list(inputs)
    check_inputs(dest, inputs)
    created = _missing_parents(dest)
    try:
        with output_lock(dest):
            check_output(dest, stage, overwrite, inputs)
            clean_leftovers(dest)
            tmp = new_dir_beside(dest, stage)
            try:
                yield tmp
                write_marker(tmp, stage)
            except BaseException:
                remove_output(tmp)
                raise
            commit_dir(tmp, dest, stage, overwrite)
    except BaseException:
        for folder in created:  # the run's own, deepest first; one that something else wrote into stays
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _missing_parents(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet (a run creates them), deepest first."""
    missing = []
    for parent in path.absolute().parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


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


@contextlib.contextmanager
def atomic_output_file(
    dest: str | Path, overwrite: bool = False, *, stage: str, inputs: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """`atomic_file` for a stage's output file, under the same rules as `atomic_dir` (`check_output_file`).

    The file gets its own marker beside it, `.<name>.prednet-output.json`, with the stage and the SHA-256 of
    its content, so that a later `--overwrite` replaces it only while it is still what the pipeline wrote.
    """
    dest = Path(dest)
    inputs = list(inputs)
    check_inputs(dest, inputs)
    with output_lock(dest):
        check_output_file(dest, stage, overwrite, inputs)
        with atomic_file(dest) as tmp:
            yield tmp
            # The marker first: a kill before the rename leaves an old file whose hash no longer matches, which
            # is refused rather than replaced.
            mark_file(dest, stage, content=tmp)


def write_json(path: str | Path, obj) -> None:
    """Writes `obj` as indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> dict:
    """Reads a JSON file that holds an object, with a clear error naming the file when it is missing, broken,
    not UTF-8, or holds something else."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"Missing file {path}.")
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise PipelineError(f"{path} is not UTF-8 text: {err.reason} at byte {err.start}.") from None
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise PipelineError(f"{path} must hold a JSON object ({{...}}). Received: {type(obj).__name__}.")
    return obj
