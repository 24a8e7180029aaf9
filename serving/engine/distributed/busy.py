"""Busy time of a rank: seconds spent computing, and the busy fraction over a recent window."""

from __future__ import annotations

import time
from collections import deque

WINDOW_S = 10.0
"""serving_pipeline_stage_busy_fraction covers about this many recent seconds."""


class BusyMeter:
    """Accumulates compute seconds; fraction() = busy share of the wall time over the last WINDOW_S."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.count = 0
        self._samples: deque[tuple[float, float]] = deque([(time.monotonic(), 0.0)])

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.count += 1

    def set_total(self, seconds: float, count: int) -> None:
        """For a remote rank: its totals as last reported."""
        self.seconds, self.count = seconds, count

    def fraction(self) -> float:
        now = time.monotonic()
        self._samples.append((now, self.seconds))
        while len(self._samples) > 2 and now - self._samples[1][0] >= WINDOW_S:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        return 0.0 if now <= t0 else min(1.0, (self.seconds - b0) / (now - t0))
