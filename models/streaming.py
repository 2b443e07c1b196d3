"""Live scoring of a stream, one frame at a time: each frame gets the score `score_frames` gives it in batch.

`score_frames` (models/live.py) scores frame t of a video with the window that `window_rows` assigns to it,
and that window depends on t alone: for t < window it starts at the video's first frame, else at
u + per_window - window with u = window + ((t - window) // per_window) * per_window, and frame t is its step
t - start. The model is causal, so running that window's frames up to t (padded with zeros after it) and
reading step t - start gives the batch prediction of frame t, whatever comes later. `StreamScorer` keeps a
stream's state (the last `window` frames, the trailing local values, an `AlarmState`), turns each frame into
one such window (`WindowRequest`), and turns the model's prediction into the calibrated score, with the
same functions as `models.calibration.apply_calibration`.

The model runs apart from the state, so that the windows of many streams share one model call:
`run_windows` scores a list of requests in one batch, and `WindowBatcher` gathers the requests of concurrent
streams (asyncio) into such batches, so that an accelerator sees a few large calls instead of many small ones.
Each frame costs `window` model steps here, against window / per_window in batch scoring: the price of
answering every frame as it comes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from models.alarms import AlarmRule, AlarmState
from models.calibration import Calibration, local_errors
from models.errors import PipelineError

SOURCES = ("model", "copy")


def window_position(t: int, window: int, per_window: int) -> tuple[int, int]:
    """(start, step): the window that scores frame t (0-based) in batch scoring starts at frame `start`,
    and frame t is its step `step` (as `models.inference.window_rows`)."""
    if t < window:
        return 0, t
    u = window + ((t - window) // per_window) * per_window
    start = u + per_window - window
    return start, t - start


@dataclass
class WindowRequest:
    """One window for the model: frames (window, h, w, c) uint8 (zeros after the scored step), fed
    (window,) 1 where the model's own prediction replaces the frame, and the step to read."""

    frames: np.ndarray
    fed: np.ndarray
    step: int


@dataclass
class FrameScore:
    """The live result of one frame; `frame` is 1-based as in batch_scoring.py's table."""

    frame: int
    score: float
    alarm: bool
    copy_score: float
    context: int

    def as_dict(self) -> dict:
        def plain(x: float) -> float | None:
            return None if not math.isfinite(x) else float(x)

        return {
            "frame": self.frame,
            "score": plain(self.score),
            "alarm": int(self.alarm),
            "copy_score": plain(self.copy_score),
        }


class StreamScorer:
    """The causal state of one stream: `prepare` a frame, run its window, `finish` with the prediction.

    Frames must come in order and be prepared and finished one at a time (`finish` before the next
    `prepare`). Frames before the calibration's first scored frame need no model run: `prepare` returns
    None and `finish(None)` gives them a score of NaN, as batch scoring does.

    Args:
        calibration: the model folder's calibration (window, per_window, horizon, norms and tails).
        rule: the alarm rule (default: the calibration's threshold).
    """

    def __init__(self, calibration: Calibration, rule: AlarmRule | None = None):
        if not calibration.window:
            raise PipelineError(
                "Streams need a windowed calibration (window > 0); this one runs whole videos as one sequence."
            )
        self.calibration = calibration
        self.rule = rule or AlarmRule(calibration.threshold)
        self.window, self.per_window, self.horizon = calibration.window, calibration.per_window, calibration.horizon
        self.first_scored = max(calibration.first_scored, 1)
        self.frames: collections.deque = collections.deque(maxlen=self.window)
        self.local = {s: collections.deque(maxlen=calibration.smooth) for s in SOURCES}
        self.alarm = AlarmState(self.rule)
        self.t = -1  # index of the last frame prepared
        self._pending: tuple[np.ndarray, int] | None = None

    def prepare(self, frame: np.ndarray) -> WindowRequest | None:
        """Takes the next frame, uint8 (h, w, c) at the model's size; returns the window the model must run
        for it, or None when the frame gets no score."""
        if self._pending is not None:
            raise PipelineError("StreamScorer.prepare called twice without finish: score frames one at a time.")
        self.t += 1
        self.frames.append(frame)
        start, step = window_position(self.t, self.window, self.per_window)
        self._pending = (frame, max(step - (self.horizon - 1), 0))
        if self.t < self.first_scored:
            return None
        frames = np.zeros((self.window, *frame.shape), np.uint8)
        frames[: step + 1] = np.stack(list(self.frames)[-(step + 1) :])
        steps = np.arange(self.window)
        fed = ((steps > step - self.horizon) & (steps < step)).astype(np.float32)
        return WindowRequest(frames, fed, step)

    def finish(self, prediction: np.ndarray | None) -> FrameScore:
        """The frame's score from the model's prediction of it ((h, w, c) in [0, 1]; None if not scored)."""
        if self._pending is None:
            raise PipelineError("StreamScorer.finish called without a prepared frame.")
        frame, context = self._pending
        self._pending = None
        c = self.calibration
        previous = self.frames[-2] if len(self.frames) > 1 else frame
        scores = {}
        for source in SOURCES:
            local = np.nan
            if prediction is not None:
                pred = prediction if source == "model" else previous.astype(np.float32) / 255.0
                errors = local_errors(frame[None], pred[None].astype(np.float32), c.cell)
                heat = c.norms[source].heat(errors, np.array([context]))
                peak = float(np.nan_to_num(heat, nan=-np.inf).max(initial=-np.inf))
                local = peak if np.isfinite(peak) else np.nan
            values = self.local[source]
            values.append(local)
            finite = [v for v in values if np.isfinite(v)]
            live = float(np.mean(finite)) if finite and np.isfinite(local) else np.nan
            scores[source] = float(c.tails[source].score(np.array([live]))[0])
        on = self.alarm.update(scores["model"])
        return FrameScore(self.t + 1, scores["model"], on, scores["copy"], context)


def run_windows(scorer, requests: Sequence[WindowRequest], pad_to: int | None = None) -> np.ndarray:
    """Runs the windows of many streams in one model call; returns each one's prediction of its step.

    Args:
        scorer: `window_scorer(layer, window, 1)` (inputs frames uint8, fed, pick; outputs a dict).
        requests: windows of the same length and frame size.
        pad_to: pad the batch to this many windows (fixed shapes: the model compiles once per size).

    Returns:
        (len(requests), h, w, c) float32 predictions in [0, 1].
    """
    n = len(requests)
    size = max(pad_to or n, n)
    window = requests[0].frames.shape[0]
    frames = np.zeros((size, *requests[0].frames.shape), np.uint8)
    fed = np.zeros((size, window), np.float32)
    pick = np.zeros((size, 1, window), np.float32)
    for i, r in enumerate(requests):
        frames[i], fed[i], pick[i, 0, r.step] = r.frames, r.fed, 1.0
    out = scorer.predict_on_batch([frames, fed, pick])
    return np.asarray(out["prediction"], np.float32)[:n, 0]


def batch_size_for(n: int, max_batch: int) -> int:
    """The padded batch size for n windows: 1, 2 or 4, then the next multiple of 4, at most `max_batch`.

    Few shapes (a backend that compiles per shape, such as JAX, compiles each once, at warm-up), and at
    most 3 padded windows: padding to powers of two cost up to half of each call (10 windows run as 16).
    """
    if n > max_batch:
        return n
    size = n if n <= 2 else -(-n // 4) * 4
    return min(size, max_batch)


def batch_sizes(max_batch: int) -> list[int]:
    """Every size `batch_size_for` gives for 1 to max_batch windows."""
    return sorted({batch_size_for(n, max_batch) for n in range(1, max_batch + 1)})


def score_stream(
    scorer, frames: np.ndarray, calibration: Calibration, rule: AlarmRule | None = None
) -> list[FrameScore]:
    """Scores frames one at a time as a stream would (a model call per frame); for tests and scripts."""
    stream = StreamScorer(calibration, rule)
    out = []
    for frame in frames:
        request = stream.prepare(frame)
        prediction = None if request is None else run_windows(scorer, [request])[0]
        out.append(stream.finish(prediction))
    return out


class WindowBatcher:
    """Gathers the windows of concurrent streams into shared model calls.

    Each `submit` waits for a batch: the worker takes the first waiting request, then those that arrive in
    the next `max_wait_ms` milliseconds (or until `max_batch`), runs them in one call on its own thread (the
    model never blocks the event loop) and answers each. While a call runs, the next batch gathers.

    Args:
        scorer: `window_scorer(layer, window, 1)`.
        max_batch: windows per model call at most.
        max_wait_ms: how long the first request of a batch waits for others.
    """

    def __init__(self, scorer, max_batch: int = 32, max_wait_ms: float = 5.0):
        self.scorer, self.max_batch, self.max_wait = scorer, max_batch, max_wait_ms / 1000.0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="window-batcher")
        self._lock = threading.Lock()
        self.calls = 0
        self.windows = 0

    def warm_up(self, request: WindowRequest) -> None:
        """Compiles the model for every padded batch size the worker can use (on the calling thread)."""
        for size in batch_sizes(self.max_batch):
            run_windows(self.scorer, [request], pad_to=size)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, request: WindowRequest) -> np.ndarray:
        """The model's prediction (h, w, c) of the request's step, from a shared call."""
        if self._queue is None:
            raise RuntimeError("WindowBatcher.start() has not run")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((request, future))
        return await future

    def _run(self, requests: list[WindowRequest]) -> np.ndarray:
        with self._lock:
            return run_windows(self.scorer, requests, batch_size_for(len(requests), self.max_batch))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            self._drain(batch)
            if len(batch) < self.max_batch and self.max_wait > 0:
                await asyncio.sleep(self.max_wait)
                self._drain(batch)
            live = [(r, f) for r, f in batch if not f.done()]  # a stream that went away cancels its future
            if not live:
                continue
            try:
                predictions = await loop.run_in_executor(self._executor, self._run, [r for r, _ in live])
            except Exception as err:  # answer every waiting stream rather than leave them hanging
                for _, f in live:
                    if not f.done():
                        f.set_exception(err)
                continue
            self.calls += 1
            self.windows += len(live)
            for (_, f), p in zip(live, predictions, strict=True):
                if not f.done():
                    f.set_result(p)

    def _drain(self, batch: list) -> None:
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    def stats(self) -> dict:
        return {
            "model_calls": self.calls,
            "windows": self.windows,
            "mean_batch": round(self.windows / self.calls, 2) if self.calls else 0.0,
        }
