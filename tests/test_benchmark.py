import json
import math
import os
import re
import subprocess
import sys

import numpy as np
from conftest import ROOT, run_script

from benchmarks.benchmark import flops_per_frame
from models.prednet import PredNet, prednet_kwargs


def test_flops_match_the_convolutions_of_the_built_layer():
    kwargs = prednet_kwargs(1, (4, 6), R0_channels=3)
    layer = PredNet(**kwargs)
    layer.build((None, 2, 8, 12, 1))
    expected = 0.0
    for convs in (layer.lstm_convs, layer.ahat_convs, layer.a_convs):
        for l, conv in enumerate(convs):
            expected += 2 * np.prod(conv.kernel.shape) * (8 // 2**l) * (12 // 2**l)
    assert flops_per_frame(kwargs["stack_sizes"], kwargs["R_stack_sizes"], 8, 12) == expected


def test_cli_prints_a_row_per_setting():
    done = run_script(
        "benchmarks/benchmark.py",
        "--config",
        "cpu",
        "--size",
        "16x24x1",
        "--steps",
        "2",
        "--frames",
        "200",
        "--score_videos",
        "1",
        "--R0_channels",
        "4",
        "--score_batch",
        "3",
        "--streams",
        "3",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("backend="))
    values = dict(item.split("=") for item in row.split())
    assert values["size"] == "16x24x1" and float(values["train_fps"]) > 0 and float(values["score_fps"]) > 0
    # frames scored as batch_scoring.py does by default: 6-frame windows (the CPU profile's nt), the next frame,
    # 3 frames per window
    assert (values["horizon"], values["per_window"]) == ("1", "3")
    assert 0 < float(values["scored_fps"]) < float(values["score_fps"])
    assert values["score_batch"] == "3"
    # live streams with their states carried along: 2 model steps per frame (6-frame windows, 3 per window),
    # the 3 streams' frames in one call
    assert values["stream_slots"] == "2" and values["streams"] == "3" and float(values["stream_fps"]) > 0
    # cameras_10fps is the exact rate // 10; the row prints the rate to 4 significant digits (550 for 549.96)
    printed = float(values["stream_fps"])
    half = 0.5 * 10 ** (math.floor(math.log10(printed)) - 3)
    assert (printed - half) // 10 <= int(values["cameras_10fps"]) <= (printed + half) // 10
    for name in ("train_compile_s", "score_compile_s", "stream_compile_s"):  # compilation, reported apart
        assert np.isfinite(float(values[name])), name
    # the timed epoch trained: a rate is reported only for an epoch that changed the weights
    timed = next(line for line in done.stdout.splitlines() if line.startswith("timed epoch: 2 steps"))
    assert float(timed.rsplit(" ", 1)[1]) > 0
    cpu = prednet_kwargs(1, (8, 16), R0_channels=4)  # config/cpu.json's stacks
    gflop = flops_per_frame(cpu["stack_sizes"], cpu["R_stack_sizes"], 16, 24) / 1e9
    assert abs(float(values["gflop_per_frame"]) - gflop) < 1e-3 * gflop
    assert done.stdout.splitlines()[-3].startswith("| backend")  # the markdown table ends the output


def test_bad_score_batch_is_refused():
    done = run_script("benchmarks/benchmark.py", "--score_batch", "0")
    assert done.returncode == 2 and "--score_batch must be 1 or more windows; got 0" in done.stderr


def test_gpu_figures_runs_every_step_into_its_folder(prepared, tmp_path):
    """benchmarks/gpu_figures.sh, at the tiny size on the CPU: the model folder, the scored test videos, the
    protocol's AUCs and the benchmark's row, each step's exit code 0; a second run into the same folder and
    a folder without prepared data are refused before any work."""
    out = tmp_path / "gpu"
    env = os.environ | {
        "PYTHON": sys.executable,
        "DATASET": prepared.name,
        "CONFIG": "cpu",
        "TRAIN_ARGS": "--precision float32 --nb_epoch 1 --samples_per_epoch 4 --nt 4 --batch_size 2",
        "BENCH_ARGS": "--precisions float32 --batch_sizes 2 --steps 2 --frames 60 --score_videos 1 "
        "--score_length 8 --score_batch 2 --nt 4",
    }
    script = ["bash", str(ROOT / "benchmarks" / "gpu_figures.sh")]
    done = subprocess.run([*script, prepared.parent, out, "1"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    for name in ("train", "scoring", "live_protocol", "benchmark"):
        assert re.search(rf"^{name}: exit 0 in \d+ s", done.stdout, re.M), done.stdout
    config = json.loads((out / prepared.name / "config.json").read_text())
    assert config["arguments"]["seed"] == 2 and config["arguments"]["max_minutes"] == 1
    assert (out / "scored" / "df.pkl.gz").is_file()
    assert "offline_raw_psnr" in json.loads((out / "live_protocol.json").read_text())
    assert "size=16x24x1" in (out / "benchmark.log").read_text()

    again = subprocess.run([*script, prepared.parent, out], env=env, capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr == f"gpu_figures.sh: {out / prepared.name} exists: choose another OUT\n"
    missing = subprocess.run([*script, tmp_path, tmp_path / "o2"], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "metadata.json not found" in missing.stderr and not (tmp_path / "o2").exists()
