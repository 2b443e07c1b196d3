"""Models around the ConvLSTM autoencoder layer: the training model and the window scorer."""

from __future__ import annotations

import keras
from keras import ops

from models.convlstm_ae.layers import ConvLSTMAutoencoder
from models.errors import PipelineError


@keras.saving.register_keras_serializable(package="convlstm_ae")
class ReconstructionError(keras.layers.Layer):
    """The training objective per window: the mean squared reconstruction error of all its frames.

    Inputs: [frames, reconstructions], both (batch, time, h, w, c); output: (batch, 1).
    """

    def call(self, inputs):
        frames, recon = (ops.cast(x, "float32") for x in inputs)
        return ops.mean(ops.square(recon - frames), axis=(1, 2, 3, 4))[:, None]

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], 1)


def autoencoder_kwargs(channels: int, encoder_filters, encoder_kernels, encoder_strides, lstm_filters) -> dict:
    """`ConvLSTMAutoencoder` arguments from the training settings."""
    return dict(
        channels=int(channels),
        encoder_filters=tuple(int(v) for v in encoder_filters),
        encoder_kernels=tuple(int(v) for v in encoder_kernels),
        encoder_strides=tuple(int(v) for v in encoder_strides),
        lstm_filters=tuple(int(v) for v in lstm_filters),
    )


def build_training_model(nt: int, frame_shape: tuple[int, int, int], **autoencoder_kwargs) -> keras.Model:
    """frames (batch, nt, h, w, c) -> mean squared reconstruction error (batch, 1); train it towards 0 with an
    MAE loss (the same targets, zeros, as PredNet's training model)."""
    inputs = keras.Input((nt, *frame_shape), name="frames")
    ae = ConvLSTMAutoencoder(name="convlstm_ae", **autoencoder_kwargs)
    loss = ReconstructionError(name="reconstruction_error", dtype="float32")([inputs, ae(inputs)])
    return keras.Model(inputs, loss, name="convlstm_ae_training")


def find_autoencoder(model: keras.Model) -> ConvLSTMAutoencoder:
    for layer in model.layers:
        if isinstance(layer, ConvLSTMAutoencoder):
            return layer
    raise PipelineError(f"Model {model.name} has no ConvLSTMAutoencoder layer.")


def reconstructor(trained: keras.Model | ConvLSTMAutoencoder) -> keras.Model:
    """frames (batch, time, h, w, c) in [0, 1] -> their reconstructions, with the trained layer's weights."""
    layer = trained if isinstance(trained, ConvLSTMAutoencoder) else find_autoencoder(trained)
    inputs = keras.Input((None, *layer.frame_shape), name="frames")
    return keras.Model(inputs, layer(inputs), name="convlstm_ae_reconstructor")


def window_scorer(trained: keras.Model | ConvLSTMAutoencoder, window: int) -> keras.Model:
    """A model that scores the last frame of each `window`-frame window.

    Takes frames (batch, window, h, w, c) uint8 (scaled to [0, 1] on the device). Returns `reconstruction`,
    the reconstruction of each window's last frame (batch, h, w, c), and `src`, the window's sequence
    reconstruction cost (batch, 1): the sum over its frames of the L2 norm of the frame's reconstruction
    error, sum_t ||x_t - xhat_t||_2 (Chong & Tay 2017). The layer is shared, not copied: the scorer always
    holds the trained layer's current weights.
    """
    layer = trained if isinstance(trained, ConvLSTMAutoencoder) else find_autoencoder(trained)
    frames = keras.Input((window, *layer.frame_shape), dtype="uint8", name="frames")
    x = ops.cast(frames, "float32") / 255.0
    recon = ops.cast(layer(x), "float32")
    src = ops.sum(ops.sqrt(ops.sum(ops.square(recon - x), axis=(2, 3, 4))), axis=1, keepdims=True)
    return keras.Model(frames, {"reconstruction": recon[:, -1], "src": src}, name="convlstm_ae_window_scorer")
