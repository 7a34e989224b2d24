"""Blockwise int8: each block of :data:`BLOCK_ELEMENTS` elements travels as one float32 scale
(the block's largest magnitude / 127) and one signed byte per element.

Bytes per element: 1 + 4 / BLOCK_ELEMENTS = 1.0156, i.e. 0.254 of float32. Blocks (not one
scale per tensor) keep one large outlier from flattening the resolution of the whole tensor.

Rounding: deterministic (to nearest) is the default: its error per element is at most half a
step (scale / 2), the smallest possible, and the same input always gives the same bytes. Its
bias is not a problem here because error feedback (uplink) and the closed loop (downlink) carry
what was rounded off into the next version. Stochastic rounding (``stochastic=True``, seeded by
a generator) is unbiased per element but doubles the worst-case error; it is there for callers
without such a loop.

Layout of ``data``: ``ceil(n / BLOCK_ELEMENTS)`` little-endian float32 scales, then ``n`` int8.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedmq.errors import InvalidMessage

#: Elements per scale. 256 puts the scales' overhead at 1.6 % of the int8 bytes while a block
#: still spans about one row of a small layer.
BLOCK_ELEMENTS = 256
LEVELS = 127


def blocks_for(count: int) -> int:
    return math.ceil(count / BLOCK_ELEMENTS)


def encoded_size(count: int) -> int:
    """Bytes of ``count`` elements encoded."""
    return count + 4 * blocks_for(count)


def quantize(values: torch.Tensor, *, stochastic: bool = False,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 scale per block) of a float32 tensor, flattened."""
    flat = values.detach().reshape(-1).to(torch.float32)
    count = flat.numel()
    pad = blocks_for(count) * BLOCK_ELEMENTS - count
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK_ELEMENTS)
    scales = blocks.abs().amax(dim=1) / LEVELS
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    scaled = blocks / safe[:, None]
    if stochastic:
        noise = torch.rand(scaled.shape, generator=generator, dtype=torch.float32)
        codes = torch.floor(scaled + noise)
    else:
        codes = torch.round(scaled)
    codes = codes.clamp_(-LEVELS, LEVELS).to(torch.int8).reshape(-1)[:count]
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of int8 ``codes`` with one scale per block (the decoder's arithmetic)."""
    count = codes.numel()
    pad = scales.numel() * BLOCK_ELEMENTS - count
    blocks = torch.nn.functional.pad(codes.to(torch.float32), (0, pad)).view(-1, BLOCK_ELEMENTS)
    return (blocks * scales[:, None]).reshape(-1)[:count]


#: Elements quantised at a time by :func:`encode_int8`: 64 K (256 KB of float32) keeps each
#: chunk's temporaries in the CPU cache and out of fresh page-faulted allocations.
CHUNK_ELEMENTS = 256 * BLOCK_ELEMENTS


def encode_int8(values: torch.Tensor, *, stochastic: bool = False, generator: torch.Generator | None = None) -> bytes:
    flat = values.detach().reshape(-1).to(torch.float32)
    count = flat.numel()
    if stochastic or count < CHUNK_ELEMENTS:
        codes, scales = quantize(flat, stochastic=stochastic, generator=generator)
        return scales.numpy().astype("<f4", copy=False).tobytes() + codes.numpy().tobytes()
    blocks = blocks_for(count)
    out = np.empty(4 * blocks + count, dtype=np.uint8)
    scales_out = torch.from_numpy(out[:4 * blocks].view("<f4"))
    codes_out = torch.from_numpy(out[4 * blocks:].view(np.int8))
    whole = count // BLOCK_ELEMENTS * BLOCK_ELEMENTS
    work = torch.empty(CHUNK_ELEMENTS, dtype=torch.float32)
    for start in range(0, whole, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, whole)
        chunk = flat[start:stop].view(-1, BLOCK_ELEMENTS)
        scratch = work[:stop - start].view(-1, BLOCK_ELEMENTS)
        scales = scales_out[start // BLOCK_ELEMENTS:stop // BLOCK_ELEMENTS]
        torch.abs(chunk, out=scratch)
        torch.amax(scratch, dim=1, out=scales)
        scales.div_(LEVELS)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        torch.div(chunk, safe[:, None], out=scratch)
        scratch.round_().clamp_(-LEVELS, LEVELS)
        codes_out[start:stop].copy_(scratch.view(-1))
    if whole < count:  # the last, partial block
        codes, scales = quantize(flat[whole:])
        scales_out[-1:] = scales
        codes_out[whole:] = codes
    return out.tobytes()


def decode_int8(count: int, data: bytes, what: str = "int8") -> torch.Tensor:
    """``count`` float32 values from :func:`encode_int8` bytes; InvalidMessage if the size is
    not exactly that of ``count`` elements or a scale is negative or not finite."""
    blocks = blocks_for(count)
    if len(data) != encoded_size(count):
        raise InvalidMessage("encoding", f"{what}: {len(data)} bytes for {count} elements, want {encoded_size(count)}")
    scales = np.frombuffer(data, dtype="<f4", count=blocks)
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise InvalidMessage("non-finite", f"{what}: a block scale is negative, NaN or Inf")
    codes = np.frombuffer(data, dtype=np.int8, offset=4 * blocks)
    out = np.empty(count, dtype=np.float32)
    whole = count // BLOCK_ELEMENTS * BLOCK_ELEMENTS
    # One pass, the same IEEE float32 product as dequantize(): float(code) * scale.
    np.multiply(codes[:whole].reshape(-1, BLOCK_ELEMENTS), scales[:whole // BLOCK_ELEMENTS, None],
                out=out[:whole].reshape(-1, BLOCK_ELEMENTS), dtype=np.float32)
    if whole < count:
        np.multiply(codes[whole:], scales[-1], out=out[whole:], dtype=np.float32)
    return torch.from_numpy(out)
