"""Bad inputs, one row each: what a user might give, the message it must get, and proof nothing was touched.

Each row builds its input in a fresh folder (a tiny dataset tree, a file, or arguments only) and returns
the arguments of one of the four scripts. The script's `main` runs as `python SCRIPT ARGS` would, through
`models.cli.run`, from inside that folder (so default paths land there too). Every row must end in exit
code 2 with the expected text on the last line of stderr (argument errors: that line only, no usage block),
no traceback, and every file under the folder exactly as it was (hashed before and after), with nothing
added. The argument errors are also run in one subprocess that checks Keras and TensorFlow were never
imported, and one row per script runs as a real `python SCRIPT` process.
"""
# ruff: noqa: E501  (the table keeps one row per line)

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, run_script
from PIL import Image

from models.cli import run


@dataclass
class Row:
    id: str
    script: str  # the script's module name: data_preparation, train, batch_scoring, fit_anoms, tune, ...
    build: Callable[[Path], list[str]]  # makes the input under the folder, returns the script's arguments
    message: str  # expected in the last line of stderr
    parse: bool = True  # refused while the arguments are parsed (no data read, no Keras)


def args(*argv) -> Callable[[Path], list[str]]:
    return lambda tmp: list(argv)


def a_file(tmp: Path, name: str = "notes.txt") -> str:
    (tmp / name).write_text("a file of mine\n")
    return name


# --- data_preparation.py inputs ---------------------------------------------------------------------------


def frames(folder: Path, names, image: Image.Image | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (image or Image.new("L", (36, 24), 40 + 10 * i)).save(folder / name)


def video(path: Path, n: int = 6) -> Path:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(n).random((n, 32, 48, 3)) * 255).astype(np.uint8)
    imageio.mimwrite(path, pixels, fps=10, macro_block_size=16)
    return path


def dataset(tmp: Path) -> Path:
    """<tmp>/raw/ds with one good training video; rows add what is wrong."""
    root = tmp / "raw" / "ds"
    frames(root / "Train" / "walk1", ["1.png", "2.png", "3.png"])
    return root


def prepare_args(*extra) -> list[str]:
    common = ["--raw_data", "raw", "--dataset", "ds", "--preprocessed_data", "pre", "--size", "16x24"]
    return [*common, "--n_layers", "3", "--workers", "1", *extra]


def frames_named(*names) -> Callable[[Path], list[str]]:
    def build(tmp):
        frames(dataset(tmp) / "Train" / "walk2", names)
        return prepare_args()

    return build


def masks_named(*names) -> Callable[[Path], list[str]]:
    def build(tmp):
        test = dataset(tmp) / "Test"
        frames(test / "Test001", ["1.png", "2.png"])
        frames(test / "Test001_gt", names)
        return prepare_args()

    return build


def videos_at(*paths: str) -> Callable[[Path], list[str]]:
    def build(tmp):
        root = dataset(tmp)
        for path in paths:
            if path.endswith("/"):
                frames(root / path, ["1.png", "2.png"])
            else:
                video(root / path)
        return prepare_args()

    return build


def truncated_avi(tmp):
    path = video(dataset(tmp) / "Train" / "cut.avi", 20)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 10])
    return prepare_args()


def not_a_video(tmp):
    (dataset(tmp) / "Train" / "broken.mp4").write_bytes(b"\x00" * 100)
    return prepare_args()


def frame_image(image: Image.Image) -> Callable[[Path], list[str]]:
    def build(tmp):
        frames(dataset(tmp) / "Train" / "walk2", ["1.tif", "2.tif"], image)
        return prepare_args()

    return build


def labels_csv(content: bytes) -> Callable[[Path], list[str]]:
    def build(tmp):
        test = dataset(tmp) / "Test"
        frames(test / "cam", ["1.png", "2.png"])
        (test / "labels.csv").write_bytes(content)
        return prepare_args()

    return build


def corrupt_frame(tmp):
    frames(dataset(tmp) / "Train" / "walk2", ["1.png", "2.png"])
    (tmp / "raw" / "ds" / "Train" / "walk2" / "2.png").write_bytes(b"not a png")
    return prepare_args()


def m_file(tmp):
    """Two test videos, one label entry and one commented out: before, the comment counted as an entry."""
    test = dataset(tmp) / "Test"
    frames(test / "Test001", ["1.png", "2.png"])
    frames(test / "Test002", ["1.png", "2.png"])
    (test / "ds.m").write_text("TestVideoFile{end+1}.gt_frame = [1:2];\n% TestVideoFile{end+1}.gt_frame = [1];\n")
    return prepare_args()


def config_file(content, option: str = "--config", *before: str) -> Callable[[Path], list[str]]:
    """A JSON file `my.json` of `content` (bytes as they are), given as `option` after `before`."""

    def build(tmp):
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        (tmp / "my.json").write_bytes(data)
        return [*before, option, "my.json"]

    return build


# --- fit_anoms.py inputs ------------------------------------------------------------------------------------


def scored_table(labels: list[list[int]]) -> pd.DataFrame:
    """One batch_scoring.py-like row per frame; `labels` holds the 0/1 labels of each video."""
    rng = np.random.default_rng(0)
    parts = []
    for v, y in enumerate(labels):
        y = np.asarray(y, float)
        frame = np.arange(1, len(y) + 1)
        parts.append(
            pd.DataFrame(
                {
                    "video": f"Test{v + 1:03d}",
                    "frame": frame,
                    "y": y,
                    "predictable": True,
                    "model_mse": y + rng.random(len(y)),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def scored(labels, nan_rows=()) -> Callable[[Path], list[str]]:
    def build(tmp):
        df = scored_table(labels)
        df.loc[list(nan_rows), "y"] = np.nan
        (tmp / "scored").mkdir()
        df.to_pickle(tmp / "scored" / "df.pkl.gz")
        return ["--scored_data", "scored", "--model_path", "anoms"]

    return build


TWO_CLASSES = [[0] * 6 + [1] * 6] * 3


def bad_classifier(content: bytes | None) -> Callable[[Path], list[str]]:
    def build(tmp):
        scored(TWO_CLASSES)(tmp)
        (tmp / "forest").mkdir()
        if content is None:
            import joblib

            joblib.dump({"model": "not a pipeline"}, tmp / "forest" / "classifier.joblib")
        else:
            (tmp / "forest" / "classifier.joblib").write_bytes(content)
        return ["--apply", "forest", "--scored_data", "scored"]

    return build


def stores(*names: str) -> Callable[[Path], list[str]]:
    """A --preprocessed_data folder `pre` holding these prepared datasets (their metadata.json only)."""

    def build(tmp):
        for name in names:
            (tmp / "pre" / name).mkdir(parents=True)
            (tmp / "pre" / name / "metadata.json").write_text("{}")
        return ["--preprocessed_data", "pre"]

    return build


def raw_datasets(tmp):
    for name in ("UCSDped1", "UCSDped2"):
        frames(tmp / "raw" / "UCSD_Anomaly_Dataset.v1p2" / name / "Train" / "Train001", ["1.png", "2.png"])
    return ["--raw_data", "raw", "--preprocessed_data", "pre", "--size", "16x24", "--n_layers", "3"]


def clip_and_model(*extra) -> Callable[[Path], list[str]]:
    def build(tmp):
        (tmp / "m").mkdir()
        frames(tmp / "clip", ["1.png", "2.png"])
        return ["--input", "clip", *extra]

    return build


# fmt: off
ROWS = [
    # data_preparation.py arguments
    Row("prep-synthetic-frames-0", "data_preparation", args("--synthetic_frames", "0"), "--synthetic_frames: must be 3 or more frames. Received: 0"),
    Row("prep-synthetic-frames-1", "data_preparation", args("--synthetic_frames", "1"), "--synthetic_frames: must be 3 or more frames. Received: 1"),
    Row("prep-synthetic-size", "data_preparation", args("--synthetic_size", "4x4"), "--synthetic_size: height and width must be 8 or more"),
    Row("prep-synthetic-train-videos", "data_preparation", args("--synthetic_train_videos", "0"), "--synthetic_train_videos: must be 1 or more"),
    Row("prep-synthetic-test-videos", "data_preparation", args("--synthetic_test_videos", "-2"), "--synthetic_test_videos: must be 1 or more"),
    Row("prep-val-fraction-1", "data_preparation", args("--val_fraction", "1"), "--val_fraction: must be in [0, 1). Received: 1"),
    Row("prep-val-fraction-negative", "data_preparation", args("--val_fraction", "-0.1"), "--val_fraction: must be in [0, 1)"),
    Row("prep-workers-0", "data_preparation", args("--workers", "0"), "--workers: must be 1 or more. Received: 0"),
    Row("prep-n-layers-0", "data_preparation", args("--n_layers", "0"), "--n_layers: must be 1 or more"),
    Row("prep-size-text", "data_preparation", args("--size", "big"), "--size: must look like HEIGHTxWIDTH"),
    Row("prep-size-zero", "data_preparation", args("--size", "0x48"), "--size: height and width must be 1 or more"),
    Row("prep-size-layers", "data_preparation", args("--size", "150x232"), "height 150 -> 144 or 152"),
    Row("prep-seed-negative", "data_preparation", args("--seed", "-1"), "--seed: must be 0 or more"),
    Row("prep-output-is-file", "data_preparation", lambda t: ["--preprocessed_data", a_file(t)], "--preprocessed_data: must be a folder, but notes.txt is a file"),
    Row("prep-raw-inside-file", "data_preparation", lambda t: ["--make_synthetic", "--raw_data", a_file(t) + "/raw"], "notes.txt/raw lies inside notes.txt, which is a file"),
    Row("prep-dataset-several", "data_preparation", raw_datasets, "argument --dataset: raw holds 2 datasets (UCSDped1, UCSDped2); pass --dataset NAME"),
    Row("prep-dataset-none", "data_preparation", args("--raw_data", "raw"), "argument --dataset: none given and raw does not exist"),
    Row("prep-prefix", "data_preparation", args("--synthetic", "--dataset", "x"), "unrecognized arguments: --synthetic"),
    # data_preparation.py data: frames
    Row("frames-mixed-names", "data_preparation", frames_named("a1.png", "b2.png"), "Cannot order the frames of raw/ds/Train/walk2: 'a1.png' and 'b2.png' differ in more than their numbers", parse=False),
    Row("frames-no-numbers", "data_preparation", frames_named("first.png", "second.png"), "'first.png' has no frame number", parse=False),
    Row("frames-same-number", "data_preparation", frames_named("1.png", "01.png", "2.png"), "'01.png' and '1.png' have the same number", parse=False),
    Row("frames-stray-file", "data_preparation", frames_named("frame_1.png", "frame_2.png", "thumbnail.png"), "'thumbnail.png' has no frame number", parse=False),
    Row("masks-mixed-names", "data_preparation", masks_named("1.bmp", "mask2.bmp"), "Cannot order the frames of raw/ds/Test/Test001_gt", parse=False),
    Row("frames-float-out-of-range", "data_preparation", frame_image(Image.fromarray(np.full((24, 36), 2.0, np.float32))), "Float frame raw/ds/Train/walk2/1.tif has values in [2, 2]; float frames must lie in [0, 1]", parse=False),
    Row("frames-float-nan", "data_preparation", frame_image(Image.fromarray(np.full((24, 36), np.nan, np.float32))), "float frames must lie in [0, 1]", parse=False),
    Row("frames-32-bit-too-large", "data_preparation", frame_image(Image.fromarray(np.full((24, 36), 70000, np.int32))), "holds integers in [70000, 70000]", parse=False),
    Row("frames-corrupt", "data_preparation", corrupt_frame, "Cannot read frame raw/ds/Train/walk2/2.png", parse=False),
    # data_preparation.py data: videos
    Row("videos-same-name-across-splits", "data_preparation", videos_at("Train/thursday.mp4", "Test/thursday.mp4"), "Two videos named 'thursday': raw/ds/Train/thursday.mp4 and raw/ds/Test/thursday.mp4", parse=False),
    Row("videos-same-name-two-formats", "data_preparation", videos_at("Train/monday.mp4", "Train/monday.avi"), "Two videos named 'monday': raw/ds/Train/monday.avi and raw/ds/Train/monday.mp4", parse=False),
    Row("videos-folder-and-file", "data_preparation", videos_at("Train/x/", "Train/x.mp4"), "Two videos named 'x': raw/ds/Train/x and raw/ds/Train/x.mp4", parse=False),
    Row("videos-truncated-avi", "data_preparation", truncated_avi, "but its container reports 20; re-encode it, or keep the", parse=False),
    Row("videos-not-a-video", "data_preparation", not_a_video, "Cannot open video file raw/ds/Train/broken.mp4", parse=False),
    # data_preparation.py data: labels
    Row("labels-latin-1", "data_preparation", labels_csv("video,start_frame,end_frame\ncam,1,1\n# caméra\n".encode("latin-1")), "Label file raw/ds/Test/labels.csv is not UTF-8 text", parse=False),
    Row("labels-bom-missing-column", "data_preparation", labels_csv("video,start_frame\ncam,1\n".encode("utf-8-sig")), "lacks the column(s) ['end_frame']", parse=False),
    Row("labels-unknown-video", "data_preparation", labels_csv(b"video,start_frame,end_frame\ncam,1,1\ncam9,1,1\n"), "names videos that are not in raw/ds/Test: ['cam9']", parse=False),
    Row("labels-m-comment-is-no-entry", "data_preparation", m_file, "Label file raw/ds/Test/ds.m has 1 entries but raw/ds/Test has 2 test videos", parse=False),
    # train.py arguments
    Row("train-batch-size-0", "train", args("--batch_size", "0"), "--batch_size: must be 1 or more windows. Received: 0"),
    Row("train-filter-sizes-2", "train", args("--filter_sizes", "3,3"), "--filter_sizes: needs 3 comma-separated values. Received: '3,3'"),
    Row("train-strides-negative", "train", args("--strides", "-1"), "--strides: every value must be a whole number, 1 or more. Received: '-1'"),
    Row("train-strides-0", "train", args("--strides", "1,0"), "--strides: every value must be a whole number, 1 or more. Received: '1,0'"),
    Row("train-nb-epoch-0", "train", args("--nb_epoch", "0"), "--nb_epoch: must be 1 or more epochs. Received: 0"),
    Row("train-nt-1", "train", args("--nt", "1"), "--nt: must be 2 or more frames. Received: 1"),
    Row("train-samples-per-epoch-0", "train", args("--samples_per_epoch", "0"), "--samples_per_epoch: must be 1 or more windows"),
    Row("train-val-samples-0", "train", args("--val_samples", "0"), "--val_samples: must be 1 or more windows"),
    Row("train-learning-rate-0", "train", args("--learning_rate", "0"), "--learning_rate: must be greater than 0. Received: 0"),
    Row("train-learning-rate-nan", "train", args("--learning_rate", "nan"), "--learning_rate: expected a finite number"),
    Row("train-lr-decay-negative", "train", args("--lr_decay", "-0.5"), "--lr_decay: must be greater than 0. Received: -0.5"),
    Row("train-patience-negative", "train", args("--patience", "-1"), "--patience: must be 0 or more. Received: -1"),
    Row("train-stack-sizes-empty", "train", args("--stack_sizes", ""), "--stack_sizes: needs at least one value"),
    Row("train-stack-sizes-0", "train", args("--stack_sizes", "8,0"), "--stack_sizes: every value must be a whole number, 1 or more"),
    Row("train-R0-channels-0", "train", args("--R0_channels", "0"), "--R0_channels: must be 1 or more"),
    Row("train-loss-weights-length", "train", args("--stack_sizes", "8,16", "--layer_loss_weights", "1,0,0,0"), "--layer_loss_weights: needs 2 values (layer 0, layers above) or one per layer (3 with --stack_sizes 8,16)"),
    Row("train-loss-weights-negative", "train", args("--layer_loss_weights", "1,-0.1"), "--layer_loss_weights: every value must be a number, at least 0"),
    Row("train-max-minutes-0", "train", args("--max_minutes", "0"), "--max_minutes: must be greater than 0"),
    Row("train-horizon-0", "train", args("--horizon", "0"), "--horizon: must be 1 or more frames"),
    Row("train-horizon-nt", "train", args("--nt", "4", "--horizon", "4", "--layer_loss_weights", "1,0"), "--horizon: 4 frames ahead needs --nt above it"),
    Row("train-freeze-layer-missing", "train", args("--stack_sizes", "8,16", "--freeze_layers", "3"), "--freeze_layers: the model has layers 0-2. Received: [3]"),
    Row("train-model-dir-is-file", "train", lambda t: ["--model_dir", a_file(t)], "--model_dir: must be a folder, but notes.txt is a file"),
    Row("train-data-is-file", "train", lambda t: ["--preprocessed_data", a_file(t)], "--preprocessed_data: must be a folder, but notes.txt is a file"),
    Row("train-config-batch-size-0", "train", config_file({"batch_size": 0}), "--batch_size (from config my.json): must be 1 or more windows. Received: 0"),
    Row("train-config-stack-sizes", "train", config_file({"stack_sizes": [8, -16]}), "--stack_sizes (from config my.json): every value must be"),
    Row("train-config-precision", "train", config_file({"precision": "fp8"}), "--precision (from config my.json): invalid choice 'fp8'"),
    Row("train-config-list", "train", config_file([1, 2]), "my.json must hold a JSON object ({...}). Received: list."),
    Row("anoms-config-utf16", "fit_anoms", config_file("{}".encode("utf-16")), "my.json is not UTF-8 text: invalid start byte at byte 0."),
    Row("tune-space-null", "tune", lambda t: [*stores("A")(t), *config_file(None, "--space")(t)], "my.json must hold a JSON object ({...}). Received: NoneType.", parse=False),
    Row("train-dataset-several", "train", stores("A", "B"), "argument --dataset: pre holds 2 datasets (A, B); pass --dataset NAME"),
    Row("train-dataset-none", "train", stores(), "argument --dataset: none given and pre does not exist"),
    Row("train-dataset-case", "train", lambda t: [*stores("Ped2")(t), "--dataset", "ped2"], "No prepared dataset 'ped2' in pre; it holds Ped2 (names are case-sensitive).", parse=False),
    Row("train-prefix", "train", args("--model_d", "x"), "train.py: error: unrecognized arguments: --model_d x"),
    Row("train-quiet-and-verbose", "train", args("-q", "-v"), "argument -v/--verbose: not allowed with argument -q/--quiet"),
    # batch_scoring.py arguments
    Row("score-dataset-several", "batch_scoring", stores("A", "B"), "argument --dataset: pre holds 2 datasets (A, B); pass --dataset NAME"),
    Row("score-dataset-with-input", "batch_scoring", clip_and_model("--model_dir", "m", "--dataset", "UCSDped2"), "argument --dataset: not allowed with --input, which scores the videos given. Received: UCSDped2"),
    Row("score-input-without-model", "batch_scoring", clip_and_model(), "argument --model_dir: required with --input"),
    Row("score-model-dir-not-a-model", "batch_scoring", clip_and_model("--model_dir", "m"), "m is not a model folder (no config.json); pass the folder train.py wrote.", parse=False),
    Row("score-calibration-twice", "batch_scoring", lambda t: clip_and_model("--model_dir", "m", "--calibration", a_file(t, "c.json"), "--calibrate_on", "clip")(t), "argument --calibration: not allowed with --calibrate_on, which fits a new calibration"),
    Row("score-labels-without-input", "batch_scoring", lambda t: ["--labels", a_file(t, "l.csv")], "argument --labels: goes with --input"),
    Row("score-labels-missing", "batch_scoring", clip_and_model("--model_dir", "m", "--labels", "l.csv"), "argument --labels: must be a file, but l.csv does not exist"),
    Row("score-calibration-folder", "batch_scoring", clip_and_model("--model_dir", "m", "--calibration", "m"), "argument --calibration: must be a file, but m is a folder"),
    Row("score-plot-videos-without-gifs", "batch_scoring", args("--plot_videos", "Test001"), "argument --plot_videos: goes with --save_prediction_error_video_frames"),
    Row("score-config-smooth-0", "batch_scoring", config_file({"smooth": 0}), "--smooth (from config my.json): must be 1 or more frames. Received: 0"),
    Row("anoms-config-unknown", "fit_anoms", config_file({"smoth": 3}), "fit_anoms.py: error: argument --config: my.json has unknown settings: ['smoth']"),
    Row("prep-config-size", "data_preparation", config_file({"size": "big"}), "--size (from config my.json): must look like HEIGHTxWIDTH"),
    Row("score-prefix", "batch_scoring", args("--scored", "x"), "unrecognized arguments: --scored x"),
    Row("score-patch-0", "batch_scoring", args("--patch", "0"), "--patch: must be 1 or more pixels. Received: 0"),
    Row("score-smooth-0", "batch_scoring", args("--smooth", "0"), "--smooth: must be 1 or more frames. Received: 0"),
    Row("score-n-plot-0", "batch_scoring", args("--n_plot", "0"), "--n_plot: must be 1 or more. Received: 0"),
    Row("score-window-negative", "batch_scoring", args("--window", "-3"), "--window: must be 0 or more frames (0: whole videos). Received: -3"),
    Row("score-model-dir-is-file", "batch_scoring", lambda t: ["--model_dir", a_file(t)], "--model_dir: must be a folder, but notes.txt is a file"),
    Row("score-output-is-file", "batch_scoring", lambda t: ["--scored_data", a_file(t)], "--scored_data: must be a folder, but notes.txt is a file"),
    # fit_anoms.py
    Row("anoms-n-splits-1", "fit_anoms", args("--n_splits", "1"), "--n_splits: must be 2 or more folds. Received: 1"),
    Row("anoms-threshold-above-1", "fit_anoms", args("--threshold", "1.5"), "--threshold: must be in [0, 1]. Received: 1.5"),
    Row("anoms-threshold-negative", "fit_anoms", args("--threshold", "-0.1"), "--threshold: must be in [0, 1]"),
    Row("anoms-smooth-0", "fit_anoms", args("--smooth", "0"), "--smooth: must be 1 or more frames. Received: 0"),
    Row("anoms-model-path-is-file", "fit_anoms", lambda t: ["--model_path", a_file(t)], "--model_path: must be a folder, but notes.txt is a file"),
    Row("anoms-no-scored-data", "fit_anoms", args(), "argument --dataset: none given and outputs/scored does not exist"),
    Row("anoms-classifier", "fit_anoms", args("--classifier", "svm"), "argument --classifier: invalid choice: 'svm'"),
    # the other scripts' arguments
    Row("tune-prefix", "tune", args("--n_trial", "3"), "tune.py: error: unrecognized arguments: --n_trial 3"),
    Row("serve-port", "serve", args("--model_dir", "m", "--port", "-1"), "--port: must be 0 or more. Received: -1"),
    Row("export-per-window", "export_model", args("--model_dir", "m", "--out", "o", "--per_window", "0"), "--per_window: must be 1 or more. Received: 0"),
    Row("anoms-one-class-fold", "fit_anoms", scored([[0] * 6 + [1] * 6, [0] * 12]), "Cannot evaluate by video: only video Test001 of 2 has anomalous frames", parse=False),
    Row("anoms-one-normal-video", "fit_anoms", scored([[1] * 12, [0] * 6 + [1] * 6, [1] * 12]), "only video Test002 of 3 has normal frames", parse=False),
    Row("anoms-nan-labels", "fit_anoms", scored(TWO_CLASSES, nan_rows=(4, 5)), "Column 'y' must hold 0 or 1 in every row, but 2 of 36 rows do not: row 4 (video Test001, frame 5): nan", parse=False),
    Row("anoms-corrupt-classifier", "fit_anoms", bad_classifier(b"\x80\x04 not a pickle"), "Cannot read the saved classifier forest/classifier.joblib", parse=False),
    Row("anoms-foreign-classifier", "fit_anoms", bad_classifier(None), "forest/classifier.joblib is not a classifier saved by fit_anoms.py", parse=False),
]
# fmt: on


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder`, by relative path, with the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_refused_in_one_line_and_touches_nothing(row, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = row.build(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    script = importlib.import_module(row.script)
    with pytest.raises(SystemExit) as done:
        run(script.main, argv)
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    assert "Traceback" not in err
    assert row.message in err.strip().splitlines()[-1], err
    if row.parse:  # argparse's errors too: one line, without the usage block
        assert len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before


def test_argument_errors_stop_before_keras_is_imported(tmp_path):
    """Every argument row, parsed in one fresh interpreter: each exits with code 2, none imports Keras."""
    cases = []
    for row in ROWS:
        if row.parse:
            folder = tmp_path / row.id
            folder.mkdir()
            cases.append((row.script, str(folder), row.build(folder)))
    code = (
        "import importlib, json, os, sys\n"
        "for script, folder, argv in json.loads(sys.argv[1]):\n"
        "    os.chdir(folder)\n"
        "    try:\n"
        "        importlib.import_module(script).parse_args(argv)\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 2, (script, argv)\n"
        "    else:\n"
        "        raise AssertionError(f'{script} {argv} was accepted')\n"
        "print(json.dumps(sorted(m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cases)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [] and len(cases) >= 40


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("data_preparation.py", ["--synthetic_frames", "1"], "--synthetic_frames: must be 3 or more frames"),
        ("train.py", ["--strides", "0"], "--strides: every value must be a whole number, 1 or more"),
        ("batch_scoring.py", ["--patch", "0"], "--patch: must be 1 or more pixels"),
        ("fit_anoms.py", ["--n_splits", "1"], "--n_splits: must be 2 or more folds"),
    ],
)
def test_scripts_exit_with_code_2(script, argv, message):
    done = run_script(script, *argv)
    assert done.returncode == 2 and message in done.stderr.strip().splitlines()[-1], done.stderr
