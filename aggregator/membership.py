"""The control queue: hellos, heartbeats and goodbyes; joins, refusals and the liveness horizon.

A worker is joined (given its partition and the task) on its hello, or on a heartbeat from a
worker this aggregator does not know (it started after the worker). A worker that said goodbye
with reason ``refused`` is not joined again on its heartbeats, only on a new hello.

The *horizon* is the time up to which the aggregator has read every control message sent: the
send time of the newest message read, or "now" whenever the aggregator found nothing waiting.
Workers are declared dead against it (see :mod:`aggregator.registry`).
"""

from __future__ import annotations

import logging
from typing import Callable

from aggregator.registry import WorkerRegistry
from fedmq.errors import Unroutable
from fedmq.events import Sink, WorkerJoined, WorkerLeft, WorkerPresumedDead, WorkerProgress
from fedmq.messages import Heartbeat, JoinAccepted, Message, TaskSpec, WorkerGoodbye, WorkerHello
from fedmq.topology import DEFAULT_EXCHANGE, inbox_queue
from fedmq.transport import Transport

log = logging.getLogger(__name__)


class Membership:
    """Applies control messages to ``registry`` and answers joins through ``transport``.

    ``on_joined(worker_id)`` runs after a worker was (re)joined: the aggregator sends it the
    current model from there. Joins, goodbyes, deaths and heartbeats are also events on ``emit``.
    """

    def __init__(self, registry: WorkerRegistry, transport: Transport, run_id: str, task: TaskSpec,
                 clock: Callable[[], float], on_joined: Callable[[str], None], *,
                 emit: Sink = lambda event: None) -> None:
        self.emit = emit
        self.registry = registry
        self.transport = transport
        self.run_id = run_id
        self.task = task
        self.clock = clock
        self.on_joined = on_joined
        self.refused: dict[str, str] = {}  # worker id -> why it will not take part
        self.horizon = clock()

    def caught_up(self, now: float) -> None:
        """Nothing was waiting at ``now``: every control message sent before it has been read."""
        self.horizon = max(self.horizon, now)

    def handle(self, message: Message) -> bool:
        """Apply one control message; False if it is not one (the caller dead-letters it)."""
        now = self.clock()
        if isinstance(message, WorkerHello):
            self.refused.pop(message.worker_id, None)
            self.join(message.worker_id, message.requested_partition, message.device, now, pinned=True)
            self._heard(message.worker_id, message.sent_at, now)
        elif isinstance(message, Heartbeat):
            self._on_heartbeat(message, now)
        elif isinstance(message, WorkerGoodbye):
            self._on_goodbye(message, now)
        else:
            return False
        return True

    def _heard(self, worker_id: str, sent_at: float, now: float) -> None:
        self.horizon = max(self.horizon, self.registry.heard(worker_id, sent_at, now))

    def _on_heartbeat(self, beat: Heartbeat, now: float) -> None:
        ours = beat.run_id == self.run_id
        if beat.worker_id in self.refused:
            self._heard(beat.worker_id, beat.sent_at, now)
            return
        if beat.worker_id not in self.registry or not ours:
            # An aggregator that (re)started after the worker learns of it from its heartbeat.
            self.join(beat.worker_id, beat.partition if ours else -1, beat.device, now, pinned=False)
        self._heard(beat.worker_id, beat.sent_at, now)
        self.registry.update_state(beat.worker_id, state=beat.state if ours else None, version=beat.version)
        record = self.registry.get(beat.worker_id)
        if ours and record is not None:
            self.emit(WorkerProgress(self.run_id, beat.worker_id, beat.state, beat.version, record.partition,
                                     beat.device, beat.progress, beat.samples_per_second, now))
        if ours and record is not None and beat.partition >= 0 and beat.partition != record.partition:
            # Its assignment (a first one, or a move) was lost or is still on its way: say it again.
            try:
                self.assign(beat.worker_id, record.partition)
            except Unroutable:
                pass

    def _on_goodbye(self, goodbye: WorkerGoodbye, now: float) -> None:
        if goodbye.run_id and goodbye.run_id != self.run_id:
            return
        was_live = self.registry.leave(goodbye.worker_id, now)
        if was_live or goodbye.reason == "refused":
            self.emit(WorkerLeft(self.run_id, goodbye.worker_id, goodbye.reason, goodbye.detail,
                                 len(self.registry.live_ids())))
        if goodbye.reason == "refused":
            self.refused[goodbye.worker_id] = goodbye.detail
            log.error("worker %s refuses run %s: %s; it is not joined again until it says hello (%d live)",
                      goodbye.worker_id, self.run_id, goodbye.detail or "no reason given",
                      len(self.registry.live_ids()))
        elif was_live:
            log.info("worker %s left (%s%s) (%d live)", goodbye.worker_id, goodbye.reason,
                     f": {goodbye.detail}" if goodbye.detail else "", len(self.registry.live_ids()))

    def join(self, worker_id: str, requested: int, device: str, now: float, *, pinned: bool) -> None:
        """Register ``worker_id`` and send it its assignment (and, via ``on_joined``, the model)."""
        record = self.registry.join(worker_id, requested, now, device=device, pinned=pinned)
        try:
            self.assign(worker_id, record.partition)
            self.on_joined(worker_id)
        except Unroutable:
            log.warning("worker %s has no inbox queue: ignoring it", worker_id)
            self.registry.leave(worker_id, now)
            return
        log.info("worker %s joined on %s with partition %d of %d (%d live)", worker_id, device or "?",
                 record.partition, self.task.num_partitions, len(self.registry.live_ids()))
        self.emit(WorkerJoined(self.run_id, worker_id, device, record.partition, len(self.registry.live_ids())))

    def assign(self, worker_id: str, partition: int) -> None:
        """Tell ``worker_id`` its partition (raises Unroutable if its inbox is gone)."""
        self.transport.send(DEFAULT_EXCHANGE, inbox_queue(worker_id).name,
                            JoinAccepted(self.run_id, worker_id, partition, self.task))

    def expire_and_rebalance(self, timeout_s: float) -> None:
        """Declare silent workers dead; move workers sharing a partition onto idle ones."""
        for worker_id in self.registry.expire(self.horizon):
            log.warning("worker %s silent for over %.0f s: considered dead (%d live)",
                        worker_id, timeout_s, len(self.registry.live_ids()))
            self.emit(WorkerPresumedDead(self.run_id, worker_id, timeout_s, len(self.registry.live_ids())))
        for worker_id, partition in self.registry.rebalance(self.clock()):
            try:
                self.assign(worker_id, partition)
            except Unroutable:
                log.warning("worker %s has no inbox queue: its new partition %d waits for its next join",
                            worker_id, partition)
