"""PredNet (Lotter, Kreiman & Cox 2016) as one Keras 3 layer, written with `keras.ops` only.

Per layer l and time step t (channels last):

    R_l^t    = ConvLSTM(E_l^{t-1}, R_l^{t-1}, Upsample(R_{l+1}^t))     top-down first
    Ahat_l^t = ReLU(Conv(R_l^t))                                         clipped at pixel_max in layer 0
    A_l^t    = x^t if l == 0 else MaxPool(ReLU(Conv(E_{l-1}^t)))
    E_l^t    = [ReLU(A_l^t - Ahat_l^t), ReLU(Ahat_l^t - A_l^t)]

The loop over time runs inside `keras.ops.scan` (`lax.scan` on JAX, a while loop on TensorFlow), so a
200-frame video compiles as quickly as a 10-frame window. The four LSTM gates of a layer are one fused
convolution (the same function as the reference's four convolutions, fewer kernel launches).
"""

from __future__ import annotations

import keras
from keras import ops

from models.prednet.scan import scan

OUTPUT_MODES = ("error", "prediction", "all")
UNIT_TYPES = ("R", "E", "A", "Ahat")


def _conv(x, kernel, bias):
    """The 'same'-padded stride-1 convolution of `keras.layers.Conv2D`, with the weights given."""
    return ops.add(ops.conv(x, kernel, padding="same"), bias)


def _per_layer(value, n: int, name: str) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != n:
        raise ValueError(f"`{name}` must have {n} entries (or be one int). Received: {name}={value}")
    return values


@keras.saving.register_keras_serializable(package="prednet")
class PredNet(keras.layers.Layer):
    """Stacked convolutional LSTM with predictive-coding errors between layers.

    Args:
        stack_sizes: channels of A and Ahat per layer; the first is the frames' channels, e.g. (1, 48, 96, 192).
        R_stack_sizes: channels of the representation units per layer (default: `stack_sizes`).
        A_filt_sizes: filter size of the target convolutions, one per layer above the first (or one int).
        Ahat_filt_sizes: filter size of the prediction convolutions, one per layer (or one int).
        R_filt_sizes: filter size of the LSTM convolutions, one per layer (or one int).
        pixel_max: largest pixel value; the frame prediction is clipped to it.
        error_activation, A_activation, LSTM_activation, LSTM_inner_activation: activation names.
        output_mode: 'error' (mean of E per layer and step: (batch, time, layers)), 'prediction'
            (the predicted frames), 'all' (a dict with both), or a unit and layer such as 'R0', 'E1',
            'A2', 'Ahat3' (that unit's activations per step).
        extrap_start_time: from this step on, the model's prediction of the step's frame replaces the
            input frame (closed-loop multi-step prediction; the reference implementation feeds the
            prediction of the step before, one frame behind). None to always read the input.
        frozen_layers: layers (0 is the pixel layer) whose convolutions are not trained (`freeze`); part of
            the config, so that a saved model loads with the same trainable weights as its optimizer's.

    Input: frames (batch, time, height, width, channels) in [0, pixel_max]; height and width must divide
    by 2^(layers-1). The prediction at step t is made from frames before t; step 0 predicts nothing useful.
    Or a pair (frames, fed) with fed (batch, time): where fed > 0, the model's prediction replaces that
    step's frame, as extrap_start_time does, but chosen per sequence and step.
    """

    def __init__(
        self,
        stack_sizes=(3, 48, 96, 192),
        R_stack_sizes=None,
        A_filt_sizes=3,
        Ahat_filt_sizes=3,
        R_filt_sizes=3,
        pixel_max=1.0,
        error_activation="relu",
        A_activation="relu",
        LSTM_activation="tanh",
        LSTM_inner_activation="hard_sigmoid",
        output_mode="error",
        extrap_start_time=None,
        frozen_layers=(),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.stack_sizes = tuple(int(s) for s in stack_sizes)
        self.nb_layers = len(self.stack_sizes)
        if self.nb_layers < 1 or min(self.stack_sizes) < 1:
            raise ValueError(f"`stack_sizes` needs at least one positive entry. Received: stack_sizes={stack_sizes}")
        self.R_stack_sizes = _per_layer(R_stack_sizes or self.stack_sizes, self.nb_layers, "R_stack_sizes")
        self.A_filt_sizes = _per_layer(A_filt_sizes, self.nb_layers - 1, "A_filt_sizes")
        self.Ahat_filt_sizes = _per_layer(Ahat_filt_sizes, self.nb_layers, "Ahat_filt_sizes")
        self.R_filt_sizes = _per_layer(R_filt_sizes, self.nb_layers, "R_filt_sizes")
        self.pixel_max = float(pixel_max)
        self.activation_names = {
            "error_activation": error_activation,
            "A_activation": A_activation,
            "LSTM_activation": LSTM_activation,
            "LSTM_inner_activation": LSTM_inner_activation,
        }
        self.error_activation = keras.activations.get(error_activation)
        self.A_activation = keras.activations.get(A_activation)
        self.LSTM_activation = keras.activations.get(LSTM_activation)
        self.LSTM_inner_activation = keras.activations.get(LSTM_inner_activation)
        layer_modes = [f"{u}{n}" for n in range(self.nb_layers) for u in UNIT_TYPES]
        if output_mode not in OUTPUT_MODES + tuple(layer_modes):
            raise ValueError(
                f"Unknown `output_mode`; expected one of {list(OUTPUT_MODES) + layer_modes}. Received: "
                f"output_mode={output_mode!r}"
            )
        self.output_mode = output_mode
        self.output_unit, self.output_layer = None, None
        if output_mode in layer_modes:
            self.output_unit, self.output_layer = output_mode[:-1], int(output_mode[-1])
        self.extrap_start_time = None if extrap_start_time is None else int(extrap_start_time)
        self.frozen_layers = tuple(sorted({int(l) for l in frozen_layers}))
        if any(not 0 <= l < self.nb_layers for l in self.frozen_layers):
            raise ValueError(
                f"`frozen_layers` must name layers 0-{self.nb_layers - 1}. Received: frozen_layers={frozen_layers}"
            )

    def build(self, input_shape):
        if isinstance(input_shape[0], (list, tuple)):  # (frames, fed)
            input_shape = input_shape[0]
        if len(input_shape) != 5:
            raise ValueError(f"PredNet takes frames (batch, time, height, width, channels). Received: {input_shape}")
        _, _, height, width, channels = input_shape
        if channels != self.stack_sizes[0]:
            raise ValueError(
                f"Input frames have {channels} channels but stack_sizes[0] is {self.stack_sizes[0]}. "
                f"Received: input_shape={input_shape}"
            )
        m = 2 ** (self.nb_layers - 1)
        if height is None or width is None or height % m or width % m:
            raise ValueError(
                f"Frame height and width must divide by {m} for {self.nb_layers} layers. "
                f"Received: input_shape={input_shape}"
            )
        self.frame_shape = (height, width, channels)
        conv = dict(padding="same", dtype=self.dtype_policy)
        self.lstm_convs, self.ahat_convs, self.a_convs = [], [], []
        for l in range(self.nb_layers):
            h, w = height // 2**l, width // 2**l
            in_ch = self.R_stack_sizes[l] + 2 * self.stack_sizes[l]
            if l < self.nb_layers - 1:
                in_ch += self.R_stack_sizes[l + 1]
            lstm = keras.layers.Conv2D(4 * self.R_stack_sizes[l], self.R_filt_sizes[l], name=f"lstm_{l}", **conv)
            lstm.build((None, h, w, in_ch))
            self.lstm_convs.append(lstm)
            # The frame prediction starts at mid-grey, where both its ReLU and its clip at pixel_max pass
            # gradients; from a zero bias a few large steps can push it below 0 everywhere, where no
            # gradient reaches the model again.
            bias = keras.initializers.Constant(self.pixel_max / 2 if l == 0 else 0.0)
            ahat = keras.layers.Conv2D(
                self.stack_sizes[l], self.Ahat_filt_sizes[l], name=f"ahat_{l}", bias_initializer=bias, **conv
            )
            ahat.build((None, h, w, self.R_stack_sizes[l]))
            self.ahat_convs.append(ahat)
            if l < self.nb_layers - 1:
                a = keras.layers.Conv2D(self.stack_sizes[l + 1], self.A_filt_sizes[l], name=f"a_{l}", **conv)
                a.build((None, h, w, 2 * self.stack_sizes[l]))
                self.a_convs.append(a)
        self.freeze(self.frozen_layers)
        self.built = True

    def freeze(self, layers) -> None:
        """Stops training the convolutions of these layers (on top of those frozen already); compile the model
        again for it to take effect."""
        self.frozen_layers = tuple(sorted({*self.frozen_layers, *(int(l) for l in layers)}))
        for convs in (self.lstm_convs, self.ahat_convs, self.a_convs):
            for l, conv in enumerate(convs):
                conv.trainable = l not in self.frozen_layers

    def initial_state(self, batch):
        """The state before a sequence's first frame: zeros, and step 0."""
        height, width, _ = self.frame_shape
        dtype = self.compute_dtype

        def zeros(l, ch):
            return ops.zeros((batch, height // 2**l, width // 2**l, ch), dtype=dtype)

        r = [zeros(l, self.R_stack_sizes[l]) for l in range(self.nb_layers)]
        c = [zeros(l, self.R_stack_sizes[l]) for l in range(self.nb_layers)]
        e = [zeros(l, 2 * self.stack_sizes[l]) for l in range(self.nb_layers)]
        return r, c, e, ops.zeros((), dtype="int32")

    def step_params(self) -> dict:
        """The weights that `step` reads, as tensors in the compute dtype: per layer, the (kernel, bias) of
        the LSTM, Ahat and A convolutions. Read once per call and handed to every step, so that no trace
        of the step reads a weight from the layer (see `call`)."""

        def pair(conv):
            return ops.cast(conv.kernel, self.compute_dtype), ops.cast(conv.bias, self.compute_dtype)

        return {
            "lstm": [pair(c) for c in self.lstm_convs],
            "ahat": [pair(c) for c in self.ahat_convs],
            "a": [pair(c) for c in self.a_convs],
        }

    def step(self, state, frame, params=None, output_mode=None, extrap_start_time=...):
        """One time step: (state, frame or (frame, fed)) -> (new state, outputs of this step).

        `params` are the weights (`step_params`; by default read from the layer now): the step reads no
        weight from the layer itself, so it is a function of its arguments alone. `output_mode` and
        `extrap_start_time` default to the layer's.
        """
        params = self.step_params() if params is None else params
        output_mode = output_mode or self.output_mode
        extrap_start_time = self.extrap_start_time if extrap_start_time is ... else extrap_start_time
        output_unit, output_layer = None, None
        if output_mode not in OUTPUT_MODES:
            output_unit, output_layer = output_mode[:-1], int(output_mode[-1])
        r_tm1, c_tm1, e_tm1, t = state
        a, fed = frame if isinstance(frame, (list, tuple)) else (frame, None)

        r, c = [None] * self.nb_layers, [None] * self.nb_layers
        for l in reversed(range(self.nb_layers)):
            inputs = [r_tm1[l], e_tm1[l]]
            if l < self.nb_layers - 1:
                inputs.append(ops.repeat(ops.repeat(r[l + 1], 2, axis=1), 2, axis=2))  # nearest up-sampling
            z = _conv(ops.concatenate(inputs, axis=-1), *params["lstm"][l])
            i, f, c_hat, o = ops.split(z, 4, axis=-1)
            gate = self.LSTM_inner_activation
            c[l] = gate(f) * c_tm1[l] + gate(i) * self.LSTM_activation(c_hat)
            r[l] = gate(o) * self.LSTM_activation(c[l])

        e, units = [], {}
        for l in range(self.nb_layers):
            ahat = _conv(r[l], *params["ahat"][l])
            ahat = ops.relu(ahat) if l == 0 else self.A_activation(ahat)
            if l == 0:
                ahat = ops.minimum(ahat, self.pixel_max)
                prediction = ahat
                if extrap_start_time is not None:  # the prediction stands in for the frame
                    a = ops.where(t >= extrap_start_time, ahat, a)
                if fed is not None:
                    a = ops.where(ops.reshape(fed, (-1, 1, 1, 1)) > 0, ahat, a)
            e.append(ops.concatenate([self.error_activation(a - ahat), self.error_activation(ahat - a)], axis=-1))
            if l == output_layer:
                units = {"R": r[l], "E": e[l], "A": a, "Ahat": ahat}
            if l < self.nb_layers - 1:
                a = ops.max_pool(self.A_activation(_conv(e[l], *params["a"][l])), pool_size=2, strides=2)

        if output_unit is not None:
            out = units[output_unit]
        else:
            errors = ops.stack([ops.mean(ops.cast(e_l, "float32"), axis=(1, 2, 3)) for e_l in e], axis=-1)
            out = {"prediction": prediction, "error": errors}
            if output_mode != "all":
                out = out[output_mode]
        return (r, c, e, t + 1), out

    def call(self, inputs):
        return self.run(inputs)

    def run(self, inputs, output_mode=None, extrap_start_time=..., state=None, return_state=False):
        """The loop over time, as `call` with this layer's output mode and extrapolation unless given.

        Args:
            inputs: frames (batch, time, h, w, c), or (frames, fed), in the compute dtype.
            output_mode, extrap_start_time: as the layer's arguments, for this run (default: the layer's).
            state: the state to start from (a `step` state, e.g. the last one of an earlier run of the
                same sequences); default: the zero state of a sequence's start.
            return_state: also return the state after the last step, to go on from it.
        """
        frames, fed = inputs if isinstance(inputs, (list, tuple)) else (inputs, None)
        xs = ops.transpose(frames, (1, 0, 2, 3, 4))  # time-major for the scan
        if fed is not None:
            xs = (xs, ops.transpose(ops.cast(fed, self.compute_dtype), (1, 0)))
        # The loop body is a new function on every call, and the weights reach it as this call's values
        # (the training state's on JAX). JAX caches a loop body's trace keyed on the body function: with
        # `self.step` as the body, a trace taken while the weights were concrete arrays (building the
        # model) could be reused by the training step, with the weights as constants: epochs that leave
        # them unchanged, then "Array has been deleted" once training had donated those arrays
        # (docs/model_development.md, "A trace that held the weights").
        params = self.step_params()

        def body(carry, x):
            return self.step(carry, x, params, output_mode, extrap_start_time)

        state = self.initial_state(ops.shape(frames)[0]) if state is None else state
        state, outputs = scan(body, state, xs)

        def batch_major(x):
            return ops.transpose(x, (1, 0, *range(2, len(x.shape))))

        outputs = keras.tree.map_structure(batch_major, outputs)
        return (outputs, state) if return_state else outputs

    def get_config(self):
        config = {
            "stack_sizes": self.stack_sizes,
            "R_stack_sizes": self.R_stack_sizes,
            "A_filt_sizes": self.A_filt_sizes,
            "Ahat_filt_sizes": self.Ahat_filt_sizes,
            "R_filt_sizes": self.R_filt_sizes,
            "pixel_max": self.pixel_max,
            **self.activation_names,
            "output_mode": self.output_mode,
            "extrap_start_time": self.extrap_start_time,
            "frozen_layers": list(self.frozen_layers),
        }
        return {**super().get_config(), **config}
