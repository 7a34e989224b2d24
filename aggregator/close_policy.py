"""When a version closes: the round loop asks its close policy, nothing else.

:class:`SyncClosePolicy` is FedAvg's synchronous rule: close at once when a quorum of the
expected live workers has reported; at the deadline close with at least ``min_updates``, else
broadcast the version again. :class:`AsyncClosePolicy` is FedBuff's: close as soon as K
updates, whatever their base version, are folded; it never waits for a straggler, whose update
is folded into a later version, weighted by its staleness.

Each policy also says which update keys the checkpoint keeps (:meth:`checkpoint_keys`): what a
resumed aggregator must recognise as folded already.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import AbstractSet, Container

from aggregator.checkpoint import UpdateKey
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

    def checkpoint_keys(self, round_: OpenRound, checkpointed: AbstractSet[UpdateKey],
                        next_version: int) -> frozenset[UpdateKey]:
        """The updates of ``round_``: any older one is stale in the next version anyway."""
        return frozenset(round_.folded_keys)


@dataclass(frozen=True)
class AsyncClosePolicy:
    """Close after ``buffer_size`` folded updates (fewer when fewer workers are live: each trains
    a version once); at the deadline close with at least ``min_updates``, else broadcast again."""

    buffer_size: int
    min_updates: int
    max_staleness: int

    def decide(self, round_: OpenRound, live: Container[str], now: float) -> Decision:
        updates = len(round_.folded_keys)
        counted = {w for w in round_.expected if w in live} | round_.folded
        if updates >= min(self.buffer_size, max(len(counted), 1)):
            return Decision.CLOSE
        if now >= round_.deadline:
            return Decision.CLOSE if updates >= self.min_updates else Decision.REBROADCAST
        return Decision.WAIT

    def checkpoint_keys(self, round_: OpenRound, checkpointed: AbstractSet[UpdateKey],
                        next_version: int) -> frozenset[UpdateKey]:
        """The updates of ``round_`` and those of earlier versions still young enough to be
        folded into ``next_version``: a copy of one of them arriving later (a redelivery, a
        worker's resend) is recognised as folded, also by a resumed aggregator."""
        oldest = next_version - self.max_staleness
        return frozenset(round_.folded_keys) | {k for k in checkpointed if k[1] >= oldest}
