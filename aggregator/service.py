"""The synchronous aggregator: publish a version, fold updates as they come, close on quorum.

The round loop owns the messaging; the maths live in :mod:`aggregator.fedavg` and
:mod:`aggregator.selection`. One thread does everything (pika connections are not
thread-safe); evaluation is short next to the heartbeat interval.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from aggregator.checkpoint import CheckpointStore
from aggregator.evaluation import Evaluation, evaluate
from aggregator.fedavg import RunningSum, apply_mean_delta, check_compatible
from aggregator.registry import WorkerRegistry
from aggregator.rounds import OpenRound, VersionRecord
from aggregator.selection import quorum_size, select_participants
from fedmq.broker.base import Broker, Delivery
from fedmq.device import resolve_device
from fedmq.errors import InvalidMessage, Unroutable
from fedmq.messages import (Heartbeat, JoinAccepted, ModelBroadcast, RunComplete, TaskSpec, TrainingConfig,
                            WeightUpdate, WorkerGoodbye, WorkerHello, encode)
from fedmq.settings import Settings
from fedmq.task import build_model, load_split
from fedmq.tensor_codec import payload_bytes
from fedmq.topology import (BROADCAST_EXCHANGE, CONTROL_QUEUE, DEFAULT_EXCHANGE, STATIC_TOPOLOGY, UPDATES_QUEUE,
                            inbox_queue)
from fedmq.transport import Received, Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    final_version: int
    test_accuracy: float
    output_dir: Path
    records: tuple[VersionRecord, ...]


def default_run_id() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S")


class Aggregator:
    """Runs one federation to its end over ``broker``; see :meth:`run`."""

    def __init__(self, settings: Settings, broker: Broker, *,
                 on_version: Callable[[VersionRecord], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.cfg = cfg = settings.run
        self.run_id = cfg.run_id or default_run_id()
        self.broker = broker
        self.transport = Transport(broker, max_frame_bytes=settings.broker.max_frame_bytes)
        self.on_version = on_version
        self.clock = clock
        num_partitions = cfg.num_partitions or cfg.start_workers
        self.task = TaskSpec(cfg.dataset, cfg.model, cfg.partition_scheme, num_partitions,
                             cfg.dirichlet_alpha, cfg.shards_per_partition, cfg.seed)
        self.training = TrainingConfig(cfg.local_epochs, cfg.local_steps, cfg.batch_size, cfg.learning_rate,
                                       cfg.optimizer, cfg.momentum, cfg.weight_decay)
        self.device = resolve_device(cfg.eval_device)
        self.model = build_model(cfg.model, seed=cfg.seed).to(self.device)
        self.weights = {k: v.detach().to("cpu").clone() for k, v in self.model.state_dict().items()}
        data = settings.data
        test = load_split(cfg.dataset, Path(data.data_root), train=False,
                          mirror=Path(data.data_mirror) if data.data_mirror else None, download=data.download)
        self.test_images, self.test_labels = test.images, test.labels
        self.registry = WorkerRegistry(num_partitions, cfg.worker_timeout_s)
        self.store = CheckpointStore(Path(cfg.output_dir) / self.run_id)
        self.version = 0
        self.resumed = False
        checkpoint = self.store.load(self.run_id)
        if checkpoint is not None:
            check_compatible(self.weights, checkpoint.weights)
            self.weights, self.version = checkpoint.weights, checkpoint.version
            self.registry.restore(checkpoint.partition_table)
            self.resumed = True
            log.info("run %s: resuming from the checkpoint of version %d", self.run_id, self.version)
        self.round: OpenRound | None = None
        self.records: list[VersionRecord] = []
        self.finished = False
        self.last_accuracy = float("nan")
        model_bytes = payload_bytes(self.weights)
        chunks = max(1, math.ceil(model_bytes / settings.broker.max_frame_bytes))
        # Folded updates stay unacknowledged until the next checkpoint, so the prefetch must hold
        # a whole round's chunks or the broker stops delivering and the round never closes.
        self.update_prefetch = max(256, 4 * num_partitions * chunks)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Publish versions until ``versions`` are done or the target accuracy is reached."""
        self.broker.declare(STATIC_TOPOLOGY)
        self.broker.subscribe(CONTROL_QUEUE, self._on_control, prefetch=256)
        self.broker.subscribe(UPDATES_QUEUE, self._on_update, prefetch=self.update_prefetch)
        log.info("run %s: %s on %s, %d partitions (%s), waiting for %d ready workers",
                 self.run_id, self.cfg.model, self.cfg.dataset, self.task.num_partitions,
                 self.task.partition_scheme, self.cfg.start_workers)
        if self.version >= self.cfg.versions:
            self._finish()
        while not self.finished:
            self.broker.run_for(0.25)
            self._tick()
        return RunResult(self.run_id, self.version, self.last_accuracy, self.store.directory, tuple(self.records))

    def _tick(self) -> None:
        if self.finished:
            return
        now = self.clock()
        for worker_id in self.registry.expire(now):
            log.warning("worker %s silent for over %.0f s: considered dead (%d live)",
                        worker_id, self.cfg.worker_timeout_s, len(self.registry.live_ids()))
        round_ = self.round
        if round_ is None:
            if self.resumed or len(self.registry.ready_ids()) >= self.cfg.start_workers:
                self._open_round(self.version)
            return
        if self._quorum_reached(round_):
            self._close_round()
        elif now >= round_.deadline:
            if len(round_.folded) >= self.cfg.min_updates:
                log.info("version %d: deadline, closing with %d of %d expected updates",
                         round_.version, len(round_.folded), len(round_.expected))
                self._close_round()
            else:
                self._rebroadcast(round_, now)
        self.transport.expire_incomplete(self.cfg.round_timeout_s)

    # -- rounds ---------------------------------------------------------------------------------
    def _open_round(self, version: int) -> None:
        live = self.registry.live_ids()
        chosen = select_participants(live, self.cfg.client_fraction, seed=self.cfg.seed, version=version)
        named = () if self.cfg.client_fraction >= 1.0 else chosen
        now = self.clock()
        self.round = OpenRound(version, named, set(chosen), now, now + self.cfg.round_timeout_s,
                               RunningSum(self.weights), b"")
        sent = self._broadcast(self.round, live)
        log.info("version %d: broadcast %.2f MB to %d live workers (%d expected)",
                 version, sent / 1e6, len(live), len(chosen))

    def _rebroadcast(self, round_: OpenRound, now: float) -> None:
        live = self.registry.live_ids()
        chosen = select_participants(live, self.cfg.client_fraction, seed=self.cfg.seed,
                                     version=round_.version + 1000 * (round_.rebroadcasts + 1))
        round_.expected = set(chosen) | round_.folded
        round_.selected = () if self.cfg.client_fraction >= 1.0 else tuple(sorted(set(chosen) | set(round_.selected)))
        round_.deadline = now + self.cfg.round_timeout_s
        round_.rebroadcasts += 1
        self._broadcast(round_, live)
        log.warning("version %d: only %d updates by the deadline (need %d); re-broadcast to %d live workers",
                    round_.version, len(round_.folded), self.cfg.min_updates, len(live))

    def _broadcast(self, round_: OpenRound, live: list[str]) -> int:
        """Encode the round's model once, publish it on the fanout and count the copies sent."""
        round_.broadcast = encode(ModelBroadcast(self.run_id, round_.version, self.training, round_.selected,
                                                 self.weights))
        sent = self.transport.send(BROADCAST_EXCHANGE, "", round_.broadcast, mandatory=False)
        round_.bytes_down += sent * len(live)  # the fanout copies it into every live inbox
        return sent

    def _quorum_reached(self, round_: OpenRound) -> bool:
        counted = {w for w in round_.expected if w in self.registry} | round_.folded
        need = quorum_size(len(counted), min_updates=self.cfg.min_updates, quorum_fraction=self.cfg.quorum_fraction)
        return len(round_.folded) >= need

    def _close_round(self) -> None:
        round_ = self.round
        assert round_ is not None
        mean = round_.running.mean()
        self.weights = apply_mean_delta(self.weights, mean)
        self.model.load_state_dict(self.weights)
        evaluation: Evaluation = evaluate(self.model, self.test_images, self.test_labels,
                                          batch_size=self.cfg.eval_batch_size, device=self.device)
        version = round_.version + 1
        # Durable first, then acknowledge: an update is acked only once it is in a checkpoint.
        self.store.save(self.run_id, version, self.weights, self.registry.partition_table)
        for delivery in round_.deliveries:
            self.broker.ack(delivery)
        record = VersionRecord(
            self.run_id, version, len(round_.folded), len(round_.expected), evaluation.accuracy, evaluation.loss,
            round_.weighted_train_loss / round_.running.total_weight, round_.bytes_up, round_.bytes_down,
            self.clock() - round_.started, len(self.registry.live_ids()), round_.stale, round_.duplicates,
            round_.dead_lettered, round_.rebroadcasts)
        self.store.append_metrics(record.to_json())
        self.records.append(record)
        self.version, self.last_accuracy, self.round = version, evaluation.accuracy, None
        log.info("version %d of run %s: %d updates, test accuracy %.4f, loss %.4f, %.1f s",
                 version, self.run_id, record.participants, evaluation.accuracy, evaluation.loss, record.seconds)
        if self.on_version is not None:
            self.on_version(record)
        target = self.cfg.target_accuracy
        if version >= self.cfg.versions or (target > 0 and evaluation.accuracy >= target):
            self._finish()
        else:
            self._open_round(version)

    def _finish(self) -> None:
        path = self.store.save_final(self.run_id, self.version, self.weights)
        accuracy = 0.0 if math.isnan(self.last_accuracy) else self.last_accuracy  # NaN: no version closed
        self.transport.send(BROADCAST_EXCHANGE, "", RunComplete(self.run_id, self.version, accuracy), mandatory=False)
        self.finished = True
        log.info("run %s complete at version %d: final model in %s", self.run_id, self.version, path)

    # -- messages -------------------------------------------------------------------------------
    def _dead_letter(self, deliveries, reason: str, detail: str) -> None:
        self.transport.dead_letter(deliveries, reason, detail)
        if self.round is not None:
            self.round.dead_lettered += 1

    def _receive(self, delivery: Delivery) -> Received | None:
        """The whole message a delivery completes; None while chunks are missing or if invalid
        (then it is dead-lettered)."""
        try:
            return self.transport.receive(delivery)
        except InvalidMessage as exc:
            self._dead_letter(exc.deliveries, exc.reason, exc.detail)  # type: ignore[attr-defined]
            return None

    def _on_control(self, delivery: Delivery) -> None:
        received = self._receive(delivery)
        if received is None:
            return
        message, now = received.message, self.clock()
        if isinstance(message, WorkerHello):
            self._join(message.worker_id, message.requested_partition, message.device, now)
        elif isinstance(message, Heartbeat):
            if message.worker_id not in self.registry or message.run_id != self.run_id:
                # An aggregator that (re)started after the worker learns of it from its heartbeat.
                requested = message.partition if message.run_id == self.run_id else -1
                self._join(message.worker_id, requested, message.device, now)
            self.registry.touch(message.worker_id, now, state=message.state if message.run_id == self.run_id else None,
                                version=message.version)
        elif isinstance(message, WorkerGoodbye):
            if self.registry.leave(message.worker_id):
                log.info("worker %s left (%d live)", message.worker_id, len(self.registry.live_ids()))
        else:
            self._dead_letter(received.deliveries, "schema", f"a {message.KIND} message on the control queue")
            return
        for d in received.deliveries:
            self.broker.ack(d)

    def _join(self, worker_id: str, requested: int, device: str, now: float) -> None:
        record = self.registry.join(worker_id, requested, now, device=device)
        inbox = inbox_queue(worker_id).name
        try:
            self.transport.send(DEFAULT_EXCHANGE, inbox, JoinAccepted(self.run_id, worker_id, record.partition, self.task))
            if self.round is not None:
                # A late joiner gets the current model now, not at the next version.
                sent = self.transport.send(DEFAULT_EXCHANGE, inbox, self.round.broadcast)
                self.round.bytes_down += sent
                if not self.round.selected and len(self.round.expected) < self.cfg.start_workers:
                    # A version opened short of --start-workers (after a resume, or after many
                    # workers died) counts joiners into its quorum instead of closing on the first.
                    self.round.expected.add(worker_id)
        except Unroutable:
            log.warning("worker %s has no inbox queue: ignoring its hello", worker_id)
            self.registry.leave(worker_id)
            return
        log.info("worker %s joined on %s with partition %d of %d (%d live)", worker_id, device or "?",
                 record.partition, self.task.num_partitions, len(self.registry.live_ids()))

    def _on_update(self, delivery: Delivery) -> None:
        received = self._receive(delivery)
        if received is None:
            return
        update, round_ = received.message, self.round
        if not isinstance(update, WeightUpdate):
            self._dead_letter(received.deliveries, "schema", f"a {update.KIND} message on the update queue")
            return
        if update.run_id != self.run_id:
            self._dead_letter(received.deliveries, "wrong-run", f"update of run {update.run_id!r}, this is {self.run_id!r}")
            return
        try:
            check_compatible(self.weights, update.delta)
        except InvalidMessage as exc:
            self._dead_letter(received.deliveries, exc.reason, f"from {update.worker_id}: {exc.detail}")
            return
        if update.base_version < self.version:
            for d in received.deliveries:
                self.broker.ack(d)
            if round_ is not None:
                round_.stale += 1
                round_.bytes_up += received.size
            log.info("stale update from %s for version %d dropped (current %d)",
                     update.worker_id, update.base_version, self.version)
            return
        if round_ is None or update.base_version > round_.version:
            self._dead_letter(received.deliveries, "future-version",
                              f"update for version {update.base_version}, open version is "
                              f"{round_.version if round_ else 'none yet'}")
            return
        round_.bytes_up += received.size
        if round_.selected and update.worker_id not in round_.selected:
            for d in received.deliveries:
                self.broker.ack(d)
            round_.stale += 1
            log.info("version %d: update from unselected worker %s dropped", round_.version, update.worker_id)
            return
        if update.worker_id in round_.folded:
            # At-least-once delivery: keep the new delivery to ack with the checkpoint, fold nothing.
            round_.deliveries.extend(received.deliveries)
            round_.duplicates += 1
            log.info("version %d: duplicate update from %s ignored", round_.version, update.worker_id)
            return
        round_.running.fold(update.delta, update.num_samples)
        round_.folded.add(update.worker_id)
        round_.deliveries.extend(received.deliveries)
        round_.weighted_train_loss += update.train_loss * update.num_samples
        self.registry.touch(update.worker_id, self.clock())
        log.info("version %d: update %d/%d from %s (%d samples, train loss %.4f, %.1f s)",
                 round_.version, len(round_.folded), len(round_.expected), update.worker_id,
                 update.num_samples, update.train_loss, update.train_seconds)
