"""Hyperparameter search for train.py on Optuna: the space file, the objective, the pruning callback, the reports.

The objective is the validation next-frame MSE relative to copying the last frame (the ratio train.py
prints), on the normal val videos: no test label is ever read. Each trial is a train.py model folder,
`<output_dir>/trial_NNNN`, and the study lives in a database (SQLite by default), so a rerun continues it
and workers on several machines can share it. docs/tuning.md has the commands.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import socket
import time
import warnings
from pathlib import Path

import keras
import optuna

from models.config import resolve_config
from models.data.index import listed
from models.data.store import dataset_dir, load_split, read_metadata
from models.errors import PipelineError
from models.io import (
    atomic_output_file,
    check_inputs,
    mark_file,
    output_lock,
    read_json,
    read_marker,
    write_json,
    write_marker,
)
from models.prednet import find_prednet, predictor
from models.registry import require_prednet
from models.shapes import check_frame_size
from models.training import PLACE_AND_MANNER, TrainSettings, WindowDataset, next_frame_mse, recorded_settings, train

log = logging.getLogger(__name__)

STAGE = "tune"
REPORTS = ("trials.md", "best_config.json", "history.png", "intermediate.png", "importances.png")
# What tune.py writes in its folder: the study database, the reports, and per trial a model folder (train.py's
# own) and its settings; of a run that a kill stopped, hidden locks, staging and temporary entries of those.
_TRIAL = re.compile(r"trial_(\d{4,})(\.json)?")  # a trial's model folder, or its settings beside it
_STUDY_ENTRY = re.compile(r"(study\.db|" + "|".join(map(re.escape, REPORTS)) + rf"|{_TRIAL.pattern}|\..*)")


class _OneLineFailures(logging.Filter):
    """Optuna logs a trial that failed with the error's traceback; a failure of ours says all in its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PipelineError):
            record.exc_info, record.exc_text = None, None
        return True


# Optuna's lines (a trial finished, a study created) go through the scripts' logging, so that --quiet hides them.
optuna.logging.disable_default_handler()
optuna.logging.enable_propagation()
logging.getLogger("optuna").setLevel(logging.NOTSET)
logging.getLogger("optuna").addFilter(_OneLineFailures())


def shown_url(url: str) -> str:
    """A storage URL for messages, its credentials hidden: what comes before its host's last '@', and the
    values of password parameters in its query."""
    shown = re.sub(r"//[^/?#]*@", "//***@", url)
    return re.sub(r"(?i)\b(password|passwd|pwd)=[^&;]*", r"\1=***", shown)


def check_trial_folders(out: str | Path, study_name: str, numbers: set[int]) -> None:
    """Refuses, before any trial, a folder holding trial folders that are not among the study's trials
    `numbers` (its database deleted, or another --storage: a new one numbers its trials from 0 again, onto
    them).

    Raises:
        PipelineError: naming the first such trial.
    """
    strays = sorted(
        p for p in Path(out).glob("trial_*") if (m := _TRIAL.fullmatch(p.name)) and int(m.group(1)) not in numbers
    )
    if strays:
        raise _left_from_earlier_study(strays[0], study_name)


def _left_from_earlier_study(path: Path, study_name: str) -> PipelineError:
    return PipelineError(
        f"{path} is left from an earlier study of the name {study_name!r} (its trials are not in this study's "
        "database, which numbers them from 0 again); move the trial folders away or choose another --output_dir."
    )


def claim_output_dir(out: str | Path, study: str, inputs=()) -> None:
    """Makes `out` the folder of `study`'s trials and reports, or checks that it is: tune.py writes only into a
    folder it made for this study (marked with the study's name), or an empty one. A folder of an earlier
    tune.py without a marker (its entries all tune.py's, a trial folder among them) is taken over, its reports
    marked as they are.

    Raises:
        PipelineError: `out` is a file, holds what tune.py did not write, another stage's output, or another
            study's trials (whose trial numbers and reports this study's would overwrite).
    """
    out = Path(out)
    check_inputs(out, inputs)
    if out.is_symlink():
        raise PipelineError(f"--output_dir {out} is a symbolic link (to {os.readlink(out)}); name the folder itself.")
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--output_dir {out} is a file; choose a folder.")
    with output_lock(out):
        marker = read_marker(out) if out.is_dir() else None
        if marker is None:
            entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
            if entries and not _earlier_study(out, entries):
                foreign = [e for e in entries if not _STUDY_ENTRY.fullmatch(e)] or entries
                raise PipelineError(
                    f"Refusing to use {out} for study {study!r}: it holds what tune.py did not write "
                    f"({listed(foreign)}); choose another --output_dir."
                )
            out.mkdir(parents=True, exist_ok=True)
            for name in REPORTS:
                if (out / name).is_file():
                    mark_file(out / name, STAGE)
            write_marker(out, STAGE, complete=False, study=study)
        elif marker["stage"] != STAGE:
            raise PipelineError(f"Refusing to use {out}: it holds the output of {marker['stage']}, not of tune.py.")
        elif marker.get("study") != study:
            raise PipelineError(
                f"{out} holds the trials of study {marker.get('study')!r}; study {study!r} needs its own --output_dir "
                "(its trial numbers and reports would overwrite them)."
            )


def _earlier_study(out: Path, entries: list[str]) -> bool:
    """Whether an unmarked folder is one an earlier tune.py wrote: only its entries, a trial folder among them."""
    trials = [out / e for e in entries if (m := _TRIAL.fullmatch(e)) and not m.group(2)]
    return all(_STUDY_ENTRY.fullmatch(e) for e in entries) and any(
        (read_marker(t) or {}).get("stage") == "train" for t in trials
    )


# Settings that say where and how a run happens, not what it learns: never searched.
NOT_SEARCHABLE = {*PLACE_AND_MANNER, "given"}  # where and how a run goes, and what its caller chose
ENTRY_KEYS = {
    "float": {"type", "low", "high", "log", "step", "help"},
    "int": {"type", "low", "high", "log", "step", "help"},
    "categorical": {"type", "choices", "help"},
}


def _encode(choice) -> str | int | float | bool | None:
    """A categorical choice as Optuna stores it: lists become '8,16' (Optuna's choices must be scalars)."""
    return ",".join(str(v) for v in choice) if isinstance(choice, (list, tuple)) else choice


def load_space(path: str | Path) -> dict[str, dict]:
    """Reads and checks a search-space file: {setting: {"type": "float"|"int"|"categorical", ...}}.

    float and int entries take `low`, `high` and optionally `log` or `step`; categorical entries take
    `choices` (lists, such as stack sizes, are allowed). Keys starting with '_' are comments; every entry
    may carry a "help" text.

    Raises:
        PipelineError: naming the file and the entry at fault.
    """
    raw = read_json(path)
    fields = {f.name for f in dataclasses.fields(TrainSettings)} - NOT_SEARCHABLE
    space = {}
    for name, entry in raw.items():
        if name.startswith("_"):
            continue
        if name not in fields:
            raise PipelineError(
                f"{path}: {name!r} is not a setting tune.py can search; expected one of {sorted(fields)}."
            )
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind not in ENTRY_KEYS:
            raise PipelineError(f"{path}: {name} needs a type of float, int or categorical. Received: {entry!r}")
        extra = set(entry) - ENTRY_KEYS[kind]
        if extra:
            raise PipelineError(f"{path}: {name} has unknown fields {sorted(extra)} for a {kind} entry.")
        if kind == "categorical":
            choices = entry.get("choices")
            if not isinstance(choices, list) or not choices:
                raise PipelineError(f"{path}: {name} needs a non-empty list of choices. Received: {choices!r}")
            if len({json.dumps(_encode(c)) for c in choices}) != len(choices):
                raise PipelineError(f"{path}: {name} lists a choice twice. Received: {choices!r}")
        else:
            low, high = entry.get("low"), entry.get("high")
            number = (int,) if kind == "int" else (int, float)
            if not (isinstance(low, number) and isinstance(high, number) and low < high):
                raise PipelineError(f"{path}: {name} needs numbers low < high. Received: low={low!r}, high={high!r}")
            if entry.get("log") and low <= 0:
                raise PipelineError(
                    f"{path}: {name} is searched on a log scale, so low must be positive. Received: {low}"
                )
        space[name] = entry
    if not space:
        raise PipelineError(f"{path} has no setting to search.")
    return space


def suggest(trial: optuna.Trial, space: dict[str, dict]) -> dict:
    """Draws one value per setting of `space`; lists come back as tuples, as TrainSettings holds them."""
    values = {}
    for name, e in space.items():
        if e["type"] == "float":
            values[name] = trial.suggest_float(name, e["low"], e["high"], log=e.get("log", False), step=e.get("step"))
        elif e["type"] == "int":
            values[name] = trial.suggest_int(name, e["low"], e["high"], log=e.get("log", False), step=e.get("step", 1))
        else:
            values[name] = decode(e, trial.suggest_categorical(name, [_encode(c) for c in e["choices"]]))
    return values


def decode(entry: dict, stored):
    """The choice of a categorical `entry` that Optuna stored as `stored`, lists as tuples; numbers as they are."""
    if entry["type"] != "categorical":
        return stored
    choice = next(c for c in entry["choices"] if _encode(c) == stored)
    return tuple(choice) if isinstance(choice, list) else choice


def base_settings(config: str, **overrides) -> tuple[dict, TrainSettings]:
    """The --config file (as written, and as TrainSettings with `overrides`) that every trial starts from."""
    values = {k: v for k, v in read_json(resolve_config(config)).items() if not k.startswith("_")}
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise PipelineError(f"Config {config} has unknown settings: {unknown}.")
    typed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    settings = TrainSettings(**(typed | overrides))
    # its objective and pruning read PredNet's next-frame error
    require_prednet(settings.model, "The tuner", "train it with train.py and set its settings by hand")
    return values, settings


def check_space(space: dict[str, dict], base: TrainSettings) -> None:
    """Refuses, before any trial, stack sizes that do not suit the frame size of the data."""
    meta = read_metadata(dataset_dir(base.preprocessed_data, base.dataset))
    if not meta["frames"].get("val"):
        raise PipelineError(
            f"Dataset {base.dataset} has no val videos; the tuner's objective is measured on them "
            "(prepare it with --val_fraction > 0)."
        )
    entry = space.get("stack_sizes")
    for stacks in entry["choices"] if entry else [base.stack_sizes]:
        try:
            check_frame_size(meta["height"], meta["width"], len(stacks) + 1)
        except PipelineError as err:
            raise PipelineError(f"stack_sizes {list(stacks)} of the space: {err}") from None


class ValRatioPruning(keras.callbacks.Callback):
    """Reports the val next-frame MSE ratio to Optuna after every epoch and stops a trial the pruner rejects.

    The ratio is the objective's own measure (next_frame_mse on the val windows train() evaluates), so the
    pruner compares like with like across trials, whatever their layer loss weights. Training is stopped
    rather than interrupted, so that a pruned trial still ends as a complete model folder.
    """

    def __init__(self, trial: optuna.Trial, val_data: WindowDataset):
        super().__init__()
        self.trial, self.val_data = trial, val_data
        self.pruned_at: int | None = None

    def on_train_begin(self, logs=None):
        self.pred_model = predictor(self.model, "prediction")  # built (and compiled) once per trial

    def on_epoch_end(self, epoch, logs=None):
        find_prednet(self.pred_model).set_weights(find_prednet(self.model).get_weights())
        mse_model, mse_copy = next_frame_mse(self.model, self.val_data, pred_model=self.pred_model)
        ratio = mse_model / max(mse_copy, 1e-12)
        if not math.isfinite(ratio):  # diverged: nothing to learn from later epochs
            self.pruned_at, self.model.stop_training = epoch, True
            return
        self.trial.report(ratio, epoch)
        if self.trial.should_prune():
            self.pruned_at, self.model.stop_training = epoch, True


class TrialFailed(PipelineError):
    """A trial's settings could not be trained; the study goes on with the next trial."""


def config_path(model_dir: str | Path) -> Path:
    """Where a trial's settings are kept as a train.py config: `<output_dir>/trial_NNNN.json`, beside its folder."""
    return Path(model_dir).with_suffix(".json")


def trial_config(s: TrainSettings, number: int) -> dict:
    """A trial's settings as a config file for `train.py --config`, to train them again or --resume the trial."""
    values = {k: v for k, v in recorded_settings(s).items() if k not in NOT_SEARCHABLE}
    comment = f"Settings of tuning trial {number}: python train.py --config {config_path(s.model_dir)} ..."
    return {"_comment": comment, **values}


@dataclasses.dataclass
class Tuner:
    """Runs trials of train.py's training: each a model folder under `output_dir`, scored by the val ratio."""

    space: dict[str, dict]
    base: TrainSettings
    output_dir: Path

    def __post_init__(self):
        self.output_dir = Path(self.output_dir)
        self._val = load_split(dataset_dir(self.base.preprocessed_data, self.base.dataset), "val")
        if keras.backend.backend() == "tensorflow":  # each trial's new models retrace: expected, not a problem
            import tensorflow as tf

            tf.get_logger().setLevel("ERROR")

    def settings(self, trial: optuna.Trial) -> TrainSettings:
        model_dir = self.output_dir / f"trial_{trial.number:04d}"
        return dataclasses.replace(self.base, **suggest(trial, self.space), model_dir=str(model_dir))

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            s = self.settings(trial)
        except ValueError as err:  # Optuna refuses a categorical whose choices changed within a study
            name = trial.study.study_name
            raise PipelineError(
                f"The space no longer matches study {name!r}: {err} New choices need a new --study."
            ) from None
        for path in (Path(s.model_dir), config_path(s.model_dir)):
            if path.exists():  # (tune.py refuses them before any trial: `check_trial_folders`)
                raise _left_from_earlier_study(path, trial.study.study_name)
        trial.set_user_attr("settings", recorded_settings(s))
        trial.set_user_attr("model_dir", s.model_dir)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        # first, so that even the folder of a trial whose worker died can be resumed with it; beside the model
        # folder, not in it: train.py writes only into a folder it made (docs/safety.md)
        write_json(config_path(s.model_dir), trial_config(s, trial.number))
        X_val, src_val = self._val
        keras.backend.clear_session()  # each trial starts from an empty graph: memory stays flat over a study
        try:
            val_data = WindowDataset(
                X_val, src_val, s.nt, s.batch_size, shuffle=False, step=s.nt, samples_per_epoch=s.val_samples
            )
            pruning = ValRatioPruning(trial, val_data)
            config = train(s, extra_callbacks=[pruning])
        except PipelineError as err:  # this trial's settings do not work (e.g. nt longer than a video): the next may
            trial.set_user_attr("error", str(err))
            raise TrialFailed(str(err)) from None
        r = config["results"]
        ratio = r["next_frame_mse"] / max(r["copy_last_frame_mse"], 1e-12)
        for key in ("next_frame_mse", "copy_last_frame_mse", "epochs_run", "train_seconds"):
            trial.set_user_attr(key, r[key])
        trial.set_user_attr("ratio", ratio)
        if pruning.pruned_at is not None:
            trial.set_user_attr("pruned_at_epoch", pruning.pruned_at)
            raise optuna.TrialPruned(f"val ratio at epoch {pruning.pruned_at + 1} worse than the pruner allows")
        return ratio


def open_study(name: str, storage: str, sampler_seed: int | None, startup_trials: int, warmup_epochs: int):
    """Creates the study, or joins it when it already exists in `storage` (a rerun, or another worker)."""
    rdb = _storage(storage)
    return optuna.create_study(
        study_name=name,
        storage=rdb,
        load_if_exists=True,
        direction="minimize",
        # constant_liar: workers running at once see each other's running trials, and spread out
        sampler=optuna.samplers.TPESampler(seed=sampler_seed, constant_liar=True),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs),
    )


def _storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """The study database; workers that start together and race to create its tables retry."""
    # SQLite lets one writer at a time in: wait up to a minute for the lock rather than fail a worker.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # heartbeats: a trial whose worker died (killed, preempted) is marked failed after 5 minutes
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=60, grace_period=300
                )
        except Exception as err:  # a bad URL, an unreachable server, a table another worker just created
            if attempt == attempts - 1:
                first = str(err).splitlines()[0].replace(url, shown_url(url))
                raise PipelineError(f"Cannot open the study storage {shown_url(url)!r}: {first}") from None
            time.sleep(1 + random.random())
    raise AssertionError("unreachable")


def enqueue_config(study: optuna.Study, space: dict[str, dict], config_values: dict) -> bool:
    """Queues the --config file's own values as a trial, so the study measures the hand-set settings too.

    Only settings whose config value lies in the space are fixed; the rest are drawn. Skipped when a trial
    with the same values is already in the study (a rerun, or another worker that queued it first).
    """
    params = {}
    for name, e in space.items():
        value = config_values.get(name)
        if value is None:
            continue
        if e["type"] == "categorical":
            match = [c for c in e["choices"] if c == value]
            if match:
                params[name] = _encode(match[0])
        elif e["low"] <= value <= e["high"]:
            params[name] = value
    if not params:
        return False
    study.enqueue_trial(params, user_attrs={"queued_from": "config"}, skip_if_exists=True)
    return True


def trial_table(study: optuna.Study) -> str:
    """A markdown table of every trial, best first among the complete ones."""
    trials = study.get_trials(deepcopy=False)
    done = sorted((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: (t.value, t.number))
    rest = sorted((t for t in trials if t.state != optuna.trial.TrialState.COMPLETE), key=lambda t: t.number)
    names = sorted({k for t in trials for k in t.params})
    head = ["trial", "state", "val ratio", "epochs", "seconds", *names, "folder"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in done + rest:
        a = t.user_attrs
        ratio = a.get("ratio")
        state = t.state.name.lower() + (f" at epoch {a['pruned_at_epoch'] + 1}" if "pruned_at_epoch" in a else "")
        if "error" in a:
            state += f": {a['error']}"
        cells = [
            str(t.number),
            state,
            f"{ratio:.4f}" if ratio is not None else "",
            str(a.get("epochs_run", "")),
            str(a.get("train_seconds", "")),
            *[_cell(t.params.get(k)) for k in names],
            Path(a.get("model_dir", "")).name,
        ]
        lines.append("| " + " | ".join(cells).replace("\n", " ") + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def best_config(study: optuna.Study, space: dict[str, dict], config_values: dict, config_name: str) -> dict | None:
    """The --config file with the best trial's values: what `train.py --config best_config.json` takes."""
    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet
        return None
    out = {
        "_comment": (
            f"Best of Optuna study {study.study_name!r}: trial {best.number}, val next-frame MSE ratio "
            f"{best.value:.4f} (model in {best.user_attrs.get('model_dir')}); the settings of {config_name} "
            "with the searched ones replaced. python train.py --config best_config.json ..."
        )
    }
    out.update(config_values)
    for name, entry in space.items():
        if name in best.params:
            value = decode(entry, best.params[name])
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def write_reports(study: optuna.Study, space: dict[str, dict], config_values: dict, config_name: str, out: Path):
    """Writes best_config.json, trials.md, history.png, intermediate.png and importances.png to `out`.

    Returns:
        Lines saying what was written and what was not (importances need two complete trials).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from optuna.visualization import matplotlib as ovm

    notes = []

    def report(name: str, what: str, write) -> None:
        """Writes the report `name` with `write(path)`, unless the user changed the one there (kept, noted)."""
        try:
            with atomic_output_file(out / name, True, stage=STAGE) as tmp:
                write(tmp)
        except PipelineError as err:  # changed by the user, or being written by another worker
            log.warning("%s", err)
            notes.append(f"{name} not written: {err}")
            return
        notes.append(f"{what} -> {out / name}")

    trials = (
        f"# Optuna study {study.study_name}\n\nObjective: val next-frame MSE / copy-last-frame MSE "
        "(lower is better; below 1 beats copying the last frame).\n\n" + trial_table(study)
    )
    report("trials.md", "trials", lambda path: path.write_text(trials))
    best = best_config(study, space, config_values, config_name)
    if best is None:
        notes.append("no complete trial yet: no best_config.json")
    else:
        report("best_config.json", "best config", lambda path: write_json(path, best))
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    target = "val MSE / copy-last-frame MSE"
    plots = [
        ("history.png", lambda s: ovm.plot_optimization_history(s, target_name=target)),
        ("intermediate.png", ovm.plot_intermediate_values),
    ]
    if len(complete) >= 2:
        plots.append(("importances.png", lambda s: ovm.plot_param_importances(s, target_name=target)))
    else:
        notes.append(f"{len(complete)} complete trial(s): parameter importances need 2, importances.png not written")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, plot in plots:
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as err:  # e.g. importances when no parameter varied
                notes.append(f"{name} not written: {err}")
                continue
            if name == "intermediate.png":
                ax.set(xlabel="epoch (0 = the first)", ylabel=target, title="Val ratio after each epoch")
            if name != "importances.png":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            fig = ax.get_figure()
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            report(
                name,
                f"{name.removesuffix('.png')} plot",
                lambda path, fig=fig: fig.savefig(path, dpi=100, format="png"),
            )
            plt.close(fig)
    return notes
