"""The preprocessed store: one folder per dataset, hickled HDF5 arrays and a metadata file.

    <preprocessed_data>/<dataset>/
        X_train.hkl X_val.hkl X_test.hkl            uint8 (n_frames, height, width, channels)
        sources_train.hkl sources_val.hkl ...       bytes (n_frames,): the video of each frame
        y_test.hkl                                  uint8 (n_frames,): 1 = anomalous frame
        masks_test.hkl                              uint8 (n_frames, height, width), when the source has masks
        metadata.json                               how the folder was made

Every array is a plain HDF5 dataset named `data`, so `h5py.File(path)["data"][()]` reads it without hickle.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import hickle
import numpy as np

from models.errors import PipelineError
from models.io import read_json

SPLITS = ("train", "val", "test")


def dump(array: np.ndarray, path: str | Path, compression: str | None = None) -> None:
    """Hickles one array; strings are stored as bytes so that plain h5py reads them too."""
    if array.dtype.kind == "U":
        array = np.char.encode(array, "utf-8")
    kwargs = {"compression": compression} if compression and array.size else {}
    hickle.dump(array, str(path), mode="w", **kwargs)


def load(path: str | Path) -> np.ndarray:
    """Loads one hickled array (also from files hickle cannot read, via plain h5py)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"Missing file {path}.")
    try:
        array = np.asarray(hickle.load(str(path)))
    except Exception:
        try:
            with h5py.File(path, "r") as f:
                array = f["data"][()]
        except Exception as err:
            raise PipelineError(f"Cannot read {path}: {err}") from None
    if array.dtype.kind == "S":
        array = np.char.decode(array, "utf-8")
    return array


def dataset_dir(preprocessed_data: str | Path, dataset: str) -> Path:
    """The folder `data_preparation.py` wrote, with a clear error if it is not there."""
    path = Path(preprocessed_data) / dataset
    if not (path / "metadata.json").is_file():
        from models.cli import prepared_datasets

        found = prepared_datasets(preprocessed_data)
        if found:
            raise PipelineError(
                f"No prepared dataset {dataset!r} in {preprocessed_data}; it holds {', '.join(found)} (names are "
                "case-sensitive)."
            )
        raise PipelineError(
            f"No preprocessed data in {path} (metadata.json missing). Run data_preparation.py first, e.g. "
            f"python data_preparation.py --preprocessed_data {preprocessed_data} --dataset {dataset}"
        )
    return path


def read_metadata(folder: str | Path) -> dict:
    return read_json(Path(folder) / "metadata.json")


def load_split(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Frames and per-frame video names of one split."""
    folder = Path(folder)
    X, sources = load(folder / f"X_{split}.hkl"), load(folder / f"sources_{split}.hkl")
    if len(X) != len(sources):
        raise PipelineError(f"{folder}: X_{split}.hkl has {len(X)} frames but sources_{split}.hkl {len(sources)}.")
    return X, sources


def load_labels(folder: str | Path) -> np.ndarray | None:
    """Test labels (0/1 per frame), or None when the dataset has none."""
    path = Path(folder) / "y_test.hkl"
    return load(path) if path.is_file() else None


def video_slices(sources: np.ndarray) -> list[tuple[str, slice]]:
    """(video name, slice of its frames) for each run of equal names, in order."""
    if len(sources) == 0:
        return []
    change = np.flatnonzero(sources[1:] != sources[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(sources)]])
    return [(str(sources[s]), slice(int(s), int(e))) for s, e in zip(starts, ends, strict=True)]
