"""One typed stream of what happens in a federation, and the bus that carries it to its sinks.

The aggregator and the workers emit these events where things happen; the sinks turn them into
``metrics.jsonl`` (:mod:`fedmq.metrics_file`), Prometheus metrics
(:mod:`fedmq.prometheus_metrics`), the live view and ``fedmq status``
(:mod:`fedmq.federation_state`) and, at DEBUG level, one log record per event
(:mod:`fedmq.event_log`; ``--log-format json`` makes that one JSON object per event). Benchmarks
and tests read the events instead of scraping log wording.

Times are seconds: ``at`` on the emitter's monotonic clock, durations as they were measured.
Bytes are wire bytes (all chunks together).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Union

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionOpened:
    """Model ``version`` was broadcast: ``expected`` updates are awaited from ``live_workers``."""

    run_id: str
    version: int
    expected: int
    live_workers: int
    bytes_down: int
    at: float
    deadline_s: float


@dataclass(frozen=True)
class UpdateFolded:
    """A worker's update was folded into ``version``: ``folded`` of ``expected`` are in."""

    run_id: str
    version: int
    worker_id: str
    folded: int
    expected: int
    num_samples: int
    train_loss: float
    train_seconds: float
    size: int
    at: float


#: Why an update is not folded without being invalid (it is acknowledged and counted).
DROPPED_REASONS = ("stale", "unselected", "duplicate", "too-stale")


@dataclass(frozen=True)
class UpdateRefused:
    """A message on the update or control queue was not folded: ``reason`` is one of
    :data:`DROPPED_REASONS` (acknowledged and dropped) or, with ``dead_lettered``, the
    dead-letter reason (``malformed``, ``schema``, ``wrong-run``, ``non-finite``...)."""

    run_id: str
    version: int
    worker_id: str
    reason: str
    dead_lettered: bool
    size: int


@dataclass(frozen=True)
class WorkerJoined:
    run_id: str
    worker_id: str
    device: str
    partition: int
    live_workers: int


@dataclass(frozen=True)
class WorkerLeft:
    """A worker said goodbye (``reason``: leaving, refused or failed)."""

    run_id: str
    worker_id: str
    reason: str
    detail: str
    live_workers: int


@dataclass(frozen=True)
class WorkerPresumedDead:
    """A worker stayed silent for over ``timeout_s`` seconds."""

    run_id: str
    worker_id: str
    timeout_s: float
    live_workers: int


@dataclass(frozen=True)
class WorkerProgress:
    """A heartbeat: the worker's state, the last version it trained, how far its current local
    training is (``progress`` 0-1) and its training speed (samples per second, 0 before any)."""

    run_id: str
    worker_id: str
    state: str
    version: int
    partition: int
    device: str
    progress: float
    samples_per_second: float
    at: float


@dataclass(frozen=True)
class VersionClosed:
    """Model ``version`` was made and its line of ``metrics.jsonl`` released: these are that line's
    fields (:class:`aggregator.rounds.VersionRecord` adds only methods), so the file is written from
    this event. ``test_*`` are on the aggregator's test set (None with ``--eval-data none``),
    ``federated_*`` the sample-weighted score of the workers' held-out rows (None when no worker
    scored it), ``federated_samples`` and ``federated_workers`` what that score stands on."""

    run_id: str
    version: int
    participants: int
    expected: int
    test_accuracy: float | None
    test_loss: float | None
    train_loss: float
    bytes_up: int
    bytes_down: int
    seconds: float
    live_workers: int
    stale: int
    duplicates: int
    dead_lettered: int
    rebroadcasts: int
    refused_steps: int = 0  # aggregates of this version refused as not finite before this one
    federated_accuracy: float | None = None
    federated_loss: float | None = None
    federated_samples: int = 0
    federated_workers: int = 0
    clipped_updates: int = 0  # updates whose norm was above --clip-norm
    dp_epsilon: float | None = None  # privacy spent so far at dp_delta (None: no DP)
    dp_noise_std: float | None = None  # of the noise added to this version's mean delta
    defences: dict[str, Any] = field(default_factory=dict)  # the run's choices (Defences.describe)
    #: bytes_up (bytes_down) over what the same messages take with raw float32 tensors (the
    #: model's size per message): 1.0 with fp32, about 0.25 with int8; None when none was sent.
    bytes_up_ratio: float | None = None
    bytes_down_ratio: float | None = None
    mode: str = "sync"  # --mode
    server_optimizer: str = "fedavg"  # --server-optimizer
    #: Staleness (versions since an update's base version) of the updates folded into this version.
    staleness_min: int | None = None
    staleness_mean: float | None = None
    staleness_max: int | None = None
    too_stale: int = 0  # updates acknowledged and not folded: older than --max-staleness
    #: Fields of the line this class does not name (added to the record later): kept, in order.
    extra: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_line(cls, line: dict[str, Any]) -> "VersionClosed":
        """The event of a ``metrics.jsonl`` line (:meth:`VersionRecord.to_json`)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in line.items() if k in known},
                   extra=tuple((k, v) for k, v in line.items() if k not in known))

    def line(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` line: every field."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class RunFinished:
    run_id: str
    version: int


@dataclass(frozen=True)
class TrainingFinished:
    """A worker trained ``version`` on its ``num_samples`` samples: ``steps`` optimizer steps in
    ``seconds``, ``samples_per_second`` the samples it went through (epochs counted) per second."""

    run_id: str
    worker_id: str
    version: int
    num_samples: int
    steps: int
    seconds: float
    train_loss: float
    samples_per_second: float


@dataclass(frozen=True)
class UpdateSent:
    """A worker's update for ``version`` was confirmed by the broker (``size`` wire bytes)."""

    run_id: str
    worker_id: str
    version: int
    size: int


Event = Union[VersionOpened, UpdateFolded, UpdateRefused, WorkerJoined, WorkerLeft, WorkerPresumedDead,
              WorkerProgress, VersionClosed, RunFinished, TrainingFinished, UpdateSent]
Sink = Callable[[Event], None]


def event_fields(event: Event) -> dict[str, Any]:
    """An event's fields by name (a version's line in full, the fields it does not name too)."""
    if isinstance(event, VersionClosed):
        return event.line()
    return {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}


def event_name(event: Event) -> str:
    """``version-closed`` for :class:`VersionClosed`: the name logs and JSON use."""
    name = type(event).__name__
    return "".join("-" + c.lower() if c.isupper() else c for c in name).lstrip("-")


class EventBus:
    """Hands each event to every sink, in the order they were added, on the emitter's thread.

    A sink that raises stops the emitter (``metrics.jsonl`` failing to be written must not pass
    unnoticed); display sinks (live view, Prometheus) do not raise. Sinks may be added from any
    thread.
    """

    def __init__(self, *sinks: Sink) -> None:
        self._sinks: list[Sink] = list(sinks)
        self._lock = threading.Lock()

    def add(self, sink: Sink) -> Sink:
        with self._lock:
            self._sinks.append(sink)
        return sink

    def remove(self, sink: Sink) -> None:
        with self._lock:
            if sink in self._sinks:
                self._sinks.remove(sink)

    def emit(self, event: Event) -> None:
        with self._lock:
            sinks = tuple(self._sinks)
        for sink in sinks:
            sink(event)


class EventRecorder:
    """A sink keeping every event (tests and benchmarks read ``events``)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, kind: type) -> list:
        with self._lock:
            return [e for e in self.events if isinstance(e, kind)]
