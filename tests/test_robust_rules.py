"""Median, trimmed mean and Krum against hand computations; the [P, N] update matrix."""

from __future__ import annotations

import pytest
import torch

from aggregator.robust_rules import (UpdateMatrix, combine, coordinate_median, krum, krum_scores, trim_count,
                                     trimmed_mean)
from fedmq.errors import AggregationError


def columns(*cols):
    return torch.tensor(cols, dtype=torch.float32).T  # each argument is one update (a column)


def test_median_odd_and_even_counts():
    assert coordinate_median(columns([1, 2], [5, -1], [3, 10])).tolist() == [3.0, 2.0]
    assert coordinate_median(columns([1], [2], [3], [10])).tolist() == [2.5]


def test_trimmed_mean_drops_each_end():
    m = columns([1], [2], [3], [4], [100])
    assert trim_count(5, 0.2) == 1
    assert trimmed_mean(m, 0.2).tolist() == [3.0]  # (2 + 3 + 4) / 3
    assert trimmed_mean(m, 0.0).tolist() == [22.0]  # no trimming: the plain mean
    assert trim_count(10, 0.25) == 2  # rounded down
    with pytest.raises(AggregationError):
        trim_count(4, 0.5)


def test_krum_scores_and_choice_by_hand():
    # 1-D points 0, 1, 2, 50, 53 with f = 1: each score sums the N - f - 2 = 2 nearest squared distances.
    m = columns([0], [1], [2], [50], [53])
    assert krum_scores(m, 1).tolist() == [5.0, 2.0, 5.0, 9.0 + 48.0 ** 2, 9.0 + 51.0 ** 2]
    chosen, index = krum(m, 1)
    assert index == 1 and chosen.tolist() == [1.0]
    with pytest.raises(AggregationError):
        krum_scores(columns([0], [1], [2]), 1)  # N = 3 < f + 3


def test_fedavg_rule_weights_by_samples():
    m = columns([1.0, 0.0], [3.0, 4.0])
    assert combine("fedavg", m, weights=[100, 300]).tolist() == [2.5, 3.0]
    with pytest.raises(AggregationError):
        combine("nope", m)


def test_robust_rules_resist_scaled_sign_flipped_updates():
    generator = torch.Generator().manual_seed(0)
    honest_mean = torch.randn(1000, generator=generator)
    honest = [honest_mean + 0.1 * torch.randn(1000, generator=generator) for _ in range(8)]
    attackers = [-10 * honest_mean for _ in range(2)]
    m = torch.stack(honest + attackers, dim=1)
    error = lambda v: float((v - honest_mean).norm() / honest_mean.norm())  # noqa: E731
    assert error(combine("fedavg", m)) > 1.0  # the mean is dragged past zero
    assert error(combine("median", m)) < 0.15
    assert error(combine("trimmed-mean", m, trim_fraction=0.2)) < 0.1
    assert error(combine("krum", m, num_byzantine=2)) < 0.2


def test_update_matrix_round_trip_with_growth_and_integer_buffers():
    template = {"w": torch.zeros(2, 3), "b": torch.zeros(3), "n": torch.zeros((), dtype=torch.int64)}
    matrix = UpdateMatrix(template, capacity=1)
    updates = [{"w": torch.full((2, 3), float(i)), "b": torch.arange(3.0) * i, "n": torch.tensor(2 * i)}
               for i in range(1, 4)]
    for u in updates:
        matrix.add(u)
    assert matrix.matrix.shape == (2 * 3 + 3 + 1, 3)
    back = matrix.unflatten(matrix.matrix[:, 1])
    assert set(back) == set(template)
    for name in template:
        assert back[name].dtype == template[name].dtype and torch.equal(back[name], updates[1][name])
    median = matrix.unflatten(coordinate_median(matrix.matrix))
    assert torch.equal(median["w"], torch.full((2, 3), 2.0)) and int(median["n"]) == 4
