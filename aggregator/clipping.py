"""Bounding what one worker can contribute: L2 norm clipping and the sample-count cap.

Plain functions over tensors, no I/O. Both run on each update before it is combined, in sync and
async mode alike, and both are what differential privacy relies on: the Gaussian noise of
:mod:`aggregator.privacy` is calibrated to the clipping norm, and an update's weight must not
grow with a count the worker merely claims.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from fedmq.errors import AggregationError

Tensors = Mapping[str, torch.Tensor]


def update_norm(delta: Tensors) -> float:
    """The L2 norm of an update over its floating tensors (integer buffers are counters, not
    directions, and are left out)."""
    total = 0.0
    for tensor in delta.values():
        if tensor.is_floating_point():
            total += float(tensor.to(torch.float64).square().sum())
    return math.sqrt(total)


def clip_update(delta: Tensors, clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """``delta`` scaled so its L2 norm is at most ``clip_norm``, and its norm before clipping.

    An update within the bound is returned unchanged (same tensors); integer buffers are never
    scaled.
    """
    if not clip_norm > 0:
        raise AggregationError(f"the clipping norm must be positive, got {clip_norm}")
    norm = update_norm(delta)
    if norm <= clip_norm:
        return dict(delta), norm
    scale = clip_norm / norm
    clipped = {name: (t * scale if t.is_floating_point() else t) for name, t in delta.items()}
    return clipped, norm


def capped_samples(claimed: int, *, max_samples: int = 0, partition_size: int = 0) -> int:
    """The FedAvg weight to give an update claiming ``claimed`` samples.

    ``max_samples`` (0: no cap) is the operator's cap; ``partition_size`` (0: unknown) is the
    size of the partition the aggregator assigned in the built-in partition mode, which a worker
    cannot have trained on more of.
    """
    if claimed < 1:
        raise AggregationError(f"an update must claim at least one sample, got {claimed}")
    caps = [c for c in (max_samples, partition_size) if c > 0]
    return min([claimed, *caps])
