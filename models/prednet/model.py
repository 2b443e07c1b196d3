"""Models around the PredNet layer: the training model, and predicting models made from a trained one."""

from __future__ import annotations

from pathlib import Path

import keras
from keras import ops

from models.errors import PipelineError
from models.prednet.layers import PredNet


@keras.saving.register_keras_serializable(package="prednet")
class WeightedError(keras.layers.Layer):
    """The PredNet training objective per sequence: errors weighted by layer, step 0 weighted 0.

    As in the reference implementation, each step after the first weighs 1/(nt - 1) (the mean over
    steps 1..nt-1), and `layer_weights` weigh the layers: (1, 0, 0, 0) is L_0, (1, .1, .1, .1) is L_all.
    Input: (batch, time, layers) errors; output: (batch, 1).
    """

    def __init__(self, layer_weights, **kwargs):
        super().__init__(**kwargs)
        self.layer_weights = tuple(float(w) for w in layer_weights)

    def call(self, errors):
        per_step = ops.sum(errors[:, 1:, :] * ops.convert_to_tensor(self.layer_weights, dtype=errors.dtype), axis=-1)
        return ops.mean(per_step, axis=1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1)

    def get_config(self):
        return {**super().get_config(), "layer_weights": self.layer_weights}


@keras.saving.register_keras_serializable(package="prednet")
class PredictionError(keras.layers.Layer):
    """The objective of a model trained to predict several frames ahead: half the mean absolute error of
    the frame predictions of steps 1..nt-1 (step 0 predicts nothing), the scale of L_0's layer-0 error.

    Inputs: [frames, predictions], both (batch, time, h, w, c); output: (batch, 1).
    """

    def call(self, inputs):
        frames, predictions = (ops.cast(x, "float32") for x in inputs)
        return 0.5 * ops.mean(ops.abs(predictions[:, 1:] - frames[:, 1:]), axis=(1, 2, 3, 4))[:, None]

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], 1)


def expand_layer_weights(weights, n_layers: int) -> tuple[float, ...]:
    """'1,0' or (1, 0.1) -> one weight per layer: the first for layer 0, the second for all above."""
    weights = tuple(float(w) for w in weights)
    if len(weights) == n_layers:
        return weights
    if len(weights) == 2:
        return (weights[0],) + (weights[1],) * (n_layers - 1)
    raise PipelineError(f"layer_loss_weights needs 2 or {n_layers} values. Received: {weights}")


def prednet_kwargs(channels: int, stack_sizes, filter_sizes=(3, 3, 3), R0_channels: int | None = None) -> dict:
    """PredNet arguments from the training settings: `stack_sizes` are the layers above the pixels,
    `filter_sizes` the A, Ahat and R filter sizes, and `R0_channels` the width of the pixel layer's
    representation (None: the frames' channels, as in the paper)."""
    stacks = (int(channels), *(int(s) for s in stack_sizes))
    return dict(
        stack_sizes=stacks,
        R_stack_sizes=(int(R0_channels or channels), *stacks[1:]),
        A_filt_sizes=int(filter_sizes[0]),
        Ahat_filt_sizes=int(filter_sizes[1]),
        R_filt_sizes=int(filter_sizes[2]),
    )


def build_training_model(
    nt: int, frame_shape: tuple[int, int, int], layer_loss_weights, horizon: int = 1, **prednet_kwargs
) -> keras.Model:
    """frames (batch, nt, h, w, c) -> weighted error (batch, 1); train it towards 0 with an MAE loss.

    With `horizon` > 1 the last frame of each window is predicted from the frames up to horizon steps
    before it: the model's own predictions stand in for the frames of the last horizon - 1 steps (as
    batch_scoring.py --horizon does), and the objective is `PredictionError`, since the errors of a step
    fed its own prediction are zero by construction; `layer_loss_weights` must then be L_0.
    """
    inputs = keras.Input((nt, *frame_shape), name="frames")
    if horizon > 1:
        weights = tuple(float(w) for w in layer_loss_weights)
        if not 1 < horizon < nt or any(weights[1:]):
            raise PipelineError(
                f"Training {horizon} frames ahead needs 1 < horizon < nt ({nt}) and L_0 layer_loss_weights "
                f"(the frame error only). Received: horizon {horizon}, layer_loss_weights {weights}"
            )
        prednet = PredNet(output_mode="prediction", extrap_start_time=nt - horizon, name="prednet", **prednet_kwargs)
        loss = PredictionError(name="prediction_error", dtype="float32")([inputs, prednet(inputs)])
        return keras.Model(inputs, loss, name="prednet_training")
    prednet = PredNet(output_mode="error", name="prednet", **prednet_kwargs)
    errors = prednet(inputs)
    weights = expand_layer_weights(layer_loss_weights, prednet.nb_layers)
    loss = WeightedError(weights, name="weighted_error", dtype="float32")(errors)
    return keras.Model(inputs, loss, name="prednet_training")


def find_prednet(model: keras.Model) -> PredNet:
    for layer in model.layers:
        if isinstance(layer, PredNet):
            return layer
    raise PipelineError(f"Model {model.name} has no PredNet layer.")


def _fresh_copy(trained: keras.Model | PredNet, output_mode: str, extrap_start_time: int | None = None):
    """The trained PredNet layer, and an unbuilt one of the same config with other outputs (its weights are
    set from the trained one once a model has built it)."""
    layer = trained if isinstance(trained, PredNet) else find_prednet(trained)
    config = {**layer.get_config(), "output_mode": output_mode, "extrap_start_time": extrap_start_time}
    config.pop("name", None)
    return layer, PredNet.from_config(config)


def predictor(
    trained: keras.Model | PredNet, output_mode: str = "all", extrap_start_time: int | None = None, fed=False
) -> keras.Model:
    """A model with the trained weights that outputs `output_mode`, for sequences of any length.

    This is how a model trained with output_mode='error' predicts frames without retraining: a new
    PredNet layer from the same config, with the other output mode, and the same weights. With `fed`, the
    model takes [frames, fed]: fed (batch, time) > 0 where its own prediction replaces the frame.
    """
    layer, new = _fresh_copy(trained, output_mode, extrap_start_time)
    inputs = keras.Input((None, *layer.frame_shape), name="frames")
    if fed:
        inputs = [inputs, keras.Input((None,), name="fed")]
    model = keras.Model(inputs, new(inputs), name=f"prednet_{output_mode}")
    new.set_weights(layer.get_weights())
    return model


class UnrolledPredNet(keras.layers.Layer):
    """A built PredNet layer run over a fixed number of steps as a Python loop of its `step`, so that the
    graph holds no while loop: the same outputs, for exporters that cannot convert the loop (tf2onnx).
    Takes (frames, fed) like PredNet; returns its 'all' outputs."""

    def __init__(self, prednet: PredNet, steps: int, **kwargs):
        super().__init__(**kwargs)
        self.prednet, self.steps = prednet, int(steps)

    def call(self, frames, fed):
        state = self.prednet._initial_state(ops.shape(frames)[0])
        params = self.prednet.step_params()
        outputs = []
        for t in range(self.steps):
            state, out = self.prednet.step(state, (frames[:, t], fed[:, t]), params)
            outputs.append(out)
        return {k: ops.stack([o[k] for o in outputs], axis=1) for k in outputs[0]}


def window_scorer(
    trained: keras.Model | PredNet, window: int, per_window: int = 1, unroll: bool = False
) -> keras.Model:
    """A model that scores `per_window` steps of each `window`-frame sequence, for windowed scoring.

    Takes [frames, fed, pick]: frames (batch, window, h, w, c) uint8 (scaled to [0, 1] on the device, a
    quarter of the float32 transfer), fed (batch, window) > 0 where the model's own prediction replaces the
    frame, and pick (batch, per_window, window), one-hot at each step to return (all zero: none). Returns
    those steps' predictions (batch, per_window, h, w, c) and layer errors (batch, per_window, layers)
    alone, instead of every step's. With `unroll`, the steps run as an unrolled loop (`UnrolledPredNet`),
    for export to ONNX.
    """
    layer, new = _fresh_copy(trained, "all")
    frames = keras.Input((window, *layer.frame_shape), dtype="uint8", name="frames")
    fed = keras.Input((window,), name="fed")
    pick = keras.Input((per_window, window), name="pick")
    x = ops.cast(frames, "float32") / 255.0
    if unroll:
        new.build((None, window, *layer.frame_shape))
        out = UnrolledPredNet(new, window, name="prednet_unrolled")(x, fed)
    else:
        out = new([x, fed])
    outputs = {
        "prediction": ops.einsum("bsk,bkhwc->bshwc", pick, ops.cast(out["prediction"], "float32")),
        "error": ops.einsum("bsk,bkl->bsl", pick, ops.cast(out["error"], "float32")),
    }
    model = keras.Model([frames, fed, pick], outputs, name="prednet_window_scorer")
    new.set_weights(layer.get_weights())
    return model


def load_model(path: str | Path, compile: bool = False) -> keras.Model:
    """Loads a `.keras` file that train.py wrote, with a clear error when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"No model file {path}; run train.py first (it writes <model_dir>/model.keras).")
    try:
        return keras.saving.load_model(path, compile=compile)
    except Exception as err:
        raise PipelineError(f"Cannot load model {path}: {err}") from None
