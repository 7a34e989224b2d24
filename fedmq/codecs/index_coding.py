"""The positions of a sparse tensor's kept elements, in whichever of two forms is smaller:

- gaps: the distance from one kept position to the next, minus one, as LEB128 varints (7 bits
  a byte); small when the kept elements are few (about 1-2 bytes each at 1 %);
- bitmap: one bit per element of the tensor (n / 8 bytes); smaller once more than about one
  element in eight to sixteen is kept.

Both forms can only express strictly increasing positions, so a decoder never sees unsorted or
repeated indices; it checks the count and that the last position is inside the tensor.
"""

from __future__ import annotations

import numpy as np

from fedmq.errors import InvalidMessage

GAPS, BITMAP = 0, 1
#: A position below 2**35 fits in 5 varint bytes; tensors are far smaller than that.
MAX_VARINT_BYTES = 5


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    lengths = np.ones(values.shape, dtype=np.int64)
    for j in range(1, MAX_VARINT_BYTES):
        lengths += values >= (1 << (7 * j))
    return lengths


def gaps_size(indices: np.ndarray) -> int:
    """Bytes of ``indices`` (sorted, unique) in the gaps form."""
    return int(_varint_lengths(_gaps(indices)).sum())


def _gaps(indices: np.ndarray) -> np.ndarray:
    indices = indices.astype(np.int64, copy=False)
    if indices.size == 0:
        return indices
    return np.concatenate(([indices[0]], np.diff(indices) - 1))


def encode_gaps(indices: np.ndarray) -> bytes:
    gaps = _gaps(indices)
    lengths = _varint_lengths(gaps)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) if gaps.size else lengths
    out = np.zeros(int(lengths.sum()), dtype=np.uint8)
    for j in range(MAX_VARINT_BYTES):
        has = lengths > j
        more = (lengths > j + 1)[has]
        out[starts[has] + j] = ((gaps[has] >> (7 * j)) & 0x7F) | np.where(more, 0x80, 0)
    return out.tobytes()


def decode_gaps(data: bytes, count: int, size: int) -> np.ndarray:
    """``count`` strictly increasing positions below ``size`` from the gaps form."""
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = (raw & 0x80) == 0
    if int(ends.sum()) != count or (raw.size and not ends[-1]):
        raise InvalidMessage("encoding", f"top-k gaps: {int(ends.sum())} varints in {raw.size} bytes, want {count}")
    group = np.concatenate(([0], np.cumsum(ends)[:-1])) if raw.size else np.zeros(0, dtype=np.int64)
    first = np.concatenate(([0], np.flatnonzero(ends)[:-1] + 1)) if raw.size else np.zeros(0, dtype=np.int64)
    position = np.arange(raw.size) - first[group]
    if raw.size and int(position.max()) >= MAX_VARINT_BYTES:
        raise InvalidMessage("encoding", f"top-k gaps: a varint longer than {MAX_VARINT_BYTES} bytes")
    gaps = np.zeros(count, dtype=np.int64)
    for j in range(MAX_VARINT_BYTES):
        at = position == j
        gaps[group[at]] |= (raw[at].astype(np.int64) & 0x7F) << (7 * j)
    indices = np.cumsum(gaps + 1) - 1
    if count and int(indices[-1]) >= size:
        raise InvalidMessage("bounds", f"top-k index {int(indices[-1])} outside a tensor of {size} elements")
    return indices


def encode_bitmap(indices: np.ndarray, size: int) -> bytes:
    bits = np.zeros(size, dtype=bool)
    bits[indices] = True
    return np.packbits(bits, bitorder="little").tobytes()


def decode_bitmap(data: bytes, count: int, size: int) -> np.ndarray:
    want = (size + 7) // 8
    if len(data) != want:
        raise InvalidMessage("encoding", f"top-k bitmap: {len(data)} bytes for {size} elements, want {want}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[size:].any():
        raise InvalidMessage("bounds", f"top-k bitmap marks positions past the tensor's {size} elements")
    indices = np.flatnonzero(bits[:size])
    if indices.size != count:
        raise InvalidMessage("encoding", f"top-k bitmap marks {indices.size} elements, the header says {count}")
    return indices


def encode_indices(indices: np.ndarray, size: int) -> tuple[int, bytes]:
    """(form, bytes) of sorted unique ``indices`` into a tensor of ``size`` elements."""
    if gaps_size(indices) <= (size + 7) // 8:
        return GAPS, encode_gaps(indices)
    return BITMAP, encode_bitmap(indices, size)


def decode_indices(form: int, data: bytes, count: int, size: int) -> np.ndarray:
    if form == GAPS:
        return decode_gaps(data, count, size)
    if form == BITMAP:
        return decode_bitmap(data, count, size)
    raise InvalidMessage("encoding", f"top-k: unknown index form {form}")
