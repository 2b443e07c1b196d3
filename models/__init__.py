"""Shared library of the PredNet video anomaly detection pipeline.

The top-level scripts (`data_preparation.py`, `train.py`, `batch_scoring.py`, `fit_anoms.py`) are thin
command-line front ends over the modules here:

- `models.data`: reading videos, the synthetic dataset, the preprocessed HDF5 store.
- `models.prednet`: the PredNet layer (Keras 3, `keras.ops` only) and model builders.
- `models.training`: window sampling and the training loop.
- `models.scoring`: per-frame prediction-error metrics and their frame-level evaluation.
- `models.anoms`: classifiers on the per-frame metrics, evaluated by video.

A trained model folder in one call::

    import models

    model = models.load("outputs/models/UCSDped2")     # a keras.Model that predicts frames
    predicted = model.predict(frames)                    # (batch, time, h, w, c) in [0, 1], the same shape

`import models` stays light (no Keras: the scripts refuse bad arguments before Keras loads), yet once it has
run, `keras.saving.load_model("model.keras")` finds the PredNet layers too: they are registered with Keras
as soon as Keras is imported, by whoever imports it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
from pathlib import Path

# Modules whose Keras classes (`@keras.saving.register_keras_serializable`) a saved model may name.
SERIALIZABLE_MODULES = ("models.prednet",)


def load(model_dir: str | Path, output_mode: str = "prediction"):
    """The model of a folder train.py wrote, as a predicting `keras.Model` (not the training graph, whose
    output is the loss).

    Args:
        model_dir: the folder holding model.keras and config.json.
        output_mode: 'prediction' (the predicted frames), 'error' (the mean error of each layer and step),
            'all' (a dict with both), or a unit such as 'R0' or 'E1'. The ConvLSTM autoencoder has
            'prediction' only: its reconstructions.

    Returns:
        A `keras.Model` taking frames (batch, time, height, width, channels) in [0, 1], of the model's frame
        size, for sequences of any length: PredNet predicts step t from the frames before t (step 0 predicts
        nothing useful); the autoencoder reconstructs the sequence.

    Raises:
        PipelineError: the folder or its model.keras is missing or unreadable.

    Example:
        >>> model = models.load("outputs/models/UCSDped2")
        >>> predicted = model.predict(frames / 255.0)
        >>> error = ((predicted[:, 1:] - frames[:, 1:] / 255.0) ** 2).mean()
    """
    from models.inference import check_model_dir
    from models.io import read_json
    from models.prednet import load_model
    from models.registry import get, model_name

    model_dir = check_model_dir(model_dir)
    spec = get(model_name(read_json(model_dir / "config.json")))
    return spec.predicting_model(load_model(model_dir / "model.keras"), output_mode)


def _register() -> None:
    for name in SERIALIZABLE_MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # never break the import of Keras itself
            logging.getLogger(__name__).debug("could not register %s with Keras: %s", name, err)


class _RegisterWhenKerasLoads(importlib.abc.MetaPathFinder):
    """Imports `SERIALIZABLE_MODULES` right after Keras itself has loaded, whoever imports it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


if "keras" in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterWhenKerasLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenKerasLoads())
