"""The aggregation seam: how an update counts, how a version's updates combine, how the model moves.

The round loop owns the messaging and knows only this object. One update goes through
:meth:`AggregationPipeline.fold`: its weight from the weighting (sample count, later scaled by
staleness), then each *update stage* in order (a pure transform of one delta: clipping), then into
the version's :class:`Combiner`. When the version closes, :meth:`~AggregationPipeline.propose`
takes the combined delta through each *aggregate stage* (a transform of the combined delta: DP
noise) and hands it to the server optimizer, which returns the next model and its own next state
without changing anything; :meth:`~AggregationPipeline.commit` makes that state current once the
checkpoint holding it is written (a refused or crashed step leaves the optimizer as it was).

Sync and async mode, robust rules, clipping, DP and secure aggregation are pieces plugged in here;
each is a plain function or small class over tensors, tested alone. The default pipeline is
FedAvg: weight by sample count, streaming weighted mean (memory O(P)), ``w + mean_delta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from aggregator.fedavg import RunningSum, apply_mean_delta

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class UpdateContext:
    """What the weighting and the update stages may know of one update besides its delta.

    ``staleness`` is the number of versions made since the update's base version (0 in sync mode);
    ``partition`` the built-in partition the update says it trained (-1: the worker's own data).
    """

    worker_id: str
    num_samples: int
    staleness: int = 0
    partition: int = -1


class Combiner(Protocol):
    """A version's updates combined into one delta: :class:`RunningSum` streams (O(P) memory);
    robust rules keep the updates (O(N*P)) and combine them at :meth:`mean`."""

    count: int
    total_weight: float

    def fold(self, delta: Tensors, weight: float) -> None: ...

    def mean(self) -> dict[str, torch.Tensor]: ...


class ServerOptimizer(Protocol):
    """Moves the model by the combined delta (a pseudo-gradient, negated). ``step`` must not
    change the optimizer: it returns the next weights and the state that goes with them."""

    name: str

    def step(self, weights: Tensors, mean_delta: Tensors) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]: ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def load(self, state: Tensors) -> None: ...


class PlainStep:
    """FedAvg's server step, ``w + server_lr * mean_delta``; it has no state."""

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    def step(self, weights: Tensors, mean_delta: Tensors) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return apply_mean_delta(weights, mean_delta, server_lr=self.server_lr), {}

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load(self, state: Tensors) -> None:
        if state:
            raise ValueError(f"the fedavg server step has no state, the checkpoint holds {sorted(state)[:3]}")


Weighting = Callable[[UpdateContext], float]
UpdateStage = Callable[[Tensors, UpdateContext], Tensors]
AggregateStage = Callable[[Tensors, Combiner], Tensors]


def sample_weight(ctx: UpdateContext) -> float:
    """FedAvg's weight: the update's sample count."""
    return float(ctx.num_samples)


@dataclass(frozen=True)
class Proposal:
    """The next model and the optimizer state that goes with it, not yet current; ``notes`` are
    what the stages report for the version's metrics (e.g. how many updates were clipped)."""

    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor]
    notes: dict[str, Any] = field(default_factory=dict)


class AggregationPipeline:
    """weigh -> update stages -> combiner -> aggregate stages -> server optimizer (see module doc)."""

    def __init__(self, *, weighting: Weighting = sample_weight, update_stages: Sequence[UpdateStage] = (),
                 combiner: Callable[[Tensors], Combiner] = RunningSum,
                 aggregate_stages: Sequence[AggregateStage] = (),
                 optimizer: ServerOptimizer | None = None) -> None:
        self.weighting = weighting
        self.update_stages = tuple(update_stages)
        self._combiner = combiner
        self.aggregate_stages = tuple(aggregate_stages)
        self.optimizer: ServerOptimizer = optimizer or PlainStep()

    def new_combiner(self, template: Tensors) -> Combiner:
        """An empty combiner for a version of the model ``template``."""
        return self._combiner(template)

    def fold(self, combiner: Combiner, delta: Tensors, ctx: UpdateContext) -> float:
        """Weigh ``delta``, pass it through the update stages and fold it; returns its weight."""
        weight = self.weighting(ctx)
        for stage in self.update_stages:
            delta = stage(delta, ctx)
        combiner.fold(delta, weight)
        return weight

    def propose(self, weights: Tensors, combiner: Combiner) -> Proposal:
        """The next model from ``weights`` and the version's combined updates; changes nothing."""
        mean_delta: Tensors = combiner.mean()
        for stage in self.aggregate_stages:
            mean_delta = stage(mean_delta, combiner)
        new_weights, state = self.optimizer.step(weights, mean_delta)
        return Proposal(new_weights, state)

    def commit(self, proposal: Proposal) -> None:
        """The proposal became the checkpointed model: its optimizer state is now current."""
        self.optimizer.load(proposal.optimizer_state)

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must keep for a resumed run to step exactly as this one would."""
        return self.optimizer.state()

    def state_after(self, proposal: Proposal) -> dict[str, torch.Tensor]:
        """What :meth:`state` will be once ``proposal`` is committed: the checkpoint that makes
        the proposal durable is written before the commit."""
        return dict(proposal.optimizer_state)

    def restore(self, state: Tensors) -> None:
        """Resume from a checkpoint's :meth:`state`."""
        self.optimizer.load(state)
