"""Server optimizers: how the global model moves by a version's combined delta.

Reddi et al. 2021, "Adaptive Federated Optimization" (Algorithm 2): the combined delta
``mean_delta`` (the weighted mean of ``w_local - w_global``) is the negated pseudo-gradient
``g = -mean_delta``, and the server takes one optimizer step with it:

- ``fedavg``: ``w + lr * mean_delta`` (lr 1: FedAvg itself);
- ``fedavgm``: ``m = momentum * m + mean_delta``; ``w + lr * m`` (Hsu et al. 2019);
- ``fedadam``: ``m = b1 * m + (1 - b1) * mean_delta``; ``v = b2 * v + (1 - b2) * mean_delta**2``;
  ``w + lr * m / (sqrt(v) + eps)``;
- ``fedyogi``: as FedAdam but ``v = v - (1 - b2) * mean_delta**2 * sign(v - mean_delta**2)``.

As in the paper there is no bias correction and ``v`` starts at ``eps**2``. Each implements
:class:`aggregator.pipeline.ServerOptimizer`: :meth:`step` returns the next weights and the next
state without changing the optimizer; the state is a flat dict of tensors named ``m.<tensor>`` and
``v.<tensor>`` (what the checkpoint keeps). Integer tensors (BatchNorm's ``num_batches_tracked``)
have no gradient meaning: they move by the rounded mean delta, as in FedAvg, and have no state.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch

from aggregator.fedavg import apply_mean_delta
from aggregator.pipeline import PlainStep, ServerOptimizer

Tensors = Mapping[str, torch.Tensor]

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")

#: The server learning rate ``--server-learning-rate 0`` stands for: FedAvg and FedAvgM step by the
#: (accumulated) delta itself; the adaptive ones take steps of about ``lr`` per coordinate, so lr
#: must be of the order of one local update's size (Reddi et al. tune it within 1e-3..1e-1).
DEFAULT_LEARNING_RATES = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01}


def _integer_step(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return apply_mean_delta({"t": weight}, {"t": delta})["t"]


class _StatefulStep:
    """Shared bookkeeping: named state tensors per floating model tensor, checked on load."""

    name = ""
    slots: tuple[str, ...] = ()

    def __init__(self, lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"{self.name}: the server learning rate must be > 0, got {lr}")
        self.lr = float(lr)
        self._state: dict[str, torch.Tensor] = {}

    def _initial(self, slot: str, weight: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(weight)

    def _slot(self, slot: str, name: str, weight: torch.Tensor) -> torch.Tensor:
        held = self._state.get(f"{slot}.{name}")
        return self._initial(slot, weight) if held is None else held

    def step(self, weights: Tensors, mean_delta: Tensors) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        new_weights: dict[str, torch.Tensor] = {}
        new_state: dict[str, torch.Tensor] = {}
        for name, weight in weights.items():
            delta = mean_delta[name]
            if not weight.dtype.is_floating_point:
                new_weights[name] = _integer_step(weight, delta)
                continue
            current = {slot: self._slot(slot, name, weight) for slot in self.slots}
            moved, updated = self._move(weight, delta.to(weight.dtype), current)
            new_weights[name] = moved
            new_state.update({f"{slot}.{name}": t for slot, t in updated.items()})
        return new_weights, new_state

    def _move(self, weight: torch.Tensor, delta: torch.Tensor,
              state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self._state.items()}

    def load(self, state: Tensors) -> None:
        unknown = sorted(k for k in state if k.split(".", 1)[0] not in self.slots or "." not in k)
        if unknown:
            raise ValueError(f"{self.name}: the checkpoint's server optimizer state holds {unknown[:3]}, "
                             f"which is not {self.name} state (slots {', '.join(self.slots)})")
        self._state = {name: t.clone() for name, t in state.items()}


class MomentumStep(_StatefulStep):
    """FedAvgM: server momentum over the versions' mean deltas."""

    name = "fedavgm"
    slots = ("m",)

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(lr)
        if not 0 <= momentum < 1:
            raise ValueError(f"fedavgm: the server momentum must be within [0, 1), got {momentum}")
        self.momentum = float(momentum)

    def _move(self, weight, delta, state):
        m = state["m"] * self.momentum + delta
        return weight + self.lr * m, {"m": m}


class AdaptiveStep(_StatefulStep):
    """FedAdam (``yogi=False``) or FedYogi (``yogi=True``)."""

    slots = ("m", "v")

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, epsilon: float = 1e-3, *,
                 yogi: bool = False) -> None:
        self.name = "fedyogi" if yogi else "fedadam"
        super().__init__(lr)
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"{self.name}: {label} must be within [0, 1), got {beta}")
        if not epsilon > 0:
            raise ValueError(f"{self.name}: epsilon must be > 0, got {epsilon}")
        self.beta1, self.beta2, self.epsilon, self.yogi = float(beta1), float(beta2), float(epsilon), yogi

    def _initial(self, slot, weight):
        # Reddi et al. start v at (at least) eps^2: the first steps are then about lr * sign(delta).
        return torch.full_like(weight, self.epsilon ** 2) if slot == "v" else torch.zeros_like(weight)

    def _move(self, weight, delta, state):
        m = self.beta1 * state["m"] + (1 - self.beta1) * delta
        square = delta * delta
        if self.yogi:
            v = state["v"] - (1 - self.beta2) * square * torch.sign(state["v"] - square)
        else:
            v = self.beta2 * state["v"] + (1 - self.beta2) * square
        return weight + self.lr * m / (v.sqrt() + self.epsilon), {"m": m, "v": v}


def build_server_optimizer(name: str, *, lr: float = 0.0, momentum: float = 0.9, beta1: float = 0.9,
                           beta2: float = 0.99, epsilon: float = 1e-3) -> ServerOptimizer:
    """The server optimizer ``name`` (one of :data:`SERVER_OPTIMIZERS`); ``lr`` 0 takes its
    default from :data:`DEFAULT_LEARNING_RATES`."""
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {name!r}: choose from {', '.join(SERVER_OPTIMIZERS)}")
    lr = lr or DEFAULT_LEARNING_RATES[name]
    if name == "fedavg":
        return PlainStep(lr)
    if name == "fedavgm":
        return MomentumStep(lr, momentum)
    return AdaptiveStep(lr, beta1, beta2, epsilon, yogi=name == "fedyogi")


def state_digest(state: Tensors) -> str:
    """SHA-256 over the state's names, dtypes, shapes and bytes: equal digests, bit-equal states."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
