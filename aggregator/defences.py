"""The aggregation pipeline's defences, built from the run settings.

What each setting plugs into :class:`aggregator.pipeline.AggregationPipeline`:

- weighting: FedAvg's sample count, capped (:func:`aggregator.clipping.capped_samples`) at
  ``--max-samples-per-update`` and, for an update trained on a built-in partition, at the size of
  the partition the aggregator assigned that worker; with DP every update weighs 1, because the
  noise is calibrated to the plain mean of the clipped updates;
- update stage: ``--clip-norm`` clips each update's L2 norm (:class:`ClipStage`);
- combiner: ``--aggregation`` fedavg streams (:class:`aggregator.fedavg.RunningSum`, O(P)
  memory); trimmed-mean, median and krum keep the version's N updates
  (:class:`aggregator.robust_rules.RobustCombiner`, O(N*P) memory, sample counts ignored);
- aggregate stage: ``--dp-noise-multiplier`` adds N(0, (Z*C/m)^2) to the mean of the m clipped
  updates (:class:`NoiseStage`), and :class:`PrivacyAccount` keeps the privacy ledger and its
  budget.

:meth:`Defences.describe` is what the checkpoint and every metrics line record.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from aggregator.clipping import capped_samples, clip_update
from aggregator.fedavg import RunningSum
from aggregator.pipeline import AggregateStage, Combiner, Tensors, UpdateContext, UpdateStage
from aggregator.privacy import PrivacyLedger, add_gaussian_noise, noise_std
from aggregator.robust_rules import RobustCombiner
from fedmq.settings import RunSettings

log = logging.getLogger(__name__)


class SampleCap:
    """The weighting: an update's claimed sample count, capped (see module doc); 1 with ``uniform``.

    ``partition_sizes[i]`` is the size of built-in partition i (None: unknown, no partition cap);
    ``assigned(worker_id)`` the partition the aggregator assigned (None: not known to it, then
    the partition the update names is used).
    """

    def __init__(self, max_samples: int = 0, partition_sizes: Sequence[int] | None = None,
                 assigned: Callable[[str], int | None] = lambda worker_id: None, *, uniform: bool = False) -> None:
        self.max_samples, self.partition_sizes, self.assigned, self.uniform = max_samples, partition_sizes, assigned, uniform

    def __call__(self, ctx: UpdateContext) -> float:
        if self.uniform:
            return 1.0
        size = 0
        if ctx.partition >= 0 and self.partition_sizes:
            index = self.assigned(ctx.worker_id)
            index = ctx.partition if index is None or index < 0 else index
            if index < len(self.partition_sizes):
                size = self.partition_sizes[index]
        weight = capped_samples(ctx.num_samples, max_samples=self.max_samples, partition_size=size)
        if weight < ctx.num_samples:
            log.info("update from %s claims %d samples, weighted as %d (cap %d, partition size %d)",
                     ctx.worker_id, ctx.num_samples, weight, self.max_samples, size)
        return float(weight)


class ClipStage:
    """Update stage: clip to L2 norm ``clip_norm``; remembers which workers' updates it clipped
    since :meth:`reset` (the aggregator resets it with every new version's combiner)."""

    def __init__(self, clip_norm: float) -> None:
        self.clip_norm = clip_norm
        self.clipped: dict[str, float] = {}  # worker id -> its update's norm before clipping

    def __call__(self, delta: Tensors, ctx: UpdateContext) -> Tensors:
        clipped, norm = clip_update(delta, self.clip_norm)
        if norm > self.clip_norm:
            self.clipped[ctx.worker_id] = norm
        return clipped

    def reset(self) -> None:
        self.clipped = {}


class NoiseStage:
    """Aggregate stage: Gaussian noise of std ``Z * C / m`` on the mean of m clipped updates.

    The generator is seeded from the operating system unless ``seed`` is given (tests): noise
    anyone can regenerate protects nothing.
    """

    def __init__(self, noise_multiplier: float, clip_norm: float, seed: int | None = None) -> None:
        self.noise_multiplier, self.clip_norm = noise_multiplier, clip_norm
        self.generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
        self.last_std = 0.0

    def __call__(self, mean: Tensors, combiner: Combiner) -> Tensors:
        self.last_std = noise_std(self.noise_multiplier, self.clip_norm, combiner.count)
        return add_gaussian_noise(mean, self.last_std, self.generator)


class PrivacyAccount:
    """The run's :class:`PrivacyLedger` (one step per released version, sampling rate = the client
    fraction) and its budget. A step is proposed, written into the checkpoint, then committed,
    like the model it accounts for."""

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float, budget: float = 0.0) -> None:
        self.noise_multiplier, self.sampling_rate, self.budget = noise_multiplier, sampling_rate, budget
        self.ledger = PrivacyLedger(delta)

    @property
    def epsilon(self) -> float:
        return self.ledger.epsilon()

    def next_epsilon(self) -> float:
        """Epsilon once one more version is released."""
        return self.ledger.epsilon_after_step(self.noise_multiplier, self.sampling_rate)

    def exhausted(self) -> bool:
        """True when releasing one more version would spend more than the budget (0: no budget)."""
        return self.budget > 0 and self.next_epsilon() > self.budget

    def propose(self) -> PrivacyLedger:
        """The ledger with the next version's step, not yet current."""
        ledger = PrivacyLedger(self.ledger.delta, list(self.ledger.steps))
        ledger.record_step(self.noise_multiplier, self.sampling_rate)
        return ledger

    def commit(self, ledger: PrivacyLedger) -> None:
        self.ledger = ledger


class Defences:
    """The pipeline pieces for one run's settings (see module doc)."""

    def __init__(self, cfg: RunSettings, *, partition_sizes: Sequence[int] | None = None,
                 assigned: Callable[[str], int | None] = lambda worker_id: None,
                 noise_seed: int | None = None) -> None:
        self.cfg = cfg
        dp = cfg.dp_noise_multiplier > 0
        self.weighting = SampleCap(cfg.max_samples_per_update, partition_sizes, assigned, uniform=dp)
        self.clip = ClipStage(cfg.clip_norm) if cfg.clip_norm > 0 else None
        self.noise = NoiseStage(cfg.dp_noise_multiplier, cfg.clip_norm, noise_seed) if dp else None
        self.privacy = PrivacyAccount(cfg.dp_noise_multiplier, cfg.client_fraction, cfg.dp_delta,
                                      cfg.dp_epsilon_budget) if dp else None
        self.partition_cap = bool(partition_sizes)

    @property
    def update_stages(self) -> list[UpdateStage]:
        return [self.clip] if self.clip else []

    @property
    def aggregate_stages(self) -> list[AggregateStage]:
        return [self.noise] if self.noise else []

    def new_combiner(self, template: Tensors) -> Combiner:
        """An empty combiner for a version (the clip stage starts counting afresh with it)."""
        if self.clip:
            self.clip.reset()
        if self.cfg.aggregation == "fedavg":
            return RunningSum(template)
        return RobustCombiner(template, self.cfg.aggregation, trim_fraction=self.cfg.trim_fraction,
                              num_byzantine=self.cfg.krum_attackers)

    def pipeline_parts(self) -> dict[str, Any]:
        """Keyword arguments of :class:`AggregationPipeline` (all but the server optimizer)."""
        return {"weighting": self.weighting, "update_stages": self.update_stages, "combiner": self.new_combiner,
                "aggregate_stages": self.aggregate_stages}

    def describe(self) -> dict[str, Any]:
        """Every defence choice of the run, for its checkpoint and metrics."""
        c = self.cfg
        return {"aggregation": c.aggregation, "trim_fraction": c.trim_fraction, "krum_attackers": c.krum_attackers,
                "clip_norm": c.clip_norm, "max_samples_per_update": c.max_samples_per_update,
                "partition_cap": self.partition_cap, "dp_noise_multiplier": c.dp_noise_multiplier,
                "dp_delta": c.dp_delta, "dp_epsilon_budget": c.dp_epsilon_budget,
                "dp_sampling_rate": c.client_fraction if self.privacy else 0.0}

    def version_notes(self, folded: Sequence[str] | set[str]) -> dict[str, Any]:
        """The :class:`aggregator.rounds.VersionRecord` fields of the version just closed (and
        committed): what the defences did in it, the privacy spent so far, the run's choices."""
        notes: dict[str, Any] = {"clipped_updates": len(set(self.clip.clipped) & set(folded)) if self.clip else 0,
                                 "defences": self.describe()}
        if self.noise and self.privacy:
            notes.update(dp_noise_std=self.noise.last_std, dp_epsilon=self.privacy.epsilon)
        return notes

    # -- the checkpoint -------------------------------------------------------------------------
    def checkpoint_state(self, ledger: PrivacyLedger | None = None) -> dict[str, Any]:
        """What the checkpoint keeps: the choices, and the privacy ledger (``ledger``: the one
        proposed for the version being written)."""
        state: dict[str, Any] = {"choices": self.describe()}
        if self.privacy:
            state["privacy_ledger"] = (ledger or self.privacy.ledger).to_state()
        return state

    def restore(self, state: Mapping[str, Any]) -> None:
        """Resume from a checkpoint's :meth:`checkpoint_state`: the privacy ledger goes on from
        where it stopped; a changed choice is logged (the run goes on with the new settings)."""
        before = state.get("choices", {})
        changed = {k: (before[k], v) for k, v in self.describe().items() if k in before and before[k] != v}
        if changed:
            log.warning("resumed with other defences than the checkpoint's: %s",
                        ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items())))
        saved = state.get("privacy_ledger")
        if saved is not None and self.privacy:
            ledger = PrivacyLedger.from_state(saved)
            self.privacy.ledger = PrivacyLedger(self.privacy.ledger.delta, ledger.steps)
            log.info("privacy ledger resumed: %d versions accounted, epsilon %.4f at delta %g",
                     sum(n for _, _, n in ledger.steps), self.privacy.epsilon, self.privacy.ledger.delta)
        elif saved is not None:
            log.warning("the checkpoint holds a privacy ledger (%d versions) but this run adds no DP noise: "
                        "the epsilon already spent stays spent", sum(n for _, _, n in saved["steps"]))


def partition_sizes(task, data_root: str, data_mirror: str = "") -> list[int] | None:
    """The size of every built-in partition of ``task`` (a :class:`fedmq.messages.TaskSpec`), from
    the training labels already on disk (never downloaded: an aggregator may hold no data); None
    when they are not there."""
    from fedmq.errors import DataUnavailable
    from fedmq.task import load_labels, make_partitions

    try:
        labels = load_labels(task.dataset, Path(data_root), train=True,
                             mirror=Path(data_mirror) if data_mirror else None, download=False)
    except (DataUnavailable, OSError, ValueError) as exc:
        log.warning("no training labels on the aggregator (%s): sample counts are capped by "
                    "--max-samples-per-update only, not by partition sizes", exc)
        return None
    parts = make_partitions(task.partition_scheme, labels, task.num_partitions, seed=task.seed,
                            alpha=task.dirichlet_alpha, shards_per_partition=task.shards_per_partition)
    return [len(p) for p in parts]
