"""User-level differential privacy for FedAvg (DP-FedAvg, McMahan et al. 2018).

Each update is clipped to L2 norm ``C`` (:mod:`aggregator.clipping`); the mean of ``m`` clipped
updates gets Gaussian noise of standard deviation ``z * C / m`` on every floating coordinate.
The privacy spent is accounted by Opacus's Rényi-DP accountant (a maintained implementation of
the sampled Gaussian mechanism), with the client fraction as the sampling rate ``q``: one
version is one step of the mechanism.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from opacus.accountants import RDPAccountant

from fedmq.errors import AggregationError

Tensors = Mapping[str, torch.Tensor]


def noise_std(noise_multiplier: float, clip_norm: float, num_updates: int) -> float:
    """The noise's standard deviation on the mean of ``num_updates`` clipped updates: z*C/m."""
    if num_updates < 1:
        raise AggregationError("DP noise needs at least one update in the mean")
    if noise_multiplier < 0 or not clip_norm > 0:
        raise AggregationError(f"need z >= 0 and C > 0, got z={noise_multiplier}, C={clip_norm}")
    return noise_multiplier * clip_norm / num_updates


def add_gaussian_noise(mean: Tensors, std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``mean`` plus N(0, std^2) on each floating coordinate (integer buffers untouched)."""
    out = {}
    for name, tensor in mean.items():
        if tensor.is_floating_point() and std > 0:
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std
            out[name] = (tensor.to(torch.float64) + noise).to(tensor.dtype)
        else:
            out[name] = tensor
    return out


@dataclass
class PrivacyLedger:
    """The privacy spent so far: every (noise multiplier, sampling rate) step applied.

    ``steps`` is what a checkpoint stores; a resumed run rebuilds the same accountant from it
    and keeps accounting from where it stopped.
    """

    delta: float
    steps: list[tuple[float, float, int]] = field(default_factory=list)

    def _accountant(self, extra: tuple[float, float, int] | None = None) -> RDPAccountant:
        accountant = RDPAccountant()
        accountant.history = [tuple(s) for s in self.steps] + ([extra] if extra else [])
        return accountant

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step)."""
        if not self.steps:
            return 0.0
        return float(self._accountant().get_epsilon(self.delta))

    def epsilon_after_step(self, noise_multiplier: float, sampling_rate: float) -> float:
        """Epsilon if one more version were released with these parameters."""
        return float(self._accountant((noise_multiplier, sampling_rate, 1)).get_epsilon(self.delta))

    def record_step(self, noise_multiplier: float, sampling_rate: float) -> None:
        """Count one released version (merged with the previous entry when the parameters match)."""
        if not 0 < sampling_rate <= 1:
            raise AggregationError(f"sampling rate must be within (0, 1], got {sampling_rate}")
        if self.steps and self.steps[-1][:2] == (noise_multiplier, sampling_rate):
            z, q, n = self.steps[-1]
            self.steps[-1] = (z, q, n + 1)
        else:
            self.steps.append((noise_multiplier, sampling_rate, 1))

    def to_state(self) -> dict:
        return {"delta": self.delta, "steps": [list(s) for s in self.steps]}

    @classmethod
    def from_state(cls, state: Mapping) -> "PrivacyLedger":
        return cls(float(state["delta"]), [(float(z), float(q), int(n)) for z, q, n in state["steps"]])
