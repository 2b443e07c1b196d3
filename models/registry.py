"""The models the pipeline trains and scores, by the name that a model folder's config.json records.

Scoring, calibration and reports talk to a *frame model*: an object with `frame_shape`, `error_names` and
`predict_videos(X, sources, batch_size, window, horizon, per_window, progress)`, which returns every frame's
prediction or reconstruction (n, h, w, c) in [0, 1], a few errors per frame (n, len(error_names)) and the
frames per second, each frame made from frames of its own video up to it, never after it. The live score,
its calibration, the alarms and the reports (`models.live`, `models.scoring`, `models.report`) see only that.

- PredNet's frame model is its predicting Keras model, scored by `models.inference.predict_videos` (the
  errors are its layer errors, columns `model_E0`, `model_E1`, ...).
- The ConvLSTM autoencoder's is `AutoencoderFrames`: frame t is the reconstruction of the last frame of the
  window that ends at t (front-padded with the video's first frame before a whole window exists), and its
  one error is that window's sequence reconstruction cost (column `model_src`).

Training talks to a `ModelSpec`: how to check the settings, build the training model, find its core layer,
measure its val error next to the copy-last-frame baseline, and make its frame model. A new model is its
own module (the layer and its Keras models) and one `ModelSpec` added to `SPECS`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from models.data.store import video_slices
from models.errors import PipelineError

MODEL_KEY = "model"  # config.json's entry naming the model a folder holds
DEFAULT_MODEL = "prednet"  # folders written before there was a choice hold PredNet


class ModelSpec:
    """What training and scoring need to know of one kind of model."""

    name = ""
    title = ""
    mse_key = ""  # config.json results entry of the model's val error (next to copy_last_frame_mse)
    mse_label = ""  # the same, in words

    def check_settings(self, s, meta: dict) -> None:
        """Raises `PipelineError` for settings or frame sizes this model cannot train with."""

    def build(self, s, frame_shape: tuple[int, int, int]):
        """The (uncompiled) training model: frames (batch, nt, h, w, c) -> loss (batch, 1), trained towards 0."""
        raise NotImplementedError

    def core(self, model):
        """The model's core layer: the one whose weights and config make the model."""
        raise NotImplementedError

    def eval_mse(self, model, dataset) -> tuple[float, float]:
        """Mean squared error of the model's frames and of copying the last frame, on the same frames."""
        raise NotImplementedError

    def frame_model(self, model):
        """The frame model (see the module docstring) of a trained training model."""
        raise NotImplementedError

    def predicting_model(self, model, output_mode: str):
        """A `keras.Model` of the trained layer that outputs frames (`models.load`): frames (batch, time, h, w,
        c) in [0, 1] -> `output_mode`."""
        raise NotImplementedError

    def default_per_window(self, window: int | None, horizon: int) -> int:
        """Frames scored per window by default."""
        return 1


class PredNetSpec(ModelSpec):
    name, title, mse_key, mse_label = "prednet", "PredNet", "next_frame_mse", "next-frame MSE"

    def check_settings(self, s, meta):
        from models.shapes import check_frame_size

        if not s.fine_tuning:  # a fine-tuned model brings its own layers: `build` checks against them
            check_frame_size(meta["height"], meta["width"], len(s.stack_sizes) + 1)

    def build(self, s, frame_shape):
        from models.prednet import build_training_model, find_prednet, load_model, prednet_kwargs

        kwargs = prednet_kwargs(frame_shape[2], s.stack_sizes, s.filter_sizes, s.R0_channels)
        if s.fine_tuning:  # its weights are convolutions: they fit any frame size its layers divide
            from models.shapes import check_frame_size

            base = find_prednet(load_model(Path(s.fine_tuning) / "model.keras"))
            if base.frame_shape[2] != frame_shape[2]:
                raise PipelineError(
                    f"Model in {s.fine_tuning} takes frames of {base.frame_shape[2]} channels, the data has "
                    f"{frame_shape[2]}: prepare it with --channels {base.frame_shape[2]}."
                )
            check_frame_size(frame_shape[0], frame_shape[1], base.nb_layers)
            keep = ("stack_sizes", "R_stack_sizes", "A_filt_sizes", "Ahat_filt_sizes", "R_filt_sizes", "pixel_max")
            kwargs = {k: v for k, v in base.get_config().items() if k in keep}
        try:
            model = build_training_model(s.nt, frame_shape, s.layer_loss_weights, s.horizon, uint8=True, **kwargs)
        except ValueError as err:
            raise PipelineError(str(err)) from None
        if s.fine_tuning:
            find_prednet(model).set_weights(base.get_weights())
        return model

    def core(self, model):
        from models.prednet import find_prednet

        return find_prednet(model)

    def eval_mse(self, model, dataset):
        from models.training import next_frame_mse

        return next_frame_mse(model, dataset)

    def frame_model(self, model):
        from models.prednet import predictor

        return predictor(model, "all")

    def predicting_model(self, model, output_mode):
        from models.prednet import predictor

        return predictor(model, output_mode)

    def default_per_window(self, window, horizon):
        from models.inference import default_per_window

        return default_per_window(window, horizon)


class ConvLSTMAESpec(ModelSpec):
    name, title, mse_key, mse_label = "convlstm_ae", "ConvLSTM autoencoder", "reconstruction_mse", "reconstruction MSE"

    def check_settings(self, s, meta):
        m = int(np.prod(s.ae_strides))
        if len(s.ae_strides) != len(s.ae_filters) or len(s.ae_kernels) != len(s.ae_filters):
            raise PipelineError(
                f"--ae_filters, --ae_kernels and --ae_strides need one value per encoder layer. Received: "
                f"{s.ae_filters}, {s.ae_kernels}, {s.ae_strides}"
            )
        if meta["height"] % m or meta["width"] % m:
            raise PipelineError(
                f"Frame size {meta['height']}x{meta['width']} does not suit the autoencoder: height and width must "
                f"divide by {m}, the product of --ae_strides {','.join(map(str, s.ae_strides))}."
            )
        unused = [
            name
            for name, used in (
                ("--fine_tuning", s.fine_tuning),
                ("--freeze_layers", s.freeze_layers),
                ("--horizon", s.horizon > 1),
            )
            if used
        ]
        if unused:
            raise PipelineError(f"{', '.join(unused)}: PredNet settings, not the autoencoder's (--model convlstm_ae).")

    def build(self, s, frame_shape):
        from models.convlstm_ae import autoencoder_kwargs, build_training_model

        kwargs = autoencoder_kwargs(frame_shape[2], s.ae_filters, s.ae_kernels, s.ae_strides, s.ae_lstm_filters)
        try:
            return build_training_model(s.nt, frame_shape, **kwargs)
        except ValueError as err:
            raise PipelineError(str(err)) from None

    def core(self, model):
        from models.convlstm_ae import find_autoencoder

        return find_autoencoder(model)

    def eval_mse(self, model, dataset):
        """Over the frames after each window's first (those the copy baseline predicts), as for PredNet."""
        from models.convlstm_ae import reconstructor

        recon_model = reconstructor(model)
        se_model = se_copy = 0.0
        count = 0
        for i in range(len(dataset)):
            x, _ = dataset[i]
            recon = np.asarray(recon_model.predict_on_batch(x), np.float32)
            se_model += float(((recon[:, 1:] - x[:, 1:]) ** 2).sum())
            se_copy += float(((x[:, :-1] - x[:, 1:]) ** 2).sum())
            count += x[:, 1:].size
        return se_model / count, se_copy / count

    def frame_model(self, model):
        return AutoencoderFrames(self.core(model))

    def predicting_model(self, model, output_mode):
        if output_mode != "prediction":
            raise PipelineError(
                f"The autoencoder outputs its reconstructions of the frames only: output_mode 'prediction'. "
                f"Received: {output_mode!r}"
            )
        from models.convlstm_ae import reconstructor

        return reconstructor(model)


def window_indices(sources: np.ndarray, window: int) -> np.ndarray:
    """(n, window) frame indices of the window that ends at each frame, within its video: before a whole
    window exists, the video's first frame repeats at the front (as a live stream starts)."""
    index = np.zeros((len(sources), window), np.int64)
    for _, sl in video_slices(sources):
        ends = np.arange(sl.start, sl.stop)
        index[sl] = np.maximum(ends[:, None] - (window - 1) + np.arange(window), sl.start)
    return index


class AutoencoderFrames:
    """The ConvLSTM autoencoder as a frame model: frame t is reconstructed as the last frame of the window
    that ends at t, so its score uses frames up to t only (causal, the same in a live stream as offline).
    Its one error per frame, `src`, is that window's sequence reconstruction cost."""

    error_names = ("src",)

    def __init__(self, layer):
        self.layer = layer
        self.frame_shape = tuple(layer.frame_shape)
        self._scorers: dict[int, object] = {}

    def predict_videos(self, X, sources, batch_size=4, window=None, horizon=1, per_window=1, progress=None):
        """Like `models.inference.predict_videos` with one scored frame per window (the last)."""
        if not window or window < 1:
            raise PipelineError(
                f"The autoencoder scores windows of frames; whole videos (--window 0) are PredNet's. Received: {window}"
            )
        if horizon != 1 or per_window != 1:
            raise PipelineError(
                "The autoencoder scores each frame as the last of the window ending at it: --horizon 1 and "
                f"--per_window 1 only. Received: horizon {horizon}, per_window {per_window}"
            )
        from models.convlstm_ae import window_scorer

        if window not in self._scorers:
            self._scorers[window] = window_scorer(self.layer, window)
        scorer = self._scorers[window]
        start = time.perf_counter()
        index = window_indices(sources, window)
        predictions = np.zeros(X.shape, np.float32)
        errors = np.zeros((len(X), 1), np.float32)
        for i in range(0, len(X), batch_size):
            rows = index[i : i + batch_size]
            frames = X[rows]
            pad = batch_size - len(rows)
            if pad:  # every call the same shape: one compilation
                frames = np.concatenate([frames, np.zeros((pad, *frames.shape[1:]), frames.dtype)])
            out = scorer.predict_on_batch(frames.astype(np.uint8))
            predictions[i : i + len(rows)] = np.asarray(out["reconstruction"], np.float32)[: len(rows)]
            errors[i : i + len(rows)] = np.asarray(out["src"], np.float32)[: len(rows)]
            if progress is not None:
                progress.update(len(rows))
        return predictions, errors, len(X) / max(time.perf_counter() - start, 1e-9)


SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in (PredNetSpec(), ConvLSTMAESpec())}


def get(name: str) -> ModelSpec:
    if name not in SPECS:
        raise PipelineError(f"Unknown model {name!r}; expected one of {sorted(SPECS)}.")
    return SPECS[name]


def model_name(config: dict) -> str:
    """The model a folder's config.json says it holds (PredNet for folders written before the choice)."""
    return config.get(MODEL_KEY, DEFAULT_MODEL)


def require_prednet(name: str, what: str, instead: str) -> None:
    """Refuses, in one line, a model other than PredNet where only PredNet is supported yet, saying what to do
    `instead`."""
    if name != DEFAULT_MODEL:
        raise PipelineError(f"{what} supports PredNet models only; this one is {name!r} ({instead}).")


def load_frame_model(model_dir: str | Path, config: dict):
    """The frame model and the trained core layer of the model folder `model_dir`, as its config names it."""
    import models.convlstm_ae  # noqa: F401 (registers its layers for loading)
    from models.prednet import load_model

    spec = get(model_name(config))
    trained = load_model(Path(model_dir) / "model.keras")
    return spec.frame_model(trained), spec.core(trained)
