"""The scripts' command lines and output, without Keras: --help, the dataset rule, aliases, logging."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

import batch_scoring
import data_preparation
import fit_anoms
import train
from models.args import int_at_least, int_in
from models.cli import choose_dataset, configure_output, keras_verbose, parser, progress

SCRIPTS = ["data_preparation", "train", "batch_scoring", "fit_anoms", "serve", "tune", "export_model"]


def help_text(script: str, *argv: str) -> str:
    """`python SCRIPT ARGV --help` in a fresh interpreter, which must not import Keras to answer."""
    code = (
        f"import sys; import {script}\n"
        "try:\n"
        f"    {script}.parse_args(sys.argv[1:])\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *argv, "--help"], cwd=ROOT, capture_output=True, text=True, env={"COLUMNS": "200"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_defaults_and_the_output_pair(script):
    text = help_text(script)
    assert "-q, --quiet" in text and "-v, --verbose" in text
    for line in text.splitlines():  # an option with a default value says it
        if line.strip().startswith("--seed"):
            assert "(default: 0)" in line
    if script in ("batch_scoring", "serve", "train", "tune"):  # the usage examples keep their continuations
        assert " \\\n        " in text


def test_help_shows_the_config_file_s_values():
    default = help_text("train")
    cpu = help_text("train", "--config", "cpu")
    values = json.loads((ROOT / "config" / "cpu.json").read_text())
    assert "--R0_channels R0_CHANNELS" in cpu and f"(default: {values['R0_channels']})" in cpu  # 4, not 16
    assert "(default: 8,16)" in cpu and "(default: 48,96,192)" in default
    assert "(default: 16)" in default and "(default: 200)" in default  # R0_channels and nb_epoch of default.json


@pytest.mark.parametrize("script", ["data_preparation", "batch_scoring", "fit_anoms", "serve"])
def test_the_config_file_example_of_each_script_is_one_of_its_settings(script, tmp_path):
    """The e.g. of --config in --help is a file the script takes, and --help then shows its value."""
    example = re.search(r"\(e\.g\. (\{.*?\})\)", " ".join(help_text(script).split())).group(1)
    (tmp_path / "c.json").write_text(example)
    [(name, value)] = json.loads(example).items()
    text = help_text(script, "--config", str(tmp_path / "c.json"))
    entry = re.search(rf"\n  --{name} .*?(?=\n  -)", text, re.S).group(0)  # the option's help, to the next one
    assert f"{value})" in " ".join(entry.split()), entry


def test_help_of_the_other_scripts_shows_their_defaults():
    assert "(default: 128x192)" in help_text("data_preparation")
    scoring = help_text("batch_scoring")
    assert "(default: 15)" in scoring and "With labels, metrics.md also gives" in scoring
    anoms = help_text("fit_anoms")
    assert "--model_dir MODEL_DIR, --model_path MODEL_DIR" in anoms and "(default: best)" in anoms


def store(root, *names):
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "metadata.json").write_text("{}")
    return str(root)


def test_the_only_prepared_dataset_is_taken(tmp_path):
    root = store(tmp_path / "pre", "Mine")
    args = train.parse_args(["--preprocessed_data", root])
    assert args.dataset == "Mine" and args.model_dir == "outputs/models/Mine"
    args = batch_scoring.parse_args(["--preprocessed_data", root])
    assert (args.dataset, args.model_dir, args.scored_data) == ("Mine", "outputs/models/Mine", "outputs/scored/Mine")
    store(tmp_path / "pre", "Other")  # two: the one named is taken, whatever else is there
    assert train.parse_args(["--preprocessed_data", root, "--dataset", "Other"]).dataset == "Other"


def test_data_preparation_finds_its_dataset_in_either_layout(tmp_path):
    (tmp_path / "raw" / "UCSD_Anomaly_Dataset.v1p2" / "UCSDped2" / "Test").mkdir(parents=True)
    assert data_preparation.parse_args(["--raw_data", str(tmp_path / "raw")]).dataset == "UCSDped2"
    (tmp_path / "raw2" / "cam" / "Train").mkdir(parents=True)
    assert data_preparation.parse_args(["--raw_data", str(tmp_path / "raw2")]).dataset == "cam"
    assert data_preparation.parse_args(["--make_synthetic"]).dataset == "Synthetic"


def test_a_config_of_one_model_with_the_other_model_is_refused(capsys):
    for argv, message in [
        (["--model", "convlstm_ae", "--config", "cpu"], "--config cpu holds prednet settings"),
        (["--config", "convlstm_ae_cpu", "--model", "prednet"], "--config convlstm_ae_cpu holds convlstm_ae settings"),
    ]:
        with pytest.raises(SystemExit):
            train.parse_args([*argv, "--dataset", "Ped2"])
        assert message in capsys.readouterr().err
    assert train.parse_args(["--model", "convlstm_ae", "--dataset", "Ped2"]).ae_filters  # its own default config


def test_options_that_contradict_each_other_are_refused(capsys):
    for argv, message in [
        (["--resume", "--overwrite"], "--overwrite: not allowed with --resume"),
        (["--ae_filters", "8,4"], "--ae_filters: the autoencoder's (--model convlstm_ae); this run trains prednet"),
    ]:
        with pytest.raises(SystemExit):
            train.parse_args([*argv, "--config", "cpu", "--dataset", "Ped2", "--model_dir", "m"])
        assert message in capsys.readouterr().err


def test_a_missing_dataset_says_what_the_user_may_mean(tmp_path, capsys):
    (tmp_path / "raw" / "cam" / "Train").mkdir(parents=True)
    with pytest.raises(SystemExit):  # the dataset's own folder as --raw_data: its parent is meant
        data_preparation.parse_args(["--raw_data", str(tmp_path / "raw" / "cam")])
    assert f"(it is a dataset itself: pass --raw_data {tmp_path / 'raw'} --dataset cam)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # nothing prepared: scoring one's own videos needs none
        batch_scoring.parse_args(["--preprocessed_data", str(tmp_path / "none")])
    assert "or score videos of your own: --input VIDEO ... --model_dir M" in capsys.readouterr().err


def test_fit_anoms_names_its_output_after_the_scored_folder_and_keeps_model_path(tmp_path):
    args = fit_anoms.parse_args(["--scored_data", str(tmp_path / "scored" / "Cam3")])
    assert args.model_dir == "outputs/anoms/Cam3" and args.classifier == "best"
    args = fit_anoms.parse_args(["--scored_data", "s/Cam3/df.pkl.gz", "--model_path", str(tmp_path / "a")])
    assert args.model_dir == str(tmp_path / "a")


def test_choose_dataset_names_what_it_found(tmp_path, capsys):
    p = parser("doc", prog="x.py")
    assert choose_dataset(p, None, tmp_path, ["A"], "w") == "A"
    assert choose_dataset(p, "B", tmp_path, ["A"], "w") == "B"
    with pytest.raises(SystemExit):
        choose_dataset(p, None, tmp_path, [], "a folder with metadata.json")
    assert capsys.readouterr().err == (
        f"x.py: error: argument --dataset: none given and {tmp_path} holds no dataset (a folder with "
        "metadata.json); pass --dataset NAME\n"
    )


def test_bounded_whole_numbers_and_empty_defaults(capsys):
    p = parser("doc", prog="x.py")
    p.add_argument("--streams", type=int_in(0, 256), default=8, help="streams (0-256)")
    p.add_argument("--frames", type=int_at_least(2, "frames"), default=50, help="frames")
    p.add_argument("--extra", default="", help="more arguments")
    assert (p.parse_args(["--streams", "0"]).streams, p.parse_args(["--streams", "256"]).streams) == (0, 256)
    for argv, message in [
        (["--streams", "257"], "argument --streams: must be 0-256. Received: 257"),
        (["--streams", "-1"], "argument --streams: must be 0-256. Received: -1"),
        (["--streams", "2.5"], "argument --streams: expected a whole number. Received: '2.5'"),
        (["--frames", "1"], "argument --frames: must be 2 or more frames. Received: 1"),
    ]:
        with pytest.raises(SystemExit) as done:
            p.parse_args(argv)
        assert done.value.code == 2 and capsys.readouterr().err == f"x.py: error: {message}\n"
    text = p.format_help()
    assert "streams (0-256) (default: 8)" in text and "frames (default: 50)" in text
    assert "more arguments\n" in text  # an empty default says nothing, not "(default: )"


def test_a_reader_that_stops_early_ends_no_run():
    """`script | head -1`: the messages its reader no longer takes are dropped, without a traceback."""
    code = (
        "import logging, sys\n"
        "from models.cli import parser\n"
        "parser('doc', prog='x.py').parse_args([])\n"
        "for i in range(20000):\n"
        "    logging.getLogger('models.x').info('line %d', i)\n"
        "print('done', file=sys.stderr)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "line 0\n"
    proc.stdout.close()  # more than a pipe's buffer is still to come
    assert proc.wait(60) == 0 and proc.stderr.read() == "done\n"


def test_quiet_and_verbose_set_logging_progress_and_keras(capsys, monkeypatch):
    p = parser("doc", prog="x.py")
    log = logging.getLogger("models.test_cli")
    try:
        args = p.parse_args([])
        log.info("shown")
        log.debug("hidden")
        log.warning("careful")
        out, err = capsys.readouterr()
        assert out == "shown\n" and err == "warning: careful\n"
        assert keras_verbose(args) == 2  # stdout is not a terminal here: one line per epoch
        args = p.parse_args(["--quiet"])
        log.info("hidden")
        assert capsys.readouterr().out == "" and keras_verbose(args) == 0 and progress(range(3)).disable
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")  # set by the user: kept
        p.parse_args(["--verbose"])
        log.debug("details")
        assert capsys.readouterr().out == "debug models.test_cli: details\n"
        assert logging.getLogger("absl").level == logging.NOTSET
    finally:
        configure_output(p.parse_args([]))
    assert logging.getLogger("absl").level == logging.ERROR


def test_ctrl_c_while_keras_loads_stops_the_run_after_it():
    """Ctrl-C during the import of Keras is raised once the import is over: raised inside a library's callback
    (a garbage-collection hook), Python printed it and dropped it, and the run went on."""
    import signal

    from models.cli import _interrupt_after

    finished, before = [], signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), _interrupt_after():
        os.kill(os.getpid(), signal.SIGINT)
        finished.append(True)  # the block is not cut short
    assert finished == [True] and signal.getsignal(signal.SIGINT) is before  # the handler it found


def test_ctrl_c_that_a_native_library_turns_into_another_error_still_reads_interrupted(capsys):
    """Ctrl-C during a training step came out of TensorFlow as `SystemError: ... bad argument to internal
    function` (a traceback, exit code 1): after a Ctrl-C, any error ends as "interrupted", 130."""
    import signal

    from models.cli import run

    def interrupted_then_mangled(argv):
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            raise SystemError("Objects/listobject.c:338: bad argument to internal function") from None

    def plain_error(argv):
        raise SystemError("a real bug")

    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as code:
            run(interrupted_then_mangled, [])
        assert code.value.code == 130 and capsys.readouterr().err == "interrupted\n"
        with pytest.raises(SystemError, match="a real bug"):  # without Ctrl-C, an error is what it is
            run(plain_error, [])
        assert signal.getsignal(signal.SIGINT) is before  # run() puts back the handler it found
    finally:
        signal.signal(signal.SIGINT, before)
