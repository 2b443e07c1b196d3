"""Models around the PredNet layer: the training model, and predicting models made from a trained one."""

from __future__ import annotations

import zipfile
from pathlib import Path

import keras
from keras import ops

from models.errors import PipelineError
from models.prednet.layers import OUTPUT_MODES, UNIT_TYPES, PredNet


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
    nt: int,
    frame_shape: tuple[int, int, int],
    layer_loss_weights,
    horizon: int = 1,
    uint8: bool = False,
    **prednet_kwargs,
) -> keras.Model:
    """frames (batch, nt, h, w, c) -> weighted error (batch, 1); train it towards 0 with an MAE loss.

    Frames in [0, 1], or with `uint8` frames as stored (0-255), scaled on the device: a quarter of the
    float32 transfer, as in scoring (`window_scorer`).

    With `horizon` > 1 the last frame of each window is predicted from the frames up to horizon steps
    before it: the model's own predictions stand in for the frames of the last horizon - 1 steps (as
    batch_scoring.py --horizon does), and the objective is `PredictionError`, since the errors of a step
    fed its own prediction are zero by construction; `layer_loss_weights` must then be L_0.
    """
    inputs = keras.Input((nt, *frame_shape), dtype="uint8" if uint8 else None, name="frames")
    frames = ops.cast(inputs, "float32") / 255.0 if uint8 else inputs
    if horizon > 1:
        weights = tuple(float(w) for w in layer_loss_weights)
        if not 1 < horizon < nt or any(weights[1:]):
            raise PipelineError(
                f"Training {horizon} frames ahead needs 1 < horizon < nt ({nt}) and L_0 layer_loss_weights "
                f"(the frame error only). Received: horizon {horizon}, layer_loss_weights {weights}"
            )
        prednet = PredNet(output_mode="prediction", extrap_start_time=nt - horizon, name="prednet", **prednet_kwargs)
        loss = PredictionError(name="prediction_error", dtype="float32")([frames, prednet(frames)])
        return keras.Model(inputs, loss, name="prednet_training")
    prednet = PredNet(output_mode="error", name="prednet", **prednet_kwargs)
    errors = prednet(frames)
    weights = expand_layer_weights(layer_loss_weights, prednet.nb_layers)
    loss = WeightedError(weights, name="weighted_error", dtype="float32")(errors)
    return keras.Model(inputs, loss, name="prednet_training")


def find_prednet(model: keras.Model) -> PredNet:
    """The PredNet layer of a model: its own, or the trained one that a predicting model runs."""
    for layer in model.layers:
        if isinstance(layer, PredNet):
            return layer
        if isinstance(getattr(layer, "prednet", None), PredNet):
            return layer.prednet
    raise PipelineError(f"Model {model.name} has no PredNet layer.")


class PredNetRun(keras.layers.Layer):
    """A trained PredNet layer run with other outputs: the same layer object, so the same weights (no copy,
    nothing to keep in step when the layer trains on), with its own output mode and extrapolation.

    Takes frames or (frames, fed) like PredNet, in [0, pixel_max]; computes in the layer's dtype policy.
    """

    def __init__(self, prednet: PredNet, output_mode: str = "all", extrap_start_time: int | None = None, **kwargs):
        super().__init__(dtype=prednet.dtype_policy, **kwargs)
        valid = OUTPUT_MODES + tuple(f"{u}{n}" for n in range(prednet.nb_layers) for u in UNIT_TYPES)
        if output_mode not in valid:
            raise ValueError(
                f"Unknown `output_mode`; expected one of {list(valid)}. Received: output_mode={output_mode!r}"
            )
        self.prednet, self.output_mode = prednet, output_mode
        self.extrap_start_time = None if extrap_start_time is None else int(extrap_start_time)

    def call(self, inputs):
        return self.prednet.run(inputs, self.output_mode, self.extrap_start_time)


def predictor(
    trained: keras.Model | PredNet, output_mode: str = "all", extrap_start_time: int | None = None, fed=False
) -> keras.Model:
    """A model that runs the trained PredNet layer with outputs `output_mode`, for sequences of any length.

    This is how a model trained with output_mode='error' predicts frames without retraining: the trained
    layer itself runs with the other output mode (`PredNetRun`), so the predicting model shares its weights
    and follows them as it trains on. With `fed`, the model takes [frames, fed]: fed (batch, time) > 0
    where its own prediction replaces the frame.
    """
    layer = trained if isinstance(trained, PredNet) else find_prednet(trained)
    inputs = keras.Input((None, *layer.frame_shape), name="frames")
    if fed:
        inputs = [inputs, keras.Input((None,), name="fed")]
    outputs = PredNetRun(layer, output_mode, extrap_start_time, name=f"prednet_{output_mode}")(inputs)
    return keras.Model(inputs, outputs, name=f"prednet_{output_mode}")


class UnrolledPredNet(keras.layers.Layer):
    """A built PredNet layer run over a fixed number of steps as a Python loop of its `step`, so that the
    graph holds no while loop: the same outputs, for exporters that cannot convert the loop (tf2onnx).
    Takes (frames, fed) like PredNet; returns its 'all' outputs."""

    def __init__(self, prednet: PredNet, steps: int, **kwargs):
        super().__init__(dtype=prednet.dtype_policy, **kwargs)
        self.prednet, self.steps = prednet, int(steps)

    def call(self, frames, fed):
        state = self.prednet.initial_state(ops.shape(frames)[0])
        params = self.prednet.step_params()
        outputs = []
        for t in range(self.steps):
            state, out = self.prednet.step(state, (frames[:, t], fed[:, t]), params, "all", None)
            outputs.append(out)
        return {k: ops.stack([o[k] for o in outputs], axis=1) for k in outputs[0]}


def pick_steps(pick, outputs: dict) -> dict:
    """The steps that `pick` (batch, per_window, window), one-hot, selects from 'all' outputs, in float32."""
    return {
        "prediction": ops.einsum("bsk,bkhwc->bshwc", pick, ops.cast(outputs["prediction"], "float32")),
        "error": ops.einsum("bsk,bkl->bsl", pick, ops.cast(outputs["error"], "float32")),
    }


def window_scorer(
    trained: keras.Model | PredNet, window: int, per_window: int = 1, unroll: bool = False
) -> keras.Model:
    """A model that scores `per_window` steps of each `window`-frame sequence, for windowed scoring.

    Takes [frames, fed, pick]: frames (batch, window, h, w, c) uint8 (scaled to [0, 1] on the device, a
    quarter of the float32 transfer), fed (batch, window) > 0 where the model's own prediction replaces the
    frame, and pick (batch, per_window, window), one-hot at each step to return (all zero: none). Returns
    those steps' predictions (batch, per_window, h, w, c) and layer errors (batch, per_window, layers)
    alone, instead of every step's. It runs the trained layer itself (`PredNetRun`): built once, it
    follows the layer's weights. With `unroll`, the steps run as an unrolled loop (`UnrolledPredNet`),
    for export to ONNX.
    """
    layer = trained if isinstance(trained, PredNet) else find_prednet(trained)
    frames = keras.Input((window, *layer.frame_shape), dtype="uint8", name="frames")
    fed = keras.Input((window,), name="fed")
    pick = keras.Input((per_window, window), name="pick")
    x = ops.cast(frames, "float32") / 255.0
    if unroll:
        out = UnrolledPredNet(layer, window, name="prednet_unrolled")(x, fed)
    else:
        out = PredNetRun(layer, "all", name="prednet_all")([x, fed])
    return keras.Model([frames, fed, pick], pick_steps(pick, out), name="prednet_window_scorer")


def load_model(path: str | Path, compile: bool = False) -> keras.Model:
    """Loads a `.keras` file that train.py wrote, with a clear error when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"No model file {path}; run train.py first (it writes <model_dir>/model.keras).")
    if not zipfile.is_zipfile(path):  # Keras says "File not found" of it
        raise PipelineError(
            f"Cannot load model {path}: not a .keras file (a zip archive); it is damaged or another file."
        )
    try:
        return keras.saving.load_model(path, compile=compile)
    except Exception as err:
        raise PipelineError(f"Cannot load model {path}: {err}") from None
