"""One open model version in synchronous mode, and the line of metrics it closes with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from aggregator.fedavg import RunningSum
from fedmq.broker.base import Delivery


@dataclass
class OpenRound:
    """Version ``version`` is out; updates for it are folded into ``running`` as they arrive.

    ``expected`` are the workers the quorum counts on (selected and live at broadcast time);
    ``deliveries`` are acknowledged only after the next version's checkpoint is written.
    """

    version: int
    selected: tuple[str, ...]  # what the broadcast names; () means every worker may train
    expected: set[str]
    started: float
    deadline: float
    running: RunningSum
    broadcast: bytes  # the encoded ModelBroadcast, re-sent to joiners and on re-broadcast
    folded: set[str] = field(default_factory=set)
    deliveries: list[Delivery] = field(default_factory=list)
    weighted_train_loss: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    stale: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    rebroadcasts: int = 0


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def console_line(self) -> str:
        return (f"version {self.version:3d}  participants {self.participants:3d}/{self.expected:<3d} "
                f"accuracy {self.test_accuracy:.4f}  loss {self.test_loss:.4f}  "
                f"up {self.bytes_up / 1e6:8.2f} MB  down {self.bytes_down / 1e6:8.2f} MB  {self.seconds:6.1f} s")
