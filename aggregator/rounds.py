"""One model version in the making, and the line of metrics it closes with."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Hashable

from aggregator.pipeline import Combiner
from fedmq.broker.base import Delivery
from fedmq.events import VersionClosed


@dataclass
class OpenRound:
    """Model version ``version``: updates for it are folded into ``combiner`` (see
    :mod:`aggregator.pipeline`) as they arrive.

    The round exists from the moment the aggregator holds ``version``, before its broadcast
    (``broadcast`` is None until then): updates redelivered after a restart are folded at once
    instead of being turned away. ``expected`` are the workers the quorum counts on (selected and
    live at broadcast time); ``held`` the deliveries (without their bodies) of the newest copy of
    every folded update, acknowledged only once the next checkpoint is written.
    """

    version: int
    combiner: Combiner
    selected: tuple[str, ...] = ()  # what the broadcast names; () means every worker may train
    expected: set[str] = field(default_factory=set)
    started: float = 0.0
    deadline: float = float("inf")
    broadcast: bytes | None = None  # the last encoded ModelBroadcast of this version (None: not sent yet)
    attempt: int = 0  # of the current broadcast (see ModelBroadcast)
    awaited: tuple[str, ...] = ()  # of the current broadcast (see ModelBroadcast)
    folded: set[str] = field(default_factory=set)  # workers with an update folded
    #: (run id, base version, worker) of every folded update: in async mode one worker may have
    #: updates of several base versions in one version.
    folded_keys: set[tuple[str, int, str]] = field(default_factory=set)
    held: dict[Hashable, tuple[Delivery, ...]] = field(default_factory=dict)  # update key -> its newest copy
    staleness: list[int] = field(default_factory=list)  # of each folded update, in versions
    too_stale: int = 0  # updates dropped as older than --max-staleness (async mode)
    weighted_train_loss: float = 0.0  # sum of train_loss * num_samples over the folded updates
    train_samples: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    copies_up: int = 0  # update messages counted in bytes_up
    copies_down: int = 0  # model messages counted in bytes_down (one per inbox reached)
    stale: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    rebroadcasts: int = 0

    @property
    def is_open(self) -> bool:
        """True once the version has been broadcast by this aggregator."""
        return self.broadcast is not None

    def hold(self, key: Hashable, deliveries: tuple[Delivery, ...]) -> tuple[Delivery, ...]:
        """Keep what acknowledging these deliveries needs (not their bodies) until the checkpoint;
        returns the deliveries of an older copy of the same update, which the caller acknowledges
        now: one unacknowledged copy in the broker is enough to lose nothing, and after a
        reconnection the older tags are void anyway (acking them does nothing)."""
        older = self.held.get(key, ())
        self.held[key] = tuple(dataclasses.replace(d, body=b"") for d in deliveries)
        return older

    def held_deliveries(self) -> list[Delivery]:
        return [d for copy in self.held.values() for d in copy]


@dataclass(frozen=True)
class VersionRecord(VersionClosed):
    """One line of ``metrics.jsonl`` and of the console (the fields are those of the
    :class:`~fedmq.events.VersionClosed` event the line is released as), with what the aggregator
    reads off a line: its accuracy and its console form."""

    @property
    def accuracy(self) -> float | None:
        """The version's accuracy: on the test set when the aggregator has one, else federated."""
        return self.test_accuracy if self.test_accuracy is not None else self.federated_accuracy

    def to_json(self) -> dict[str, Any]:
        return self.line()

    def console_line(self) -> str:
        test = (f"accuracy {self.test_accuracy:.4f}  loss {self.test_loss:.4f}" if self.test_accuracy is not None
                else f"{'accuracy':>8s} {'-':>6s}  {'loss':>4s} {'-':>6s}")
        federated = "" if self.federated_accuracy is None else (
            f"  federated {self.federated_accuracy:.4f} ({self.federated_samples} samples, "
            f"{self.federated_workers} workers)")
        privacy = "" if self.dp_epsilon is None else (
            f"  epsilon {self.dp_epsilon:.3f} (delta {self.defences.get('dp_delta', 0):g})")
        return (f"version {self.version:3d}  participants {self.participants:3d}/{self.expected:<3d} {test}  "
                f"up {self.bytes_up / 1e6:8.2f} MB{_ratio(self.bytes_up_ratio)}  "
                f"down {self.bytes_down / 1e6:8.2f} MB{_ratio(self.bytes_down_ratio)}  {self.seconds:6.1f} s"
                f"{federated}{privacy}{self._asynchronous()}")

    def _asynchronous(self) -> str:
        if self.mode != "async":
            return ""
        spread = "" if self.staleness_mean is None else (
            f"  staleness {self.staleness_min}/{self.staleness_mean:.1f}/{self.staleness_max}")
        return spread + (f"  {self.too_stale} too stale" if self.too_stale else "")


def staleness_notes(staleness: list[int], too_stale: int) -> dict[str, Any]:
    """The staleness fields of :class:`VersionRecord` for the staleness of its folded updates."""
    if not staleness:
        return {"too_stale": too_stale}
    return {"staleness_min": min(staleness), "staleness_mean": sum(staleness) / len(staleness),
            "staleness_max": max(staleness), "too_stale": too_stale}


def _ratio(value: float | None) -> str:
    return "" if value is None or abs(value - 1.0) < 0.005 else f" ({value:.3f} of fp32)"


def fp32_ratio(sent_bytes: int, copies: int, model_bytes: int) -> float | None:
    """``sent_bytes`` over ``copies`` messages each carrying the model raw (``model_bytes``)."""
    return sent_bytes / (copies * model_bytes) if copies and model_bytes else None
