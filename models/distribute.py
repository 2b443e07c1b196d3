"""Data-parallel training over every local accelerator with `keras.distribution` (JAX backend only).

    KERAS_BACKEND=jax python train.py --config default --dataset UCSDped2 --distribute

Each batch of `--batch_size` windows (the global batch) is split evenly across the devices, the weights are
replicated on all of them, and the gradients are averaged: the same training as on one device with that
batch, only faster. See docs/tuning.md for what is not supported.
"""

from __future__ import annotations

import keras
import numpy as np

from models.data.store import dataset_dir, read_metadata
from models.errors import PipelineError
from models.training import TrainSettings, window_starts


def val_batches(s: TrainSettings) -> list[int]:
    """Sizes of the validation batches that train() will evaluate, from the store's metadata alone."""
    videos = read_metadata(dataset_dir(s.preprocessed_data, s.dataset))["videos"].get("val", {})
    sources = np.repeat(np.array(list(videos), dtype=object), list(videos.values()))
    windows = len(window_starts(sources, s.nt, (1,), step=s.nt)) if len(sources) else 0
    samples = min(s.val_samples or windows, windows)
    return [s.batch_size] * (samples // s.batch_size) + ([samples % s.batch_size] if samples % s.batch_size else [])


def check_backend() -> None:
    """Raises a PipelineError unless Keras runs on JAX, the one backend keras.distribution supports."""
    backend = keras.backend.backend()
    if backend != "jax":
        raise PipelineError(
            f"--distribute needs the JAX backend (KERAS_BACKEND=jax python train.py ...). Received: backend={backend}"
        )


def setup_data_parallel(s: TrainSettings) -> list[str]:
    """Makes every Keras model built from now on train data-parallel over all local devices.

    Call it before the model is built: `keras.distribution.set_distribution` is global, and weights are
    laid out (replicated) when they are created.

    Args:
        s: the run's settings: `batch_size` (the global batch) and every validation batch must divide evenly
            among the devices.

    Returns:
        The devices used, e.g. ["cuda:0", "cuda:1"].

    Raises:
        PipelineError: the backend is not JAX, or a batch does not divide among the devices.
    """
    check_backend()
    devices = keras.distribution.list_devices()
    n = len(devices)
    if s.batch_size % n:
        raise PipelineError(
            f"--distribute splits each batch over {n} devices, so --batch_size must be a multiple of {n}. "
            f"Received: batch_size={s.batch_size}"
        )
    uneven = [b for b in val_batches(s) if b % n]
    if uneven:
        raise PipelineError(
            f"--distribute: the last validation batch has {uneven[0]} windows, which do not split over {n} devices; "
            f"make --val_samples a multiple of --batch_size. Received: val_samples={s.val_samples}"
        )
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return devices
