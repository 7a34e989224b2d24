"""Server optimizers and staleness weights against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from aggregator.pipeline import AggregationPipeline, UpdateContext
from aggregator.server_optimizers import build_server_optimizer
from aggregator.staleness import build_staleness


def _w(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32), "n": torch.tensor(4)}


def _d(*values: float, n: int = 2) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32), "n": torch.tensor(n)}


def _steps(name: str, deltas, **params):
    """Take each step and commit it, as the round loop does; returns the weights after each."""
    optimizer = build_server_optimizer(name, **params)
    weights, seen = _w(1.0, -2.0), []
    for delta in deltas:
        weights, state = optimizer.step(weights, delta)
        optimizer.load(state)
        seen.append(weights)
    return optimizer, seen


def test_fedavg_is_the_plain_step_with_its_learning_rate():
    optimizer, seen = _steps("fedavg", [_d(0.5, 1.0)], lr=0.5)
    assert seen[0]["w"].tolist() == [1.25, -1.5]
    assert optimizer.state() == {}
    assert int(seen[0]["n"]) == 5  # 4 + 0.5 * 2, rounded


def test_fedavgm_accumulates_momentum_by_hand():
    # m1 = 1.0; w1 = 1 + 0.5*1.0 = 1.5.   m2 = 0.9*1.0 + 2.0 = 2.9; w2 = 1.5 + 0.5*2.9 = 2.95
    optimizer, seen = _steps("fedavgm", [_d(1.0, 0.0), _d(2.0, -1.0)], lr=0.5, momentum=0.9)
    assert seen[0]["w"].tolist() == pytest.approx([1.5, -2.0])
    assert seen[1]["w"].tolist() == pytest.approx([2.95, -2.5])
    state = optimizer.state()
    assert sorted(state) == ["m.w"]  # integer buffers have no state
    assert state["m.w"].tolist() == pytest.approx([2.9, -1.0])
    assert int(seen[1]["n"]) == 8  # integers move by the plain delta: 4 + 2 + 2


def test_fedadam_by_hand():
    lr, b1, b2, eps = 0.1, 0.9, 0.99, 1e-3
    optimizer, seen = _steps("fedadam", [_d(0.2, -0.1), _d(0.4, 0.0)], lr=lr, beta1=b1, beta2=b2, epsilon=eps)
    m, v, w = [0.0, 0.0], [eps ** 2] * 2, [1.0, -2.0]
    for delta in ([0.2, -0.1], [0.4, 0.0]):
        for i, d in enumerate(delta):
            m[i] = b1 * m[i] + (1 - b1) * d
            v[i] = b2 * v[i] + (1 - b2) * d * d
            w[i] = w[i] + lr * m[i] / (math.sqrt(v[i]) + eps)
    assert seen[-1]["w"].tolist() == pytest.approx(w, rel=1e-5)
    state = optimizer.state()
    assert state["m.w"].tolist() == pytest.approx(m, rel=1e-5)
    assert state["v.w"].tolist() == pytest.approx(v, rel=1e-5)
    # First step by hand: m = 0.02, v = 1e-6*0.99 + 0.01*0.04 = 0.00040099; w = 1 + 0.1*0.02/(0.020025+0.001)
    assert float(seen[0]["w"][0]) == pytest.approx(1 + 0.1 * 0.02 / (math.sqrt(0.00040099) + 1e-3), rel=1e-6)


def test_fedyogi_by_hand_differs_from_adam_in_v():
    lr, b1, b2, eps = 0.1, 0.9, 0.99, 1e-3
    optimizer, seen = _steps("fedyogi", [_d(0.2, -0.1), _d(0.01, 0.0)], lr=lr, beta1=b1, beta2=b2, epsilon=eps)
    m, v, w = [0.0, 0.0], [eps ** 2] * 2, [1.0, -2.0]
    for delta in ([0.2, -0.1], [0.01, 0.0]):
        for i, d in enumerate(delta):
            m[i] = b1 * m[i] + (1 - b1) * d
            sign = math.copysign(1.0, v[i] - d * d) if v[i] != d * d else 0.0
            v[i] = v[i] - (1 - b2) * d * d * sign
            w[i] = w[i] + lr * m[i] / (math.sqrt(v[i]) + eps)
    assert seen[-1]["w"].tolist() == pytest.approx(w, rel=1e-5)
    assert optimizer.state()["v.w"].tolist() == pytest.approx(v, rel=1e-5)
    # Yogi's first v grows additively, 1e-6 + 0.01*0.04, where Adam's would be 0.99e-6 + 0.01*0.04.
    first = build_server_optimizer("fedyogi", lr=lr, beta1=b1, beta2=b2, epsilon=eps)
    first.load(first.step(_w(1.0, -2.0), _d(0.2, -0.1))[1])
    assert float(first.state()["v.w"][0]) == pytest.approx(1e-6 + 0.01 * 0.04, rel=1e-6)


def test_step_changes_nothing_and_state_round_trips_bit_for_bit():
    optimizer = build_server_optimizer("fedadam", lr=0.05)
    weights, state = optimizer.step(_w(1.0, 2.0), _d(0.3, -0.7))
    assert optimizer.state() == {}  # step proposed only
    optimizer.load(state)
    again = build_server_optimizer("fedadam", lr=0.05)
    again.load(optimizer.state())
    a = optimizer.step(weights, _d(0.1, 0.1))
    b = again.step(weights, _d(0.1, 0.1))
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1]) and torch.equal(a[0]["w"], b[0]["w"])


def test_foreign_state_and_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="not fedavgm state"):
        build_server_optimizer("fedavgm").load({"v.w": torch.zeros(2)})
    with pytest.raises(ValueError, match="no state"):
        build_server_optimizer("fedavg").load({"m.w": torch.zeros(2)})
    with pytest.raises(ValueError, match="unknown server optimizer"):
        build_server_optimizer("sgd")
    with pytest.raises(ValueError, match="beta2"):
        build_server_optimizer("fedyogi", beta2=1.0)
    with pytest.raises(ValueError, match="momentum"):
        build_server_optimizer("fedavgm", momentum=1.5)


def test_default_learning_rates_depend_on_the_optimizer():
    assert build_server_optimizer("fedavg").server_lr == 1.0
    assert build_server_optimizer("fedadam").lr == 0.01
    assert build_server_optimizer("fedavgm", lr=0.3).lr == 0.3


def test_server_optimizer_in_the_pipeline_folds_then_steps():
    pipeline = AggregationPipeline(optimizer=build_server_optimizer("fedavgm", lr=1.0, momentum=0.5))
    for _ in range(2):
        combiner = pipeline.new_combiner(_w(0, 0))
        pipeline.fold(combiner, _d(1.0, 1.0), UpdateContext("a", 1))
        pipeline.fold(combiner, _d(3.0, 3.0), UpdateContext("b", 3))  # mean 2.5
        proposal = pipeline.propose(_w(0.0, 0.0), combiner)
        pipeline.commit(proposal)
    assert proposal.weights["w"].tolist() == [2.5 * 1.5, 2.5 * 1.5]  # m2 = 0.5*2.5 + 2.5


# -- staleness ------------------------------------------------------------------------------------

def test_staleness_weights_by_hand():
    constant = build_staleness("constant")
    assert [constant(t) for t in (0, 1, 50)] == [1.0, 1.0, 1.0]
    fedbuff = build_staleness("polynomial")  # 1/sqrt(1+tau)
    assert fedbuff(0) == 1.0 and fedbuff(3) == 0.5 and fedbuff(8) == pytest.approx(1 / 3)
    assert build_staleness("polynomial", exponent=1.0)(4) == pytest.approx(0.2)
    hinge = build_staleness("hinge", hinge_slope=10.0, hinge_start=4)
    assert [hinge(t) for t in (0, 4)] == [1.0, 1.0]
    assert hinge(5) == pytest.approx(1 / 11) and hinge(6) == pytest.approx(1 / 21)


def test_staleness_refuses_nonsense():
    with pytest.raises(ValueError, match=">= 0"):
        build_staleness("polynomial")(-1)
    with pytest.raises(ValueError, match="unknown staleness"):
        build_staleness("linear")
    with pytest.raises(ValueError, match="exponent"):
        build_staleness("polynomial", exponent=-1)
