"""A ConvLSTM autoencoder of frame windows (Chong & Tay 2017) in Keras 3: the layer and the models around it."""

from models.convlstm_ae.layers import ConvLSTMAutoencoder
from models.convlstm_ae.model import (
    ReconstructionError,
    autoencoder_kwargs,
    build_training_model,
    find_autoencoder,
    reconstructor,
    window_scorer,
)

__all__ = [
    "ConvLSTMAutoencoder",
    "ReconstructionError",
    "autoencoder_kwargs",
    "build_training_model",
    "find_autoencoder",
    "reconstructor",
    "window_scorer",
]
