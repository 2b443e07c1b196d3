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
answering every frame as it comes without keeping the model's state.

`StaggeredStates` keeps it instead: the same predictions for one model step per window alive, about
window / per_window steps per frame (two with the default half-window), as batch scoring; `score_stream`
uses it with `stateful=True`. The service still sends windows (`WindowBatcher` shares model calls between
streams, whose states would have to travel with them).
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
    scorer, frames: np.ndarray, calibration: Calibration, rule: AlarmRule | None = None, stateful: bool = False
) -> list[FrameScore]:
    """Scores frames one at a time as a stream would (a model call per frame); for tests and scripts.

    Args:
        scorer: `window_scorer(layer, window, 1)`, or with `stateful` the trained PredNet layer (or a model
            holding it), run by `StaggeredStates`.
    """
    stream = StreamScorer(calibration, rule)
    states = StaggeredStates(scorer, stream.window, stream.per_window, stream.horizon) if stateful else None
    out = []
    for frame in frames:
        request = stream.prepare(frame)
        if states is not None:
            prediction = states.push(frame)[0]  # every frame moves the states on, scored or not
        else:
            prediction = None if request is None else run_windows(scorer, [request])[0]
        out.append(stream.finish(None if request is None else prediction))
    return out


class StaggeredStates:
    """The model's states for one stream, so that each frame costs one model step per window alive.

    Batch scoring (`models.inference.window_rows`) runs windows of `window` (W) frames, each from the zero
    state, and reads the last `per_window` (P) steps of each: the first window starts at the video's first
    frame and scores frames 0 to W - 1, and the window starting at frame s = kP (k >= 1) scores frames
    s + W - P to s + W - 1. So a window starts every P frames and lives W frames: at most K = ceil(W / P)
    are alive at once. This keeps K states, slot k % K holding the window that starts at frame kP; each
    frame resets the slot whose window starts there, moves all K states one step in one model call (batch
    K), and reads the prediction of the frame from the slot of the window that scores it
    (`window_position`). That window has then seen exactly the frames the batch window holds up to the
    frame, from the same zero state, so the prediction is the batch one (to float rounding): K steps per
    frame, 2 for the default P = W / 2, against W for a window per frame. With horizon H > 1 (P = 1) every
    frame has its own window (the first W all from frame 0), fed its own predictions at the H - 1 steps
    before the scored one, as in batch scoring: W states, W steps per frame.

    Args:
        trained: the trained PredNet layer, or a model holding it (its weights are read at every frame,
            so it follows them).
        window, per_window, horizon: the calibration's.
    """

    def __init__(self, trained, window: int, per_window: int = 1, horizon: int = 1):
        from models.prednet import PredNet, find_prednet

        if not window or per_window < 1 or (horizon > 1 and per_window != 1):
            raise PipelineError(
                f"Staggered states need windows (window > 0), per_window >= 1, and per_window 1 with horizon > 1. "
                f"Received: window {window}, per_window {per_window}, horizon {horizon}"
            )
        self.layer = trained if isinstance(trained, PredNet) else find_prednet(trained)
        self.window, self.per_window, self.horizon = window, per_window, horizon
        # Horizon 1: slot k % K holds the window starting at frame kP. Horizon > 1 (P = 1): each frame f has
        # its own row, from frame 0 for f < W (they differ in the steps fed), else from f - W + 1: slot f % W.
        self.slots = -(-window // per_window) if horizon == 1 else window
        self.starts = np.full(self.slots, -(10**9))  # each slot's first frame and the frame of its last step
        self.lasts = np.full(self.slots, -(10**9))
        self.state = self.layer.initial_state(self.slots)
        self.t = -1
        self._step = _compiled_step(self.layer)

    def push(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Takes the next frame (h, w, c) uint8; returns the model's prediction of it ((h, w, c) float32 in
        [0, 1], from the frames before it in the window that scores it) and that step's layer errors."""
        self.t += 1
        t, window, per_window = self.t, self.window, self.per_window
        reset = np.zeros(self.slots, np.float32)
        if self.horizon == 1:
            if t % per_window == 0:  # a window starts here (the first at frame 0)
                slot = (t // per_window) % self.slots
                reset[slot], self.starts[slot], self.lasts[slot] = 1.0, t, t + window - 1
            scoring = (window_position(t, window, per_window)[0] // per_window) % self.slots
        else:
            rows = range(window) if t == 0 else [t + window - 1]  # the rows that start at frame t
            for f in rows:
                reset[f % window], self.starts[f % window], self.lasts[f % window] = 1.0, t, f
            scoring = t % window
        # The frames after last - horizon and before last are replaced by the model's prediction.
        fed = ((t > self.lasts - self.horizon) & (t < self.lasts)).astype(np.float32)
        self.state, prediction, error = self._step(
            self.layer.step_params(), self.state, frame, fed, reset, np.int32(scoring)
        )
        return np.asarray(prediction, np.float32), np.asarray(error, np.float32)


def _compiled_step(layer):
    """One compiled step of `layer` over a batch of states: (params, state, frame (h, w, c) uint8 for every
    state, fed (states,), reset (states,) 1 to start that state over, slot) -> (state, the slot's prediction
    (h, w, c) float32, its layer errors). The weights are an argument, never a constant of the trace."""
    import keras
    from keras import ops

    def step(params, state, frame, fed, reset, slot):
        keep = ops.cast(1 - reset, layer.compute_dtype)
        r, c, e, t = state

        def kept(xs):
            return [x * ops.reshape(keep, (-1, 1, 1, 1)) for x in xs]

        state = (kept(r), kept(c), kept(e), t)
        n = ops.shape(keep)[0]
        x = ops.cast(ops.broadcast_to(frame[None], (n, *frame.shape)), layer.compute_dtype) / 255.0
        state, out = layer.step(state, (x, ops.cast(fed, layer.compute_dtype)), params, "all", None)
        prediction = ops.cast(ops.take(out["prediction"], slot, axis=0), "float32")
        return state, prediction, ops.take(out["error"], slot, axis=0)

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(step)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(step, reduce_retracing=True)
    return step


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
