"""Federated evaluation: the workers' reports on one model version, folded into one score.

Each selected worker scores the global model on the rows it holds out and reports its sample
count, mean loss and accuracy; the federation's accuracy is the sample-weighted mean, the same
number one evaluation over all the held-out rows together would give. A worker counts once
(deliveries are at least once), and a worker without held-out rows reports 0 samples: it
counts as having answered but weighs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


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
