"""The aggregation seam alone: weighting, update stages, combiner, aggregate stages, server step."""

from __future__ import annotations

import pytest
import torch

from aggregator.fedavg import RunningSum
from aggregator.pipeline import AggregationPipeline, PlainStep, UpdateContext

TEMPLATE = {"w": torch.zeros(3), "count": torch.tensor(0)}


def _delta(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value), "count": torch.tensor(2)}


def test_the_default_pipeline_is_sample_weighted_fedavg():
    pipeline = AggregationPipeline()
    combiner = pipeline.new_combiner(TEMPLATE)
    assert isinstance(combiner, RunningSum)
    assert pipeline.fold(combiner, _delta(1.0), UpdateContext("a", 10)) == 10.0
    assert pipeline.fold(combiner, _delta(4.0), UpdateContext("b", 30)) == 30.0
    proposal = pipeline.propose({"w": torch.ones(3), "count": torch.tensor(5)}, combiner)
    # (10*1 + 30*4) / 40 = 3.25, added to the model's 1.
    assert torch.allclose(proposal.weights["w"], torch.full((3,), 4.25))
    assert int(proposal.weights["count"]) == 7
    assert proposal.optimizer_state == {}


def test_stages_run_in_order_and_see_the_update_and_the_combiner():
    seen = []

    def halve(delta, ctx):
        seen.append(("halve", ctx.worker_id, ctx.staleness))
        return {k: v / 2 if v.is_floating_point() else v for k, v in delta.items()}

    def add_count(mean, combiner):
        seen.append(("count", combiner.count))
        return {k: v + combiner.count if v.is_floating_point() else v for k, v in mean.items()}

    pipeline = AggregationPipeline(weighting=lambda ctx: 1.0, update_stages=[halve], aggregate_stages=[add_count])
    combiner = pipeline.new_combiner(TEMPLATE)
    pipeline.fold(combiner, _delta(2.0), UpdateContext("a", 10, staleness=3))
    pipeline.fold(combiner, _delta(4.0), UpdateContext("b", 99))
    proposal = pipeline.propose({"w": torch.zeros(3), "count": torch.tensor(0)}, combiner)
    assert seen == [("halve", "a", 3), ("halve", "b", 0), ("count", 2)]
    assert torch.allclose(proposal.weights["w"], torch.full((3,), 1.5 + 2))  # mean(1, 2) + 2 updates


class _CountingStep:
    """A server step with state: how many steps were taken (to see propose/commit apart)."""

    name = "counting"

    def __init__(self):
        self.steps = torch.tensor(0)

    def step(self, weights, mean_delta):
        return PlainStep().step(weights, mean_delta)[0], {"steps": self.steps + 1}

    def state(self):
        return {"steps": self.steps.clone()}

    def load(self, state):
        self.steps = state["steps"].clone()


def test_propose_changes_nothing_until_commit():
    optimizer = _CountingStep()
    pipeline = AggregationPipeline(optimizer=optimizer)
    combiner = pipeline.new_combiner(TEMPLATE)
    pipeline.fold(combiner, _delta(1.0), UpdateContext("a", 1))
    first = pipeline.propose(TEMPLATE, combiner)
    again = pipeline.propose(TEMPLATE, combiner)  # a refused step is proposed again from the same state
    assert int(first.optimizer_state["steps"]) == int(again.optimizer_state["steps"]) == 1
    assert int(pipeline.state()["steps"]) == 0
    pipeline.commit(first)
    assert int(pipeline.state()["steps"]) == 1
    resumed = AggregationPipeline(optimizer=_CountingStep())
    resumed.restore(pipeline.state())
    assert int(resumed.state()["steps"]) == 1


def test_the_stateless_step_refuses_a_state_it_cannot_hold():
    with pytest.raises(ValueError, match="no state"):
        PlainStep().load({"momentum.w": torch.zeros(3)})
