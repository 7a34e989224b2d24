"""Which torch device a service computes on."""

from __future__ import annotations

import torch

from fedmq.errors import FedmqError


class DeviceUnavailable(FedmqError):
    """The device asked for does not exist on this machine."""


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU; ``cuda`` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {name!r} was asked for, but torch sees no CUDA device here")
    return torch.device(name)
