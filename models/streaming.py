"""Live scoring of a stream, one frame at a time: each frame gets the score `score_frames` gives it in batch.

`score_frames` (models/live.py) scores frame t of a video with the window that `window_rows` assigns to it,
and that window depends on t alone: for t < window it starts at the video's first frame, else at
u + per_window - window with u = window + ((t - window) // per_window) * per_window, and frame t is its step
t - start (`window_position`). The model is causal, so a run of that window's frames up to t gives the batch
prediction of frame t, whatever comes later.

A stream keeps the model's states of the windows alive at its last frame (`StreamState`: about
window / per_window of them, two with the default half-window) rather than the frames: each new frame moves
them all one step and the window that scores the frame gives its prediction, so a frame costs two model
steps, as in batch scoring, against a whole window's for a window per frame. `StateStepper` runs that step
for the states of many streams in one model call; `StateBatcher` gathers the frames of concurrent streams
(asyncio) into such calls, so that an accelerator sees a few large calls rather than many small ones.
`StreamScorer` turns each prediction into the calibrated score and the alarm, with the same functions as
`models.calibration.apply_calibration`. `StaggeredStates` and `score_stream` are one stream, frame by frame.
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
    """The calibrated score of one stream: `prepare` a frame, have the model predict it, `finish`.

    Frames must come in order and be prepared and finished one at a time (`finish` before the next
    `prepare`). Frames before the calibration's first scored frame get a score of NaN, as in batch scoring:
    `prepare` returns False for them and `finish(None)` scores them.

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
        self.frames: collections.deque = collections.deque(maxlen=2)  # the copy baseline's previous frame
        self.local = {s: collections.deque(maxlen=calibration.smooth) for s in SOURCES}
        self.alarm = AlarmState(self.rule)
        self.t = -1  # index of the last frame prepared
        self._pending: tuple[np.ndarray, int] | None = None

    def prepare(self, frame: np.ndarray) -> bool:
        """Takes the next frame, uint8 (h, w, c) at the model's size; returns whether it gets a score (the
        model's prediction of it is then needed)."""
        if self._pending is not None:
            raise PipelineError("StreamScorer.prepare called twice without finish: score frames one at a time.")
        self.t += 1
        self.frames.append(frame)
        step = window_position(self.t, self.window, self.per_window)[1]
        self._pending = (frame, max(step - (self.horizon - 1), 0))
        return self.t >= self.first_scored

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
            scores[source] = float(c.tails[source].score(np.array([live]), np.array([len(finite)]))[0])
        on = self.alarm.update(scores["model"])
        return FrameScore(self.t + 1, scores["model"], on, scores["copy"], context)


class StreamState:
    """The model's states of one stream: the windows alive at its last frame, in K slots.

    Batch scoring (`models.inference.window_rows`) runs windows of `window` (W) frames, each from the zero
    state, and reads the last `per_window` (P) steps of each: the first window starts at the video's first
    frame and scores frames 0 to W - 1, and the window starting at frame s = kP (k >= 1) scores frames
    s + W - P to s + W - 1. So a window starts every P frames and lives W frames: at most K = ceil(W / P)
    are alive at once, slot k % K holding the window that starts at frame kP. Each frame resets the slot
    whose window starts there, moves all K states one step, and reads the prediction of the frame from the
    slot of the window that scores it (`window_position`). That window has then seen exactly the frames the
    batch window holds up to the frame, from the same zero state, so the prediction is the batch one (to
    float rounding). With horizon H > 1 (P = 1) every frame has its own window (the first W all from frame
    0), fed its own predictions at the H - 1 steps before the scored one, as in batch scoring: W slots.

    `advance` does the bookkeeping of the next frame; `StateStepper` runs the model and keeps `state`.
    """

    def __init__(self, window: int, per_window: int, horizon: int, state):
        self.window, self.per_window, self.horizon = window, per_window, horizon
        self.slots = slots_for(window, per_window, horizon)
        self.lasts = np.full(self.slots, -(10**9))  # the frame of each slot's last step
        self.state = state
        self.t = -1

    def advance(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The next frame's (reset (K,): 1 where a window starts, fed (K,): 1 where the model's prediction
        replaces the frame, the slot that scores it)."""
        self.t += 1
        t, window, per_window = self.t, self.window, self.per_window
        reset = np.zeros(self.slots, np.float32)
        if self.horizon == 1:
            if t % per_window == 0:  # a window starts here (the first at frame 0)
                slot = (t // per_window) % self.slots
                reset[slot], self.lasts[slot] = 1.0, t + window - 1
            scoring = (window_position(t, window, per_window)[0] // per_window) % self.slots
        else:
            rows = range(window) if t == 0 else [t + window - 1]  # the rows that start at frame t
            for f in rows:
                reset[f % window], self.lasts[f % window] = 1.0, f
            scoring = t % window
        # The frames after last - horizon and before last are replaced by the model's prediction.
        fed = ((t > self.lasts - self.horizon) & (t < self.lasts)).astype(np.float32)
        return reset, fed, scoring


def slots_for(window: int, per_window: int, horizon: int) -> int:
    """Model states a stream keeps, and so model steps per frame: ceil(window / per_window), or window with
    horizon > 1."""
    return -(-window // per_window) if horizon == 1 else window


class StateStepper:
    """Moves the states of any number of streams one frame on, in one model call.

    Args:
        trained: the trained PredNet layer, or a model holding it (its weights are read at every call, so
            it follows them).
        window, per_window, horizon: the calibration's.

    Raises:
        PipelineError: no windows, per_window < 1, or horizon > 1 with per_window > 1.
    """

    def __init__(self, trained, window: int, per_window: int = 1, horizon: int = 1):
        from models.prednet import PredNet, find_prednet

        if not window or per_window < 1 or (horizon > 1 and per_window != 1):
            raise PipelineError(
                f"Stream states need windows (window > 0), per_window >= 1, and per_window 1 with horizon > 1. "
                f"Received: window {window}, per_window {per_window}, horizon {horizon}"
            )
        self.layer = trained if isinstance(trained, PredNet) else find_prednet(trained)
        self.window, self.per_window, self.horizon = window, per_window, horizon
        self.slots = slots_for(window, per_window, horizon)
        self._step = _compiled_step(self.layer, self.slots)
        self._padding = None  # the zero states that pad calls to a fixed number of streams (never moved on)

    def new_stream(self) -> StreamState:
        """The states of a new stream, before its first frame."""
        return StreamState(self.window, self.per_window, self.horizon, self.layer.initial_state(self.slots))

    def step(
        self, streams: Sequence[StreamState], frames: Sequence[np.ndarray], pad_to: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Moves each stream on by its next frame (uint8 (h, w, c)), all in one call.

        Args:
            streams: distinct streams (each advanced once).
            frames: their next frames.
            pad_to: run this many streams at least (the model compiles once per number of streams).

        Returns:
            predictions (n, h, w, c) float32 in [0, 1] of each frame, from the frames before it in the
            window that scores it, and that step's layer errors (n, layers).
        """
        n = len(streams)
        picks = [stream.advance() for stream in streams]
        states = [stream.state for stream in streams]
        frames = list(frames)
        if pad_to and pad_to > n:
            if self._padding is None:
                self._padding = self.layer.initial_state(self.slots)
            zeros = np.zeros(self.slots, np.float32)
            states += [self._padding] * (pad_to - n)
            frames += [np.zeros_like(frames[0])] * (pad_to - n)
            picks += [(zeros, zeros, 0)] * (pad_to - n)
        reset, fed, slot = (np.stack([p[i] for p in picks]) for i in range(3))
        new_states, prediction, error = self._step(
            self.layer.step_params(), states, np.stack(frames), fed, reset, slot.astype(np.int32)
        )
        for stream, state in zip(streams, new_states, strict=False):
            stream.state = state
        return np.asarray(prediction, np.float32)[:n], np.asarray(error, np.float32)[:n]


class StaggeredStates:
    """One stream's states and their stepper: `push` each frame, get the model's prediction of it.

    Args:
        trained, window, per_window, horizon: as `StateStepper`.
    """

    def __init__(self, trained, window: int, per_window: int = 1, horizon: int = 1):
        self.stepper = StateStepper(trained, window, per_window, horizon)
        self.stream = self.stepper.new_stream()
        self.slots = self.stepper.slots

    def push(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Takes the next frame (h, w, c) uint8; returns the model's prediction of it ((h, w, c) float32 in
        [0, 1]) and that step's layer errors."""
        prediction, error = self.stepper.step([self.stream], [frame])
        return prediction[0], error[0]


def score_stream(
    trained, frames: np.ndarray, calibration: Calibration, rule: AlarmRule | None = None
) -> list[FrameScore]:
    """Scores frames one at a time as a stream would (a model call per frame); for tests and scripts.

    Args:
        trained: the trained PredNet layer, or a model holding it.
    """
    scorer = StreamScorer(calibration, rule)
    states = StaggeredStates(trained, scorer.window, scorer.per_window, scorer.horizon)
    out = []
    for frame in frames:
        scored = scorer.prepare(frame)
        prediction = states.push(frame)[0]  # every frame moves the states on, scored or not
        out.append(scorer.finish(prediction if scored else None))
    return out


def _compiled_step(layer, slots: int):
    """One compiled step of `layer` for n streams of `slots` states each: (params, states (n state tuples
    of batch `slots`), frames (n, h, w, c) uint8, fed (n, slots), reset (n, slots) 1 to start that state
    over, slot (n,)) -> (the n new states, each stream's prediction from its slot (n, h, w, c) float32, and
    its layer errors). The weights are an argument, never a constant of the trace."""
    import keras
    from keras import ops

    def step(params, states, frames, fed, reset, slot):
        n = len(states)
        keep = ops.reshape(ops.cast(1 - ops.reshape(reset, (-1,)), layer.compute_dtype), (-1, 1, 1, 1))

        def joined(i):  # component i (r, c or e) of all streams, one batch of n * slots
            return [ops.concatenate([s[i][l] for s in states], axis=0) * keep for l in range(len(states[0][i]))]

        x = ops.cast(ops.repeat(frames, slots, axis=0), layer.compute_dtype) / 255.0
        fed = ops.cast(ops.reshape(fed, (-1,)), layer.compute_dtype)
        state, out = layer.step((joined(0), joined(1), joined(2), states[0][3]), (x, fed), params, "all", None)
        r, c, e, t = state
        rows = ops.arange(n) * slots + ops.cast(slot, "int32")
        prediction = ops.cast(ops.take(out["prediction"], rows, axis=0), "float32")
        error = ops.take(out["error"], rows, axis=0)

        def part(xs, k):
            return [x[k * slots : (k + 1) * slots] for x in xs]

        new_states = [(part(r, k), part(c, k), part(e, k), t) for k in range(n)]
        return new_states, prediction, error

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(step)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(step, reduce_retracing=True, autograph=False)  # no temporary files of converted code
    return step


def batch_size_for(n: int, max_batch: int) -> int:
    """The padded number of streams for a call of n: 1, 2 or 4, then the next multiple of 4, at most
    `max_batch`.

    Few shapes (a backend that compiles per shape, such as JAX, compiles each once, at warm-up), and at
    most 3 padded streams: padding to powers of two cost up to half of each call (10 streams run as 16).
    """
    if n > max_batch:
        return n
    size = n if n <= 2 else -(-n // 4) * 4
    return min(size, max_batch)


def batch_sizes(max_batch: int) -> list[int]:
    """Every size `batch_size_for` gives for 1 to max_batch streams."""
    return sorted({batch_size_for(n, max_batch) for n in range(1, max_batch + 1)})


class StateBatcher:
    """Gathers the frames of concurrent streams into shared model calls.

    Each `submit` waits for a batch: the worker takes the first waiting frame, then those that arrive in
    the next `max_wait_ms` milliseconds (or until `max_batch`), moves their streams' states on in one call
    (`StateStepper.step`) on its own thread (the model never blocks the event loop) and answers each. While
    a call runs, the next batch gathers. A stream has at most one frame waiting (it sends the next after the
    answer): `submit` refuses a second.

    Args:
        stepper: the `StateStepper` of the model and calibration.
        max_batch: streams per model call at most.
        max_wait_ms: how long the first frame of a batch waits for others.
    """

    def __init__(self, stepper: StateStepper, max_batch: int = 32, max_wait_ms: float = 5.0):
        self.stepper, self.max_batch, self.max_wait = stepper, max_batch, max_wait_ms / 1000.0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-batcher")
        self._lock = threading.Lock()
        self._waiting: set[int] = set()  # the streams (ids) with a frame waiting
        self.calls = 0
        self.frames = 0

    def warm_up(self, frame: np.ndarray) -> None:
        """Compiles the model for every padded number of streams the worker can use (on the calling thread)."""
        for size in batch_sizes(self.max_batch):
            self.stepper.step([self.stepper.new_stream()], [frame], pad_to=size)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, stream: StreamState, frame: np.ndarray) -> np.ndarray:
        """Moves `stream` on by `frame` in a shared call; returns the model's prediction (h, w, c) of it."""
        if self._queue is None:
            raise RuntimeError("StateBatcher.start() has not run")
        if id(stream) in self._waiting:
            raise PipelineError("A stream sent a frame before the answer to its last one: send them one at a time.")
        self._waiting.add(id(stream))
        try:
            future = asyncio.get_running_loop().create_future()
            await self._queue.put((stream, frame, future))
            return await future
        finally:
            self._waiting.discard(id(stream))

    def _run(self, streams: list[StreamState], frames: list[np.ndarray]) -> np.ndarray:
        with self._lock:
            return self.stepper.step(streams, frames, batch_size_for(len(streams), self.max_batch))[0]

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            self._drain(batch)
            if len(batch) < self.max_batch and self.max_wait > 0:
                await asyncio.sleep(self.max_wait)
                self._drain(batch)
            # A stream gone away has cancelled its future; its states need not move on.
            live = [(s, x, f) for s, x, f in batch if not f.done()]
            if not live:
                continue
            streams, frames = [s for s, _, _ in live], [x for _, x, _ in live]
            try:
                predictions = await loop.run_in_executor(self._executor, self._run, streams, frames)
            except Exception as err:  # answer every waiting stream rather than leave them hanging
                for _, _, f in live:
                    if not f.done():
                        f.set_exception(err)
                continue
            self.calls += 1
            self.frames += len(live)
            for (_, _, f), p in zip(live, predictions, strict=True):
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
            "batched_frames": self.frames,
            "mean_batch": round(self.frames / self.calls, 2) if self.calls else 0.0,
            "steps_per_frame": self.stepper.slots,
        }
