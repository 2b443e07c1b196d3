"""PredNet (Lotter, Kreiman & Cox 2016) in Keras 3: the layer and the models built around it."""

from models.prednet.layers import PredNet
from models.prednet.model import (
    PredictionError,
    PredNetRun,
    WeightedError,
    build_training_model,
    expand_layer_weights,
    find_prednet,
    load_model,
    predictor,
    prednet_kwargs,
    window_scorer,
)

__all__ = [
    "PredNet",
    "PredictionError",
    "PredNetRun",
    "WeightedError",
    "build_training_model",
    "expand_layer_weights",
    "find_prednet",
    "load_model",
    "prednet_kwargs",
    "predictor",
    "window_scorer",
]
