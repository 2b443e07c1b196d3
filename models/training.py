"""Stage 2: training PredNet on windows of normal video to predict the next frame."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import keras
import numpy as np

import models.convlstm_ae  # noqa: F401 (registers the autoencoder's layers, for load_model)
from models.calibration import FILENAME as CALIBRATION_FILE
from models.cli import option_text
from models.config import training_defaults
from models.data.store import dataset_dir, load_split, read_metadata, video_slices
from models.errors import PipelineError
from models.io import (
    MARKER,
    atomic_file,
    check_inputs,
    check_output,
    clean_leftovers,
    commit_dir,
    new_dir_beside,
    output_lock,
    read_marker,
    remove_output,
    replace_dir,
    sibling,
    temporary_dir,
    temporary_file_of,
    write_json,
    write_marker,
)
from models.prednet import find_prednet, load_model, predictor
from models.registry import MODEL_KEY, get

log = logging.getLogger(__name__)

STAGE = "train"  # the stage name in the marker of the model folder (models.io)


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
    """Batches of `nt`-frame windows in [0, 1] (or uint8 as stored), never crossing from one video into the next.

    Targets are zeros: the training model outputs its weighted prediction error, trained towards 0.
    """

    def __init__(
        self,
        X,
        sources,
        nt,
        batch_size,
        strides=(1,),
        shuffle=True,
        samples_per_epoch=None,
        step=1,
        seed=0,
        uint8=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.X, self.nt, self.batch_size, self.shuffle = X, nt, batch_size, shuffle
        self.uint8 = uint8  # batches of frames as stored, for a model that scales them on the device
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
        x = self.X[self.frame_indices(index)]
        if not self.uint8:
            x = x.astype(np.float32) / 255.0
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
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x
        pred = np.asarray(pred_model.predict_on_batch(x), dtype=np.float32)
        se_model += float(((pred[:, 1:] - x[:, 1:]) ** 2).sum())
        se_copy += float(((x[:, :-1] - x[:, 1:]) ** 2).sum())
        count += x[:, 1:].size
    return se_model / count, se_copy / count


def copy_last_frame_loss(dataset: WindowDataset) -> float:
    """The L_0 loss of copying the last frame: half the mean absolute difference of each frame from the one
    before it, over steps 1..nt-1 of each window (the scale of the layer-0 error, `WeightedError`)."""
    total, count = 0.0, 0
    for i in range(len(dataset)):
        x, _ = dataset[i]
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)  # uint8: as stored
        total += float(np.abs(x[:, 1:] - x[:, :-1]).sum())
        count += x[:, 1:].size
    return 0.5 * total / max(count, 1)


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


class _WeightsMustChange(keras.callbacks.Callback):
    """Stops the run with an error after an epoch that left every trainable weight exactly as it was.

    Such an epoch trained nothing (on the H100 a JAX trace that held the weights as constants did this,
    silently; docs/model_development.md). It runs before the epoch is checkpointed, so the last epoch that
    trained stays the run's state. A few weights that do not change (a frozen or unused one) are no fault.
    """

    def on_train_begin(self, logs=None):
        self.last = self._values()

    def on_epoch_end(self, epoch, logs=None):
        now = self._values()
        if now and all(np.array_equal(a, b) for a, b in zip(now, self.last, strict=True)):
            raise PipelineError(
                f"Epoch {epoch + 1} left all {len(now)} trainable weights exactly as they were: the training "
                f"step did nothing (backend {keras.backend.backend()}). Stopped before saving that epoch."
            )
        self.last = now

    def _values(self) -> list[np.ndarray]:
        return [keras.ops.convert_to_numpy(w.value) for w in self.model.trainable_weights]


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


class _Checkpoints(keras.callbacks.Callback):
    """The run's state, committed as one after every epoch, and early stopping on that state.

    `checkpoints/` holds `last.keras` (the model and its optimizer), `best.keras` (the best epoch so far),
    `history.csv` and `last.json` (the epoch, the best monitored value, its epoch, and the patience counter).
    Each epoch writes a new folder and swaps it in (`models.io.replace_dir`), so the four always agree and a
    kill leaves the previous epoch's set. A resumed run starts from that state: a worse epoch never becomes
    best, and patience counts on.
    """

    def __init__(self, run_dir: Path, monitor: str, patience: int, state: dict, rows: list[dict]):
        super().__init__()
        self.run_dir, self.monitor, self.patience = run_dir, monitor, patience
        self.state, self.rows = dict(state), list(rows)
        self.stopped = False

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.rows.append({"epoch": epoch} | {k: float(v) for k, v in sorted(logs.items())})
        value = logs.get(self.monitor)
        best = self.state["best"]
        improved = value is not None and math.isfinite(value) and (best is None or value < best)
        self.state["wait"] += 1
        if improved:
            self.state.update(best=float(value), best_epoch=epoch, wait=0)
        elif self.state["wait"] >= self.patience and epoch > 0:
            self.model.stop_training = self.stopped = True
        self.state["epoch"] = epoch
        self._commit(improved)

    def _commit(self, improved: bool) -> None:
        refuse_foreign_in_run(self.run_dir)
        ckpt = self.run_dir / "checkpoints"
        tmp = temporary_dir(".checkpoints.tmp-", self.run_dir)
        self.model.save(tmp / "last.keras")
        if improved:
            self.model.save(tmp / "best.keras")
        elif (ckpt / "best.keras").is_file():
            _link_or_copy(ckpt / "best.keras", tmp / "best.keras")
        _write_history(self.rows, tmp / "history.csv")
        write_json(tmp / "last.json", self.state)
        replace_dir(tmp, ckpt)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _write_history(rows: list[dict], path: Path) -> None:
    """One row per epoch, the columns of Keras's CSVLogger: epoch, then the logs in name order."""
    columns = ["epoch"] + sorted({k for row in rows for k in row} - {"epoch"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _read_history(path: Path, last_epoch: int) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [{k: float(v) if v != "" else math.nan for k, v in row.items()} for row in csv.DictReader(f)]
    return [row | {"epoch": int(row["epoch"])} for row in rows if row["epoch"] <= last_epoch]


def _read_state(ckpt: Path, frame_shape: tuple[int, int, int], nt: int) -> dict:
    """The committed state of an interrupted run, checked against the data and settings it resumes with."""
    path = ckpt / "last.json"
    try:
        state = json.loads(path.read_text())
        state = {
            "epoch": int(state["epoch"]),
            "best": None if state["best"] is None else float(state["best"]),
            "best_epoch": None if state["best_epoch"] is None else int(state["best_epoch"]),
            "wait": int(state["wait"]),
            "monitor": str(state["monitor"]),
            "frame_shape": [int(v) for v in state["frame_shape"]],
            "nt": int(state["nt"]),
            MODEL_KEY: str(state.get(MODEL_KEY, "prednet")),  # runs from before the choice trained PredNet
        }
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PipelineError(
            f"Cannot resume from {path}: it is missing or corrupt ({type(err).__name__}: {err}); start over with "
            "--overwrite."
        ) from None
    if tuple(state["frame_shape"]) != tuple(frame_shape):
        raise PipelineError(
            f"Cannot resume from {path}: that run trained on frames {tuple(state['frame_shape'])} (h, w, c), the "
            f"data has {tuple(frame_shape)}; resume on the same data, or start over with --overwrite."
        )
    if state["nt"] != nt:
        raise PipelineError(
            f"Cannot resume from {path}: that run trained on {state['nt']}-frame windows, not --nt {nt}."
        )
    return state


# What a run writes in its staging folder, and nothing else (`_foreign_in_run`).
_RUN_FILES = frozenset({MARKER, "model.keras", "config.json", CALIBRATION_FILE, "history.csv", "history.png"})
_CHECKPOINT_FILES = frozenset({"last.keras", "best.keras", "history.csv", "last.json"})
_CHECKPOINTS_TMP = re.compile(r"\.checkpoints\.tmp-[a-z0-9_]{8}")  # an epoch's commit killed midway


def _foreign_in_run(run_dir: Path) -> list[str]:
    """Entries of an interrupted run's staging folder that train.py does not write there (a user's notes):
    they stop a run that would continue or delete it."""
    foreign = []
    for entry in sorted(run_dir.iterdir()):
        if entry.is_symlink():
            foreign.append(entry.name)
        elif entry.is_dir() and (entry.name == "checkpoints" or _CHECKPOINTS_TMP.fullmatch(entry.name)):
            foreign += [
                f"{entry.name}/{e.name}"
                for e in sorted(entry.iterdir())
                if e.is_symlink() or not e.is_file() or e.name not in _CHECKPOINT_FILES
            ]
        elif entry.is_dir() or not (entry.name in _RUN_FILES or temporary_file_of(entry.name) in _RUN_FILES):
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def refuse_foreign_in_run(run_dir: Path) -> None:
    """Stops a run, before it replaces its checkpoints or puts its model in place, when something was saved in
    its staging folder while it trained (`_foreign_in_run`): kept, never deleted nor carried into the model.

    Raises:
        PipelineError: naming the first such entry.
    """
    foreign = _foreign_in_run(run_dir)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise PipelineError(
            f"{run_dir / foreign[0]}{more} was saved in {run_dir} while it trained; it is kept, and the run stops at "
            "its last saved epoch: move it away, then continue with --resume."
        )


def _clean_run_dir(run_dir: Path) -> None:
    """Deletes what a killed epoch commit or final write left in a staging folder (`_foreign_in_run` has
    found nothing else there)."""
    for leftover in run_dir.iterdir():
        if _CHECKPOINTS_TMP.fullmatch(leftover.name) or temporary_file_of(leftover.name) in _RUN_FILES:
            remove_output(leftover)


def staging_dir(model_dir: str | Path) -> Path:
    """Where a run into `model_dir` trains until it is complete: `.<name>.partial` beside it."""
    return sibling(model_dir, ".partial")


def _model_marker(model_dir: Path) -> dict | None:
    """The marker of the model folder a run would replace, if there is one (a link is not looked through)."""
    return read_marker(model_dir) if model_dir.is_dir() and not model_dir.is_symlink() else None


def _finish_commit(staging: Path, model_dir: Path, marker: dict) -> None:
    """A complete staging folder is what a kill left at the end of a run: the finished model, if the kill came
    before it was swapped in (its marker names the model folder it replaces, which is still there, or there
    is none), which is then put in place; else the replaced old model folder, which is deleted."""
    current = _model_marker(model_dir)
    if current is not None and marker.get("replacing") != current.get("created"):
        remove_output(staging)
        return
    log.warning("%s holds a run that finished but was not put in place (killed at its end): putting it there", staging)
    commit_dir(staging, model_dir, STAGE, overwrite=True)


def _open_run(s: TrainSettings, model_dir: Path, inputs: list) -> tuple[Path | None, Path | None]:
    """Decides, before any work, where the run trains and what it resumes. Writes nothing; deletes only a
    replaced model folder that a kill left under the staging name.

    Returns:
        (the interrupted run's folder to continue in, or None for a new one; the checkpoints to resume from,
        or None to start from scratch).
    """
    staging = staging_dir(model_dir)
    if staging.exists():
        marker = read_marker(staging)
        if marker is None or marker["stage"] != STAGE:
            raise PipelineError(
                f"Refusing to use {staging}: it was not written by train.py (no train {MARKER}); move it away."
            )
        if marker.get("complete"):  # a whole model folder, its files listed
            check_output(staging, STAGE, overwrite=True)
            _finish_commit(staging, model_dir, marker)
        else:
            foreign = _foreign_in_run(staging)
            if foreign:
                more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
                raise PipelineError(
                    f"Refusing to use {staging}: {staging / foreign[0]}{more} was not written by train.py; move it "
                    "away first."
                )
    exists = model_dir.exists() or model_dir.is_symlink()
    if s.resume:
        if exists:
            check_output(model_dir, STAGE, True, inputs)
        if staging.exists():
            ckpt = staging / "checkpoints"
            return staging, ckpt if (ckpt / "last.json").is_file() else None
        if exists and (model_dir / "checkpoints" / "last.json").is_file():
            return None, model_dir / "checkpoints"
        raise PipelineError(
            f"Nothing to resume in {model_dir}: no checkpoints/last.json there and no interrupted run in {staging}."
        )
    if staging.exists() and not s.overwrite:
        raise PipelineError(
            f"{staging} holds an interrupted run into {model_dir}; pass --resume to continue it, or --overwrite to "
            "start over."
        )
    if exists and not s.overwrite:
        check_output(model_dir, STAGE, True, inputs)  # a folder train.py did not write is refused as such
        raise PipelineError(f"{model_dir} already holds a trained model; pass --overwrite, or --resume to continue.")
    check_output(model_dir, STAGE, s.overwrite, inputs)
    return None, None


# The one source of the training defaults: config/default.json (train.py's default --config); TrainSettings
# takes its defaults from it, so that the library and the command line train the same model by default.
DEFAULTS = training_defaults()
LR_SCHEDULES = ("decay", "step")


def _default(name: str):
    value = DEFAULTS[name]
    return field(default=tuple(value) if isinstance(value, list) else value)


@dataclass
class TrainSettings:
    """Every setting of a training run; train.py fills it from the config file and the command line. The
    defaults of the model and the optimisation are config/default.json's (`DEFAULTS`)."""

    preprocessed_data: str
    dataset: str
    model_dir: str
    model: str = "prednet"  # a name in models.registry.SPECS
    stack_sizes: tuple[int, ...] = _default("stack_sizes")
    R0_channels: int | None = _default("R0_channels")
    filter_sizes: tuple[int, int, int] = _default("filter_sizes")
    layer_loss_weights: tuple[float, ...] = _default("layer_loss_weights")
    nt: int = _default("nt")
    horizon: int = 1
    batch_size: int = _default("batch_size")
    nb_epoch: int = _default("nb_epoch")
    samples_per_epoch: int | None = _default("samples_per_epoch")
    val_samples: int | None = _default("val_samples")
    learning_rate: float = _default("learning_rate")
    lr_schedule: str = _default("lr_schedule")
    lr_decay: float = _default("lr_decay")
    lr_step_epoch: int = _default("lr_step_epoch")
    strides: tuple[int, ...] = _default("strides")
    patience: int = _default("patience")
    max_minutes: float | None = None
    precision: str = _default("precision")
    fine_tuning: str | None = None
    freeze_layers: tuple[int, ...] = ()
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    verbose: int = 1
    distribute: bool = False  # data-parallel over all local devices (JAX): models.distribute
    # The ConvLSTM autoencoder (--model convlstm_ae): encoder convolutions and the ConvLSTM bottleneck.
    ae_filters: tuple[int, ...] = (128, 64)
    ae_kernels: tuple[int, ...] = (11, 5)
    ae_strides: tuple[int, ...] = (4, 2)
    ae_lstm_filters: tuple[int, ...] = (64, 32, 64)
    # The settings the caller chose, which a resumed run or the layers of a fine-tuned model never silently
    # override (`_take`): train.py passes those given on its command line. None (a call from Python): how long
    # the run goes on (`_MAY_CHANGE_ON_RESUME`); the rest follows the resumed run or the starting model.
    given: tuple[str, ...] | None = None


# Settings that say how a run goes, not what it trains: a resumed run never takes them from its record.
_MANNER = ("model_dir", "resume", "overwrite", "verbose", "distribute")
# ... and with where its data is: the tuner never searches them.
PLACE_AND_MANNER = ("preprocessed_data", "dataset", *_MANNER)
# Settings a resumed run may change when given on the command line: how long it goes on, and where its data
# now lies (the dataset itself may not change).
_MAY_CHANGE_ON_RESUME = ("nb_epoch", "patience", "max_minutes", "preprocessed_data")
_PATHS = ("preprocessed_data", "fine_tuning")  # compared as the folders they name


def recorded_settings(s: TrainSettings) -> dict:
    """The settings as config.json, last.json and the tuner record them (JSON: lists for tuples)."""
    values = {f.name: getattr(s, f.name) for f in fields(s) if f.name != "given"}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _chosen(s: TrainSettings) -> set[str]:
    return set(_MAY_CHANGE_ON_RESUME) if s.given is None else set(s.given)


def _same(name: str, a, b) -> bool:
    if name in _PATHS and a is not None and b is not None:
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def _take(s: TrainSettings, theirs: dict, whose: str, remedy: str) -> TrainSettings:
    """`s` with the settings `theirs` (`whose`), logged where they change a value; one of them that the caller
    chose (`TrainSettings.given`) with another value is refused, with `remedy`."""
    theirs = {k: tuple(v) if isinstance(v, list) else v for k, v in theirs.items()}
    changed = {k: v for k, v in theirs.items() if not _same(k, getattr(s, k), v)}
    clash = [k for k in changed if k in _chosen(s)]
    if clash:
        raise PipelineError(
            f"{whose} ({', '.join(f'--{k} {option_text(theirs[k])}' for k in clash)}); this run was given "
            f"{', '.join(f'--{k} {option_text(getattr(s, k))}' for k in clash)}: {remedy}"
        )
    if changed:
        log.info("%s: %s", whose, ", ".join(f"{k} {option_text(v)}" for k, v in changed.items()))
    return replace(s, **changed)


def _recorded_arguments(model_dir: Path) -> dict | None:
    """The settings of the run `resume` continues: an interrupted run's, recorded in its checkpoints'
    last.json (none if it was killed before its first epoch ended), else the complete model folder's (its
    last.json, or its config.json for a run from before last.json held them); None where nothing says."""
    staging = staging_dir(model_dir)
    if staging.is_dir():
        places = [staging / "checkpoints" / "last.json"]
    else:
        places = [model_dir / "checkpoints" / "last.json", model_dir / "config.json"]
    for path in places:
        try:
            recorded = json.loads(path.read_text()).get("arguments")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(recorded, dict):
            return recorded
    return None


_RESUME_REMEDY = (
    "drop these options to continue the run as it was (only --nb_epoch, --patience, --max_minutes and, for data "
    "that moved, --preprocessed_data may change), or start a new run (--overwrite, or another --model_dir)"
)


def _settings_of_resumed_run(s: TrainSettings) -> TrainSettings:
    """With `resume`, the settings of the run it continues, except its place and manner (`PLACE_AND_MANNER`) and
    what the command line gives of `_MAY_CHANGE_ON_RESUME`; another setting given with another value is refused."""
    recorded = _recorded_arguments(Path(s.model_dir)) if s.resume else None
    if recorded is None:
        return s
    keep = set(recorded_settings(s)) - set(_MANNER) - (set(_MAY_CHANGE_ON_RESUME) & _chosen(s))
    theirs = {k: v for k, v in recorded.items() if k in keep}
    return _take(s, theirs, "--resume continues the run with its own settings", _RESUME_REMEDY)


def _fine_tuned_layers(s: TrainSettings) -> TrainSettings:
    """With `fine_tuning` (PredNet), the layer settings of the model it starts from, as its config.json records
    its layer: the recorded settings and the model agree."""
    path = Path(s.fine_tuning or "") / "config.json"
    if not s.fine_tuning or s.model != "prednet" or not path.is_file():
        return s  # (a folder without config.json is refused when the model is built)
    try:
        layer = json.loads(path.read_text())["prednet"]
        theirs = {
            "stack_sizes": layer["stack_sizes"][1:],
            "R0_channels": layer["R_stack_sizes"][0],
            "filter_sizes": [layer[k][0] for k in ("A_filt_sizes", "Ahat_filt_sizes", "R_filt_sizes")],
        }
    except (ValueError, KeyError, IndexError, TypeError):
        return s  # an older model folder: its layer is read from model.keras when the model is built
    remedy = "drop these options (the layers come with the weights), or train a new model without --fine_tuning"
    return _take(s, theirs, f"--fine_tuning {s.fine_tuning} brings its model's layers", remedy)


def learning_rate(s: TrainSettings, epoch: int) -> float:
    """The learning rate of epoch `epoch` (0-based): `learning_rate` times `lr_decay` per epoch ('decay'), or
    the reference's step ('step': Lotter et al.'s Keras code trains at 0.001 for epochs < 75, then 0.0001):
    `learning_rate` before epoch `lr_step_epoch`, a tenth of it from then on."""
    if s.lr_schedule == "step":
        return s.learning_rate * (0.1 if epoch >= s.lr_step_epoch else 1.0)
    return s.learning_rate * s.lr_decay**epoch


def freeze(model: keras.Model, layers) -> None:
    """Freezes the weights of the given PredNet layers (0 is the pixel layer)."""
    prednet = find_prednet(model)
    for l in layers:
        if not 0 <= l < prednet.nb_layers:
            raise PipelineError(f"--freeze_layers names layer {l}, but the model has layers 0-{prednet.nb_layers - 1}.")
    if set(layers) >= set(range(prednet.nb_layers)):
        raise PipelineError(f"--freeze_layers {option_text(sorted(layers))} freezes every layer: nothing would train.")
    prednet.freeze(layers)


def fit_normal_calibration(model, s: TrainSettings, X_train, src_train, X_val, src_val):
    """The live score's calibration (`models.calibration`) on the normal videos: the local error levels on the
    train and val frames, the exceedance on the val videos (held out from training; the train videos when
    there are none), with batch_scoring.py's default windows."""
    from models.live import calibrate, scoring_settings

    X = np.concatenate([X_train, X_val])
    sources = np.concatenate([src_train, src_val])
    tail = set(src_val.tolist()) or set(src_train.tolist())
    settings = scoring_settings({"arguments": {"nt": s.nt}, MODEL_KEY: s.model})
    fitted_on = {"train_frames": len(X_train), "val_frames": len(X_val), "tail_videos": sorted(tail)}
    frames = get(s.model).frame_model(model)
    return calibrate(frames, X, sources, tail, settings, batch_size=64, fitted_on=fitted_on)


def train(s: TrainSettings, extra_callbacks: list[keras.callbacks.Callback] | None = None) -> dict:
    """Trains the model `s.model` names (PredNet by default; `models.registry`) and writes model.keras,
    calibration.json, config.json, history.csv, history.png and checkpoints/ to `s.model_dir`, as one: killed
    at any moment, `s.model_dir` holds the previous complete model (or nothing), and the interrupted run can
    be continued with `resume`.

    The run trains in a staging folder beside the model folder, `.<name>.partial` (`staging_dir`), marked as
    train.py's. After every epoch its `checkpoints/` is replaced as a whole (`_Checkpoints`). At the end the
    final files are written into it and it is swapped with the model folder in one step
    (`models.io.replace_dir`); the old folder is then deleted. So model.keras and config.json never exist
    one without the other, and an old model.keras never sits beside a new history.csv.

    - A new run refuses an existing model folder without `overwrite`, and an interrupted run's staging
      folder without `resume` or `overwrite` (so its checkpoints are never silently replaced).
    - `resume` continues the staging folder's run, or else the run of a complete model folder (its
      checkpoints are copied into a new staging folder, and the folder stays as it was until the end): the
      model and optimizer from `last.keras`, the epoch count (the learning-rate schedule follows the epoch
      index), and the best monitored value and patience counter from `last.json`, so a worse epoch never
      becomes best.
    - `overwrite` starts over, replacing only what train.py wrote (`models.io.check_output`).
    - The lock of the model folder (`models.io.output_lock`) makes a second run into it refuse at once.

    Args:
        s: the settings.
        extra_callbacks: more Keras callbacks for `fit`, after the built-in ones (the tuner's pruning callback).

    Returns:
        The content of config.json.

    Raises:
        PipelineError: bad settings or data, a refused model folder, a corrupt or mismatched run to resume.
    """
    s = _fine_tuned_layers(_settings_of_resumed_run(s))
    if s.dataset is None:  # train.py --resume without --dataset, for a run that recorded none
        raise PipelineError(f"The run in {s.model_dir} records no dataset: pass --preprocessed_data and --dataset.")
    data_dir = dataset_dir(s.preprocessed_data, s.dataset)
    meta = read_metadata(data_dir)
    get(s.model).check_settings(s, meta)
    if s.lr_schedule not in LR_SCHEDULES:
        raise PipelineError(f"--lr_schedule must be one of {list(LR_SCHEDULES)}. Received: {s.lr_schedule!r}")
    if s.max_minutes is not None and not s.max_minutes > 0:
        raise PipelineError(f"--max_minutes must be positive. Received: {s.max_minutes}")
    if s.nt < 2:
        raise PipelineError(f"--nt must be at least 2 (the first step predicts nothing). Received: {s.nt}")

    if s.nb_epoch < 1:
        raise PipelineError(f"--nb_epoch must be 1 or more. Received: {s.nb_epoch}")

    model_dir = Path(s.model_dir)
    inputs = [data_dir, s.fine_tuning]
    check_inputs(model_dir, inputs)
    policy = keras.config.dtype_policy()
    try:
        with output_lock(model_dir):
            run_dir, resume_from = _open_run(s, model_dir, inputs)
            return _train_locked(s, data_dir, meta, model_dir, run_dir, resume_from, extra_callbacks)
    finally:  # --precision is this run's: models built after it (scoring, the next trial) get the old policy
        keras.config.set_dtype_policy(policy)


def _train_locked(
    s: TrainSettings,
    data_dir: Path,
    meta: dict,
    model_dir: Path,
    run_dir: Path | None,
    resume_from: Path | None,
    extra_callbacks=None,
) -> dict:
    """The body of `train`, run under the lock of `model_dir` once `_open_run` has decided what to do."""
    frame_shape = (meta["height"], meta["width"], meta["channels"])
    spec = get(s.model)

    if s.distribute:  # before any model is built: weights are laid out on the devices when created
        from models.distribute import setup_data_parallel

        devices = setup_data_parallel(s)
        log.info("data-parallel over %d devices: %s", len(devices), ", ".join(devices))

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
    monitor = "val_loss" if val_data is not None else "loss"

    initial_epoch, rows = 0, []
    state = {"epoch": -1, "best": None, "best_epoch": None, "wait": 0, "monitor": monitor}
    state |= {"frame_shape": list(frame_shape), "nt": s.nt, MODEL_KEY: s.model}
    if resume_from is not None:
        state = _read_state(resume_from, frame_shape, s.nt)
        if state[MODEL_KEY] != s.model:
            raise PipelineError(
                f"Cannot resume from {resume_from}: that run trained --model {state[MODEL_KEY]}, not --model {s.model}."
            )
        if state["monitor"] != monitor:
            raise PipelineError(
                f"Cannot resume from {resume_from}: that run monitored {state['monitor']}, this data gives {monitor}."
            )
        if run_dir is None and state["epoch"] + 1 >= s.nb_epoch:  # a finished model folder: more epochs, or none
            raise PipelineError(
                f"The run in {resume_from.parent} is complete ({state['epoch'] + 1} epochs, --nb_epoch {s.nb_epoch}): "
                "nothing to resume; pass a larger --nb_epoch to train on."
            )
        model = load_model(resume_from / "last.keras", compile=True)
        initial_epoch = state["epoch"] + 1
        rows = _read_history(resume_from / "history.csv", state["epoch"])
    else:
        model = spec.build(s, frame_shape)
        model.compile(optimizer=keras.optimizers.Adam(s.learning_rate), loss="mae")
    state["arguments"] = recorded_settings(s)  # what a resumed run takes (`_settings_of_resumed_run`)
    # Frames go to the device as stored (uint8) and are scaled there, unless the model takes floats (a
    # checkpoint from before that, or a model built without it).
    for data in (train_data, val_data):
        if data is not None:
            data.uint8 = model.inputs[0].dtype == "uint8"
    if s.freeze_layers:  # trainable flags take effect at compile time
        if not s.fine_tuning:
            log.warning("--freeze_layers without --fine_tuning keeps those layers at their random initial weights")
        freeze(model, s.freeze_layers)
        model.compile(optimizer=model.optimizer, loss="mae")

    # Every check has passed: only now is anything written, and only beside model_dir until the end.
    clean_leftovers(model_dir)
    if run_dir is None:
        run_dir = staging_dir(model_dir)
        if run_dir.exists():  # --overwrite of an interrupted run (_open_run checked that train.py wrote it)
            remove_output(run_dir)
        tmp = new_dir_beside(model_dir, STAGE)
        if resume_from is not None:  # a complete model folder: its run continues in a new staging folder
            shutil.copytree(resume_from, tmp / "checkpoints")
        tmp.rename(run_dir)
    else:
        _clean_run_dir(run_dir)

    throughput = _Throughput(len(train_data) * s.batch_size * s.nt)
    checkpoints = _Checkpoints(run_dir, monitor, s.patience, state, rows)
    callbacks = [
        keras.callbacks.LearningRateScheduler(lambda epoch: learning_rate(s, epoch)),
        throughput,
        _WeightsMustChange(),
        checkpoints,
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
    ckpt = run_dir / "checkpoints"
    if (ckpt / "best.keras").is_file():
        spec.core(model).set_weights(spec.core(load_model(ckpt / "best.keras")).get_weights())

    eval_data = val_data or WindowDataset(
        X_train, src_train, s.nt, s.batch_size, shuffle=False, step=s.nt, samples_per_epoch=s.val_samples
    )
    mse_model, mse_copy = spec.eval_mse(model, eval_data)
    calibration = fit_normal_calibration(model, s, X_train, src_train, X_val, src_val)
    with atomic_file(run_dir / "model.keras") as tmp:
        model.save(tmp)
    calibration.save(run_dir / CALIBRATION_FILE)
    with atomic_file(run_dir / "history.csv") as tmp:
        _write_history(checkpoints.rows, tmp)
    from models.plots import plot_history

    # PredNet with L_0: copying the last frame has a loss on the same scale to compare with.
    only_pixels = s.model == "prednet" and s.horizon == 1 and not any(s.layer_loss_weights[1:])
    plot_history(
        run_dir / "history.csv",
        run_dir / "history.png",
        copy_last_frame_loss(eval_data) if only_pixels else None,
        spec.title,
    )
    steady = throughput.rates[1:] or throughput.rates
    config = {
        "arguments": recorded_settings(s),
        MODEL_KEY: s.model,
        "frame_shape": list(frame_shape),
        s.model: spec.core(model).get_config(),
        "data": {k: meta[k] for k in ("source", "height", "width", "channels", "frames", "videos")},
        "results": {
            "epochs_run": len(throughput.rates),
            "epochs_total": len(checkpoints.rows),
            "best_epoch": checkpoints.state["best_epoch"],
            "stopped_early": checkpoints.stopped,
            "stopped_by_time_budget": bool(budget and budget.stopped),
            "train_seconds": round(seconds, 1),
            "train_frames_per_s": round(float(np.median(steady)), 1) if steady else None,
            "eval_split": "val" if val_data is not None else "train",
            spec.mse_key: mse_model,
            "copy_last_frame_mse": mse_copy,
            "backend": keras.backend.backend(),
        },
    }
    write_json(run_dir / "config.json", config)
    # complete: from here on the run folder is a finished model folder, which names the one it replaces (for
    # `_finish_commit`, should a kill come before the swap)
    replaced = _model_marker(model_dir)
    refuse_foreign_in_run(run_dir)  # the marker lists what is there: the run's own files only
    write_marker(run_dir, STAGE, replacing=replaced.get("created") if replaced else None)
    commit_dir(run_dir, model_dir, STAGE, overwrite=s.overwrite or s.resume)
    return config


def summary_line(config: dict) -> str:
    r, spec = config["results"], get(config.get(MODEL_KEY, "prednet"))
    mse = r[spec.mse_key]
    better = "better" if mse < r["copy_last_frame_mse"] else "WORSE"
    return (
        f"{r['eval_split']} {spec.mse_label} {mse:.6f} vs copy-last-frame {r['copy_last_frame_mse']:.6f} "
        f"({better} than the baseline, ratio {mse / max(r['copy_last_frame_mse'], 1e-12):.3f}); "
        f"{r['epochs_run']} epochs in {r['train_seconds']} s, {r['train_frames_per_s']} frames/s"
        + (" (stopped by --max_minutes)" if r.get("stopped_by_time_budget") else "")
        + ("" if math.isfinite(mse) else " (NaN loss!)")
    )
