"""Shared library of the PredNet video anomaly detection pipeline.

The top-level scripts (`data_preparation.py`, `train.py`, `batch_scoring.py`, `fit_anoms.py`) are thin
command-line front ends over the modules here:

- `models.data`: reading videos, the synthetic dataset, the preprocessed HDF5 store.
- `models.prednet`: the PredNet layer (Keras 3, `keras.ops` only) and model builders.
- `models.training`: window sampling and the training loop.
- `models.scoring`: per-frame prediction-error metrics and their frame-level evaluation.
- `models.anoms`: classifiers on the per-frame metrics, evaluated by video.
"""
