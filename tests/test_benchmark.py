import numpy as np
from conftest import run_script

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
    assert int(values["cameras_10fps"]) == int(float(values["stream_fps"]) // 10)
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
