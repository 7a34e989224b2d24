"""Local training of one model version (no I/O): weights in, delta out."""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from fedmq.messages import TrainingConfig


@dataclass(frozen=True)
class TrainResult:
    """``delta`` = trained weights - given weights (CPU tensors, the weights' dtypes).

    ``train_loss`` is the mean loss over the last local epoch (over all steps with
    ``local_steps``); ``completed`` is False when ``should_stop`` cut training short.
    """

    delta: dict[str, torch.Tensor]
    num_samples: int
    train_loss: float
    steps: int
    seconds: float
    completed: bool


def make_optimizer(config: TrainingConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}: use sgd or adam")


def train_locally(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], images: torch.Tensor,
                  labels: torch.Tensor, config: TrainingConfig, *, seed: int,
                  should_stop: Callable[[], bool] = lambda: False,
                  on_step: Callable[[int, int, int], None] | None = None) -> TrainResult:
    """Train ``model`` from ``weights`` on ``images``/``labels`` (already on the model's device).

    ``on_step(steps, total_steps, samples)`` is called after each optimizer step (``samples``:
    gone through so far, epochs counted).

    A fresh optimizer per version, as in FedAvg: no optimizer state crosses versions.
    """
    started = time.perf_counter()
    device = images.device
    model.load_state_dict(weights)
    model.train()
    optimizer = make_optimizer(config, model.parameters())
    # FedProx: the proximal term pulls the local solution towards the global model it started
    # from, which keeps heterogeneous workers' updates from drifting apart.
    mu = config.proximal_mu
    anchors = [p.detach().clone() for p in model.parameters()] if mu > 0 else []
    n = len(labels)
    batch = config.batch_size or n
    per_epoch = math.ceil(n / batch)
    total_steps = config.local_steps if config.local_steps > 0 else config.local_epochs * per_epoch
    generator = torch.Generator().manual_seed(seed)
    steps, loss_sum, loss_count, samples = 0, torch.zeros((), device=device), 0, 0
    completed = True
    while steps < total_steps:
        order = torch.randperm(n, generator=generator).to(device)
        if config.local_steps == 0:
            loss_sum, loss_count = torch.zeros((), device=device), 0  # report the last epoch
        for start in range(0, n, batch):
            if steps >= total_steps:
                break
            if should_stop():
                completed = False
                break
            index = order[start:start + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(images[index]), labels[index])
            if mu > 0:
                proximal = sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchors))
                (loss + mu / 2 * proximal).backward()
            else:
                loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            loss_count += 1
            steps += 1
            samples += len(index)
            if on_step is not None:
                on_step(steps, total_steps, samples)
        if not completed:
            break
    trained = model.state_dict()
    delta = {name: trained[name].detach().to("cpu") - w for name, w in weights.items()}
    return TrainResult(delta, n, float(loss_sum) / max(1, loss_count), steps,
                       time.perf_counter() - started, completed)


def training_seed(task_seed: int, version: int, partition: int, worker_id: str) -> int:
    """The seed of one worker's local training of one version. It depends on the worker id so
    that two workers sharing a partition do not send the same update twice (double weight)."""
    return (task_seed * 1_000_003 + version * 1009 + partition + zlib.crc32(worker_id.encode()) * 7919) % (2**63)


def weights_mismatch(template: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> str:
    """What differs between a broadcast's tensors and the model's (names, shapes, dtypes); "" if
    nothing does."""
    if weights.keys() != template.keys():
        missing, extra = sorted(set(template) - set(weights))[:3], sorted(set(weights) - set(template))[:3]
        return f"missing {missing}, unexpected {extra}"
    for name, reference in template.items():
        got = weights[name]
        if got.shape != reference.shape or got.dtype != reference.dtype:
            return f"{name}: {tuple(got.shape)} {got.dtype}, the model has {tuple(reference.shape)} {reference.dtype}"
    return ""
