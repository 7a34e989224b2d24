"""One model version in the making, and the line of metrics it closes with."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from aggregator.fedavg import RunningSum
from fedmq.broker.base import Delivery


@dataclass
class OpenRound:
    """Model version ``version``: updates for it are folded into ``running`` as they arrive.

    The round exists from the moment the aggregator holds ``version``, before its broadcast
    (``broadcast`` is None until then): updates redelivered after a restart are folded at once
    instead of being turned away. ``expected`` are the workers the quorum counts on (selected and
    live at broadcast time); ``held`` the deliveries (without their bodies) of every folded
    update and its duplicates, acknowledged only once the next checkpoint is written.
    """

    version: int
    running: RunningSum
    selected: tuple[str, ...] = ()  # what the broadcast names; () means every worker may train
    expected: set[str] = field(default_factory=set)
    started: float = 0.0
    deadline: float = float("inf")
    broadcast: bytes | None = None  # the encoded ModelBroadcast, re-sent to joiners
    attempt: int = 0  # of the current broadcast (see ModelBroadcast)
    folded: set[str] = field(default_factory=set)
    held: dict[str, list[tuple[Delivery, ...]]] = field(default_factory=dict)
    weighted_train_loss: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    stale: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    rebroadcasts: int = 0

    @property
    def is_open(self) -> bool:
        """True once the version has been broadcast by this aggregator."""
        return self.broadcast is not None

    def hold(self, worker_id: str, deliveries: tuple[Delivery, ...]) -> None:
        """Keep what acknowledging these deliveries needs (not their bodies) until the checkpoint.

        A delivery the broker marks redelivered replaces the ones held for the same worker: it
        came back because the connection that carried them closed, so their tags are void.
        """
        slim = tuple(dataclasses.replace(d, body=b"") for d in deliveries)
        if any(d.redelivered for d in deliveries):
            self.held[worker_id] = [slim]
        else:
            self.held.setdefault(worker_id, []).append(slim)

    def held_deliveries(self) -> list[Delivery]:
        return [d for copies in self.held.values() for copy in copies for d in copy]

    @property
    def held_count(self) -> int:
        return sum(len(copy) for copies in self.held.values() for copy in copies)


@dataclass(frozen=True)
class VersionRecord:
    """One line of ``metrics.jsonl`` and of the console: what producing ``version`` took."""

    run_id: str
    version: int
    participants: int
    expected: int
    test_accuracy: float
    test_loss: float
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def console_line(self) -> str:
        return (f"version {self.version:3d}  participants {self.participants:3d}/{self.expected:<3d} "
                f"accuracy {self.test_accuracy:.4f}  loss {self.test_loss:.4f}  "
                f"up {self.bytes_up / 1e6:8.2f} MB  down {self.bytes_down / 1e6:8.2f} MB  {self.seconds:6.1f} s")
