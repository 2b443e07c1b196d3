"""Alarms from a live score: a causal state machine per video, the events it raises, and how they compare
with labelled anomalies (events detected, delay, false alarms per minute of normal video).

An alarm goes on at the frame where the last `min_frames` scored frames were all at or over the threshold,
and off after `gap` scored frames in a row below it, so that a dip of fewer frames does not split an event.
Each frame's state depends on that frame and earlier ones only: the same rule runs on a stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.data.index import label_ranges
from models.errors import PipelineError

DEFAULT_MIN_FRAMES = 3
DEFAULT_GAP = 5
EVENT_COLUMNS = ["video", "start_frame", "end_frame", "peak_frame", "peak_score"]


@dataclass
class AlarmRule:
    threshold: float
    min_frames: int = DEFAULT_MIN_FRAMES
    gap: int = DEFAULT_GAP

    def __post_init__(self):
        if self.min_frames < 1 or self.gap < 1:
            raise PipelineError(
                f"Alarms need min_frames and gap of 1 frame or more. Received: {self.min_frames}, {self.gap}"
            )


class AlarmState:
    """The alarm of one stream, fed one score at a time (NaN: a frame without a score, which changes nothing)."""

    def __init__(self, rule: AlarmRule):
        self.rule = rule
        self.on = False
        self.over = 0  # scored frames in a row at or over the threshold
        self.under = 0  # scored frames in a row below it

    def update(self, score: float) -> bool:
        if np.isfinite(score):
            if score >= self.rule.threshold:
                self.over, self.under = self.over + 1, 0
            else:
                self.over, self.under = 0, self.under + 1
            if not self.on and self.over >= self.rule.min_frames:
                self.on = True
            elif self.on and self.under >= self.rule.gap:
                self.on = False
        return self.on


def alarm_states(scores: np.ndarray, videos: np.ndarray, rule: AlarmRule) -> np.ndarray:
    """0/1 alarm state of each frame, a fresh `AlarmState` per video (frames of a video contiguous)."""
    out = np.zeros(len(scores), np.int8)
    state, current = None, object()
    for i, (score, video) in enumerate(zip(scores, videos, strict=True)):
        if video != current:
            state, current = AlarmState(rule), video
        out[i] = state.update(float(score))
    return out


def alarm_events(df: pd.DataFrame, score: str = "score", alarm: str = "alarm") -> pd.DataFrame:
    """One row per alarm: video, first and last frame on (1-based, inclusive), the frame and value of its
    highest score."""
    rows = []
    for video, g in df.groupby("video", sort=False):
        frames, states, scores = g["frame"].to_numpy(), g[alarm].to_numpy(), g[score].to_numpy()
        for start, end in label_ranges(states):  # 1-based positions within the video's rows
            span = slice(start - 1, end)
            peak = start - 1 + int(np.nanargmax(np.nan_to_num(scores[span], nan=-np.inf)))
            rows.append((video, int(frames[start - 1]), int(frames[end - 1]), int(frames[peak]), float(scores[peak])))
    return pd.DataFrame(rows, columns=EVENT_COLUMNS)


def event_metrics(df: pd.DataFrame, alarm: str, fps: float | Mapping[str, float]) -> dict:
    """Event-level figures of an alarm column against the labels `y`; `fps` the frame rate of every video, or
    of each (by name), for the minutes of normal video.

    Returns:
        events (labelled anomalous ranges), detected (those with an alarm on at one of their frames),
        median and mean delay in frames from an event's first frame to the first alarm frame within it, and
        false alarms (alarm events that touch no anomalous frame) per minute of normal video.
    """
    events = detected = false_alarms = 0
    delays = []
    for _, g in df.groupby("video", sort=False):
        y, on = g["y"].to_numpy(), g[alarm].to_numpy()
        for start, end in label_ranges(y):
            events += 1
            hits = np.flatnonzero(on[start - 1 : end])
            if len(hits):
                detected += 1
                delays.append(int(hits[0]))
        false_alarms += sum(1 for s, e in label_ranges(on) if not y[s - 1 : e].any())
    normal = (df["y"] == 0).groupby(df["video"], sort=False).sum()
    rates = pd.Series(fps if isinstance(fps, Mapping) else {v: fps for v in normal.index}, dtype=float)
    normal_minutes = float((normal / rates.reindex(normal.index)).sum()) / 60.0
    return {
        "events": events,
        "detected": detected,
        "median_delay_frames": float(np.median(delays)) if delays else float("nan"),
        "mean_delay_frames": float(np.mean(delays)) if delays else float("nan"),
        "false_alarms": false_alarms,
        "false_alarms_per_minute": false_alarms / normal_minutes if normal_minutes > 0 else float("nan"),
        "normal_minutes": normal_minutes,
    }
