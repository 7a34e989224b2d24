"""Test-set evaluation of the global model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Evaluation:
    accuracy: float  # fraction of test samples classified right, 0..1
    loss: float  # mean cross-entropy per sample


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
             batch_size: int = 1000, device: torch.device | str = "cpu") -> Evaluation:
    """Accuracy and mean cross-entropy of ``model`` on ``images``/``labels`` (eval mode)."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True)
        y = labels[start:start + batch_size].to(device, non_blocking=True)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    model.train(was_training)
    n = max(1, len(labels))
    return Evaluation(correct / n, loss_sum / n)
