"""Who is alive, timed by when workers spoke (their clock), and which partition each trains.

Liveness is measured by the sender: a heartbeat carries its wall-clock send time, and each
worker's clock is mapped onto the aggregator's monotonic clock with an offset, the smallest
``received - sent`` seen so far (clock skew plus the shortest transit). So a heartbeat read late
(a backlog in the queue, a busy aggregator) counts for when it was sent: a dead worker's old
heartbeats do not make it look alive. A worker is declared dead only against a *horizon* the
aggregator knows it has heard everything up to (see :meth:`WorkerRegistry.expire`), so a backlog
does not make a live worker look dead either.

A worker whose first heartbeat is read from a backlog has no offset yet; it counts as sent when
read, i.e. it looks alive for at most one timeout longer than it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aggregator.partitions import PartitionTable

log = logging.getLogger(__name__)


@dataclass
class WorkerRecord:
    worker_id: str
    partition: int
    last_seen: float  # our monotonic seconds: when it last spoke, by its own clock mapped onto ours
    joined_at: float
    state: str = "joining"
    device: str = ""
    version: int = -1
    pinned: bool = False  # asked for its partition: never moved
    clock_offset: float | None = None  # our monotonic time minus its wall clock, smallest seen


class WorkerRegistry:
    """Live workers and the partition table (see :mod:`aggregator.partitions`)."""

    def __init__(self, num_partitions: int, timeout_s: float, *, reassign_after_s: float | None = None) -> None:
        self.num_partitions = num_partitions
        self.timeout_s = timeout_s
        self.partitions = PartitionTable(num_partitions,
                                         grace_s=timeout_s if reassign_after_s is None else reassign_after_s)
        self._live: dict[str, WorkerRecord] = {}

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._live

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._live.get(worker_id)

    @property
    def partition_table(self) -> dict[str, int]:
        return self.partitions.snapshot()

    def _holders(self) -> dict[str, int]:
        return {w: r.partition for w, r in self._live.items()}

    def restore(self, table: dict[str, int], live: tuple[str, ...] = (), now: float = 0.0) -> None:
        """Take a checkpoint's partition table; ``live`` (the workers live when it was written)
        count as alive from ``now`` until they stay silent for the timeout."""
        self.partitions.restore(table)
        for worker_id in live:
            partition = table.get(worker_id)
            if partition is not None and 0 <= partition < self.num_partitions:
                self._live[worker_id] = WorkerRecord(worker_id, partition, now, now, state="ready")

    def live_ids(self) -> list[str]:
        return sorted(self._live)

    def ready_ids(self) -> list[str]:
        return sorted(w for w, r in self._live.items() if r.state != "joining")

    def join(self, worker_id: str, requested: int, now: float, *, device: str = "",
             pinned: bool = True) -> WorkerRecord:
        """Register a worker (first contact: it counts as seen ``now``) and fix its partition.

        ``requested`` (-1: none) is honoured; ``pinned`` says it was the worker's own choice
        (``--partition``), never moved, rather than the index it reports having been given.
        """
        record = self._live.get(worker_id)
        if record is None:
            partition = self.partitions.assign(worker_id, requested, self._holders())
            record = WorkerRecord(worker_id, partition, now, now, device=device,
                                  pinned=pinned and 0 <= requested < self.num_partitions)
            self._live[worker_id] = record
        if device:
            record.device = device
        return record

    def heard(self, worker_id: str, sent_at: float, now: float) -> float:
        """Map a send time (the worker's wall clock, s) read at ``now`` (our monotonic clock) onto
        our clock; the worker's ``last_seen`` moves to it if it is live. Returns the mapped time."""
        record = self._live.get(worker_id)
        if record is None:
            return now
        offset = now - sent_at
        if record.clock_offset is None or offset < record.clock_offset:
            record.clock_offset = offset
        sent = min(now, sent_at + record.clock_offset)
        record.last_seen = max(record.last_seen, sent)
        return sent

    def update_state(self, worker_id: str, *, state: str | None = None, version: int | None = None) -> None:
        record = self._live.get(worker_id)
        if record is None:
            return
        if state is not None:
            record.state = state
        if version is not None:
            record.version = version

    def leave(self, worker_id: str, now: float) -> bool:
        """Forget a live worker (goodbye); its partition becomes free. True if it was live."""
        record = self._live.pop(worker_id, None)
        if record is None:
            return False
        self.partitions.vacated(record.partition, self._holders(), now)
        return True

    def expire(self, horizon: float) -> list[str]:
        """Drop workers silent for longer than the timeout before ``horizon``, the time up to
        which every message sent has been read; returns their ids."""
        dead = sorted(w for w, r in self._live.items() if horizon - r.last_seen > self.timeout_s)
        for worker_id in dead:
            self.leave(worker_id, horizon)
        return dead

    def rebalance(self, now: float) -> list[tuple[str, int]]:
        """Give partitions idle past the grace period to workers that share one; returns the
        moves ``(worker_id, new_partition)`` (the workers must be told)."""
        movable = sorted((w for w, r in self._live.items() if not r.pinned),
                         key=lambda w: (-self._live[w].joined_at, w))
        moves = self.partitions.rebalance(self._holders(), movable, now)
        for worker_id, index in moves:
            self._live[worker_id].partition = index
            log.info("worker %s moves to partition %d, idle since its holder left", worker_id, index)
        return moves
