"""The aggregation pipeline a run's settings ask for, and the check that a resumed run asks the same.

The defences (:mod:`aggregator.defences`: sample caps, clipping, robust combiners, DP noise) give
the weighting, the stages and the combiner; this module adds the server optimizer and, in async
mode, scales the defences' weight by the update's staleness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from aggregator.checkpoint import CheckpointError
from aggregator.pipeline import AggregationPipeline, UpdateContext, Weighting, sample_weight
from aggregator.server_optimizers import build_server_optimizer
from aggregator.staleness import Staleness, build_staleness
from fedmq.settings import RunSettings


@dataclass(frozen=True)
class StalenessWeight:
    """Async mode's weight: the ``base`` weight (the sample count, capped by the defences) times
    ``staleness(tau)``."""

    staleness: Staleness
    base: Weighting = sample_weight

    def __call__(self, ctx: UpdateContext) -> float:
        return self.base(ctx) * self.staleness(ctx.staleness)


def staleness_of(run: RunSettings) -> Staleness:
    """The staleness function ``--staleness`` and its parameters name."""
    return build_staleness(run.staleness, exponent=run.staleness_exponent, hinge_slope=run.staleness_hinge_slope,
                           hinge_start=run.staleness_hinge_start)


def build_pipeline(run: RunSettings, parts: Mapping[str, Any] | None = None) -> AggregationPipeline:
    """The pipeline of ``parts`` (keyword arguments of :class:`AggregationPipeline`, from
    :meth:`aggregator.defences.Defences.pipeline_parts`; none: FedAvg's) with the run's server
    optimizer, its weighting scaled by the staleness weight in async mode."""
    parts = dict(parts or {})
    parts["optimizer"] = build_server_optimizer(run.server_optimizer, lr=run.server_learning_rate,
                                                momentum=run.server_momentum, beta1=run.server_beta1,
                                                beta2=run.server_beta2, epsilon=run.server_epsilon)
    if run.mode == "async":
        parts["weighting"] = StalenessWeight(staleness_of(run), parts.get("weighting", sample_weight))
    return AggregationPipeline(**parts)


def aggregation_record(run: RunSettings) -> dict[str, Any]:
    """What the checkpoint records of how the run aggregates (see :func:`check_same_aggregation`)."""
    return {"mode": run.mode, "server_optimizer": run.server_optimizer}


def check_same_aggregation(run: RunSettings, recorded: Mapping[str, Any]) -> None:
    """CheckpointError if the checkpoint was written by a run that aggregates differently: its
    optimizer state (or its lack of one) would make the resumed run another run. Checkpoints
    written before the record existed were sync FedAvg."""
    ours = aggregation_record(run)
    theirs = {"mode": "sync", "server_optimizer": "fedavg", **{k: recorded[k] for k in ours if k in recorded}}
    if theirs != ours:
        raise CheckpointError(
            f"run {run.run_id or 'default'} was checkpointed with --mode {theirs['mode']} --server-optimizer "
            f"{theirs['server_optimizer']}; this aggregator is set to --mode {ours['mode']} --server-optimizer "
            f"{ours['server_optimizer']}: resume it with the same settings, or start a new run (--run-id)")
