"""Session fixtures: a tiny synthetic dataset in the real UCSD layout, prepared, trained and scored once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.data.prepare import PrepareConfig, prepare  # noqa: E402
from models.data.synthetic import SyntheticSpec, make_synthetic  # noqa: E402

TINY_SPEC = SyntheticSpec(height=24, width=36, train_videos=3, test_videos=4, frames=24, seed=1)
TINY_SIZE = (16, 24)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """<tmp>/UCSD_Anomaly_Dataset.v1p2/Synthetic with Train/, Test/, Test00N_gt/ and Synthetic.m."""
    return make_synthetic(tmp_path_factory.mktemp("raw"), "Synthetic", TINY_SPEC)


@pytest.fixture(scope="session")
def prepared(synthetic_root, tmp_path_factory) -> Path:
    """The preprocessed store of the tiny dataset: 16x24 grey frames, one val video."""
    out = tmp_path_factory.mktemp("pre") / "Synthetic"
    prepare(synthetic_root, out, PrepareConfig(size=TINY_SIZE, n_layers=3, val_fraction=0.34, workers=1))
    return out


@pytest.fixture(scope="session")
def trained(prepared, tmp_path_factory) -> Path:
    """A model folder from train.py's code path: 3 layers, tiny stacks, two short epochs."""
    from models.training import train

    model_dir = tmp_path_factory.mktemp("model") / "m"
    train(tiny_settings(prepared, model_dir))
    return model_dir


def run_script(*args) -> subprocess.CompletedProcess:
    """Runs one of the pipeline's scripts as a user would: `python SCRIPT ARGS...` from the repository root."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def run_on_jax(script: str, *args, **env) -> subprocess.CompletedProcess:
    """Runs `python -c SCRIPT ARGS...` from the repository root on the JAX backend on the CPU (the tests'
    own process runs TensorFlow), with `env` added to the environment."""
    env = os.environ | {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"} | env
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def script_result(done: subprocess.CompletedProcess) -> dict:
    """The JSON a script printed on its line starting with "RESULT "."""
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def tiny_settings(prepared: Path, model_dir: Path, **overrides):
    from models.training import TrainSettings

    values = dict(
        preprocessed_data=str(prepared.parent),
        dataset=prepared.name,
        model_dir=str(model_dir),
        stack_sizes=(4, 8),
        R0_channels=3,
        nt=4,
        batch_size=2,
        nb_epoch=2,
        samples_per_epoch=8,
        val_samples=4,
        learning_rate=0.01,
        strides=(1, 2),
        precision="float32",
        verbose=0,
    )
    return TrainSettings(**(values | overrides))


def video_with_longer_audio(path: Path, n_frames: int = 20, seconds: float = 5.0) -> Path:
    """A real H.264 .mp4 of `n_frames` grey frames at 10 frames/s (2 s for 20) with an AAC tone of `seconds`:
    its container's duration is the audio's, as a camera recording's can be."""
    import math
    import struct
    import wave

    import imageio.v2 as imageio
    import numpy as np

    wav = path.with_suffix(".wav")
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        tone = (int(8000 * math.sin(2 * math.pi * 440 * i / 8000)) for i in range(int(8000 * seconds)))
        w.writeframes(b"".join(struct.pack("<h", v) for v in tone))
    with imageio.get_writer(
        str(path), fps=10, codec="libx264", macro_block_size=4, audio_path=str(wav), audio_codec="aac"
    ) as writer:
        for i in range(n_frames):
            writer.append_data(np.full((24, 32, 3), 10 * i, np.uint8))
    wav.unlink()
    return path
