"""The pretrained Ped2 model in the repository: what it was trained on, that it predicts video as a trained
model does, that batch_scoring.py scores a user's video with it, and that train.py fine-tunes from it at
another frame size."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, run_script, tiny_settings

PRETRAINED = ROOT / "pretrained" / "UCSDped2-cpu"


def test_it_was_trained_on_the_normal_training_videos_only():
    files = {p.name for p in PRETRAINED.iterdir()}
    assert {"model.keras", "config.json", "calibration.json", "history.csv", "README.md"} <= files
    assert sum(p.stat().st_size for p in PRETRAINED.rglob("*") if p.is_file()) < 30 * 2**20
    config = json.loads((PRETRAINED / "config.json").read_text())
    assert config["arguments"]["dataset"] == "UCSDped2" and config["model"] == "prednet"
    videos = config["data"]["videos"]
    assert videos["train"] and videos["val"]
    assert all(v.startswith("Train") for split in ("train", "val") for v in videos[split])
    results = config["results"]
    assert results["next_frame_mse"] < results["copy_last_frame_mse"]  # on the held-out normal videos
    calibration = json.loads((PRETRAINED / "calibration.json").read_text())
    assert all(v.startswith("Train") for v in calibration["fitted_on"]["tail_videos"])  # held-out normal video
    readme = (PRETRAINED / "README.md").read_text()
    assert "train.py" in readme and "batch_scoring.py --model_dir pretrained/UCSDped2-cpu" in readme


def test_it_predicts_a_still_scene_as_it_is(synthetic_root):
    """A model that predicts the next frame of a fixed camera has learned to reproduce what does not move;
    untrained weights predict a mid-grey frame, with an error of the order of the frame's mean square."""
    from PIL import Image

    import models

    model = models.load(PRETRAINED)
    h, w, _ = model.input_shape[2:]
    first = sorted((synthetic_root / "Test" / "Test001").glob("*.tif"))[0]
    frame = np.asarray(Image.open(first).convert("L").resize((w, h)), np.float32)[..., None] / 255.0
    still = np.repeat(frame[None, None], 8, axis=1)
    predicted = np.asarray(model.predict_on_batch(still))
    error = float(np.mean((predicted[0, -1] - frame) ** 2))
    assert error < 0.02 * float(np.mean(frame**2)), error


def test_batch_scoring_scores_a_video_with_it(synthetic_root, tmp_path):
    clip = synthetic_root / "Test" / "Test002"
    done = run_script(
        "batch_scoring.py", "--model_dir", PRETRAINED, "--input", clip, "--scored_data", tmp_path / "s", "-q"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    df = pd.read_pickle(tmp_path / "s" / "df.pkl.gz")
    assert len(df) == len(list(clip.glob("*.tif")))
    assert df["score"].iloc[2:].notna().all() and set(df["alarm"].unique()) <= {0, 1}


def test_fine_tuning_from_it_at_another_frame_size(prepared, tmp_path):
    """Its convolutions fit any frame size its layers divide: the tiny 16x24 dataset, one short epoch,
    starts far closer to the data than the same training from scratch."""
    from models.training import train

    a = json.loads((PRETRAINED / "config.json").read_text())["arguments"]
    settings = dict(nb_epoch=1, stack_sizes=tuple(a["stack_sizes"]), R0_channels=a["R0_channels"], seed=3)
    tuned = train(tiny_settings(prepared, tmp_path / "tuned", fine_tuning=str(PRETRAINED), **settings))
    scratch = train(tiny_settings(prepared, tmp_path / "scratch", **settings))
    assert tuned["frame_shape"] == scratch["frame_shape"] == [16, 24, 1]
    assert tuned["results"]["next_frame_mse"] < 0.5 * scratch["results"]["next_frame_mse"]


def test_fine_tuning_refuses_frames_of_other_channels(synthetic_root, tmp_path):
    from models.data.prepare import PrepareConfig, prepare
    from models.errors import PipelineError
    from models.training import train

    out = tmp_path / "pre" / "Synthetic"
    prepare(synthetic_root, out, PrepareConfig(size=(16, 24), n_layers=3, val_fraction=0.34, workers=1, channels="3"))
    with pytest.raises(PipelineError, match="takes frames of 1 channels, the data has 3"):
        train(tiny_settings(out, tmp_path / "m", fine_tuning=str(PRETRAINED), nb_epoch=1))
