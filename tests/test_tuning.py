"""tune.py: a real study on the tiny dataset, two workers on one SQLite storage at once, a rerun, the pruner."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import ROOT, run_script

import train as train_script
from models.errors import PipelineError
from models.io import read_marker, write_marker
from models.training import TrainSettings
from models.tuning import (
    TrialFailed,
    Tuner,
    check_space,
    check_trial_folders,
    claim_output_dir,
    decode,
    load_space,
    open_study,
    shown_url,
    suggest,
    write_reports,
)

# The tiny profile of conftest.tiny_settings, as the config file every trial starts from.
TINY_CONFIG = {
    "stack_sizes": [4, 8],
    "R0_channels": 3,
    "filter_sizes": [3, 3, 3],
    "layer_loss_weights": [1.0, 0.0],
    "nt": 4,
    "batch_size": 2,
    "nb_epoch": 2,
    "samples_per_epoch": 8,
    "val_samples": 4,
    "learning_rate": 0.01,
    "lr_decay": 1.0,
    "strides": [1, 2],
    "patience": 5,
    "precision": "float32",
}
TINY_SPACE = {
    "_comment": "a continuous rate, so two trials never share their settings by chance",
    "learning_rate": {"type": "float", "low": 0.003, "high": 0.03, "log": True},
    "stack_sizes": {"type": "categorical", "choices": [[4, 8], [4, 4]]},
}
# Out of the space on purpose: Adam steps of 0.3 throw the frame prediction to black or white in the first epoch,
# an MSE 15-20 times the untrained model's, and the one-epoch ratio of every normal trial lies below the untrained one.
BAD_RATE = 0.3


def tune_command(prepared, tmp_path, *extra):
    return [
        sys.executable,
        "tune.py",
        "--config",
        str(tmp_path / "tiny.json"),
        "--space",
        str(tmp_path / "space.json"),
        "--preprocessed_data",
        str(prepared.parent),
        "--dataset",
        prepared.name,
        "--study",
        "tiny",
        "--output_dir",
        str(tmp_path / "study"),
        *map(str, extra),
    ]


@pytest.fixture(scope="module")
def study_dir(prepared, tmp_path_factory):
    """Two workers at once (2 trials each, no pruning), then a rerun that adds a bad trial (pruned)."""
    tmp_path = tmp_path_factory.mktemp("tune")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "space.json").write_text(json.dumps(TINY_SPACE))
    env = os.environ | {"KERAS_BACKEND": "tensorflow"}
    workers = [
        subprocess.Popen(
            tune_command(prepared, tmp_path, "--n_trials", 2, "--startup_trials", 100, "--sampler_seed", seed),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in (1, 2)
    ]
    for seed, w in zip((1, 2), workers, strict=True):
        out, _ = w.communicate(timeout=600)
        assert w.returncode == 0, out[-3000:]
        (tmp_path / f"worker{seed}.log").write_text(out)
    storage = f"sqlite:///{tmp_path / 'study' / 'study.db'}"
    optuna.load_study(study_name="tiny", storage=storage).enqueue_trial({"learning_rate": BAD_RATE})
    rerun = subprocess.run(
        tune_command(prepared, tmp_path, "--n_trials", 1, "--startup_trials", 2, "--warmup_epochs", 0, "-q"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (tmp_path / "rerun.log").write_text(rerun.stdout + rerun.stderr)
    return tmp_path / "study"


def test_optuna_s_lines_are_the_script_s(study_dir):
    """Optuna's progress comes through the script's logging: shown by default, hidden by --quiet."""
    out = (study_dir.parent / "worker1.log").read_text()
    assert "Trial 0 finished with value" in out or "Trial 1 finished with value" in out
    assert "[I 20" not in out  # not Optuna's own handler
    assert "finished with value" not in (study_dir.parent / "rerun.log").read_text()  # -q


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def trials_of(study_dir):
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir / 'study.db'}")
    return study.get_trials()


def test_two_workers_share_one_study_without_repeating_a_trial(study_dir):
    first = [t for t in trials_of(study_dir) if t.number < 4]
    assert sorted(t.number for t in first) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in first)
    assert len({t.user_attrs["worker"] for t in first}) == 2  # both processes ran trials
    assert len({t.params["learning_rate"] for t in first}) == 4  # no settings drawn twice
    for t in first:  # each trial is its own train.py model folder, trained with the trial's settings
        folder = study_dir / f"trial_{t.number:04d}"
        assert t.user_attrs["model_dir"] == str(folder) and (folder / "model.keras").is_file()
        config = json.loads((folder / "config.json").read_text())
        assert config["arguments"]["learning_rate"] == t.params["learning_rate"]
        assert config["arguments"]["stack_sizes"] == list(decode(TINY_SPACE["stack_sizes"], t.params["stack_sizes"]))
        # its settings as a train.py config, to train them again or --resume the trial
        again = vars(train_script.parse_args(["--config", str(folder.with_suffix(".json")), "--dataset", "x"]))
        ran = config["arguments"]
        same = [k for k in ran if k not in ("model_dir", "preprocessed_data", "dataset", "verbose")]
        assert {k: _tuple(again[k]) for k in same} == {k: _tuple(ran[k]) for k in same}
        r = config["results"]
        assert t.value == pytest.approx(r["next_frame_mse"] / r["copy_last_frame_mse"])  # the objective
        assert set(t.intermediate_values) == {0, 1}
        assert len(pd.read_csv(folder / "history.csv")) == 2


def test_rerun_continues_the_study_and_the_pruner_stops_the_bad_trial(study_dir):
    trials = trials_of(study_dir)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    bad = trials[4]
    assert bad.params["learning_rate"] == BAD_RATE
    assert bad.state == optuna.trial.TrialState.PRUNED and bad.user_attrs["pruned_at_epoch"] == 0
    assert list(bad.intermediate_values) == [0]  # stopped after its first epoch, of two
    assert bad.intermediate_values[0] > max(t.intermediate_values[0] for t in trials[:4])
    # the pruned trial still ends as a complete model folder, one epoch long
    config = json.loads((study_dir / "trial_0004" / "config.json").read_text())
    assert config["results"]["epochs_run"] == 1 and (study_dir / "trial_0004" / "model.keras").is_file()


def test_reports(study_dir):
    for name in ("trials.md", "best_config.json", "history.png", "intermediate.png", "importances.png"):
        assert (study_dir / name).is_file(), name
    table = (study_dir / "trials.md").read_text()
    assert table.count("| complete |") == 4 and "pruned at epoch 1" in table
    best = min(
        (t for t in trials_of(study_dir) if t.value is not None and t.state.name == "COMPLETE"), key=lambda t: t.value
    )
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # below the header
    assert rows[0].startswith(f"| {best.number} | complete")  # best first


def test_a_report_the_user_changed_is_kept(study_dir, tmp_path):
    folder = tmp_path / "study"
    shutil.copytree(study_dir, folder)
    (folder / "trials.md").write_text("my notes on the trials\n")
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'study.db'}")
    notes = write_reports(study, TINY_SPACE, TINY_CONFIG, "tiny.json", folder)
    assert (folder / "trials.md").read_text() == "my notes on the trials\n"
    assert any(n.startswith("trials.md not written: ") and "changed since" in n for n in notes), notes
    assert f"best config -> {folder / 'best_config.json'}" in notes  # the others are written


def test_the_folder_of_a_study_is_its_own(tmp_path):
    """tune.py writes only into a folder it made for the study, or an empty one; a folder of an earlier tune.py
    without a marker (all its entries tune.py's, a trial folder among them) is taken over."""
    claim_output_dir(tmp_path / "new" / "s", "s")
    assert read_marker(tmp_path / "new" / "s") | {"created": 0} == {
        "stage": "tune",
        "created": 0,
        "version": 1,
        "complete": False,
        "study": "s",
    }
    claim_output_dir(tmp_path / "new" / "s", "s")  # a rerun, or another worker
    with pytest.raises(PipelineError, match=r"holds the trials of study 's'; study 't' needs its own --output_dir"):
        claim_output_dir(tmp_path / "new" / "s", "t")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "trials.md").write_text("mine")
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(
        PipelineError, match=r"Refusing to use .*mine for study 's': it holds what tune.py did not write \(notes.txt\)"
    ):
        claim_output_dir(mine, "s")
    (mine / "notes.txt").unlink()
    with pytest.raises(PipelineError, match="did not write"):  # only names of tune.py's, but no trial of its
        claim_output_dir(mine, "s")
    assert read_marker(mine) is None and (mine / "trials.md").read_text() == "mine"
    (mine / "trial_0000").mkdir()
    write_marker(mine / "trial_0000", "train")
    claim_output_dir(mine, "s")  # an earlier tune.py's folder
    assert read_marker(mine)["study"] == "s" and (mine / ".trials.md.prednet-output.json").is_file()
    write_marker(tmp_path / "scored", "batch_scoring", complete=False)
    with pytest.raises(PipelineError, match="holds the output of batch_scoring, not of tune.py"):
        claim_output_dir(tmp_path / "scored", "s")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")  # a link, dangling or not, is never followed
    with pytest.raises(PipelineError, match="--output_dir .*link is a symbolic link"):
        claim_output_dir(tmp_path / "link", "s")
    assert not (tmp_path / "nowhere").exists()


def test_a_trial_folder_of_an_earlier_study_stops_the_study(prepared, tmp_path):
    """A new study database numbers its trials from 0: a trial folder of the study before it is never written
    over (the study stops at once, naming it)."""
    (tmp_path / "trial_0000").mkdir()
    (tmp_path / "trial_0000" / "model.keras").write_text("an earlier study's model")
    study = open_study("s", f"sqlite:///{tmp_path / 'study.db'}", 0, 1, 0)
    with pytest.raises(PipelineError, match=r"trial_0000 is left from an earlier study of the name 's'"):
        check_trial_folders(tmp_path, "s", {t.number for t in study.get_trials()})  # tune.py's, before any trial
    base = TrainSettings(preprocessed_data=str(prepared.parent), dataset=prepared.name, model_dir="")
    entries = {k: v for k, v in TINY_SPACE.items() if not k.startswith("_")}
    with pytest.raises(PipelineError, match=r"trial_0000 is left from an earlier study of the name 's'"):
        study.optimize(Tuner(entries, base, tmp_path), n_trials=1, catch=(TrialFailed,))  # and each trial's
    assert (tmp_path / "trial_0000" / "model.keras").read_text() == "an earlier study's model"
    assert not Path(tmp_path / "trial_0000.json").exists()


def test_storage_urls_are_shown_without_credentials():
    assert shown_url("postgresql://tuner:S3CRET@db:5432/optuna") == "postgresql://***@db:5432/optuna"
    assert shown_url("postgresql://tuner:pa@ss@db/optuna") == "postgresql://***@db/optuna"  # an unquoted '@'
    assert (
        shown_url("postgresql://tuner@db/optuna?password=S3CRET&x=1") == "postgresql://***@db/optuna?password=***&x=1"
    )
    assert shown_url("sqlite:////tmp/study.db") == "sqlite:////tmp/study.db"


def test_best_config_trains_with_train_py(study_dir, prepared, tmp_path):
    best = json.loads((study_dir / "best_config.json").read_text())
    assert set(best) - {"_comment"} == set(TINY_CONFIG)  # the same keys as the config the study started from
    trial = min((t for t in trials_of(study_dir) if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert best["learning_rate"] == trial.params["learning_rate"]
    model_dir = tmp_path / "best"
    argv = ["--config", str(study_dir / "best_config.json"), "--preprocessed_data", str(prepared.parent)]
    argv += ["--dataset", prepared.name, "--model_dir", str(model_dir), "--nb_epoch", "1", "--quiet"]
    assert train_script.main(argv) == 0
    config = json.loads((model_dir / "config.json").read_text())
    assert config["arguments"]["learning_rate"] == best["learning_rate"]
    assert config["arguments"]["stack_sizes"] == best["stack_sizes"]


@pytest.mark.parametrize(
    "space,message",
    [
        ({"model_dir": {"type": "categorical", "choices": ["a"]}}, "'model_dir' is not a setting tune.py can search"),
        ({"nt": {"type": "int", "low": 8, "high": 4}}, "nt needs numbers low < high"),
        ({"learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}}, "low must be positive"),
        ({"strides": {"type": "categorical", "choices": []}}, "strides needs a non-empty list"),
        ({"nt": {"type": "uniform", "low": 4, "high": 8}}, "nt needs a type of float, int or categorical"),
        ({"nt": {"type": "int", "low": 4, "high": 8, "q": 2}}, r"unknown fields \['q'\]"),
        ({"_comment": "nothing else"}, "no setting to search"),
    ],
)
def test_bad_space_is_refused(space, message, tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    with pytest.raises(PipelineError, match=message):
        load_space(path)


def test_space_files_load():
    for name in ("tune.json", "tune_cpu.json"):
        space = load_space(ROOT / "config" / name)
        assert {"learning_rate", "lr_decay", "stack_sizes", "R0_channels", "nt", "batch_size"} <= set(space)
        assert all(entry.get("help") for entry in space.values())


def test_stacks_that_do_not_suit_the_frames_are_refused_before_any_trial(prepared):
    base = TrainSettings(preprocessed_data=str(prepared.parent), dataset=prepared.name, model_dir="")
    with pytest.raises(PipelineError, match=r"stack_sizes \[4, 4, 4, 4\] of the space: .*16x24"):
        check_space({"stack_sizes": {"type": "categorical", "choices": [[4, 8], [4, 4, 4, 4]]}}, base)


def test_changed_choices_stop_the_study_with_a_message(prepared, tmp_path):
    study = open_study("s", f"sqlite:///{tmp_path / 'study.db'}", 0, 1, 0)
    entries = {k: v for k, v in TINY_SPACE.items() if not k.startswith("_")}
    study.optimize(lambda trial: suggest(trial, entries)["learning_rate"], n_trials=1)
    space = entries | {"stack_sizes": {"type": "categorical", "choices": [[4, 8], [8, 8]]}}
    base = TrainSettings(preprocessed_data=str(prepared.parent), dataset=prepared.name, model_dir="")
    with pytest.raises(PipelineError, match="The space no longer matches study 's'.*New choices need a new --study"):
        study.optimize(Tuner(space, base, tmp_path), n_trials=1, catch=(TrialFailed,))


def test_cli_argument_error_exit(tmp_path):
    done = run_script("tune.py", "--n_trials", "0")
    assert done.returncode == 2 and "argument --n_trials: must be 1 or more trials. Received: 0" in done.stderr
    done = run_script("tune.py", "--space", tmp_path / "nope.json")
    assert done.returncode == 2 and f"Search-space file {tmp_path / 'nope.json'} not found" in done.stderr
