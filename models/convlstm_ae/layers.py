"""A spatio-temporal autoencoder of frame windows (Chong & Tay 2017) as one Keras 3 layer, `keras.ops` only.

Each frame of a window goes through a spatial encoder (strided convolutions), the sequence of codes
through a stack of convolutional LSTMs (the temporal bottleneck), and each step's output through a spatial
decoder (transposed convolutions mirroring the encoder) back to a frame:

    z_t      = Encoder(x_t)                                      per frame, strides s_1 ... s_k
    h_l^t    = ConvLSTM_l(h_{l-1}^t, h_l^{t-1}, c_l^{t-1})       h_0^t = z_t, l = 1 ... L
    xhat_t   = sigmoid(Decoder(h_L^t))                           per frame, back to the frame's size

with the LSTM of each layer in Keras's form (gates i, f, c, o of one fused convolution over [input, h];
sigmoid gates; forget bias starting at 1 as `unit_forget_bias`):

    c^t = f * c^{t-1} + i * tanh(chat),   h^t = o * tanh(c^t).

The reconstruction of frame t depends on frames 0..t of the window only (the LSTM runs forward in time), so
the last frame's reconstruction in a window that ends at a frame uses no later frame.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from models.prednet.scan import scan  # the time loop with outputs shaped unlike the carry (TensorFlow)


def _ints(value, name: str, n: int | None = None) -> tuple[int, ...]:
    values = (value,) * (n or 1) if isinstance(value, int) else tuple(int(v) for v in value)
    if not values or min(values) < 1 or (n is not None and len(values) != n):
        want = f"{n} positive entries (or one int)" if n else "at least one positive entry"
        raise ValueError(f"`{name}` needs {want}. Received: {name}={value}")
    return values


@keras.saving.register_keras_serializable(package="convlstm_ae")
class ConvLSTMAutoencoder(keras.layers.Layer):
    """Spatial conv encoder, ConvLSTM bottleneck, spatial deconv decoder: reconstructs frame sequences.

    Args:
        channels: the frames' channels (1 grey, 3 RGB).
        encoder_filters: channels of each encoder convolution, e.g. (128, 64) as in Chong & Tay.
        encoder_kernels: kernel size of each encoder convolution (and of its mirrored decoder one).
        encoder_strides: stride of each encoder convolution; height and width must divide by their product.
        lstm_filters: channels of each ConvLSTM layer of the bottleneck, e.g. (64, 32, 64).
        lstm_kernel: kernel size of the ConvLSTM convolutions.
        activation: activation of the encoder and inner decoder convolutions.
        LSTM_activation, LSTM_inner_activation: the LSTM's cell and gate activations.

    Input: frames (batch, time, height, width, channels) in [0, 1]. Output: their reconstruction, the same
    shape, in [0, 1].
    """

    def __init__(
        self,
        channels=1,
        encoder_filters=(128, 64),
        encoder_kernels=(11, 5),
        encoder_strides=(4, 2),
        lstm_filters=(64, 32, 64),
        lstm_kernel=3,
        activation="tanh",
        LSTM_activation="tanh",
        LSTM_inner_activation="sigmoid",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.channels = int(channels)
        if self.channels < 1:
            raise ValueError(f"`channels` must be positive. Received: channels={channels}")
        self.encoder_filters = _ints(encoder_filters, "encoder_filters")
        n = len(self.encoder_filters)
        self.encoder_kernels = _ints(encoder_kernels, "encoder_kernels", n)
        self.encoder_strides = _ints(encoder_strides, "encoder_strides", n)
        self.lstm_filters = _ints(lstm_filters, "lstm_filters")
        self.lstm_kernel = int(lstm_kernel)
        if self.lstm_kernel < 1:
            raise ValueError(f"`lstm_kernel` must be positive. Received: lstm_kernel={lstm_kernel}")
        self.activation_names = {
            "activation": activation,
            "LSTM_activation": LSTM_activation,
            "LSTM_inner_activation": LSTM_inner_activation,
        }
        self.LSTM_activation = keras.activations.get(LSTM_activation)
        self.LSTM_inner_activation = keras.activations.get(LSTM_inner_activation)

    @property
    def size_multiple(self) -> int:
        """Frame height and width must divide by this: the product of the encoder's strides."""
        return int(np.prod(self.encoder_strides))

    def build(self, input_shape):
        if len(input_shape) != 5:
            raise ValueError(
                f"ConvLSTMAutoencoder takes frames (batch, time, height, width, channels). Received: {input_shape}"
            )
        _, _, height, width, channels = input_shape
        if channels != self.channels:
            raise ValueError(
                f"Input frames have {channels} channels, the layer was made for {self.channels}. "
                f"Received: input_shape={input_shape}"
            )
        m = self.size_multiple
        if height is None or width is None or height % m or width % m:
            raise ValueError(
                f"Frame height and width must divide by {m} (the product of encoder_strides "
                f"{self.encoder_strides}). Received: input_shape={input_shape}"
            )
        self.frame_shape = (height, width, channels)
        conv = dict(padding="same", dtype=self.dtype_policy)
        act = self.activation_names["activation"]
        self.encoder, h, w, ch = [], height, width, channels
        for i, (f, k, s) in enumerate(
            zip(self.encoder_filters, self.encoder_kernels, self.encoder_strides, strict=True)
        ):
            layer = keras.layers.Conv2D(f, k, strides=s, activation=act, name=f"encoder_{i}", **conv)
            layer.build((None, h, w, ch))
            self.encoder.append(layer)
            h, w, ch = h // s, w // s, f
        self.code_shape = (h, w)
        self.lstm_convs = []
        for l, f in enumerate(self.lstm_filters):
            layer = keras.layers.Conv2D(4 * f, self.lstm_kernel, name=f"lstm_{l}", **conv)
            layer.build((None, h, w, ch + f))
            bias = np.zeros(4 * f, "float32")
            bias[f : 2 * f] = 1.0  # forget gate open at the start (Keras's unit_forget_bias)
            layer.bias.assign(bias)
            self.lstm_convs.append(layer)
            ch = f
        self.decoder = []
        for i in reversed(range(len(self.encoder_filters))):
            out = self.encoder_filters[i - 1] if i > 0 else self.channels
            layer = keras.layers.Conv2DTranspose(
                out,
                self.encoder_kernels[i],
                strides=self.encoder_strides[i],
                activation=act if i > 0 else "sigmoid",
                name=f"decoder_{i}",
                **conv,
            )
            layer.build((None, h, w, ch))
            self.decoder.append(layer)
            h, w, ch = h * self.encoder_strides[i], w * self.encoder_strides[i], out
        self.built = True

    def _initial_state(self, batch):
        h, w = self.code_shape
        zeros = [ops.zeros((batch, h, w, f), dtype=self.compute_dtype) for f in self.lstm_filters]
        return list(zeros), [ops.zeros_like(z) for z in zeros]

    def step(self, state, code):
        """One time step of the bottleneck: ((h, c) of each layer, encoded frame) -> (new state, top h)."""
        h_tm1, c_tm1 = state  # previous outputs and memory states, one per layer
        x, h, c = code, [], []
        for l, conv in enumerate(self.lstm_convs):
            i, f, c_hat, o = ops.split(conv(ops.concatenate([x, h_tm1[l]], axis=-1)), 4, axis=-1)
            gate = self.LSTM_inner_activation
            c.append(gate(f) * c_tm1[l] + gate(i) * self.LSTM_activation(c_hat))
            h.append(gate(o) * self.LSTM_activation(c[l]))
            x = h[l]
        return (h, c), x

    def call(self, frames):
        shape = ops.shape(frames)
        batch, time = shape[0], shape[1]
        x = ops.reshape(frames, (-1, *self.frame_shape))
        for layer in self.encoder:
            x = layer(x)
        h, w = self.code_shape
        x = ops.reshape(x, (batch, time, h, w, self.encoder_filters[-1]))
        _, top = scan(self.step, self._initial_state(batch), ops.transpose(x, (1, 0, 2, 3, 4)))
        x = ops.reshape(ops.transpose(top, (1, 0, 2, 3, 4)), (-1, h, w, self.lstm_filters[-1]))
        for layer in self.decoder:
            x = layer(x)
        return ops.reshape(x, (batch, time, *self.frame_shape))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = {
            "channels": self.channels,
            "encoder_filters": self.encoder_filters,
            "encoder_kernels": self.encoder_kernels,
            "encoder_strides": self.encoder_strides,
            "lstm_filters": self.lstm_filters,
            "lstm_kernel": self.lstm_kernel,
            **self.activation_names,
        }
        return {**super().get_config(), **config}
