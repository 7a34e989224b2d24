"""Compressed broadcasts in a closed loop, like a video codec.

The aggregator keeps a copy of the model the workers hold: the *reference*, their reconstruction
of the last version sent. Version v travels as the encoded difference between the true model
w_v and the reference of v-1 (a *diff frame*); both sides add the same decoded difference to the
same reference, so the workers' reconstruction and the aggregator's reference of v agree bit for
bit, and what the codec rounded off stays in ``w - reference`` and is sent with the next frame
instead of accumulating. A worker that lacks the base of a diff frame (a joiner, a restart, a
missed version) gets a *keyframe*: the reference of v itself, raw and exact. The first version
(no reference yet) is the whole model through the codec, to everyone: its decoded value is the
first reference.

Every frame carries the SHA-256 of the reconstruction it should produce; a worker whose result
differs trains nothing and asks for a keyframe (:class:`fedmq.messages.KeyframeRequest`).

With the ``fp32`` codec there is no loop: every frame is a keyframe of the true model (no diff,
no digest), exactly today's broadcast.

Pure state and arithmetic here (no I/O): the aggregator's round loop and the worker's inbox call
:class:`DownlinkEncoder` and :class:`Reconstruction`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Mapping

import torch

from fedmq.codecs import Codec
from fedmq.tensor_codec import encode_with

log = logging.getLogger(__name__)

KEYFRAME = -1  # the base_version of a frame that carries the whole model


def model_digest(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, in name order (the order a
    mapping was built in, e.g. loaded from a file, does not matter)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        cpu = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{cpu.dtype}|{tuple(cpu.shape)}|".encode())
        if cpu.numel():
            digest.update(memoryview(cpu.reshape(-1).view(torch.uint8).numpy()))
    return digest.digest()


def add(reference: Mapping[str, torch.Tensor], diff: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """reference + diff, tensor by tensor, on the CPU in the reference's dtype: the one
    arithmetic both ends of the loop use, so their results agree bit for bit."""
    if set(diff) != set(reference):
        raise KeyError(f"tensors {sorted(set(diff) ^ set(reference))[:5]} are in one of the two only")
    return {name: (value + diff[name].to(value.dtype)) for name, value in reference.items()}


@dataclass(frozen=True)
class Frame:
    """What one broadcast carries: ``weights`` are the whole model (``base_version`` -1) or the
    difference from the reconstruction of ``base_version``; ``digest`` is that of the
    reconstruction the receiver ends up with (empty: not checked, fp32)."""

    version: int
    base_version: int
    weights: Mapping[str, torch.Tensor]
    digest: bytes

    @property
    def is_keyframe(self) -> bool:
        return self.base_version == KEYFRAME


class DownlinkEncoder:
    """The aggregator's end: one frame per version, and the reference the workers hold."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.reference: dict[str, torch.Tensor] | None = None
        self.reference_version = -1
        #: the frame of reference_version everyone is sent: a diff from the version before, or
        #: (the first version, or after a lost reference) the whole model through the codec.
        self.diff: Frame | None = None

    def restore(self, reference: Mapping[str, torch.Tensor] | None, version: int) -> None:
        """Go on from a checkpointed reference of ``version`` (None: start over with keyframes)."""
        self.reference = None if reference is None else dict(reference)
        self.reference_version = version if reference is not None else -1
        self.diff = None

    def advance(self, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Make the frames of ``version`` from the true model ``weights``. Called once per
        version (again for the same version is a no-op): a diff from the reference of the
        version before when there is one, and the new reference either way."""
        if version == self.reference_version and self.reference is not None:
            return
        if not self.codec.lossy:
            self.reference, self.reference_version, self.diff = dict(weights), version, None
            return
        current = {name: t.detach().to("cpu") for name, t in weights.items()}
        if self.reference is not None and list(self.reference) != list(current):
            if set(self.reference) != set(current):
                self.reference = None  # another model's reference: start over with a keyframe
            else:  # restored from a file in another order: frames follow the model's order
                self.reference = {name: self.reference[name] for name in current}
        if self.reference is None or self.reference_version != version - 1:
            # No reference of the version before: the whole model, encoded with the codec (a
            # lossy keyframe, what everyone is sent); its decoded value is the new reference.
            encoded = encode_with(self.codec, current)
            self.reference = dict(encoded.decoded)
            self.reference_version = version
            self.diff = Frame(version, KEYFRAME, encoded, model_digest(self.reference))
            return
        encoded = encode_with(self.codec, {name: current[name] - ref for name, ref in self.reference.items()})
        self.reference = add(self.reference, encoded)
        self.reference_version = version
        self.diff = Frame(version, version - 1, encoded, model_digest(self.reference))

    def keyframe(self) -> Frame:
        """The whole reference, exact (what a worker without the base of the diff gets)."""
        assert self.reference is not None
        digest = model_digest(self.reference) if self.codec.lossy else b""
        return Frame(self.reference_version, KEYFRAME, self.reference, digest)

    def frame_for(self, held_version: int | None) -> Frame:
        """The frame for a worker that holds the reconstruction of ``held_version`` (None:
        unknown or nothing): the version's frame when the worker can use it (it holds its base,
        or the version itself, as on a re-broadcast, or the frame is a whole model), an exact
        keyframe of the reference otherwise."""
        diff = self.diff
        if diff is not None and (diff.is_keyframe or held_version in (diff.base_version, diff.version)):
            return self.diff
        return self.keyframe()


class Reconstruction:
    """The worker's end: the model of the last frame it applied, checked by digest."""

    def __init__(self) -> None:
        self.run_id = ""
        self.version = -1
        self.weights: dict[str, torch.Tensor] | None = None

    def apply(self, run_id: str, frame: Frame) -> tuple[dict[str, torch.Tensor] | None, str]:
        """(the model of ``frame``'s version, "") or (None, why a keyframe is needed)."""
        if frame.is_keyframe:
            weights = dict(frame.weights)
        elif run_id == self.run_id and self.weights is not None and self.version == frame.version:
            # The same version again (a re-broadcast, or the diff after its keyframe): keep it
            # if it is the right one.
            if frame.digest and model_digest(self.weights) != frame.digest:
                return None, f"the model held for version {frame.version} does not match its digest"
            return self.weights, ""
        elif run_id != self.run_id or self.weights is None or self.version != frame.base_version:
            held = f"version {self.version} of run {self.run_id or '-'}" if self.weights is not None else "no model"
            return None, f"a difference from version {frame.base_version}, and this worker holds {held}"
        else:
            try:
                weights = add(self.weights, frame.weights)
            except (KeyError, RuntimeError) as exc:
                return None, f"the difference does not fit the model held: {type(exc).__name__}: {exc}"
        if frame.digest and model_digest(weights) != frame.digest:
            return None, f"the reconstruction of version {frame.version} does not match its digest"
        self.run_id, self.version, self.weights = run_id, frame.version, weights
        return weights, ""
