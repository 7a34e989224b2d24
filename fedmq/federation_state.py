"""What the live view and ``fedmq status`` show: the federation as its events describe it.

:class:`FederationState` is a sink of the aggregator's events; any thread may take a
:meth:`~FederationState.snapshot` (the live view's refresh thread, the status answer). Times
are the aggregator's monotonic seconds; ``elapsed_s`` and ``estimate_s`` are durations.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Callable

from fedmq.events import (Event, RunFinished, UpdateFolded, UpdateRefused, VersionClosed, VersionOpened,
                          WorkerJoined, WorkerLeft, WorkerPresumedDead, WorkerProgress)
from fedmq.status_messages import WorkerStatus


@dataclass(frozen=True)
class FederationSnapshot:
    """The federation at one moment.

    ``open_version`` is the version being trained (-1: none open), with ``folded`` of
    ``expected`` updates in for ``elapsed_s`` seconds; ``estimate_s`` the seconds it may still
    take (the mean of the versions closed so far, less the elapsed time; -1 before any closed).
    ``version`` is the newest model made; ``last`` its line (None before the first).
    """

    run_id: str
    versions: int
    version: int
    open_version: int
    expected: int
    folded: int
    elapsed_s: float
    estimate_s: float
    last: VersionClosed | None
    workers: tuple[WorkerStatus, ...]  # as ``fedmq status`` receives them
    dead_letters: int
    dropped: int
    bytes_up: int
    bytes_down: int
    finished: bool


class FederationState:
    """The sink keeping a :class:`FederationSnapshot` up to date; ``versions`` is the run's
    ``--versions`` (for the progress of the whole run)."""

    def __init__(self, run_id: str, versions: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.run_id, self.versions, self.clock = run_id, versions, clock
        self._lock = threading.Lock()
        self._version = 0
        self._open, self._expected, self._folded, self._opened_at = -1, 0, 0, 0.0
        self._last: VersionClosed | None = None
        self._seconds: list[float] = []
        self._workers: dict[str, WorkerStatus] = {}
        self._heard: dict[str, float] = {}
        self._dead_letters = self._dropped = self._bytes_up = self._bytes_down = 0
        self._finished = False

    def __call__(self, event: Event) -> None:
        with self._lock:
            if not self.run_id:  # the embedded mode names its run once it starts
                self.run_id = getattr(event, "run_id", "")
            self._apply(event)

    def _apply(self, event: Event) -> None:  # noqa: C901 - one branch per event kind
        if isinstance(event, VersionOpened):
            self._open, self._expected, self._folded, self._opened_at = (event.version, event.expected, 0,
                                                                          self.clock())
        elif isinstance(event, UpdateFolded):
            if event.version == self._open:
                self._folded, self._expected = event.folded, max(self._expected, event.expected)
        elif isinstance(event, UpdateRefused):
            if event.dead_lettered:
                self._dead_letters += 1
            else:
                self._dropped += 1
        elif isinstance(event, VersionClosed):
            self._closed(event)
        elif isinstance(event, WorkerJoined):
            self._worker(event.worker_id, device=event.device, partition=event.partition)
        elif isinstance(event, (WorkerLeft, WorkerPresumedDead)):
            self._workers.pop(event.worker_id, None)
            self._heard.pop(event.worker_id, None)
        elif isinstance(event, WorkerProgress):
            self._worker(event.worker_id, state=event.state, device=event.device, partition=event.partition,
                         version=event.version, progress=event.progress, samples_per_second=event.samples_per_second)
        elif isinstance(event, RunFinished):
            self._finished, self._open = True, -1

    def _closed(self, event: VersionClosed) -> None:
        self._version = max(self._version, event.version)
        self._last = event
        self._seconds.append(event.seconds)
        self._bytes_up += event.bytes_up
        self._bytes_down += event.bytes_down
        if event.version > self._open:  # the open round made it; the next is not broadcast yet
            self._open, self._expected, self._folded = -1, 0, 0

    def _worker(self, worker_id: str, **changes) -> None:
        view = self._workers.get(worker_id) or WorkerStatus(worker_id, "joining", "", -1, -1, 0.0, 0.0, 0.0)
        if not changes.get("device"):
            changes.pop("device", None)
        if changes.get("samples_per_second") == 0.0:
            changes.pop("samples_per_second")  # keep the last speed known
        self._workers[worker_id] = dataclasses.replace(view, **changes)
        self._heard[worker_id] = self.clock()

    def snapshot(self) -> FederationSnapshot:
        with self._lock:
            now = self.clock()
            elapsed = now - self._opened_at if self._open >= 0 else 0.0
            mean = sum(self._seconds) / len(self._seconds) if self._seconds else -1.0
            estimate = max(0.0, mean - elapsed) if mean >= 0 and self._open >= 0 else -1.0
            workers = tuple(dataclasses.replace(view, silent_s=max(0.0, now - self._heard[w]))
                            for w, view in sorted(self._workers.items()))
            return FederationSnapshot(self.run_id, self.versions, self._version, self._open, self._expected,
                                      self._folded, elapsed, estimate, self._last, workers, self._dead_letters,
                                      self._dropped, self._bytes_up, self._bytes_down, self._finished)
