"""Running a trained PredNet over whole videos: one prediction per frame, from earlier frames only."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from models.data.store import video_slices
from models.errors import PipelineError
from models.io import read_json


def load_predictor(model_dir: str | Path, output_mode: str = "all"):
    """The trained model of `model_dir`, turned into one that outputs `output_mode`, and its config.json."""
    from models.prednet import find_prednet, load_model, predictor

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise PipelineError(f"Model folder {model_dir} does not exist; run train.py first.")
    config = read_json(model_dir / "config.json")
    trained = find_prednet(load_model(model_dir / "model.keras"))
    return predictor(trained, output_mode), trained, config


def predict_videos(model, X: np.ndarray, sources: np.ndarray, batch_size: int = 4):
    """Predicts every frame of every video, several videos per call (padded at the end to one length).

    Padding at the end never changes earlier predictions: the model is causal in time.

    Returns:
        predictions (n, h, w, c) in [0, 1] aligned with X (row 0 of each video is the model's output
        before it saw any frame), layer errors (n, layers), and frames per second.
    """
    videos = video_slices(sources)
    predictions = np.zeros(X.shape, np.float32)
    errors = None
    start = time.perf_counter()
    for i in range(0, len(videos), batch_size):
        group = videos[i : i + batch_size]
        length = max(sl.stop - sl.start for _, sl in group)
        batch = np.zeros((len(group), length, *X.shape[1:]), np.float32)
        for j, (_, sl) in enumerate(group):
            batch[j, : sl.stop - sl.start] = X[sl] / 255.0
        out = model.predict_on_batch(batch)
        pred, err = np.asarray(out["prediction"], np.float32), np.asarray(out["error"], np.float32)
        if errors is None:
            errors = np.zeros((len(X), err.shape[-1]), np.float32)
        for j, (_, sl) in enumerate(group):
            predictions[sl] = pred[j, : sl.stop - sl.start]
            errors[sl] = err[j, : sl.stop - sl.start]
    seconds = time.perf_counter() - start
    return predictions, errors, len(X) / max(seconds, 1e-9)
