"""Weight updates in: decide from the header, then fold, hold, acknowledge or dead-letter.

The order of the checks is the point: the cheap ones (run, version, duplicate, selection) run on
the header alone (:func:`fedmq.messages.peek_update`), so a backlog of stale or duplicate
updates costs neither the CPU nor the memory of decoding their tensors. Only an update that will
be folded is decoded, then checked against the model (:func:`check_update`).

What each outcome does with the deliveries:
- fold: fold into the round; hold the deliveries (bodies dropped) until the next checkpoint;
- duplicate: fold nothing; hold this newest copy instead of the older one, acknowledging the
  older (its tags may be void after a reconnection; this copy keeps the update in the broker);
- stale or unselected: acknowledge at once, count it;
- too stale (async mode: trained on a version more than ``max_staleness`` versions old):
  acknowledge at once, count it;
- invalid: dead-letter with the reason, count it.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from dataclasses import dataclass
from typing import AbstractSet, Callable, Mapping

import torch

from aggregator.checkpoint import UpdateKey
from aggregator.fedavg import check_compatible
from aggregator.pipeline import AggregationPipeline, UpdateContext
from aggregator.rounds import OpenRound
from fedmq.broker.base import Broker
from fedmq.events import Sink, UpdateFolded, UpdateRefused
from fedmq.errors import InvalidMessage
from fedmq.messages import UpdateHeader, WeightUpdate, peek_update
from fedmq.transport import ReceivedBytes, Transport

log = logging.getLogger(__name__)


class Action(enum.Enum):
    FOLD = "fold"  # decode, check and fold it into the open version
    DUPLICATE = "duplicate"  # already folded: keep the delivery to acknowledge with the checkpoint
    STALE = "stale"  # its version is closed (or it is already in the checkpoint): acknowledge, drop
    UNSELECTED = "unselected"  # the version named other workers: acknowledge, drop
    TOO_STALE = "too-stale"  # async mode: its base version is more than max_staleness old: acknowledge, drop
    DEAD_LETTER = "dead-letter"  # invalid here: dead-letter with ``reason``


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str = ""
    detail: str = ""
    staleness: int = 0  # of an update to fold: versions made since its base version


def classify_update(header: UpdateHeader, *, run_id: str, version: int, round_: OpenRound | None,
                    checkpointed: AbstractSet[UpdateKey], num_partitions: int,
                    max_staleness: int | None = None) -> Verdict:
    """The verdict on an update for a run at ``version`` whose open round is ``round_``.

    ``checkpointed`` are the keys of updates already folded into the last checkpoint (they come
    back when the aggregator died between writing it and acknowledging them). ``max_staleness``
    None is sync mode (only updates of the open version count); a number is async mode (see
    :func:`classify_async`).
    """
    if max_staleness is not None:
        return classify_async(header, run_id=run_id, version=version, round_=round_, checkpointed=checkpointed,
                              num_partitions=num_partitions, max_staleness=max_staleness)
    if header.run_id != run_id:
        return Verdict(Action.DEAD_LETTER, "wrong-run", f"update of run {header.run_id!r}, this is {run_id!r}")
    if not -1 <= header.partition < num_partitions:
        return Verdict(Action.DEAD_LETTER, "bounds",
                       f"from {header.worker_id}: partition {header.partition}, the run has {num_partitions}")
    if header.key in checkpointed or header.base_version < version:
        return Verdict(Action.STALE)
    if round_ is None or header.base_version > round_.version:
        return Verdict(Action.DEAD_LETTER, "future-version",
                       f"update for version {header.base_version}, open version is "
                       f"{round_.version if round_ else 'none'}")
    if round_.selected and header.worker_id not in round_.selected:
        return Verdict(Action.UNSELECTED)
    if header.worker_id in round_.folded:
        return Verdict(Action.DUPLICATE)
    return Verdict(Action.FOLD)


def classify_async(header: UpdateHeader, *, run_id: str, version: int, round_: OpenRound | None,
                   checkpointed: AbstractSet[UpdateKey], num_partitions: int, max_staleness: int) -> Verdict:
    """Async mode's verdict: an update trained on any version up to ``max_staleness`` versions
    before the open one is folded with its staleness; one (run, base version, worker) only once,
    across checkpoints too (``checkpointed`` holds the keys still young enough to come back)."""
    if header.run_id != run_id:
        return Verdict(Action.DEAD_LETTER, "wrong-run", f"update of run {header.run_id!r}, this is {run_id!r}")
    if not -1 <= header.partition < num_partitions:
        return Verdict(Action.DEAD_LETTER, "bounds",
                       f"from {header.worker_id}: partition {header.partition}, the run has {num_partitions}")
    if header.key in checkpointed or (round_ is None and header.base_version <= version):
        return Verdict(Action.STALE)
    if round_ is None or header.base_version > round_.version:
        return Verdict(Action.DEAD_LETTER, "future-version",
                       f"update for version {header.base_version}, open version is "
                       f"{round_.version if round_ else 'none'}")
    staleness = round_.version - header.base_version
    if staleness > max_staleness:
        return Verdict(Action.TOO_STALE, staleness=staleness)
    if header.key in round_.folded_keys:
        return Verdict(Action.DUPLICATE, staleness=staleness)
    return Verdict(Action.FOLD, staleness=staleness)


def check_update(update: WeightUpdate, template: Mapping[str, torch.Tensor]) -> None:
    """InvalidMessage unless the decoded update fits the model (names, shapes, dtypes)."""
    try:
        check_compatible(template, update.delta)
    except InvalidMessage as exc:
        raise InvalidMessage(exc.reason, f"from {update.worker_id}: {exc.detail}") from None


class UpdateIntake:
    """Takes each whole update (:class:`ReceivedBytes`) and acts on its verdict.

    ``update_bytes`` bounds one encoded update, ``max_frame_bytes`` one AMQP message: together
    they say how many deliveries (chunks) one update takes. Each outcome is also an event on
    ``emit`` (:class:`UpdateFolded` or :class:`UpdateRefused`).
    """

    def __init__(self, broker: Broker, transport: Transport, run_id: str, num_partitions: int, *,
                 update_bytes: int, max_frame_bytes: int, pipeline: AggregationPipeline | None = None,
                 max_staleness: int | None = None, emit: Sink = lambda event: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.broker = broker
        self.max_staleness = max_staleness  # None: sync mode
        self.pipeline = pipeline or AggregationPipeline()
        self.emit = emit
        self.clock = clock
        self.transport = transport
        self.run_id = run_id
        self.num_partitions = num_partitions
        self.update_bytes = update_bytes
        self.frames_per_update = 1 if update_bytes <= max_frame_bytes else math.ceil(
            update_bytes / (max_frame_bytes - 1024))  # chunks leave room for their envelope

    def prefetch_for(self, workers: int) -> int:
        """The update prefetch (deliveries) for ``workers`` workers. Folded updates stay
        unacknowledged until the next checkpoint, so the prefetch must hold one update of every
        worker, all its frames, and room for as many again arriving (duplicates, the next
        version's early ones), or the broker stops delivering before the quorum is in."""
        return self.frames_per_update * (2 * workers + 4)

    def take(self, raw: ReceivedBytes, round_: OpenRound | None, *, version: int,
             checkpointed: AbstractSet[UpdateKey], template: Mapping[str, torch.Tensor]) -> None:
        """Handle one update for a run at ``version`` (``round_`` its round, None once finished)."""
        try:
            header, update = peek_update(raw.data), None
            if header is None:  # not laid out as fedmq writes updates: decode it whole
                message = self.transport.decode(raw)
                if not isinstance(message, WeightUpdate):
                    raise InvalidMessage("schema", f"a {message.KIND} message on the update queue")
                header, update = message.header, message
        except InvalidMessage as exc:
            self._dead_letter(raw, round_, exc.reason, exc.detail)
            return
        worker = header.worker_id
        verdict = classify_update(header, run_id=self.run_id, version=version, round_=round_,
                                  checkpointed=checkpointed, num_partitions=self.num_partitions,
                                  max_staleness=self.max_staleness)
        if verdict.action is Action.DEAD_LETTER:
            self._dead_letter(raw, round_, verdict.reason, verdict.detail, worker)
            return
        if verdict.action in (Action.STALE, Action.UNSELECTED):
            self._ack(raw.deliveries)
            if round_ is not None:
                round_.stale += 1
                round_.bytes_up += raw.size
                round_.copies_up += 1
            log.info("%s update from %s for version %d dropped (current %d)", verdict.action.value,
                     header.worker_id, header.base_version, version)
            self.emit(UpdateRefused(self.run_id, header.base_version, worker, verdict.action.value, False, raw.size))
            return
        if verdict.action is Action.TOO_STALE:
            assert round_ is not None
            self._ack(raw.deliveries)
            round_.too_stale += 1
            round_.bytes_up += raw.size
            round_.copies_up += 1
            log.info("version %d: update from %s for version %d dropped: %d versions old, more than "
                     "--max-staleness %d (%d dropped so far)", round_.version, header.worker_id, header.base_version,
                     verdict.staleness, self.max_staleness, round_.too_stale)
            self.emit(UpdateRefused(self.run_id, header.base_version, worker, verdict.action.value, False, raw.size))
            return
        assert round_ is not None
        round_.bytes_up += raw.size
        round_.copies_up += 1
        if verdict.action is Action.DUPLICATE:
            self._ack(round_.hold(header.key, raw.deliveries))
            round_.duplicates += 1
            log.info("version %d: duplicate update from %s for version %d ignored", round_.version, header.worker_id,
                     header.base_version)
            self.emit(UpdateRefused(self.run_id, round_.version, worker, "duplicate", False, raw.size))
            return
        try:
            if update is None:
                message = self.transport.decode(raw)
                assert isinstance(message, WeightUpdate)  # peek_update read its kind
                update = message
            check_update(update, template)
        except InvalidMessage as exc:
            self._dead_letter(raw, round_, exc.reason, exc.detail, worker)
            return
        self._fold(round_, update, raw, verdict.staleness)

    def _fold(self, round_: OpenRound, update: WeightUpdate, raw: ReceivedBytes, staleness: int) -> None:
        context = UpdateContext(update.worker_id, update.num_samples, staleness, partition=update.partition)
        weight = self.pipeline.fold(round_.combiner, update.delta, context)
        round_.folded.add(update.worker_id)
        round_.folded_keys.add(update.header.key)
        round_.staleness.append(staleness)
        self._ack(round_.hold(update.header.key, raw.deliveries))
        round_.weighted_train_loss += update.train_loss * update.num_samples
        round_.train_samples += update.num_samples
        log.info("version %d: update %d/%d from %s (%d samples, train loss %.4f, %.1f s)%s%s",
                 round_.version, len(round_.folded_keys), len(round_.expected), update.worker_id,
                 update.num_samples, update.train_loss, update.train_seconds,
                 "" if self.max_staleness is None else
                 f", trained on version {update.base_version}: staleness {staleness}, weight {weight:.1f}",
                 "" if round_.is_open else " (redelivered; the version is not broadcast yet)")
        self.emit(UpdateFolded(self.run_id, round_.version, update.worker_id, len(round_.folded), len(round_.expected),
                               update.num_samples, update.train_loss, update.train_seconds, raw.size, self.clock()))

    def _ack(self, deliveries) -> None:
        for d in deliveries:
            self.broker.ack(d)

    def _dead_letter(self, raw: ReceivedBytes, round_: OpenRound | None, reason: str, detail: str,
                     worker_id: str = "") -> None:
        self.transport.dead_letter(raw.deliveries, reason, detail)
        if round_ is not None:
            round_.dead_lettered += 1
        self.emit(UpdateRefused(self.run_id, round_.version if round_ is not None else -1, worker_id, reason, True,
                                raw.size))
