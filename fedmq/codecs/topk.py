"""Top-k sparsification: keep the ``fraction`` of a tensor's elements largest in magnitude.

Per tensor: each tensor keeps ``ceil(fraction * n)`` elements (at least one), so every layer
gets a share of the bytes (a global top-k lets one layer with large deltas starve the others).
The kept values travel as blockwise int8 (default) or fp16 (``topk:<fraction>:fp16``), their
positions in :mod:`fedmq.codecs.index_coding`'s smaller form. Meant for the uplink with error
feedback, which carries every element it drops into the next update.

Layout of ``data``: a 10-byte header (``<BBII``: index form, value form, k, index bytes), the
index bytes, then the values (int8: k + 4 * ceil(k / 256) bytes; fp16: 2 * k bytes).
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from fedmq.codecs import index_coding
from fedmq.codecs.floats import decode_fp16, encode_fp16
from fedmq.codecs.int8 import decode_int8, encode_int8
from fedmq.errors import InvalidMessage

HEADER = struct.Struct("<BBII")
VALUES_INT8, VALUES_FP16 = 0, 1
VALUE_FORMS = {"int8": VALUES_INT8, "fp16": VALUES_FP16}


def kept_count(size: int, fraction: float) -> int:
    return min(size, max(1, math.ceil(fraction * size)))


def select(values: torch.Tensor, fraction: float) -> np.ndarray:
    """Sorted positions of the ``kept_count`` largest magnitudes of ``values`` (flattened)."""
    flat = values.detach().reshape(-1)
    k = kept_count(flat.numel(), fraction)
    top = torch.topk(flat.abs(), k, sorted=False).indices
    return np.sort(top.numpy())


def encode_topk(values: torch.Tensor, fraction: float, value_form: int = VALUES_INT8) -> bytes:
    flat = values.detach().reshape(-1).to(torch.float32)
    indices = select(flat, fraction)
    form, index_bytes = index_coding.encode_indices(indices, flat.numel())
    kept = flat[torch.from_numpy(indices)]
    value_bytes = encode_int8(kept) if value_form == VALUES_INT8 else encode_fp16(kept)
    return HEADER.pack(form, value_form, indices.size, len(index_bytes)) + index_bytes + value_bytes


def decode_topk(count: int, data: bytes) -> torch.Tensor:
    """A dense float32 tensor of ``count`` elements from :func:`encode_topk` bytes (zero where
    nothing was kept); InvalidMessage for any inconsistency, before allocating the result."""
    if len(data) < HEADER.size:
        raise InvalidMessage("encoding", f"top-k: {len(data)} bytes, shorter than its header")
    form, value_form, k, index_len = HEADER.unpack_from(data)
    if k > count:
        raise InvalidMessage("bounds", f"top-k: {k} kept elements in a tensor of {count}")
    if HEADER.size + index_len > len(data):
        raise InvalidMessage("encoding", f"top-k: {index_len} index bytes declared, {len(data) - HEADER.size} present")
    if value_form not in VALUE_FORMS.values():
        raise InvalidMessage("encoding", f"top-k: unknown value form {value_form}")
    index_bytes = data[HEADER.size:HEADER.size + index_len]
    value_bytes = data[HEADER.size + index_len:]
    indices = index_coding.decode_indices(form, index_bytes, k, count)
    kept = decode_int8(k, value_bytes, "top-k int8 values") if value_form == VALUES_INT8 else decode_fp16(k, value_bytes)
    dense = torch.zeros(count, dtype=torch.float32)
    dense[torch.from_numpy(indices)] = kept
    return dense
