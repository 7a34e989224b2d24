"""Half-precision codecs: ``fp16`` and ``bf16`` carry each float32 element in 2 bytes.

fp16 keeps 11 significant bits over a narrow range (largest finite 65504): values beyond it are
clamped to the largest finite half, so the codec never turns a finite tensor into Inf.
bf16 keeps float32's range with 8 significant bits. Both round to nearest even (torch's cast),
so the error of one element is at most half a unit in the last place of the half format.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from fedmq.errors import InvalidMessage

FP16_MAX = 65504.0


def encode_fp16(values: torch.Tensor) -> bytes:
    """A float32 tensor (any shape) as little-endian float16 bytes, 2 per element."""
    flat = values.detach().reshape(-1)
    if flat.numel():
        low, high = torch.aminmax(flat)
        if float(low) < -FP16_MAX or float(high) > FP16_MAX:  # rare: clamp only then
            flat = flat.clamp(-FP16_MAX, FP16_MAX)
    out = np.empty(flat.numel(), dtype="<f2")
    torch.from_numpy(out).copy_(flat)  # into a buffer: faster than .to(), which allocates
    return out.tobytes()


def decode_fp16(count: int, data: bytes) -> torch.Tensor:
    """``count`` float32 values from :func:`encode_fp16` bytes."""
    _check_size("fp16", count, data)
    out = torch.empty(count, dtype=torch.float32)
    if count:
        out.copy_(_read_only(data, torch.float16))
    return out


def encode_bf16(values: torch.Tensor) -> bytes:
    """A float32 tensor as bfloat16 bytes (the upper 16 bits, rounded to nearest even)."""
    return values.detach().reshape(-1).to(torch.bfloat16).view(torch.int16).numpy().astype("<i2", copy=False).tobytes()


def decode_bf16(count: int, data: bytes) -> torch.Tensor:
    """``count`` float32 values from :func:`encode_bf16` bytes."""
    _check_size("bf16", count, data)
    halves = torch.from_numpy(np.frombuffer(data, dtype="<i2").copy())
    return halves.view(torch.bfloat16).to(torch.float32)


def _read_only(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over ``data`` without copying it; only ever read (torch warns that it could be
    written to, which this module never does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype)


def _check_size(name: str, count: int, data: bytes) -> None:
    if len(data) != 2 * count:
        raise InvalidMessage("encoding", f"{name}: {len(data)} bytes for {count} elements, want {2 * count}")
