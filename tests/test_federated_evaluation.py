"""Federated evaluation as plain functions: the weighted score equals one evaluation over all
held-out rows together; a worker counts once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aggregator.federated_evaluation import FederatedEvaluation
from fedmq.task.evaluation import evaluate


def test_weighted_score_equals_one_evaluation_of_all_rows() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    sites = [(torch.randn(n, 5), torch.randint(0, 3, (n,))) for n in (7, 40, 13)]
    fed = FederatedEvaluation(version=4)
    for index, (x, y) in enumerate(sites):
        local = evaluate(model, x, y, batch_size=8)
        assert local.num_samples == len(y)
        assert fed.add(f"w{index}", local.num_samples, local.loss, local.accuracy)
    together = evaluate(model, torch.cat([x for x, _ in sites]), torch.cat([y for _, y in sites]))
    result = fed.result()
    assert result.samples == 60 and result.workers == 3
    assert result.accuracy == pytest.approx(together.accuracy, abs=1e-12)
    assert result.loss == pytest.approx(together.loss, rel=1e-5)


def test_unequal_sites_weigh_by_samples_and_duplicates_count_once() -> None:
    fed = FederatedEvaluation(version=1)
    assert fed.add("big", 900, 0.1, 0.95)
    assert fed.add("small", 100, 2.0, 0.15)
    assert not fed.add("small", 100, 0.0, 1.0), "a redelivered report is not folded again"
    assert fed.add("no-data", 0, 0.0, 0.0)
    result = fed.result()
    # (900*0.95 + 100*0.15) / 1000 = 0.87; (900*0.1 + 100*2.0) / 1000 = 0.29
    assert result.accuracy == pytest.approx(0.87) and result.loss == pytest.approx(0.29)
    assert (result.samples, result.workers) == (1000, 2)
    assert fed.reported == {"big", "small", "no-data"}


def test_no_samples_no_score() -> None:
    fed = FederatedEvaluation(version=2)
    fed.add("a", 0, 0.0, 0.0)
    assert fed.result().accuracy is None and fed.result().loss is None


@pytest.mark.parametrize("n,loss,accuracy", [(-1, 0.1, 0.5), (10, -0.1, 0.5), (10, 0.1, 1.01)])
def test_impossible_reports_are_refused(n: int, loss: float, accuracy: float) -> None:
    with pytest.raises(ValueError):
        FederatedEvaluation(version=1).add("w", n, loss, accuracy)


def test_evaluate_restores_training_mode_and_handles_no_rows() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model.train()
    empty = evaluate(model, torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64))
    assert (empty.accuracy, empty.loss, empty.num_samples) == (0.0, 0.0, 0)
    assert model.training
