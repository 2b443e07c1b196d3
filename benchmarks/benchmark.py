r"""Throughput of PredNet training and scoring, its FLOPs per frame, and the fraction of the GPU's peak.

    python benchmarks/benchmark.py --config cpu --size 64x96x1                       # the CPU profile
    KERAS_BACKEND=jax python benchmarks/benchmark.py --config default --size 128x192x1 \
        --batch_sizes 8,16,32 --precisions float32,mixed_bfloat16                   # on the GPU machine

Trains with `model.fit` on a `WindowDataset` of random frames (so the input pipeline is included).
Scoring is timed three ways: `score_fps`, model steps per second over whole sequences (--score_length
frames, 180 by default; the raw rate, and the one `score_peak_frac` comes from); `scored_fps`, frames
per second scored the way batch_scoring.py does by default (`score_videos`: `nt`-frame windows,
--score_batch windows per call, the next frame, `default_per_window` frames scored per window, the
metrics computed on the device); and `stream_fps`, frames per second of --streams live streams together
with the model's states carried along, as the service runs them (`models.streaming.StateStepper`: one call
per frame of every stream); `cameras_10fps` is how many 10 fps cameras that keeps up with. Compilation is
excluded from every rate and reported apart:
`train_compile_s` (the first epoch's time beyond a timed epoch's), `score_compile_s` (the first
`score_videos` call's beyond the timed rate's) and `stream_compile_s` (the first frame's).
With --prepare RAW_ROOT it also times data preparation of that dataset folder.
Prints one line per setting and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.args import positive_int  # noqa: E402
from models.cli import import_keras, parser  # noqa: E402
from models.config import parse_with_config  # noqa: E402
from models.inference import DEFAULT_HORIZON, default_per_window, score_videos  # noqa: E402

PEAK_BF16 = 790e12  # H100 SXM dense bf16 matrix throughput measured on the lent machine


def flops_per_frame(stack_sizes, R_stack_sizes, height, width, k=3) -> float:
    """Forward multiply-adds x 2 of every convolution of one PredNet time step."""
    total, n = 0.0, len(stack_sizes)
    for l in range(n):
        h, w = height // 2**l, width // 2**l
        a, r = stack_sizes[l], R_stack_sizes[l]
        cin = r + 2 * a + (R_stack_sizes[l + 1] if l < n - 1 else 0)
        total += 2 * k * k * cin * 4 * r * h * w  # fused LSTM gates
        total += 2 * k * k * r * a * h * w  # Ahat
        if l < n - 1:
            total += 2 * k * k * 2 * a * stack_sizes[l + 1] * h * w  # A of the layer above
    return total


def peak_memory_mb() -> float:
    try:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 2**20
    except Exception:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(args, batch_size: int, precision: str) -> dict:
    import keras

    from models.prednet import build_training_model, predictor, prednet_kwargs
    from models.streaming import StateStepper
    from models.training import WindowDataset

    keras.mixed_precision.set_dtype_policy(precision)
    h, w, c = args.shape
    kwargs = prednet_kwargs(c, args.stack_sizes, R0_channels=args.R0_channels)
    model = build_training_model(args.nt, (h, w, c), (1, 0), uint8=True, **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mae")
    rng = np.random.default_rng(0)
    X = rng.integers(0, 255, (args.frames, h, w, c), dtype=np.uint8)
    sources = np.repeat(np.arange(args.frames // 180 + 1), 180)[: args.frames].astype(str)
    data = WindowDataset(X, sources, args.nt, batch_size, samples_per_epoch=batch_size * args.steps, uint8=True)
    start = time.perf_counter()
    model.fit(data, epochs=1, verbose=0)  # compile
    first_epoch = time.perf_counter() - start
    train_fps, seconds = float("nan"), float("nan")
    for _ in range(3):
        before = keras.ops.convert_to_numpy(model.trainable_weights[0].value)
        start = time.perf_counter()
        history = model.fit(data, epochs=1, verbose=0)
        after = keras.ops.convert_to_numpy(model.trainable_weights[0].value)  # JAX runs asynchronously: wait
        seconds = time.perf_counter() - start
        change = float(np.abs(after - before).max())
        print(
            f"timed epoch: {len(data)} steps in {seconds:.2f} s, loss {history.history['loss'][-1]:.4g}, "
            f"first weight changed by {change:.3g}"
        )
        if change > 0:  # on the H100 a process's first timed epoch now and then left the weights as they
            train_fps = batch_size * args.steps * args.nt / seconds  # were, 4x "faster": not a training rate
            break
    train_compile_s = first_epoch - seconds
    pred = predictor(model, "all")
    seq = rng.random((args.score_videos, args.score_length, h, w, c)).astype(np.float32)
    pred.predict_on_batch(seq)
    start = time.perf_counter()
    for _ in range(3):
        out = pred.predict_on_batch(seq)
    np.asarray(out["error"])
    score_fps = 3 * seq.shape[0] * seq.shape[1] / (time.perf_counter() - start)
    horizon, per_window = DEFAULT_HORIZON, default_per_window(args.nt, DEFAULT_HORIZON)
    score_batch = args.score_batch or batch_size
    scoring = (score_batch, args.nt, horizon, per_window)
    n = score_batch * 2
    start = time.perf_counter()
    score_videos(pred, X[:n], sources[:n], *scoring)  # compile
    first_call = time.perf_counter() - start
    scored_fps = score_videos(pred, X, sources, *scoring)["fps"]
    score_compile_s = first_call - n / scored_fps
    stepper = StateStepper(model, args.nt, per_window)
    streams = [stepper.new_stream() for _ in range(args.streams)]
    cameras = [X[k :: args.streams] for k in range(args.streams)]  # a different video for each stream
    start = time.perf_counter()
    stepper.step(streams, [c[0] for c in cameras])  # compile
    stream_compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(1, 1 + args.stream_frames):
        stepper.step(streams, [c[i % len(c)] for c in cameras])
    stream_fps = args.streams * args.stream_frames / (time.perf_counter() - start)
    flops = flops_per_frame(kwargs["stack_sizes"], kwargs["R_stack_sizes"], h, w)
    keras.mixed_precision.set_dtype_policy("float32")
    return {
        "backend": keras.backend.backend(),
        "size": f"{h}x{w}x{c}",
        "stacks": "/".join(map(str, args.stack_sizes)),
        "precision": precision,
        "batch": batch_size,
        "train_fps": train_fps,
        "train_compile_s": train_compile_s,
        "score_fps": score_fps,
        "scored_fps": scored_fps,
        "score_compile_s": score_compile_s,
        "streams": args.streams,
        "stream_fps": stream_fps,
        "cameras_10fps": int(stream_fps // 10),
        "stream_slots": stepper.slots,
        "stream_compile_s": stream_compile_s,
        "score_batch": score_batch,
        "horizon": horizon,
        "per_window": per_window,
        "gflop_per_frame": flops / 1e9,
        "train_peak_frac": 3 * flops * train_fps / PEAK_BF16,
        "score_peak_frac": flops * score_fps / PEAK_BF16,
        "peak_mem_mb": peak_memory_mb(),
    }


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--config", default="cpu", help="settings of the model timed: a name in config/ or a file")
    p.add_argument("--stack_sizes", default=None, help="channels of layers 1..: 48,96,192 (default: the config's)")
    p.add_argument("--R0_channels", type=int, default=None, help="channels of layer 0's state (default: the config's)")
    p.add_argument("--nt", type=int, default=None, help="frames per training window (default: the config's)")
    p.add_argument("--size", default="64x96x1", help="HEIGHTxWIDTHxCHANNELS")
    p.add_argument("--batch_sizes", default="4", help="training batch sizes to time, comma-separated: 8,16,32")
    p.add_argument(
        "--precisions", default="float32", help="Keras dtype policies to time, comma-separated: float32,mixed_bfloat16"
    )
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--frames", type=int, default=720, help="random frames to sample windows from")
    p.add_argument("--score_videos", type=int, default=6, help="sequences per raw scoring call")
    p.add_argument("--score_length", type=int, default=180, help="frames per sequence of the raw scoring rate")
    p.add_argument("--stream_frames", type=positive_int, default=30, help="frames of each timed live stream")
    p.add_argument("--streams", type=positive_int, default=1, help="live streams whose frames share each model call")
    p.add_argument(
        "--score_batch", type=int, default=None, help="windows per call for scored_fps (default: the training batch)"
    )
    p.add_argument("--prepare", default=None, help="also time data_preparation on this dataset folder")
    for name in (
        "batch_size",
        "nb_epoch",
        "samples_per_epoch",
        "val_samples",
        "learning_rate",
        "lr_decay",
        "lr_schedule",
        "lr_step_epoch",
        "strides",
        "patience",
        "precision",
        "filter_sizes",
        "layer_loss_weights",
        "horizon",
    ):
        p.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    args = parse_with_config(p, argv)
    if args.score_batch is not None and args.score_batch < 1:
        p.error(f"--score_batch must be 1 or more windows; got {args.score_batch}")
    import_keras()  # after argument errors, the native libraries' start-up lines hidden
    args.stack_sizes = [
        int(v) for v in (args.stack_sizes if isinstance(args.stack_sizes, list) else str(args.stack_sizes).split(","))
    ]
    args.shape = tuple(int(v) for v in args.size.split("x"))
    rows = []
    if args.prepare:
        from models.data.prepare import PrepareConfig, prepare

        with tempfile.TemporaryDirectory() as tmp:
            meta = prepare(args.prepare, Path(tmp) / "out", PrepareConfig(size=args.shape[:2]))
        print(
            f"data preparation of {args.prepare}: {meta['seconds']} s, {meta['frames_per_second']} frames/s "
            f"on {os.cpu_count()} cores"
        )
    for precision in args.precisions.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            row = bench(args, batch, precision)
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    import pandas as pd

    print(pd.DataFrame(rows).round(4).to_markdown(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
