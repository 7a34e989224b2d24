"""Each model version's line of ``metrics.jsonl`` (and of the console), with its scores.

A line is released as a :class:`~fedmq.events.VersionClosed` event; the ``metrics.jsonl`` sink
(:class:`~fedmq.metrics_file.MetricsFile`) writes it, Prometheus and the live view show it.

A version's test-set score is known when it is made; its federated score only once the workers
have scored it, on receipt of its broadcast (or, for the final version, of an evaluation
request). So a line is written at once when no worker scores versions, and otherwise held until
the awaited workers' scores are in, their deadline passes, or the version's round closes.
A line held when the aggregator dies is not written (the checkpoint is unaffected).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Container, Iterable

from aggregator.checkpoint import CheckpointStore
from aggregator.federated_evaluation import EvaluationLedger, FederatedResult, Verdict
from aggregator.rounds import VersionRecord
from fedmq.events import EventBus, VersionClosed
from fedmq.messages import EvaluationReport
from fedmq.metrics_file import MetricsFile

log = logging.getLogger(__name__)


class VersionLines:
    """Releases the lines of run ``run_id`` as events on ``events`` (without one: written to
    ``store``'s ``metrics.jsonl``), then calls ``on_version`` with each."""

    def __init__(self, run_id: str, store: CheckpointStore,
                 on_version: Callable[[VersionRecord], None] | None, events: EventBus | None = None) -> None:
        self.run_id = run_id
        self.store = store
        self.on_version = on_version
        self.events = events if events is not None else EventBus(MetricsFile(store.metrics_path))
        self._warned = False
        self.ledger = EvaluationLedger(run_id)
        self.records: list[VersionRecord] = []

    @property
    def last(self) -> VersionRecord | None:
        return self.records[-1] if self.records else None

    @property
    def waiting(self) -> bool:
        """A line is held for its workers' scores."""
        return self.ledger.pending is not None

    def closed(self, record: VersionRecord) -> VersionRecord | None:
        """A version was made: the line still held (the previous version's: no more scores of it
        are waited for) is written and returned; ``record``'s is held if workers score versions."""
        written = self._write(*self.ledger.release()) if self.waiting else None
        if self.ledger.evaluators:
            self.ledger.hold(record)
        else:
            self._write(record, None)
        return written

    def await_scores(self, workers: Iterable[str], deadline: float) -> None:
        """The held line waits for the scores of ``workers`` (those that score) until ``deadline``."""
        if self.waiting:
            self.ledger.wait_for(workers, deadline)

    def take_score(self, report: EvaluationReport, *, version: int) -> tuple[str, str] | None:
        """Count a worker's score (once) if its version's line is held, drop it if it comes late;
        returns (reason, detail) to dead-letter it with when it cannot be right."""
        verdict = self.ledger.take(report, version=version)
        if verdict is Verdict.WRONG_RUN:
            return "wrong-run", f"evaluation of run {report.run_id!r}, this is {self.run_id!r}"
        if verdict is Verdict.FUTURE:
            return "future-version", f"{report.worker_id} scored version {report.version}, the newest is {version}"
        if verdict is Verdict.DUPLICATE:
            log.info("version %d: duplicate score from %s ignored", report.version, report.worker_id)
        else:
            log.info("version %d: score from %s: accuracy %.4f, loss %.4f on %d held-out samples%s", report.version,
                     report.worker_id, report.accuracy, report.loss, report.num_samples,
                     "" if verdict is Verdict.FOLD else " (not recorded: no line of that version is waiting)")
        return None

    def tick(self, live: Container[str], now: float) -> VersionRecord | None:
        """Write the held line if it need not wait any more; returns it then."""
        if self.ledger.complete(live, now):
            return self._write(*self.ledger.release())
        return None

    def _write(self, record: VersionRecord, federated: FederatedResult | None) -> VersionRecord:
        if federated is not None and federated.accuracy is not None:
            record = dataclasses.replace(record, federated_accuracy=federated.accuracy, federated_loss=federated.loss,
                                         federated_samples=federated.samples, federated_workers=federated.workers)
        self.events.emit(VersionClosed.from_line(record.to_json()))
        self.records.append(record)
        log.info("version %d of run %s: %d updates, test accuracy %s, federated accuracy %s (%d held-out samples "
                 "of %d workers), %.1f s", record.version, self.run_id, record.participants,
                 _fmt(record.test_accuracy), _fmt(record.federated_accuracy), record.federated_samples,
                 record.federated_workers, record.seconds)
        if record.accuracy is None and not self._warned:
            self._warned = True
            log.warning("run %s: version %d has no accuracy: --eval-data none and no worker scored it (give "
                        "workers --eval-fraction to hold out rows)", self.run_id, record.version)
        if self.on_version is not None:
            self.on_version(record)
        return record


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
