"""Error feedback for lossy update codecs: what the codec dropped is sent with the next update.

A worker adds its residual (what earlier encodings lost) to each new delta, encodes the sum, and
keeps as the new residual the sum minus what the receiver will decode. Over versions, the sum of
what was sent plus the residual equals the sum of the deltas: nothing is lost, only delayed
(Seide et al. 2014; Karimireddy et al. 2019). Top-k at 1 % works only because of it.

The residual belongs to one run and one partition: it is dropped when either changes, since the
mass it carries is a correction of another model's training.
"""

from __future__ import annotations

import logging
from typing import Hashable, Mapping

import torch

from fedmq.codecs import Codec
from fedmq.tensor_codec import EncodedTensors, encode_with

log = logging.getLogger(__name__)


class ErrorFeedback:
    """The residual of one worker's lossy update encodings (CPU float32 tensors)."""

    def __init__(self) -> None:
        self.key: Hashable = None
        self.residual: dict[str, torch.Tensor] = {}

    def encode(self, key: Hashable, codec: Codec, delta: Mapping[str, torch.Tensor]) -> EncodedTensors:
        """Encode ``delta`` plus the residual carried for ``key`` (a run and partition) with
        ``codec``, and keep what the encoding dropped. A lossless codec keeps no residual."""
        if key != self.key:
            if self.residual:
                log.info("error feedback residual dropped: %s is not %s", key, self.key)
            self.key, self.residual = key, {}
        if not codec.lossy:
            self.residual = {}
            return encode_with(codec, delta)
        compensated = {}
        for name, tensor in delta.items():
            value = tensor.detach().to("cpu")
            carried = self.residual.get(name)
            if carried is not None and carried.shape == value.shape and value.is_floating_point():
                value = value + carried
            compensated[name] = value
        encoded = encode_with(codec, compensated)
        self.residual = {name: compensated[name] - encoded[name] for name in compensated
                         if compensated[name].is_floating_point() and codec.compresses(compensated[name])}
        return encoded

    def residual_norm(self) -> float:
        """The L2 norm of the residual (for logs)."""
        return float(sum(float(r.double().pow(2).sum()) for r in self.residual.values())) ** 0.5
