"""Which partition of the training set each worker trains on (pure bookkeeping, no I/O).

Rules:
- a worker may ask for an index (``--partition``); it gets it and is never moved;
- a worker that comes back gets its old index, unless a live worker holds it now;
- otherwise the lowest index no live worker holds; when every index is held, the least shared
  one (and a warning: more workers than partitions);
- an index left without a live holder for ``grace_s`` (a worker died or left) is given to a worker
  that shares its index with others, so no data lies idle while two workers train the same.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Mapping

log = logging.getLogger(__name__)


class PartitionTable:
    """The partition of every worker ever assigned (dead or alive), and idle indexes."""

    def __init__(self, num_partitions: int, *, grace_s: float) -> None:
        self.num_partitions = num_partitions
        self.grace_s = grace_s
        self._table: dict[str, int] = {}
        self._vacated_at: dict[int, float] = {}  # index -> when its last live holder went away

    def snapshot(self) -> dict[str, int]:
        return dict(self._table)

    def restore(self, table: Mapping[str, int]) -> None:
        self._table = {w: p for w, p in table.items() if 0 <= p < self.num_partitions}

    def assign(self, worker_id: str, requested: int, live: Mapping[str, int]) -> int:
        """The index for ``worker_id`` joining now; ``live`` maps the other live workers to theirs."""
        if 0 <= requested < self.num_partitions:
            index = requested
        else:
            if requested >= self.num_partitions:
                log.warning("worker %s asked for partition %d but the run has %d; assigning one",
                            worker_id, requested, self.num_partitions)
            others = {w: p for w, p in live.items() if w != worker_id}
            held = Counter(others.values())
            old = self._table.get(worker_id)
            free = [p for p in range(self.num_partitions) if held[p] == 0]
            if old is not None and held[old] == 0:
                index = old
            elif free:
                index = free[0]
            else:
                index = min(range(self.num_partitions), key=lambda p: (held[p], p))
                log.warning("more live workers (%d) than partitions (%d): worker %s shares partition %d",
                            len(others) + 1, self.num_partitions, worker_id, index)
        self._table[worker_id] = index
        self._vacated_at.pop(index, None)
        return index

    def vacated(self, index: int, live: Mapping[str, int], now: float) -> None:
        """A holder of ``index`` went away; ``live`` are the workers still live."""
        if index not in live.values():
            self._vacated_at.setdefault(index, now)

    def rebalance(self, live: Mapping[str, int], movable: list[str], now: float) -> list[tuple[str, int]]:
        """Moves ``(worker_id, new_index)`` that give idle indexes to workers sharing one.

        ``movable`` lists live workers that may move, newest first (workers that asked for an
        index are not in it). Applies the moves to the table.
        """
        current = dict(live)
        holders: dict[int, list[str]] = {}
        for worker_id, index in current.items():
            holders.setdefault(index, []).append(worker_id)
        idle = sorted(p for p, since in self._vacated_at.items()
                      if now - since >= self.grace_s and not holders.get(p))
        moves = []
        for index in idle:
            candidates = [w for w in movable if w in current and len(holders[current[w]]) > 1]
            if not candidates:
                break
            worker_id = candidates[0]
            holders[current[worker_id]].remove(worker_id)
            holders[index] = [worker_id]
            current[worker_id] = index
            self._table[worker_id] = index
            self._vacated_at.pop(index, None)
            moves.append((worker_id, index))
        return moves
