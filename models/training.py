"""Stage 2: training PredNet on windows of normal video to predict the next frame."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from models.calibration import FILENAME as CALIBRATION_FILE
from models.data.store import dataset_dir, load_split, read_metadata, video_slices
from models.errors import PipelineError
from models.io import atomic_file, write_json
from models.prednet import build_training_model, find_prednet, load_model, predictor, prednet_kwargs
from models.prednet.layers import OUTPUT_MODES, UNIT_TYPES
from models.shapes import check_frame_size


def window_starts(sources: np.ndarray, nt: int, strides=(1,), step: int = 1) -> np.ndarray:
    """(start, stride) of every `nt`-frame window that stays inside one video.

    Args:
        sources: the video name of each frame, frames of a video contiguous.
        nt: frames per window.
        strides: frame strides to sample with (2 means every other frame), as augmentation.
        step: distance between consecutive window starts.
    """
    out = []
    for _, sl in video_slices(sources):
        for stride in strides:
            last = sl.stop - (nt - 1) * stride
            out += [(s, stride) for s in range(sl.start, last, step)]
    return np.array(out, dtype=np.int64).reshape(-1, 2)


class WindowDataset(keras.utils.PyDataset):
    """Batches of `nt`-frame windows in [0, 1], never crossing from one video into the next.

    Targets are zeros: the training model outputs its weighted prediction error, trained towards 0.
    """

    def __init__(
        self, X, sources, nt, batch_size, strides=(1,), shuffle=True, samples_per_epoch=None, step=1, seed=0, **kwargs
    ):
        super().__init__(**kwargs)
        self.X, self.nt, self.batch_size, self.shuffle = X, nt, batch_size, shuffle
        self.windows = window_starts(sources, nt, strides, step)
        if len(self.windows) == 0:
            raise PipelineError(f"No {nt}-frame windows fit in any video; lower --nt.")
        # Shuffled sets sample `samples_per_epoch` windows (with repeats if there are fewer); fixed sets
        # take each window at most once.
        self.samples = samples_per_epoch or len(self.windows)
        if not shuffle:
            self.samples = min(self.samples, len(self.windows))
        self.rng = np.random.default_rng(seed)
        self.order = np.arange(len(self.windows))
        self.on_epoch_end()

    def __len__(self):
        return max(1, self.samples // self.batch_size) if self.shuffle else math.ceil(self.samples / self.batch_size)

    def on_epoch_end(self):
        if self.shuffle:
            n = max(self.samples, len(self.windows))
            self.order = self.rng.permutation(n) % len(self.windows)

    def frame_indices(self, index: int) -> np.ndarray:
        """Frame indices of batch `index`: (batch, nt)."""
        rows = self.windows[self.order[index * self.batch_size : (index + 1) * self.batch_size]]
        return rows[:, :1] + rows[:, 1:] * np.arange(self.nt)

    def __getitem__(self, index):
        x = self.X[self.frame_indices(index)].astype(np.float32) / 255.0
        return x, np.zeros((len(x), 1), np.float32)


def shortest_video(sources: np.ndarray) -> int:
    return min(sl.stop - sl.start for _, sl in video_slices(sources))


def next_frame_mse(
    model: keras.Model, dataset: WindowDataset, pred_model: keras.Model | None = None
) -> tuple[float, float]:
    """Mean squared error of the model's next-frame prediction and of copying the last frame (steps >= 1).

    `pred_model`, a `predictor(model, "prediction")` already holding the model's weights, saves building
    (and compiling) a new one at every call.
    """
    pred_model = pred_model or predictor(model, "prediction")
    se_model = se_copy = 0.0
    count = 0
    for i in range(len(dataset)):
        x, _ = dataset[i]
        pred = np.asarray(pred_model.predict_on_batch(x), dtype=np.float32)
        se_model += float(((pred[:, 1:] - x[:, 1:]) ** 2).sum())
        se_copy += float(((x[:, :-1] - x[:, 1:]) ** 2).sum())
        count += x[:, 1:].size
    return se_model / count, se_copy / count


class _Throughput(keras.callbacks.Callback):
    """Training frames per second per epoch (the first epoch includes compilation)."""

    def __init__(self, frames_per_epoch: int):
        super().__init__()
        self.frames_per_epoch = frames_per_epoch
        self.rates: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        rate = self.frames_per_epoch / (time.perf_counter() - self.start)
        self.rates.append(rate)
        if logs is not None:
            logs["frames_per_s"] = rate


class _TimeBudget(keras.callbacks.Callback):
    """Stops training after the last epoch that can finish within `minutes` of wall-clock time.

    The next epoch is expected to take as long as the longest so far, not counting the first (compilation).
    """

    def __init__(self, minutes: float):
        super().__init__()
        self.seconds = 60.0 * minutes
        self.stopped = False

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()
        self.durations: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        self.durations.append(now - self.epoch_start)
        expected = max(self.durations[1:] or self.durations)
        if now - self.start + expected > self.seconds:
            self.model.stop_training = True
            self.stopped = True


class _SaveLast(keras.callbacks.Callback):
    """Saves the whole model, optimizer included, after every epoch, for --resume."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def on_epoch_end(self, epoch, logs=None):
        with atomic_file(self.folder / "last.keras") as tmp:
            self.model.save(tmp)
        write_json(self.folder / "last.json", {"epoch": epoch})


@dataclass
class TrainSettings:
    """Every setting of a training run; train.py fills it from the config file and the command line."""

    preprocessed_data: str
    dataset: str
    model_dir: str
    stack_sizes: tuple[int, ...] = (48, 96, 192)
    R0_channels: int | None = None
    filter_sizes: tuple[int, int, int] = (3, 3, 3)
    layer_loss_weights: tuple[float, ...] = (1.0, 0.0)
    nt: int = 10
    horizon: int = 1
    batch_size: int = 8
    nb_epoch: int = 150
    samples_per_epoch: int | None = 500
    val_samples: int | None = 100
    learning_rate: float = 1e-3
    lr_decay: float = 1.0
    strides: tuple[int, ...] = (1,)
    patience: int = 10
    max_minutes: float | None = None
    output_mode: str = "all"
    precision: str = "float32"
    fine_tuning: str | None = None
    freeze_layers: tuple[int, ...] = ()
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    verbose: int = 1
    distribute: bool = False  # data-parallel over all local devices (JAX): models.distribute


def _check_output_mode(mode: str, n_layers: int) -> None:
    valid = list(OUTPUT_MODES) + [f"{u}{n}" for n in range(n_layers) for u in UNIT_TYPES]
    if mode not in valid:
        raise PipelineError(f"Unknown output mode {mode!r}; expected one of {valid}.")


def freeze(model: keras.Model, layers) -> None:
    """Freezes the weights of the given PredNet layers (0 is the pixel layer)."""
    prednet = find_prednet(model)
    for l in layers:
        if not 0 <= l < prednet.nb_layers:
            raise PipelineError(f"--freeze_layers names layer {l}, but the model has layers 0-{prednet.nb_layers - 1}.")
        for convs in (prednet.lstm_convs, prednet.ahat_convs, prednet.a_convs):
            if l < len(convs):
                convs[l].trainable = False


def _plot_history(history_csv: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    hist = pd.read_csv(history_csv)
    fig, ax = plt.subplots(figsize=(6, 4))
    for col in ("loss", "val_loss"):
        if col in hist:
            ax.plot(hist["epoch"] + 1, hist[col], label=col)
    ax.set(xlabel="epoch", ylabel="weighted prediction error", title="PredNet training")
    ax.legend()
    fig.tight_layout()
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def fit_normal_calibration(model, s: TrainSettings, X_train, src_train, X_val, src_val):
    """The live score's calibration (`models.calibration`) on the normal videos: the local error levels on the
    train and val frames, the exceedance on the val videos (held out from training; the train videos when
    there are none), with batch_scoring.py's default windows."""
    from models.live import calibrate, scoring_settings

    X = np.concatenate([X_train, X_val])
    sources = np.concatenate([src_train, src_val])
    tail = set(src_val.tolist()) or set(src_train.tolist())
    settings = scoring_settings({"arguments": {"nt": s.nt}})
    fitted_on = {"train_frames": len(X_train), "val_frames": len(X_val), "tail_videos": sorted(tail)}
    return calibrate(predictor(model, "all"), X, sources, tail, settings, batch_size=64, fitted_on=fitted_on)


def train(s: TrainSettings, extra_callbacks: list[keras.callbacks.Callback] | None = None) -> dict:
    """Trains PredNet and writes model.keras, calibration.json, config.json, history.csv and history.png to
    `s.model_dir`.

    Args:
        s: the settings.
        extra_callbacks: more Keras callbacks for `fit`, after the built-in ones (the tuner's pruning callback).

    Returns:
        The content of config.json.
    """
    data_dir = dataset_dir(s.preprocessed_data, s.dataset)
    meta = read_metadata(data_dir)
    frame_shape = (meta["height"], meta["width"], meta["channels"])
    n_layers = len(s.stack_sizes) + 1
    check_frame_size(meta["height"], meta["width"], n_layers)
    _check_output_mode(s.output_mode, n_layers)
    if s.max_minutes is not None and not s.max_minutes > 0:
        raise PipelineError(f"--max_minutes must be positive. Received: {s.max_minutes}")
    if s.nt < 2:
        raise PipelineError(f"--nt must be at least 2 (the first step predicts nothing). Received: {s.nt}")

    model_dir = Path(s.model_dir)
    ckpt = model_dir / "checkpoints"
    if (model_dir / "model.keras").exists() and not (s.overwrite or s.resume):
        raise PipelineError(f"{model_dir} already holds a trained model; pass --overwrite, or --resume to continue.")
    if s.resume and not (ckpt / "last.keras").is_file():
        raise PipelineError(f"Nothing to resume in {model_dir}: no checkpoints/last.keras.")

    if s.distribute:  # before any model is built: weights are laid out on the devices when created
        from models.distribute import setup_data_parallel

        devices = setup_data_parallel(s)
        if s.verbose:
            print(f"data-parallel over {len(devices)} devices: {', '.join(devices)}")

    X_train, src_train = load_split(data_dir, "train")
    X_val, src_val = load_split(data_dir, "val")
    for name, src in (("train", src_train), ("val", src_val)):
        if len(src) and s.nt * min(s.strides) > shortest_video(src):
            raise PipelineError(
                f"--nt {s.nt} is longer than the shortest {name} video ({shortest_video(src)} frames) of {data_dir}."
            )
    if len(X_train) == 0:
        raise PipelineError(f"{data_dir} has no training frames.")

    keras.utils.set_random_seed(s.seed)
    keras.mixed_precision.set_dtype_policy(s.precision)
    train_data = WindowDataset(
        X_train, src_train, s.nt, s.batch_size, s.strides, True, s.samples_per_epoch, seed=s.seed
    )
    val_data = None
    if len(X_val):
        val_data = WindowDataset(
            X_val, src_val, s.nt, s.batch_size, shuffle=False, step=s.nt, samples_per_epoch=s.val_samples, seed=s.seed
        )

    initial_epoch = 0
    if s.resume:
        model = load_model(ckpt / "last.keras", compile=True)
        initial_epoch = json.loads((ckpt / "last.json").read_text())["epoch"] + 1
    else:
        kwargs = prednet_kwargs(frame_shape[2], s.stack_sizes, s.filter_sizes, s.R0_channels)
        if s.fine_tuning:
            base = find_prednet(load_model(Path(s.fine_tuning) / "model.keras"))
            if base.frame_shape != frame_shape:
                raise PipelineError(
                    f"Model in {s.fine_tuning} takes frames {base.frame_shape}, the data has {frame_shape}."
                )
            kwargs = {
                k: v
                for k, v in base.get_config().items()
                if k in ("stack_sizes", "R_stack_sizes", "A_filt_sizes", "Ahat_filt_sizes", "R_filt_sizes", "pixel_max")
            }
        try:
            model = build_training_model(s.nt, frame_shape, s.layer_loss_weights, s.horizon, **kwargs)
        except ValueError as err:
            raise PipelineError(str(err)) from None
        if s.fine_tuning:
            find_prednet(model).set_weights(base.get_weights())
        model.compile(optimizer=keras.optimizers.Adam(s.learning_rate), loss="mae")
    freeze(model, s.freeze_layers)
    if s.freeze_layers:  # trainable flags take effect at compile time
        model.compile(optimizer=model.optimizer, loss="mae")

    ckpt.mkdir(parents=True, exist_ok=True)
    throughput = _Throughput(len(train_data) * s.batch_size * s.nt)
    monitor = "val_loss" if val_data is not None else "loss"
    callbacks = [
        keras.callbacks.LearningRateScheduler(lambda epoch: s.learning_rate * s.lr_decay**epoch),
        throughput,
        keras.callbacks.ModelCheckpoint(ckpt / "best.keras", monitor=monitor, save_best_only=True),
        keras.callbacks.EarlyStopping(monitor=monitor, patience=s.patience, restore_best_weights=True),
        keras.callbacks.CSVLogger(model_dir / "history.csv", append=s.resume),
        _SaveLast(ckpt),
    ]
    budget = _TimeBudget(s.max_minutes) if s.max_minutes else None
    if budget:
        callbacks.append(budget)
    start = time.perf_counter()
    model.fit(
        train_data,
        validation_data=val_data,
        epochs=s.nb_epoch,
        initial_epoch=initial_epoch,
        callbacks=callbacks + list(extra_callbacks or ()),
        verbose=s.verbose,
    )
    seconds = time.perf_counter() - start
    if (ckpt / "best.keras").is_file():
        find_prednet(model).set_weights(find_prednet(load_model(ckpt / "best.keras")).get_weights())

    eval_data = val_data or WindowDataset(
        X_train, src_train, s.nt, s.batch_size, shuffle=False, step=s.nt, samples_per_epoch=s.val_samples
    )
    mse_model, mse_copy = next_frame_mse(model, eval_data)
    calibration = fit_normal_calibration(model, s, X_train, src_train, X_val, src_val)
    with atomic_file(model_dir / "model.keras") as tmp:
        model.save(tmp)
    calibration.save(model_dir / CALIBRATION_FILE)
    _plot_history(model_dir / "history.csv", model_dir / "history.png")
    steady = throughput.rates[1:] or throughput.rates
    config = {
        "arguments": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(s).items()},
        "frame_shape": list(frame_shape),
        "prednet": find_prednet(model).get_config(),
        "data": {k: meta[k] for k in ("source", "height", "width", "channels", "frames", "videos")},
        "results": {
            "epochs_run": len(throughput.rates),
            "stopped_by_time_budget": bool(budget and budget.stopped),
            "train_seconds": round(seconds, 1),
            "train_frames_per_s": round(float(np.median(steady)), 1) if steady else None,
            "eval_split": "val" if val_data is not None else "train",
            "next_frame_mse": mse_model,
            "copy_last_frame_mse": mse_copy,
            "backend": keras.backend.backend(),
        },
    }
    write_json(model_dir / "config.json", config)
    return config


def summary_line(config: dict) -> str:
    r = config["results"]
    better = "better" if r["next_frame_mse"] < r["copy_last_frame_mse"] else "WORSE"
    return (
        f"{r['eval_split']} next-frame MSE {r['next_frame_mse']:.6f} vs copy-last-frame {r['copy_last_frame_mse']:.6f} "
        f"({better} than the baseline, ratio {r['next_frame_mse'] / max(r['copy_last_frame_mse'], 1e-12):.3f}); "
        f"{r['epochs_run']} epochs in {r['train_seconds']} s, {r['train_frames_per_s']} frames/s"
        + (" (stopped by --max_minutes)" if r.get("stopped_by_time_budget") else "")
        + ("" if math.isfinite(r["next_frame_mse"]) else " (NaN loss!)")
    )
