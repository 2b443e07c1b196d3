"""Load test of the web service (serve.py), on this machine only: N cameras streaming frames over WebSockets
and M clients posting clips, for T seconds; prints frames/s, latency, errors and the server's memory growth.

    # starts `serve.py` itself on a free localhost port, and stops it at the end
    python benchmarks/load_test.py --model_dir outputs/models/UCSDped2 --streams 8 --clip_clients 1 --seconds 30
    # against a running service (localhost only); --server_pid to report its memory
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --server_pid 1234 --streams 16 --fps 10

Each stream sends a PNG frame, waits for its answer, and sends the next (at --fps frames per second, or as
fast as the answers come with --fps 0); each clip client posts a short mp4 and waits for its scores. The
frames are moving squares drawn at the model's frame size. Everything stops after --seconds (at most 600)
and --max_requests per client; the exit code is 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.args import float_in, int_at_least, int_in, positive_int  # noqa: E402
from models.cli import parser  # noqa: E402

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--model_dir", default=None, help="start serve.py with this model folder (else --url)")
    p.add_argument("--url", default=None, help="a running service on this machine, e.g. http://127.0.0.1:8000")
    p.add_argument("--server_pid", type=positive_int, help="with --url: its process, for the memory figures")
    p.add_argument(
        "--api_key",
        default=os.environ.get("PREDNET_API_KEY") or None,
        help="the service's key, if it has one; default: $PREDNET_API_KEY, else none",
    )
    p.add_argument("--streams", type=int_in(0, 256), default=8, help="concurrent WebSocket streams (0-256)")
    p.add_argument(
        "--fps", type=float_in(0), default=10.0, help="frames per second per stream (0: as fast as answered)"
    )
    p.add_argument("--clip_clients", type=int_in(0, 32), default=1, help="concurrent clients posting clips (0-32)")
    p.add_argument("--clip_frames", type=int_at_least(2, "frames"), default=50, help="frames per posted clip")
    p.add_argument("--seconds", type=float_in(0, 600, low_open=True), default=30.0, help="how long the load runs")
    p.add_argument("--max_requests", type=positive_int, default=100000, help="frames or clips per client at most")
    p.add_argument("--serve_args", default="", help="with --model_dir: more serve.py arguments, e.g. '--max_batch 16'")
    args = p.parse_args(argv)
    if (args.model_dir is None) == (args.url is None):
        p.error("give --model_dir (start a server) or --url (a running one), not both")
    if args.url and urlparse(args.url).hostname not in LOCAL_HOSTS:
        p.error(f"--url must be on this machine ({', '.join(LOCAL_HOSTS)}); got {args.url}")
    if args.streams + args.clip_clients == 0:
        p.error("--streams and --clip_clients are both 0: nothing to load the service with")
    return args


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process in MB (VmRSS of /proc/<pid>/status), None if unknown."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(found.group(1)) / 1024 if found else None


def make_frames(height: int, width: int, n: int = 40, seed: int = 0) -> list[np.ndarray]:
    """n grey frames of a few squares crossing a noisy background, uint8 (height, width)."""
    rng = np.random.default_rng(seed)
    background = rng.integers(60, 120, (height, width)).astype(np.uint8)
    side = max(2, height // 8)
    starts = rng.integers(0, width, 3)
    rows = rng.integers(0, max(height - side, 1), 3)
    frames = []
    for t in range(n):
        f = background.copy()
        for x0, y0 in zip(starts, rows, strict=True):
            x = int((x0 + 2 * t) % max(width - side, 1))
            f[y0 : y0 + side, x : x + side] = 220
        frames.append(f)
    return frames


def png_bytes(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(frames: list[np.ndarray], fps: float = 10.0) -> bytes:
    import imageio.v2 as imageio

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        with imageio.get_writer(str(path), fps=fps, codec="libx264", quality=8, macro_block_size=2) as w:
            for f in frames:
                w.append_data(np.repeat(f[..., None], 3, axis=-1))
        return path.read_bytes()


def start_server(
    serve_args: list[str], log_path: Path, env: dict | None = None, timeout_s: float = 300
) -> tuple[subprocess.Popen, str]:
    """`python serve.py SERVE_ARGS` on a free localhost port (--port 0), its output in `log_path`, `env` added to
    the environment; returns the process and its URL once /health answers. Raises RuntimeError with the log's
    end if it exits or does not answer within `timeout_s` (then it is killed)."""
    import httpx

    args = [sys.executable, str(ROOT / "serve.py"), *map(str, serve_args), "--port", "0"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url, start = None, time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited: {log_path.read_text()[-2000:]}")
        found = url or re.search(r"on (http://[\d.]+:\d+) ", log_path.read_text())
        url = url or (found and found.group(1))
        if url:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"serve.py did not answer /health within {timeout_s:g} s: {log_path.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """Asks the server to stop (SIGTERM), kills it if it has not within `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Tally:
    def __init__(self):
        self.latencies: list[float] = []
        self.frames = 0
        self.errors = 0
        self.messages: list[str] = []

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.messages) < 5:
            self.messages.append(message[:200])


async def stream_client(url, headers, frames, fps, end, max_requests, tally: Tally) -> None:
    from websockets.asyncio.client import connect

    try:
        async with connect(url.replace("http", "ws", 1) + "/v1/stream", additional_headers=headers) as ws:
            start = time.perf_counter()
            for k in range(max_requests):
                if time.perf_counter() >= end:
                    break
                if fps > 0:
                    await asyncio.sleep(max(0.0, start + k / fps - time.perf_counter()))
                sent = time.perf_counter()
                await ws.send(frames[k % len(frames)])
                reply = json.loads(await ws.recv())
                tally.latencies.append(time.perf_counter() - sent)
                if "error" in reply:
                    tally.error(reply["error"])
                else:
                    tally.frames += 1
    except Exception as err:  # a refused or broken stream counts as an error, the test goes on
        tally.error(f"stream: {type(err).__name__}: {err}")


async def clip_client(url, headers, clip, n_frames, end, max_requests, tally: Tally) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(max_requests):
            if time.perf_counter() >= end:
                break
            sent = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/score", content=clip, headers={**headers, "Content-Type": "video/mp4"})
            except httpx.HTTPError as err:
                tally.error(f"clip: {type(err).__name__}: {err}")
                continue
            tally.latencies.append(time.perf_counter() - sent)
            if r.status_code == 200 and r.json()["n_frames"] == n_frames:
                tally.frames += n_frames
            else:
                tally.error(f"clip: HTTP {r.status_code}: {r.text[:200]}")


def summary(name: str, tally: Tally, seconds: float) -> str:
    if not tally.latencies:
        return f"{name}: no answers, {tally.errors} errors {tally.messages}"
    ms = np.asarray(tally.latencies) * 1000
    return (
        f"{name}: {tally.frames} frames in {len(ms)} requests, {tally.frames / seconds:.1f} frames/s; latency p50 "
        f"{np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms; errors {tally.errors}"
        + (f" {tally.messages}" if tally.messages else "")
    )


async def load(args, url: str, pid: int | None) -> int:
    import httpx

    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    async with httpx.AsyncClient(timeout=30) as client:
        info = (await client.get(f"{url}/v1/model", headers=headers)).json()
    h, w = info["frame_shape"]["height"], info["frame_shape"]["width"]
    frames = make_frames(h, w)
    pngs = [png_bytes(f) for f in frames]
    clip = mp4_bytes(make_frames(h, w, args.clip_frames, seed=1))
    # one frame and one clip first, so that what follows measures the service warm
    await stream_client(url, headers, pngs[:2], 0, time.perf_counter() + 30, 2, Tally())
    if args.clip_clients:
        await clip_client(url, headers, clip, args.clip_frames, time.perf_counter() + 60, 1, Tally())
    before = rss_mb(pid)
    streams, clips = Tally(), Tally()
    start = time.perf_counter()
    end = start + args.seconds
    tasks = [stream_client(url, headers, pngs, args.fps, end, args.max_requests, streams) for _ in range(args.streams)]
    tasks += [
        clip_client(url, headers, clip, args.clip_frames, end, args.max_requests, clips)
        for _ in range(args.clip_clients)
    ]
    samples: list[float] = []

    async def sample_memory():  # every tenth of the run: growth that levels off is not a leak
        while time.perf_counter() < end:
            await asyncio.sleep(args.seconds / 10)
            value = rss_mb(pid)
            if value is not None:
                samples.append(value)

    await asyncio.wait_for(asyncio.gather(*tasks, sample_memory()), args.seconds + 180)
    seconds = time.perf_counter() - start
    after = rss_mb(pid)
    async with httpx.AsyncClient(timeout=30) as client:
        health = (await client.get(f"{url}/health")).json()
    print(
        f"{args.streams} streams at {'max' if args.fps == 0 else f'{args.fps:g}'} fps, {args.clip_clients} clip "
        f"clients ({args.clip_frames}-frame mp4), {seconds:.1f} s, frames {w}x{h}"
    )
    if args.streams:
        print(summary("streams", streams, seconds))
    if args.clip_clients:
        print(summary("clips", clips, seconds))
    print(f"all: {(streams.frames + clips.frames) / seconds:.1f} frames/s, errors {streams.errors + clips.errors}")
    print(
        f"shared model calls: {health['model_calls']} for {health['batched_frames']} stream frames "
        f"(mean batch {health['mean_batch']} streams, {health['steps_per_frame']} model steps per frame)"
    )
    if before is not None and after is not None:
        print(f"server memory (RSS): {before:.0f} MB -> {after:.0f} MB, growth {after - before:+.1f} MB")
        print("  every tenth of the run: " + " ".join(f"{v:.0f}" for v in samples) + " MB")
    return 1 if streams.errors + clips.errors else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    proc = None
    url, pid = args.url, args.server_pid
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.model_dir:
                serve_args = ["--model_dir", args.model_dir, "--log_level", "warning", *args.serve_args.split()]
                try:
                    proc, url = start_server(serve_args, Path(tmp) / "serve.log")
                except RuntimeError as e:
                    raise SystemExit(str(e)) from None
                pid = proc.pid
            return asyncio.run(load(args, url.rstrip("/"), pid))
        finally:
            if proc is not None:
                stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
