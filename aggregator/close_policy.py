"""When a version closes: the round loop asks its close policy, nothing else.

:class:`SyncClosePolicy` is FedAvg's synchronous rule: close at once when a quorum of the
expected live workers has reported; at the deadline close with at least ``min_updates``, else
broadcast the version again. An asynchronous policy (close every K updates) plugs in here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Container

from aggregator.rounds import OpenRound
from aggregator.selection import quorum_size


class Decision(enum.Enum):
    WAIT = "wait"
    CLOSE = "close"
    REBROADCAST = "rebroadcast"


@dataclass(frozen=True)
class SyncClosePolicy:
    min_updates: int
    quorum_fraction: float

    def decide(self, round_: OpenRound, live: Container[str], now: float) -> Decision:
        """What to do with the open (broadcast) ``round_`` at ``now``; ``live`` are the live workers."""
        counted = {w for w in round_.expected if w in live} | round_.folded
        need = quorum_size(len(counted), min_updates=self.min_updates, quorum_fraction=self.quorum_fraction)
        if len(round_.folded) >= need:
            return Decision.CLOSE
        if now >= round_.deadline:
            return Decision.CLOSE if len(round_.folded) >= self.min_updates else Decision.REBROADCAST
        return Decision.WAIT
