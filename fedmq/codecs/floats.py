"""Half-precision codecs: ``fp16`` and ``bf16`` carry each float32 element in 2 bytes.

fp16 keeps 11 significant bits over a narrow range (largest finite 65504): values beyond it are
clamped to the largest finite half, so the codec never turns a finite tensor into Inf.
bf16 keeps float32's range with 8 significant bits. Both round to nearest even (torch's cast),
so the error of one element is at most half a unit in the last place of the half format.
"""

from __future__ import annotations

import numpy as np
import torch

from fedmq.errors import InvalidMessage

FP16_MAX = 65504.0


def encode_fp16(values: torch.Tensor) -> bytes:
    """A float32 tensor (any shape) as little-endian float16 bytes, 2 per element."""
    half = values.detach().reshape(-1).clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    return half.numpy().astype("<f2", copy=False).tobytes()


def decode_fp16(count: int, data: bytes) -> torch.Tensor:
    """``count`` float32 values from :func:`encode_fp16` bytes."""
    _check_size("fp16", count, data)
    return torch.from_numpy(np.frombuffer(data, dtype="<f2").astype(np.float32))


def encode_bf16(values: torch.Tensor) -> bytes:
    """A float32 tensor as bfloat16 bytes (the upper 16 bits, rounded to nearest even)."""
    return values.detach().reshape(-1).to(torch.bfloat16).view(torch.int16).numpy().astype("<i2", copy=False).tobytes()


def decode_bf16(count: int, data: bytes) -> torch.Tensor:
    """``count`` float32 values from :func:`encode_bf16` bytes."""
    _check_size("bf16", count, data)
    halves = torch.from_numpy(np.frombuffer(data, dtype="<i2").copy())
    return halves.view(torch.bfloat16).to(torch.float32)


def _check_size(name: str, count: int, data: bytes) -> None:
    if len(data) != 2 * count:
        raise InvalidMessage("encoding", f"{name}: {len(data)} bytes for {count} elements, want {2 * count}")
