"""Who is alive, and which partition of the training set each worker trains on."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class WorkerRecord:
    worker_id: str
    partition: int
    last_seen: float  # monotonic seconds
    state: str = "joining"
    device: str = ""
    version: int = -1


class WorkerRegistry:
    """Live workers and the partition table.

    A new worker gets the lowest partition index no live worker holds; a worker that comes back
    gets its old index; a worker may ask for an index. When there are more workers than
    partitions, indexes are shared (the least-shared first) and a warning is logged.
    """

    def __init__(self, num_partitions: int, timeout_s: float) -> None:
        self.num_partitions = num_partitions
        self.timeout_s = timeout_s
        self._live: dict[str, WorkerRecord] = {}
        self._table: dict[str, int] = {}  # every worker ever assigned, dead or alive

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._live

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._live.get(worker_id)

    @property
    def partition_table(self) -> dict[str, int]:
        return dict(self._table)

    def restore(self, table: dict[str, int]) -> None:
        """Take the partition table of a checkpoint (no worker is live until it speaks)."""
        self._table = {w: p for w, p in table.items() if 0 <= p < self.num_partitions}

    def live_ids(self) -> list[str]:
        return sorted(self._live)

    def ready_ids(self) -> list[str]:
        return sorted(w for w, r in self._live.items() if r.state != "joining")

    def _choose_partition(self, worker_id: str, requested: int) -> int:
        if 0 <= requested < self.num_partitions:
            return requested
        if requested >= self.num_partitions:
            log.warning("worker %s asked for partition %d but the run has %d; assigning one",
                        worker_id, requested, self.num_partitions)
        if worker_id in self._table:
            return self._table[worker_id]
        held = Counter(r.partition for r in self._live.values())
        free = [p for p in range(self.num_partitions) if held[p] == 0]
        if free:
            return free[0]
        shared = min(range(self.num_partitions), key=lambda p: (held[p], p))
        log.warning("more live workers (%d) than partitions (%d): worker %s shares partition %d",
                    len(self._live) + 1, self.num_partitions, worker_id, shared)
        return shared

    def join(self, worker_id: str, requested: int, now: float, *, device: str = "") -> WorkerRecord:
        """Register (or refresh) a worker and fix its partition."""
        record = self._live.get(worker_id)
        if record is None:
            partition = self._choose_partition(worker_id, requested)
            record = WorkerRecord(worker_id, partition, now, device=device)
            self._live[worker_id] = record
            self._table[worker_id] = partition
        record.last_seen = now
        if device:
            record.device = device
        return record

    def touch(self, worker_id: str, now: float, *, state: str | None = None, version: int | None = None) -> None:
        record = self._live.get(worker_id)
        if record is None:
            return
        record.last_seen = now
        if state is not None:
            record.state = state
        if version is not None:
            record.version = version

    def leave(self, worker_id: str) -> bool:
        """Forget a live worker (goodbye); its partition becomes free. True if it was live."""
        return self._live.pop(worker_id, None) is not None

    def expire(self, now: float) -> list[str]:
        """Drop workers silent for longer than the timeout; returns their ids."""
        dead = [w for w, r in self._live.items() if now - r.last_seen > self.timeout_s]
        for worker_id in dead:
            del self._live[worker_id]
        return sorted(dead)
