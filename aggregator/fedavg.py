"""Weighted federated averaging as plain functions over tensors (no I/O).

Updates are deltas ``w_local - w_global``. :class:`RunningSum` folds them one at a time into a
weighted sum (memory O(P) however many workers report); :func:`apply_mean_delta` moves the
global model by the weighted mean. Accumulation is in float64 so that the order updates arrive
in does not change the result beyond float32 rounding.

Integer tensors (BatchNorm's ``num_batches_tracked``) are averaged like the rest and rounded to
the nearest integer; floating buffers (running mean and variance) are averaged like weights.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from fedmq.errors import AggregationError, InvalidMessage

Tensors = Mapping[str, torch.Tensor]


def check_compatible(template: Tensors, delta: Tensors) -> None:
    """InvalidMessage("shape") unless ``delta`` has exactly the template's names, shapes, dtypes."""
    if delta.keys() != template.keys():
        missing = sorted(set(template) - set(delta))[:5]
        extra = sorted(set(delta) - set(template))[:5]
        raise InvalidMessage("shape", f"tensor names differ from the model: missing {missing}, unexpected {extra}")
    for name, reference in template.items():
        got = delta[name]
        if got.shape != reference.shape:
            raise InvalidMessage("shape", f"{name}: shape {tuple(got.shape)}, model has {tuple(reference.shape)}")
        if got.dtype != reference.dtype:
            raise InvalidMessage("shape", f"{name}: dtype {got.dtype}, model has {reference.dtype}")


class RunningSum:
    """The weighted sum of the deltas folded so far, and the total weight."""

    def __init__(self, template: Tensors) -> None:
        for name, tensor in template.items():
            if tensor.dtype == torch.bool or tensor.is_complex():
                raise AggregationError(f"{name}: cannot average tensors of dtype {tensor.dtype}")
        self._sum = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in template.items()}
        self._dtypes = {name: t.dtype for name, t in template.items()}
        self.total_weight = 0.0
        self.count = 0

    def fold(self, delta: Tensors, weight: float) -> None:
        """Add ``weight * delta``; ``weight`` is usually the worker's sample count."""
        if not weight > 0:
            raise AggregationError(f"an update's weight must be positive, got {weight}")
        for name, acc in self._sum.items():
            acc.add_(delta[name].to(torch.float64), alpha=float(weight))
        self.total_weight += float(weight)
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean delta, in each tensor's own dtype."""
        if self.total_weight <= 0:
            raise AggregationError("total weight is zero: no update to average")
        out = {}
        for name, acc in self._sum.items():
            mean = acc / self.total_weight
            dtype = self._dtypes[name]
            out[name] = mean.round().to(dtype) if not dtype.is_floating_point else mean.to(dtype)
        return out


def fold_update(running: RunningSum, delta: Tensors, weight: float) -> None:
    """Fold one update into ``running`` (the function form of :meth:`RunningSum.fold`)."""
    running.fold(delta, weight)


def weighted_mean_delta(updates: Iterable[tuple[Tensors, float]], template: Tensors) -> dict[str, torch.Tensor]:
    """FedAvg of ``(delta, weight)`` pairs in one call."""
    running = RunningSum(template)
    for delta, weight in updates:
        running.fold(delta, weight)
    return running.mean()


def apply_mean_delta(weights: Tensors, mean_delta: Tensors, *, server_lr: float = 1.0) -> dict[str, torch.Tensor]:
    """``w + server_lr * mean_delta`` for every tensor (server_lr 1.0 is plain FedAvg)."""
    out = {}
    for name, w in weights.items():
        step = mean_delta[name]
        if w.dtype.is_floating_point:
            out[name] = w + step * server_lr if server_lr != 1.0 else w + step
        else:
            out[name] = w + (step.to(torch.float64) * server_lr).round().to(w.dtype)
    return out


def fedavg_step(weights: Tensors, running: RunningSum, *, server_lr: float = 1.0) -> dict[str, torch.Tensor]:
    """The next global model: ``weights`` moved by the weighted mean of the folded deltas."""
    return apply_mean_delta(weights, running.mean(), server_lr=server_lr)


def non_finite_tensors(tensors: Tensors) -> list[str]:
    """Names of the floating tensors holding NaN or Inf (a model must never be one of those)."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
