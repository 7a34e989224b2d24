"""The models a federated run can train, built from a short spec string.

A spec is either a built-in name (:data:`BUILTIN_MODELS`) or ``"package.module:factory"``,
a zero-argument callable returning a ``torch.nn.Module``. Aggregator and workers build the
model from the same spec, and with the same ``seed`` they start from identical weights.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from fedmq.task.factories import resolve_factory

logger = logging.getLogger(__name__)

BUILTIN_MODELS = ("fedavg-cnn", "fedavg-2nn", "cifar-cnn")


class FedAvgCNN(nn.Module):
    """The MNIST CNN of the FedAvg paper (McMahan et al. 2017): input [N, 1, 28, 28], 10 logits.

    Two 5x5 conv layers (32 and 64 channels, each ReLU + 2x2 max pool), a 512-unit ReLU layer
    and a linear output. Parameters: 832 + 51,264 + 1,606,144 + 5,130 = 1,663,370.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)  # 1*32*25 + 32 = 832
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)  # 32*64*25 + 64 = 51,264
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 7 * 7, 512)  # 3136*512 + 512 = 1,606,144
        self.fc2 = nn.Linear(512, num_classes)  # 512*10 + 10 = 5,130

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))  # [N, 32, 14, 14]
        x = self.pool(torch.relu(self.conv2(x)))  # [N, 64, 7, 7]
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class FedAvg2NN(nn.Module):
    """The FedAvg paper's "2NN": an MLP 784 -> 200 -> 200 -> 10 with ReLU, on [N, 1, 28, 28].

    Parameters: 157,000 + 40,200 + 2,010 = 199,210.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 200)  # 784*200 + 200 = 157,000
        self.fc2 = nn.Linear(200, 200)  # 200*200 + 200 = 40,200
        self.fc3 = nn.Linear(200, num_classes)  # 200*10 + 10 = 2,010

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class CifarCNN(nn.Module):
    """A small CIFAR-10 CNN with BatchNorm: input [N, 3, 32, 32], 10 logits.

    Its BatchNorm layers carry buffers (float running_mean / running_var and the int64
    num_batches_tracked), so it exercises aggregation of non-parameter state.
    Parameters: 864 + 64 + 18,432 + 128 + 1,048,832 + 2,570 = 1,070,890.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        # No conv bias: the BatchNorm right after it has its own shift, a bias would be redundant.
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, padding=1, bias=False)  # 3*32*9 = 864
        self.bn1 = nn.BatchNorm2d(32)  # weight + bias: 64
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False)  # 32*64*9 = 18,432
        self.bn2 = nn.BatchNorm2d(64)  # weight + bias: 128
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 8 * 8, 256)  # 4096*256 + 256 = 1,048,832
        self.fc2 = nn.Linear(256, num_classes)  # 256*10 + 10 = 2,570

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))  # [N, 32, 16, 16]
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))  # [N, 64, 8, 8]
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


_BUILTINS: dict[str, Callable[[], nn.Module]] = {
    "fedavg-cnn": FedAvgCNN,
    "fedavg-2nn": FedAvg2NN,
    "cifar-cnn": CifarCNN,
}


def build_model(spec: str, *, seed: int | None = None) -> nn.Module:
    """Build the model named by ``spec`` (a built-in name or ``"package.module:factory"``).

    With ``seed``, the initial weights depend only on the seed (same seed, identical
    ``state_dict``) and the caller's global RNG state is left as it was. Without it, the
    global RNG is used as torch normally does.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    factory = _resolve(spec)
    if seed is None:
        model = factory()
    else:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"model seed must be a non-negative integer, got {seed!r}")
        # fork_rng restores the CPU generator afterwards. Seeding only the CPU generator (not
        # torch.manual_seed, which also seeds every CUDA device) keeps GPU RNG state untouched;
        # parameters are initialised on the CPU, so the CPU generator is the one that matters.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model spec {spec!r}: the factory returned {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    logger.debug("built model %s with %d parameters", spec, count_parameters(model))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalar parameters (elements of parameters with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _resolve(spec: str) -> Callable[[], object]:
    """The zero-argument callable that builds ``spec``'s model."""
    if spec in _BUILTINS:
        return _BUILTINS[spec]
    if ":" not in spec:
        raise ValueError(
            f"unknown model {spec!r}; use one of {', '.join(BUILTIN_MODELS)} "
            "or 'package.module:factory' (a function with no arguments returning an nn.Module)"
        )
    return resolve_factory(spec, what="model")
