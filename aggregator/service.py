"""The aggregator: hold a model version, broadcast it, fold updates as they come, close it.

The round loop owns the messaging and asks two seams what to do: the close policy
(:mod:`aggregator.close_policy`) when a version closes, and the aggregation pipeline
(:mod:`aggregator.pipeline`: weighting, update stages, combiner, server optimizer) what an update
counts for and what the next model is. Update intake is decided in
:mod:`aggregator.intake`, workers and liveness in :mod:`aggregator.membership`. One thread does
everything (pika connections are not thread-safe).

Recovery: the checkpoint (one atomic file) holds the model, the version, the partition table,
the workers live when it was written and the keys of the updates folded into it. Updates are
acknowledged only after the checkpoint that covers them, so a crash at any point loses none
and, with the keys, folds none twice.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from aggregator.broadcasting import Broadcaster
from aggregator.checkpoint import CheckpointError, CheckpointStore
from aggregator.close_policy import AsyncClosePolicy, Decision, SyncClosePolicy
from aggregator.defences import Defences, partition_sizes
from aggregator.fedavg import check_compatible, non_finite_tensors
from aggregator.intake import UpdateIntake
from aggregator.membership import Membership
from aggregator.pipeline import Proposal
from aggregator.pipeline_config import aggregation_record, build_pipeline, check_same_aggregation
from aggregator.registry import WorkerRegistry
from aggregator.rounds import OpenRound, VersionRecord, fp32_ratio, staleness_notes
from aggregator.sender_identity import identity_refusal
from aggregator.selection import select_participants
from aggregator.server_optimizers import state_digest
from aggregator.version_lines import VersionLines
from fedmq.broker.base import Broker, Delivery
from fedmq.device import resolve_device
from fedmq.errors import InvalidMessage
from fedmq.codecs import parse_codec
from fedmq.event_log import log_event
from fedmq.events import EventBus, RunFinished, UpdateRefused, VersionOpened
from fedmq.federation_state import FederationState
from fedmq.messages import (EvaluationReport, EvaluationRequest, KeyframeRequest, RunComplete, TaskSpec,
                            TrainingConfig, peek_kind)
from fedmq.metrics_file import MetricsFile
from fedmq.status import answer_status
from fedmq.settings import DEFAULT_RUN_ID, Settings
from fedmq.status_messages import StatusRequest
from fedmq.task import build_model, load_split
from fedmq.task.evaluation import Evaluation, evaluate
from fedmq.topology import BROADCAST_EXCHANGE, CONTROL_QUEUE, STATIC_TOPOLOGY, UPDATES_QUEUE
from fedmq.tensor_codec import element_count, encoded_size_bound, payload_bytes
from fedmq.transport import ReceivedBytes, Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """``test_accuracy`` and ``federated_accuracy`` of the final version (NaN when not measured)."""

    run_id: str
    final_version: int
    test_accuracy: float
    output_dir: Path
    records: tuple[VersionRecord, ...]
    federated_accuracy: float = math.nan


class Aggregator:
    """Runs one federation to its end over ``broker``; see :meth:`run`. What happens goes out
    as events (:mod:`fedmq.events`): to ``metrics.jsonl``, then to ``events`` when given."""

    def __init__(self, settings: Settings, broker: Broker, *,
                 on_version: Callable[[VersionRecord], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, events: EventBus | None = None) -> None:
        self.settings = settings
        self.cfg = cfg = settings.run
        self.run_id = cfg.run_id or DEFAULT_RUN_ID
        self.broker = broker
        self.transport = Transport(broker, max_frame_bytes=settings.broker.max_frame_bytes)
        self.clock = clock
        self.task = TaskSpec(cfg.dataset, cfg.model, cfg.partition_scheme, cfg.partition_count,
                             cfg.dirichlet_alpha, cfg.shards_per_partition, cfg.seed)
        self.training = TrainingConfig(cfg.local_epochs, cfg.local_steps, cfg.batch_size, cfg.learning_rate,
                                       cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.proximal_mu,
                                       cfg.update_codec, cfg.mode)
        self.asynchronous = cfg.mode == "async"
        self.close_policy: SyncClosePolicy | AsyncClosePolicy = (
            AsyncClosePolicy(cfg.buffer_size, cfg.min_updates, cfg.max_staleness) if self.asynchronous
            else SyncClosePolicy(cfg.min_updates, cfg.quorum_fraction))
        self.defences = Defences(cfg, assigned=self._assigned_partition, partition_sizes=(
            partition_sizes(self.task, settings.data.data_root, settings.data.data_mirror)
            if cfg.aggregation == "fedavg" and cfg.dp_noise_multiplier == 0 else None))
        self.pipeline = build_pipeline(cfg, self.defences.pipeline_parts())
        self.device = resolve_device(cfg.eval_device)
        self.model = build_model(cfg.model, seed=cfg.seed).to(self.device)
        self.weights = {k: v.detach().to("cpu").clone() for k, v in self.model.state_dict().items()}
        self.model_bytes = payload_bytes(self.weights)  # one message's tensors raw: the fp32 baseline
        data = settings.data
        self.test = None if cfg.eval_data == "none" else load_split(
            cfg.dataset, Path(data.data_root), train=False, mirror=Path(data.data_mirror) if data.data_mirror else None,
            download=data.download)
        self.registry = WorkerRegistry(self.task.num_partitions, cfg.worker_timeout_s)
        self.store = CheckpointStore(Path(cfg.output_dir) / self.run_id)
        self.state = FederationState(self.run_id, cfg.versions, clock)  # what `fedmq status` is told
        self.events = EventBus(MetricsFile(self.store.metrics_path), log_event, self.state)
        if events is not None:
            self.events.add(events.emit)
        self.lines = VersionLines(self.run_id, self.store, on_version, self.events)
        self.version = 0
        self.resumed = False
        self.checkpointed: frozenset = frozenset()  # keys of the updates in the last checkpoint
        self.broadcaster = Broadcaster(self.transport, self.run_id, self.training, parse_codec(cfg.broadcast_codec))
        self._resume()
        self.membership = Membership(self.registry, self.transport, self.run_id, self.task, clock, self._on_joined,
                                     emit=self.events.emit)
        self.intake = UpdateIntake(broker, self.transport, self.run_id, self.task.num_partitions,
                                   update_bytes=encoded_size_bound(self.weights),
                                   max_frame_bytes=settings.broker.max_frame_bytes, pipeline=self.pipeline,
                                   max_staleness=cfg.max_staleness if self.asynchronous else None,
                                   emit=self.events.emit, clock=clock)
        # A compressed update may declare no more elements than the model has.
        self.transport.max_decoded_elements = element_count(self.weights)
        self.round: OpenRound | None = self._new_round(self.version)
        self.finished = False
        self._stop_requested = False
        self.refused_steps = 0
        self._handled = 0  # deliveries handled, to tell an idle broker slice from a busy one
        self.update_prefetch = 0

    def _resume(self) -> None:
        checkpoint = self.store.load(self.run_id)
        if checkpoint is None:
            return
        check_compatible(self.weights, checkpoint.weights)
        check_same_aggregation(self.cfg, checkpoint.aggregation)
        try:
            self.pipeline.restore(checkpoint.pipeline_state)
        except ValueError as exc:
            raise CheckpointError(f"{self.store.checkpoint_path}: {exc}") from None
        self.weights, self.version = checkpoint.weights, checkpoint.version
        self.checkpointed = checkpoint.folded
        self.defences.restore(checkpoint.defences)
        # The workers live at the checkpoint count as alive until they stay silent for the
        # timeout: the resumed version waits for them instead of closing on the first update.
        self.registry.restore(checkpoint.partition_table, checkpoint.live_workers, self.clock())
        self.resumed = True
        self.broadcaster.restore_reference(self.store.directory, self.version, checkpoint.live_workers)
        log.info("run %s: resuming from the checkpoint of version %d (%d workers were live); %s mode, server "
                 "optimizer %s with %d state tensors (sha256 %s)", self.run_id, self.version,
                 len(checkpoint.live_workers), self.cfg.mode, self.pipeline.optimizer.name,
                 len(self.pipeline.state()), state_digest(self.pipeline.state()))

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Publish versions until ``versions`` are done or the target accuracy is reached."""
        self.broker.declare(STATIC_TOPOLOGY)
        self.broker.subscribe(CONTROL_QUEUE, self._on_control, prefetch=256)
        self._fit_update_prefetch()
        log.info("run %s: %s on %s, %d partitions (%s), waiting for %d ready workers",
                 self.run_id, self.cfg.model, self.cfg.dataset, self.task.num_partitions,
                 self.task.partition_scheme, self.cfg.start_workers)
        if self.version >= self.cfg.versions or self._budget_spent():
            self._finish()
        while not self.finished and not self._stop_requested:
            handled = self._handled
            self.broker.run_for(0.25)
            if self._handled == handled:
                self.membership.caught_up(self.clock())
            self._tick()
        last = self.lines.last
        return RunResult(self.run_id, self.version, _or_nan(last and last.test_accuracy), self.store.directory,
                         tuple(self.lines.records), _or_nan(last and last.federated_accuracy))

    def stop(self) -> None:
        """Ask :meth:`run` to return after the event in hand (safe from a signal handler): the
        checkpoint stays that of the last closed version, and the updates folded since were never
        acknowledged, so the broker hands them to the aggregator that resumes the run."""
        self._stop_requested = True

    def _tick(self) -> None:
        # Chunk sets that never complete are dropped whether or not a version is open.
        self.transport.expire_incomplete(self.cfg.round_timeout_s)
        if self.finished:
            return
        self.membership.expire_and_rebalance(self.cfg.worker_timeout_s)
        self._fit_update_prefetch()
        now = self.clock()
        written = self.lines.tick(self.registry, now)
        round_ = self.round
        if round_ is None:  # the final version is out to be scored
            if not self.lines.waiting:
                self._finish()
            return
        if written is not None and written.version == round_.version and self._reached_target(written):
            # The model being trained is the one that reached it: the run ends with it, and the
            # updates of its round will never be folded.
            for delivery in round_.held_deliveries():
                self.broker.ack(delivery)
            self._finish()
            return
        if not round_.is_open:
            if self.resumed or len(self.registry.ready_ids()) >= self.cfg.start_workers:
                self._open_round(round_)
            return
        decision = self.close_policy.decide(round_, self.registry, now)
        if decision is Decision.CLOSE:
            if now >= round_.deadline:
                log.info("version %d: deadline, closing with %d of %d expected updates",
                         round_.version, len(round_.folded), len(round_.expected))
            self._close_round(round_)
        elif decision is Decision.REBROADCAST:
            self._rebroadcast(round_, now, f"only {len(round_.folded)} updates by the deadline "
                                           f"(need {self.cfg.min_updates})")

    def _fit_update_prefetch(self) -> None:
        """Subscribe (again) to the updates with a prefetch for the live workers; it grows with
        them (doubling), never shrinks (see :meth:`UpdateIntake.prefetch_for`)."""
        round_ = self.round
        workers = max(len(self.registry.live_ids()), self.cfg.start_workers, len(round_.held) if round_ else 0)
        wanted = self.intake.prefetch_for(workers)
        # Chunked updates are reassembled in memory: at most one update's encoded size each, and
        # one per expected sender (plus slack for a straggler's) at once.
        update_bytes = self.intake.update_bytes
        self.transport.bound_messages(update_bytes, update_bytes * (workers + 2))
        if wanted > self.update_prefetch:
            self.update_prefetch = max(wanted, 2 * self.update_prefetch)
            self.broker.subscribe(UPDATES_QUEUE, self._on_update, prefetch=self.update_prefetch)
            log.info("update prefetch %d deliveries (%d workers, %d frames per update)",
                     self.update_prefetch, workers, self.intake.frames_per_update)

    # -- rounds ---------------------------------------------------------------------------------
    def _new_round(self, version: int) -> OpenRound:
        return OpenRound(version, self.pipeline.new_combiner(self.weights))

    def _open_round(self, round_: OpenRound) -> None:
        live = self.registry.live_ids()
        chosen = select_participants(live, self.cfg.client_fraction, seed=self.cfg.seed, version=round_.version)
        round_.selected = () if self.cfg.client_fraction >= 1.0 else chosen
        round_.expected = set(chosen)
        round_.started = self.clock()
        round_.deadline = round_.started + self.cfg.round_timeout_s
        # The selected workers score this version on receipt: its line waits for them.
        self.lines.await_scores(chosen, round_.deadline)
        sent = self._broadcast(round_, live, attempt=0, awaited=())
        log.info("version %d: broadcast %.2f MB in all to %d live workers (%d expected, %d updates already in)",
                 round_.version, sent / 1e6, len(live), len(chosen), len(round_.folded))
        self.events.emit(VersionOpened(self.run_id, round_.version, len(chosen), len(live), round_.bytes_down,
                                       round_.started, self.cfg.round_timeout_s))

    def _rebroadcast(self, round_: OpenRound, now: float, why: str) -> None:
        live = self.registry.live_ids()
        chosen = select_participants(live, self.cfg.client_fraction, seed=self.cfg.seed,
                                     version=round_.version + 1000 * (round_.rebroadcasts + 1))
        round_.expected = set(chosen) | round_.folded
        if self.cfg.client_fraction < 1.0:
            round_.selected = tuple(sorted(set(chosen) | set(round_.selected)))
        round_.deadline = now + self.cfg.round_timeout_s
        round_.rebroadcasts += 1
        awaited = tuple(sorted(w for w in (round_.selected or live) if w not in round_.folded))
        # A number never used for this version before, also across restarts of the aggregator.
        attempt = max(round_.attempt + 1, time.time_ns() // 1_000_000)
        self._broadcast(round_, live, attempt=attempt, awaited=awaited)
        log.warning("version %d: %s; re-broadcast asking %d of %d live workers to train it again",
                    round_.version, why, len(awaited), len(live))

    def _broadcast(self, round_: OpenRound, live: list[str], *, attempt: int, awaited: tuple[str, ...]) -> int:
        """Send the round's version to the workers it names (every live one when all are
        selected; see :mod:`aggregator.broadcasting`); returns the bytes sent."""
        round_.attempt, round_.awaited = attempt, awaited
        self.broadcaster.open(round_, self.weights)
        recipients = sorted(set(round_.selected) | set(awaited)) if round_.selected else live
        before = round_.bytes_down
        self.broadcaster.send(round_, recipients, live)
        return round_.bytes_down - before

    def _close_round(self, round_: OpenRound) -> None:
        proposal: Proposal = self.pipeline.propose(self.weights, round_.combiner)
        bad = non_finite_tensors(proposal.weights)
        if bad:
            self._refuse_step(round_, bad)
            return
        self.weights = proposal.weights
        evaluation = self._test()
        version = round_.version + 1
        folded = self.close_policy.checkpoint_keys(round_, self.checkpointed, version)
        privacy = self.defences.privacy
        ledger = privacy.propose() if privacy else None
        # Durable first, then acknowledge: an update is acked only once it is in a checkpoint.
        self.store.save(self.run_id, version, self.weights, self.registry.partition_table,
                        live_workers=self.registry.live_ids(), folded=folded,
                        defences=self.defences.checkpoint_state(ledger),
                        pipeline_state=self.pipeline.state_after(proposal), aggregation=aggregation_record(self.cfg))
        self.broadcaster.save_reference(self.store.directory)
        self.checkpointed = folded
        self.pipeline.commit(proposal)
        if privacy and ledger:
            privacy.commit(ledger)
        for delivery in round_.held_deliveries():
            self.broker.ack(delivery)
        record = VersionRecord(
            self.run_id, version, len(round_.folded_keys), len(round_.expected),
            evaluation.accuracy if evaluation else None, evaluation.loss if evaluation else None,
            round_.weighted_train_loss / max(round_.train_samples, 1), round_.bytes_up, round_.bytes_down,
            self.clock() - round_.started, len(self.registry.live_ids()), round_.stale, round_.duplicates,
            round_.dead_lettered, round_.rebroadcasts, self.refused_steps,
            bytes_up_ratio=fp32_ratio(round_.bytes_up, round_.copies_up, self.model_bytes),
            bytes_down_ratio=fp32_ratio(round_.bytes_down, round_.copies_down, self.model_bytes),
            mode=self.cfg.mode, server_optimizer=self.pipeline.optimizer.name,
            **staleness_notes(round_.staleness, round_.too_stale), **self.defences.version_notes(round_.folded))
        self.version, self.refused_steps = version, 0
        released = self.lines.closed(record)
        if (version >= self.cfg.versions or self._reached_target(record)
                or (released is not None and self._reached_target(released)) or self._budget_spent()):
            self._score_final_version()
        else:
            self.round = self._new_round(version)
            self._open_round(self.round)

    def _reached_target(self, record: VersionRecord) -> bool:
        """The version's accuracy (test set, else federated) reached ``--target-accuracy``."""
        target = self.cfg.target_accuracy
        return target > 0 and record.accuracy is not None and record.accuracy >= target

    def _budget_spent(self) -> bool:
        """One more version would spend more privacy than ``--dp-epsilon-budget``: the run ends here."""
        privacy = self.defences.privacy
        if privacy is None or not privacy.exhausted():
            return False
        log.warning("run %s: version %d would bring epsilon to %.4f, above the budget %.4f (delta %g); "
                    "stopping at version %d (epsilon %.4f)", self.run_id, self.version + 1, privacy.next_epsilon(),
                    privacy.budget, privacy.ledger.delta, self.version, privacy.epsilon)
        return True

    def _assigned_partition(self, worker_id: str) -> int | None:
        record = self.registry.get(worker_id)
        return None if record is None else record.partition

    def _test(self) -> Evaluation | None:
        """The current model on the aggregator's test set (None with ``--eval-data none``)."""
        if self.test is None:
            return None
        self.model.load_state_dict(self.weights)
        return evaluate(self.model, self.test.images, self.test.labels, batch_size=self.cfg.eval_batch_size,
                        device=self.device)

    def _score_final_version(self) -> None:
        """No version follows to be scored on receipt: ask the workers to score this one."""
        if not self.lines.waiting:
            self._finish()
            return
        live = self.registry.live_ids()
        self.lines.await_scores(live, self.clock() + self.cfg.round_timeout_s)
        self.round = None
        self.transport.send(BROADCAST_EXCHANGE, "", EvaluationRequest(self.run_id, self.version, (), self.weights),
                            mandatory=False)
        log.info("version %d: final model sent to %d live workers to score on their held-out rows",
                 self.version, len(live))

    def _refuse_step(self, round_: OpenRound, bad: list[str]) -> None:
        """The aggregate is not finite: it never becomes a version. Keep the current model,
        dead-letter the updates that made it (RabbitMQ's own dead-lettering: their bodies are
        not kept here) and ask every live worker to train the version again."""
        self.refused_steps += 1
        log.error("version %d: the aggregate of %d updates (%s) is not finite in %s; step refused, the model "
                  "stays at version %d, the updates are dead-lettered, the version is broadcast again "
                  "(%d refused so far)", round_.version, len(round_.folded), ", ".join(sorted(round_.folded)),
                  ", ".join(bad[:5]), self.version, self.refused_steps)
        for delivery in round_.held_deliveries():
            self.broker.reject(delivery, requeue=False)
        fresh = self._new_round(round_.version)
        fresh.rebroadcasts = round_.rebroadcasts
        fresh.started, fresh.attempt, fresh.selected = round_.started, round_.attempt, round_.selected
        self.round = fresh
        self._rebroadcast(fresh, self.clock(), "its aggregate was refused")

    def _finish(self) -> None:
        path = self.store.save_final(self.run_id, self.version, self.weights)
        last = self.lines.last.accuracy if self.lines.last else None
        accuracy = 0.0 if last is None else last  # no version closed, or none measured
        self.transport.send(BROADCAST_EXCHANGE, "", RunComplete(self.run_id, self.version, accuracy), mandatory=False)
        self.finished, self.round = True, None
        self.events.emit(RunFinished(self.run_id, self.version))
        log.info("run %s complete at version %d: final model in %s", self.run_id, self.version, path)

    # -- messages -------------------------------------------------------------------------------
    def _dead_letter(self, deliveries, reason: str, detail: str) -> None:
        self.transport.dead_letter(deliveries, reason, detail)
        if self.round is not None:
            self.round.dead_lettered += 1
        self.events.emit(UpdateRefused(self.run_id, self.version, "", reason, True,
                                       sum(len(d.body) for d in deliveries)))

    def _receive(self, delivery: Delivery) -> ReceivedBytes | None:
        """The whole message a delivery completes, undecoded; None while chunks are missing or
        if invalid (then it is dead-lettered)."""
        self._handled += 1
        try:
            raw = self.transport.receive_bytes(delivery)
        except InvalidMessage as exc:
            self._dead_letter(exc.deliveries, exc.reason, exc.detail)  # type: ignore[attr-defined]
            return None
        refused = raw and identity_refusal(raw, required=self.cfg.require_worker_identity)
        if refused:
            self._dead_letter(raw.deliveries, *refused)
            return None
        return raw

    def _on_control(self, delivery: Delivery) -> None:
        raw = self._receive(delivery)
        if raw is None:
            return
        try:
            message = self.transport.decode(raw)
        except InvalidMessage as exc:
            self._dead_letter(raw.deliveries, exc.reason, exc.detail)
            return
        if isinstance(message, KeyframeRequest):
            self._on_keyframe_request(message)
        elif isinstance(message, StatusRequest):
            answer_status(self.transport, message, self.state.snapshot())
        elif not self.membership.handle(message):
            self._dead_letter(raw.deliveries, "schema", f"a {message.KIND} message on the control queue")
            return
        for d in raw.deliveries:
            self.broker.ack(d)

    def _on_keyframe_request(self, request: KeyframeRequest) -> None:
        round_ = self.round
        if (request.run_id != self.run_id or round_ is None or not round_.is_open
                or request.worker_id not in self.registry.live_ids()):
            return
        if self.broadcaster.send_keyframe(round_, request.worker_id, requested=True):
            log.warning("version %d: keyframe sent to %s, which could not rebuild version %d: %s", round_.version,
                        request.worker_id, request.version, request.reason)

    def _on_joined(self, worker_id: str) -> None:
        round_ = self.round
        if round_ is None or round_.broadcast is None:
            return
        # A late joiner gets the current model now, whole, not at the next version.
        self.broadcaster.send_keyframe(round_, worker_id)
        if not round_.selected and len(round_.expected) < self.cfg.start_workers:
            # A version opened short of --start-workers (after many workers died) counts
            # joiners into its quorum instead of closing on the first update.
            round_.expected.add(worker_id)

    def _on_update(self, delivery: Delivery) -> None:
        raw = self._receive(delivery)
        if raw is None:
            return
        if peek_kind(raw.data) == EvaluationReport.KIND:
            self._on_evaluation(raw)
        else:
            self.intake.take(raw, self.round, version=self.version, checkpointed=self.checkpointed,
                             template=self.weights)
            round_ = self.round
            if (self.asynchronous and round_ is not None and round_.is_open
                    and self.close_policy.decide(round_, self.registry, self.clock()) is Decision.CLOSE):
                # FedBuff: the K-th update closes the version at once, not at the next tick.
                self._close_round(round_)

    def _on_evaluation(self, raw: ReceivedBytes) -> None:
        """A worker's score of a version: counted once if that version's line is waiting for
        scores, dropped (acknowledged) if it comes late, dead-lettered if it cannot be right."""
        try:
            report = self.transport.decode(raw)
        except InvalidMessage as exc:
            self._dead_letter(raw.deliveries, exc.reason, exc.detail)
            return
        refused = self.lines.take_score(report, version=self.version)
        if refused is not None:
            self._dead_letter(raw.deliveries, *refused)
            return
        for d in raw.deliveries:
            self.broker.ack(d)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value
