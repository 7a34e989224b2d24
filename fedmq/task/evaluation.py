"""Accuracy and loss of a model on labelled examples: the aggregator's test set and a worker's
held-out rows are scored by the same function."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Evaluation:
    accuracy: float  # fraction of samples classified right, 0..1 (0 with no samples)
    loss: float  # mean cross-entropy per sample (0 with no samples)
    num_samples: int


@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
             batch_size: int = 1000, device: torch.device | str = "cpu") -> Evaluation:
    """Accuracy and mean cross-entropy of ``model`` on ``inputs``/``labels`` (in eval mode;
    the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for start in range(0, len(labels), batch_size):
            x = inputs[start:start + batch_size].to(device, non_blocking=True)
            y = labels[start:start + batch_size].to(device, non_blocking=True)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
    finally:
        model.train(was_training)
    n = len(labels)
    return Evaluation(correct / n if n else 0.0, loss_sum / n if n else 0.0, n)
