"""Federated evaluation: the workers' scores of a model version, folded into one.

Each selected worker scores the global model on the rows it holds out and reports its sample
count, mean loss and accuracy; the federation's accuracy is the sample-weighted mean, the same
number one evaluation over all the held-out rows together would give. A worker counts once
(deliveries are at least once), and a worker without held-out rows reports 0 samples: it
counts as having answered but weighs nothing.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Container, Iterable

from fedmq.messages import EvaluationReport


@dataclass(frozen=True)
class FederatedResult:
    """``accuracy`` and ``loss`` are sample-weighted means, None when no report had samples;
    ``samples`` the held-out rows behind them, ``workers`` the reports that had any."""

    accuracy: float | None
    loss: float | None
    samples: int
    workers: int


class FederatedEvaluation:
    """The reports on model ``version``, one per worker."""

    def __init__(self, version: int) -> None:
        self.version = version
        self._reports: dict[str, tuple[int, float, float]] = {}

    def add(self, worker_id: str, num_samples: int, loss: float, accuracy: float) -> bool:
        """Fold one report; False (and nothing changes) when ``worker_id`` already reported."""
        if worker_id in self._reports:
            return False
        if num_samples < 0 or not 0.0 <= accuracy <= 1.0 or loss < 0.0:
            raise ValueError(f"report from {worker_id}: {num_samples} samples, loss {loss}, accuracy {accuracy}")
        self._reports[worker_id] = (num_samples, loss, accuracy)
        return True

    @property
    def reported(self) -> frozenset[str]:
        return frozenset(self._reports)

    def result(self) -> FederatedResult:
        samples = sum(n for n, _, _ in self._reports.values())
        workers = sum(1 for n, _, _ in self._reports.values() if n > 0)
        if samples == 0:
            return FederatedResult(None, None, 0, 0)
        accuracy = sum(n * a for n, _, a in self._reports.values()) / samples
        loss = sum(n * l for n, l, _ in self._reports.values()) / samples
        return FederatedResult(accuracy, loss, samples, workers)


class Verdict(enum.Enum):
    FOLD = "fold"  # a score of the version being collected: count it
    DUPLICATE = "duplicate"  # this worker's score of that version is in already
    LATE = "late"  # of a version no longer (or never) collected: acknowledge, drop
    WRONG_RUN = "wrong-run"  # dead-letter
    FUTURE = "future-version"  # of a version this aggregator has not made: dead-letter


@dataclass
class PendingLine:
    """A version's metrics line, held until the workers' scores of that version are in."""

    record: Any  # the aggregator's VersionRecord
    scores: FederatedEvaluation
    awaited: frozenset[str] = frozenset()  # the workers whose score may be waited for
    deadline: float = math.inf


class EvaluationLedger:
    """Which version's scores are being collected and whether they are all in.

    Only workers that have sent a score in this run (``evaluators``: the ones holding rows out)
    are waited for, so a federation without held-out rows never waits. Scores are collected for
    one version at a time, the newest, whose metrics line is held (:class:`PendingLine`).
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.evaluators: set[str] = set()
        self.pending: PendingLine | None = None
        self.late = 0
        self.duplicates = 0

    def classify(self, report: EvaluationReport, *, version: int) -> Verdict:
        """The verdict on ``report`` for an aggregator holding model ``version``."""
        if report.run_id != self.run_id:
            return Verdict.WRONG_RUN
        if report.version > version:
            return Verdict.FUTURE
        pending = self.pending
        if pending is None or report.version != pending.record.version:
            return Verdict.LATE
        if report.worker_id in pending.scores.reported:
            return Verdict.DUPLICATE
        return Verdict.FOLD

    def take(self, report: EvaluationReport, *, version: int) -> Verdict:
        """Classify ``report`` and count it if it counts; every valid report names an evaluator."""
        verdict = self.classify(report, version=version)
        if verdict in (Verdict.WRONG_RUN, Verdict.FUTURE):
            return verdict
        self.evaluators.add(report.worker_id)
        if verdict is Verdict.FOLD:
            assert self.pending is not None
            self.pending.scores.add(report.worker_id, report.num_samples, report.loss, report.accuracy)
        elif verdict is Verdict.DUPLICATE:
            self.duplicates += 1
        else:
            self.late += 1
        return verdict

    def hold(self, record: Any) -> None:
        """Collect scores of ``record.version``; its line waits (see :meth:`wait_for`)."""
        self.pending = PendingLine(record, FederatedEvaluation(record.version))

    def wait_for(self, workers: Iterable[str], deadline: float) -> None:
        """The pending line waits for the scores of ``workers`` (those that hold rows out) until
        ``deadline`` (clock seconds)."""
        assert self.pending is not None
        self.pending.awaited = frozenset(workers)
        self.pending.deadline = deadline

    def complete(self, live: Container[str], now: float) -> bool:
        """True when the pending line need not wait any more: every awaited evaluator that is
        still live has reported, or the deadline has passed."""
        pending = self.pending
        if pending is None:
            return False
        missing = [w for w in pending.awaited & self.evaluators if w in live and w not in pending.scores.reported]
        return not missing or now >= pending.deadline

    def release(self) -> tuple[Any, FederatedResult]:
        """The pending record and its federated score; nothing is pending afterwards."""
        assert self.pending is not None
        pending, self.pending = self.pending, None
        return pending.record, pending.scores.result()
