"""How far a worker's local training is and how fast it goes, for heartbeats and views.

The training thread reports each optimizer step (:meth:`TrainingProgress.step`); the connection
thread reads :meth:`snapshot` for the heartbeat. Speed is samples gone through (epochs counted)
per second of training.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ProgressSnapshot:
    """``version`` being trained (-1: none), ``fraction`` of its steps done (0-1),
    ``samples_per_second`` of the training in hand, else of the last one (0 before any)."""

    version: int
    fraction: float
    samples_per_second: float
    steps: int
    total_steps: int


class TrainingProgress:
    """Thread-safe progress of one worker's local training."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._version = -1
        self._steps = self._total = self._samples = 0
        self._started = 0.0
        self._last_speed = 0.0

    def begin(self, version: int) -> None:
        with self._lock:
            self._version, self._steps, self._total, self._samples = version, 0, 0, 0
            self._started = self.clock()

    def step(self, steps: int, total_steps: int, samples: int) -> None:
        """``steps`` of ``total_steps`` done, ``samples`` gone through so far."""
        with self._lock:
            self._steps, self._total, self._samples = steps, total_steps, samples

    def end(self) -> float:
        """Training stopped (finished or abandoned); returns its samples per second."""
        with self._lock:
            speed = self._speed()
            if speed > 0:
                self._last_speed = speed
            self._version, self._steps, self._total = -1, 0, 0
            return speed

    def _speed(self) -> float:
        elapsed = self.clock() - self._started
        return self._samples / elapsed if self._samples and elapsed > 0 else 0.0

    def snapshot(self) -> ProgressSnapshot:
        with self._lock:
            fraction = min(1.0, self._steps / self._total) if self._total else 0.0
            speed = self._speed() if self._version >= 0 else 0.0
            return ProgressSnapshot(self._version, fraction, speed or self._last_speed, self._steps, self._total)
