"""Tensor codecs, registered by name: how a float32 tensor's values travel on the wire.

A codec is a pure function pair over tensors (no I/O): ``encode(tensor) -> (encoding, bytes)``
and, keyed by the encoding name written beside the bytes, ``decode(count, bytes) -> tensor``.
Decoding needs only the encoding name, never the run's settings, so every receiver can read
what any sender wrote.

Run settings name a codec by its spec:

==================  ============  =========================================================
spec                encoding      what travels per float32 element
==================  ============  =========================================================
``fp32``            ``raw``       4 bytes, exact (the default)
``fp16``            ``fp16``      2 bytes (:mod:`fedmq.codecs.floats`)
``bf16``            ``bf16``      2 bytes
``int8``            ``int8``      1 byte + a float32 scale per 256 (:mod:`fedmq.codecs.int8`)
``topk:F[:V]``      ``topk``      the fraction F largest magnitudes; values as V = ``int8``
                                  (default) or ``fp16``, positions as gaps or a bitmap
                                  (:mod:`fedmq.codecs.topk`); uplink only
==================  ============  =========================================================

What always travels raw: tensors that are not float32 (integer buffers such as
``num_batches_tracked``, float64) and float32 tensors of fewer than :data:`RAW_BELOW_ELEMENTS`
elements (biases, norms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fedmq.codecs.floats import decode_bf16, decode_fp16, encode_bf16, encode_fp16
from fedmq.codecs.int8 import decode_int8, encode_int8
from fedmq.codecs.topk import VALUE_FORMS, decode_topk, encode_topk
from fedmq.errors import InvalidMessage

RAW = "raw"

#: float32 tensors smaller than this travel raw. Below one int8 block the saving is under 768
#: bytes a tensor (0.01 % of a 1.66M-parameter model's update; ``bench/codec_speed.py`` prints
#: the sizes), and raw keeps biases exact, which costs the learning nothing.
RAW_BELOW_ELEMENTS = 256

#: encoding name -> decode(count, data) -> flat float32 tensor; InvalidMessage on any defect.
DECODERS: dict[str, Callable[[int, bytes], torch.Tensor]] = {
    "fp16": decode_fp16,
    "bf16": decode_bf16,
    "int8": decode_int8,
    "topk": decode_topk,
}

#: The specs a run may name (``topk`` takes a fraction: ``topk:0.01``).
CODEC_NAMES = ("fp32", "fp16", "bf16", "int8", "topk:<fraction>[:int8|fp16]")


@dataclass(frozen=True)
class Codec:
    """A parsed codec spec; :meth:`encode` gives ``(encoding, data)`` for one tensor."""

    spec: str
    encoding: str
    fraction: float = 1.0  # top-k only
    value_form: str = "int8"  # top-k only

    @property
    def lossy(self) -> bool:
        return self.encoding != RAW

    @property
    def sparse(self) -> bool:
        return self.encoding == "topk"

    def compresses(self, tensor: torch.Tensor) -> bool:
        """True if this tensor travels in the codec's encoding, False if raw."""
        return self.lossy and tensor.dtype == torch.float32 and tensor.numel() >= RAW_BELOW_ELEMENTS

    def encode(self, tensor: torch.Tensor) -> tuple[str, bytes]:
        """(encoding, data) of a float32 tensor this codec :meth:`compresses`."""
        values = tensor.detach().to("cpu").reshape(-1)
        if self.encoding == "fp16":
            return "fp16", encode_fp16(values)
        if self.encoding == "bf16":
            return "bf16", encode_bf16(values)
        if self.encoding == "int8":
            return "int8", encode_int8(values)
        if self.encoding == "topk":
            return "topk", encode_topk(values, self.fraction, VALUE_FORMS[self.value_form])
        raise AssertionError(self.encoding)


FP32 = Codec("fp32", RAW)


def parse_codec(spec: str) -> Codec:
    """The codec a spec names; ValueError naming the accepted specs otherwise."""
    text = spec.strip().lower()
    if text in ("fp32", "raw", ""):
        return FP32
    if text in ("fp16", "bf16", "int8"):
        return Codec(text, text)
    parts = text.split(":")
    if parts[0] == "topk" and len(parts) in (2, 3):
        try:
            fraction = float(parts[1])
        except ValueError:
            fraction = -1.0
        value_form = parts[2] if len(parts) == 3 else "int8"
        if 0.0 < fraction <= 1.0 and value_form in VALUE_FORMS:
            return Codec(text, "topk", fraction, value_form)
    raise ValueError(f"unknown codec {spec!r}: choose from {', '.join(CODEC_NAMES)} (a fraction in (0, 1])")


def decode_values(encoding: str, count: int, data: bytes, *, what: str) -> torch.Tensor:
    """The flat float32 values of one tensor in ``encoding``; InvalidMessage naming ``what``."""
    decoder = DECODERS.get(encoding)
    if decoder is None:
        raise InvalidMessage("encoding", f"{what}: encoding {encoding!r} is unknown to this fedmq build "
                                         f"(it reads raw, {', '.join(DECODERS)}); upgrade it, or run with "
                                         "--update-codec fp32 --broadcast-codec fp32")
    try:
        return decoder(count, data)
    except InvalidMessage as exc:
        raise InvalidMessage(exc.reason, f"{what}: {exc.detail}") from None
