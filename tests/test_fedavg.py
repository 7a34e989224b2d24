"""Weighted FedAvg, selection and quorum as plain functions."""

import gc
import weakref

import pytest
import torch

from aggregator.fedavg import RunningSum, apply_mean_delta, check_compatible, fold_update, weighted_mean_delta
from aggregator.selection import quorum_size, select_participants
from fedmq.errors import AggregationError, InvalidMessage

TEMPLATE = {"w": torch.zeros(2, dtype=torch.float32), "count": torch.tensor(0, dtype=torch.int64)}


def test_weighted_mean_matches_a_hand_computation_with_unequal_weights_and_an_int_buffer():
    updates = [
        ({"w": torch.tensor([1.0, 2.0]), "count": torch.tensor(10)}, 100.0),
        ({"w": torch.tensor([4.0, -1.0]), "count": torch.tensor(30)}, 300.0),
        ({"w": torch.tensor([0.0, 5.0]), "count": torch.tensor(20)}, 600.0),
    ]
    mean = weighted_mean_delta(updates, TEMPLATE)
    # w: (100*1 + 300*4 + 600*0)/1000 = 1.3 ; (100*2 - 300*1 + 600*5)/1000 = 2.9
    assert torch.allclose(mean["w"], torch.tensor([1.3, 2.9]))
    assert mean["w"].dtype == torch.float32
    # count: (100*10 + 300*30 + 600*20)/1000 = 22.0, stays an integer tensor
    assert mean["count"].dtype == torch.int64 and int(mean["count"]) == 22


def test_integer_buffers_round_to_the_nearest_integer():
    updates = [({"w": torch.zeros(2), "count": torch.tensor(1)}, 1.0),
               ({"w": torch.zeros(2), "count": torch.tensor(2)}, 3.0)]
    # (1*1 + 3*2)/4 = 1.75 -> 2
    assert int(weighted_mean_delta(updates, TEMPLATE)["count"]) == 2


def test_fold_order_does_not_matter():
    deltas = [({"w": torch.randn(2), "count": torch.tensor(i)}, float(w)) for i, w in enumerate([5, 1, 9, 2])]
    forward = weighted_mean_delta(deltas, TEMPLATE)
    backward = weighted_mean_delta(list(reversed(deltas)), TEMPLATE)
    assert torch.equal(forward["w"], backward["w"]) and torch.equal(forward["count"], backward["count"])


def test_running_sum_keeps_no_update_alive_and_averages_them_all():
    # O(P) memory whatever the number of updates: a folded delta is not referenced afterwards
    # (an implementation that buffered updates would keep them alive).
    running = RunningSum(TEMPLATE)
    alive = []
    for i in range(50):
        delta = {"w": torch.full((2,), float(i)), "count": torch.tensor(i)}
        alive.append(weakref.ref(delta["w"]))
        fold_update(running, delta, 2.0)
        del delta
    gc.collect()
    assert not any(ref() is not None for ref in alive)
    assert running.count == 50 and running.total_weight == 100.0
    assert torch.allclose(running.mean()["w"], torch.full((2,), 24.5))  # mean of 0..49
    assert int(running.mean()["count"]) == 24  # 24.5 rounds to the even 24


def test_zero_total_weight_is_refused_with_a_clear_error():
    with pytest.raises(AggregationError, match="total weight is zero"):
        RunningSum(TEMPLATE).mean()
    with pytest.raises(AggregationError, match="positive"):
        RunningSum(TEMPLATE).fold({"w": torch.ones(2), "count": torch.tensor(0)}, 0.0)


def test_apply_mean_delta_moves_floats_and_integers():
    weights = {"w": torch.tensor([1.0, 1.0]), "count": torch.tensor(7)}
    out = apply_mean_delta(weights, {"w": torch.tensor([0.5, -1.0]), "count": torch.tensor(3)})
    assert torch.allclose(out["w"], torch.tensor([1.5, 0.0])) and int(out["count"]) == 10
    assert torch.equal(weights["w"], torch.tensor([1.0, 1.0]))  # the input is not modified


def test_incompatible_updates_are_refused():
    with pytest.raises(InvalidMessage) as info:
        check_compatible(TEMPLATE, {"w": torch.zeros(3), "count": torch.tensor(0)})
    assert info.value.reason == "shape"
    with pytest.raises(InvalidMessage):
        check_compatible(TEMPLATE, {"w": torch.zeros(2)})
    with pytest.raises(InvalidMessage):
        check_compatible(TEMPLATE, {"w": torch.zeros(2, dtype=torch.float64), "count": torch.tensor(0)})
    with pytest.raises(AggregationError):
        RunningSum({"flag": torch.tensor(True)})


def test_selection_is_seeded_sized_and_a_subset():
    live = [f"w{i}" for i in range(10)]
    chosen = select_participants(live, 0.3, seed=1, version=4)
    assert len(chosen) == 3 and set(chosen) <= set(live) and list(chosen) == sorted(chosen)
    assert chosen == select_participants(reversed(live), 0.3, seed=1, version=4)
    others = {select_participants(live, 0.3, seed=1, version=v) for v in range(20)}
    assert len(others) > 1  # changes with the version
    assert select_participants(live, 1.0, seed=1, version=0) == tuple(sorted(live))
    assert len(select_participants(live, 0.01, seed=1, version=0)) == 1
    assert select_participants([], 0.5, seed=1, version=0) == ()


def test_quorum_size():
    assert quorum_size(10, min_updates=1, quorum_fraction=1.0) == 10
    assert quorum_size(10, min_updates=1, quorum_fraction=0.75) == 8
    assert quorum_size(2, min_updates=3, quorum_fraction=1.0) == 3
    assert quorum_size(0, min_updates=1, quorum_fraction=1.0) == 1
