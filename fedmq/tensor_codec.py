"""Tensors on the wire: ``{name, dtype, shape, encoding, data}`` maps, never pickle.

``encoding`` is ``"raw"`` (little-endian bytes of the dtype) or a compressed encoding of a float32
tensor (:mod:`fedmq.codecs`: ``fp16``, ``bf16``, ``int8``, ``topk``); the layout is the same.
Decoding checks everything a sender could get wrong: the dtype is known, the shape is a list of
non-negative ints, the byte count matches, names are unique, and a compressed tensor declares
no more elements than the receiver allows (``max_elements``: its model's size), checked before
anything is allocated.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from fedmq.codecs import RAW, Codec, decode_values
from fedmq.errors import InvalidMessage

MAX_RANK = 8
#: The most elements a message's compressed tensors may declare when the receiver set no bound
#: (1 GiB of float32): a sparse encoding's declared size is not limited by its byte count.
DEFAULT_MAX_ELEMENTS = 1 << 28

#: wire name -> (torch dtype, numpy dtype used to move the bytes)
WIRE_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float64": (torch.float64, np.dtype("<f8")),
    "float16": (torch.float16, np.dtype("<f2")),
    # numpy has no bfloat16: its bytes travel as int16 and are viewed back on arrival.
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),
    "int64": (torch.int64, np.dtype("<i8")),
    "int32": (torch.int32, np.dtype("<i4")),
    "int16": (torch.int16, np.dtype("<i2")),
    "int8": (torch.int8, np.dtype("i1")),
    "uint8": (torch.uint8, np.dtype("u1")),
    "bool": (torch.bool, np.dtype("?")),
}
_NAME_OF = {torch_dtype: name for name, (torch_dtype, _) in WIRE_DTYPES.items()}


def wire_dtype(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype; ValueError for dtypes that do not travel."""
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be sent; supported: {sorted(WIRE_DTYPES)}") from None


def encode_tensor(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    """One tensor as a msgpack-ready map (the data copied once, to CPU, contiguous)."""
    dtype_name = wire_dtype(tensor.dtype)
    cpu = tensor.detach().to("cpu").contiguous()
    if cpu.dtype == torch.bfloat16:
        cpu = cpu.view(torch.int16)
    data = cpu.numpy().tobytes()
    return {"name": name, "dtype": dtype_name, "shape": list(cpu.shape), "encoding": RAW, "data": data}


class EncodedTensors(Mapping[str, torch.Tensor]):
    """Tensors already encoded with a codec: the wire maps, and as a mapping the tensors a
    receiver decodes from them (what error feedback and the downlink's closed loop need).
    A message holding one writes its wire maps as they are (no second, different encoding)."""

    def __init__(self, entries: list[dict[str, Any]], decoded: dict[str, torch.Tensor], codec: Codec) -> None:
        self.entries, self.decoded, self.codec = entries, decoded, codec

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.decoded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.decoded)

    def __len__(self) -> int:
        return len(self.decoded)

    @property
    def data_bytes(self) -> int:
        """Bytes of the tensors' data on the wire (framing not counted)."""
        return sum(len(e["data"]) for e in self.entries)


def encode_with(codec: Codec, tensors: Mapping[str, torch.Tensor]) -> EncodedTensors:
    """Encode every tensor with ``codec`` (raw where it does not compress that tensor) and
    decode the result again, exactly as a receiver will."""
    entries, decoded = [], {}
    for name, tensor in tensors.items():
        if codec.compresses(tensor):
            encoding, data = codec.encode(tensor)
            entry = {"name": name, "dtype": "float32", "shape": list(tensor.shape), "encoding": encoding, "data": data}
            decoded[name] = decode_values(encoding, tensor.numel(), data, what=f"tensor {name!r}").reshape(tensor.shape)
        else:
            entry = encode_tensor(name, tensor)
            decoded[name] = tensor.detach().to("cpu").clone()
        entries.append(entry)
    return EncodedTensors(entries, decoded, codec)


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """A name -> tensor mapping as a list of wire maps, in the mapping's order (raw, unless the
    mapping is :class:`EncodedTensors`)."""
    if isinstance(tensors, EncodedTensors):
        return tensors.entries
    return [encode_tensor(name, tensor) for name, tensor in tensors.items()]


def _decode_tensor(entry: Any, budget: list[int]) -> tuple[str, torch.Tensor]:
    if not isinstance(entry, dict):
        raise InvalidMessage("schema", f"a tensor must be a map, got {type(entry).__name__}")
    expected = {"name", "dtype", "shape", "encoding", "data"}
    if set(entry) != expected:
        raise InvalidMessage("schema", f"tensor fields {sorted(map(str, entry))}, want {sorted(expected)}")
    name, dtype_name, shape, encoding, data = (entry[k] for k in ("name", "dtype", "shape", "encoding", "data"))
    if not isinstance(name, str) or not name:
        raise InvalidMessage("schema", "tensor name must be a non-empty string")
    if dtype_name not in WIRE_DTYPES:
        raise InvalidMessage("schema", f"tensor {name!r}: unknown dtype {dtype_name!r}")
    if not isinstance(encoding, str):
        raise InvalidMessage("schema", f"tensor {name!r}: encoding must be a string")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InvalidMessage("shape", f"tensor {name!r}: bad shape {shape!r}")
    if not isinstance(data, bytes):
        raise InvalidMessage("schema", f"tensor {name!r}: data must be bytes")
    if encoding != RAW:
        return name, _decode_compressed(name, dtype_name, shape, encoding, data, budget)
    torch_dtype, np_dtype = WIRE_DTYPES[dtype_name]
    want = math.prod(shape) * np_dtype.itemsize
    if len(data) != want:
        raise InvalidMessage("shape", f"tensor {name!r}: {len(data)} bytes for shape {shape} {dtype_name}, want {want}")
    # Copy into writable memory: msgpack's bytes are read-only and training writes in place.
    array = np.frombuffer(data, dtype=np_dtype).reshape(shape).copy()
    tensor = torch.from_numpy(array)
    if torch_dtype == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return name, tensor


def _decode_compressed(name: str, dtype_name: str, shape: list[int], encoding: str, data: bytes,
                       budget: list[int]) -> torch.Tensor:
    if dtype_name != "float32":
        raise InvalidMessage("schema", f"tensor {name!r}: encoding {encoding!r} is for float32, not {dtype_name}")
    count = math.prod(shape)
    if count > budget[0]:
        raise InvalidMessage("oversize", f"tensor {name!r}: {count} elements declared, more than the "
                                         f"{budget[0]} this message may still hold")
    budget[0] -= count
    return decode_values(encoding, count, data, what=f"tensor {name!r}").reshape(shape)


def decode_tensors(entries: Any, *, max_elements: int | None = None) -> dict[str, torch.Tensor]:
    """Wire maps back to an ordered name -> tensor dict; InvalidMessage on any defect.

    ``max_elements`` bounds the elements the compressed tensors may declare together (the
    receiver's model size; default :data:`DEFAULT_MAX_ELEMENTS`)."""
    if not isinstance(entries, list):
        raise InvalidMessage("schema", "tensors must be a list")
    out: dict[str, torch.Tensor] = {}
    budget = [DEFAULT_MAX_ELEMENTS if max_elements is None else max_elements]
    for entry in entries:
        name, tensor = _decode_tensor(entry, budget)
        if name in out:
            raise InvalidMessage("schema", f"tensor {name!r} appears twice")
        out[name] = tensor
    return out


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """InvalidMessage("non-finite") if any floating tensor holds NaN or Inf."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidMessage("non-finite", f"tensor {name!r} holds NaN or Inf")


def payload_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Raw size of the tensors' data in bytes."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def element_count(tensors: Mapping[str, torch.Tensor]) -> int:
    """Elements of all tensors together."""
    return sum(t.numel() for t in tensors.values())


def encoded_size_bound(weights: Mapping[str, torch.Tensor]) -> int:
    """An upper bound, in bytes, of one encoded update or model of these tensors (their data plus
    msgpack's framing of each tensor and of the message)."""
    return payload_bytes(weights) + sum(len(name) + 128 for name in weights) + 4096
