"""Model versions out: which frame each worker gets, and to whom a version is sent at all.

Only the workers a version names (selected, or asked again) receive it: straight into their
inboxes through the default exchange, so downlink bytes scale with the selected count, not the
live count. When every live worker gets the same frame, one publish on the fanout does it.

Each worker gets a diff frame when it holds the version before (this aggregator sent it), a
keyframe otherwise (:mod:`fedmq.downlink`). A worker that could not use its frame asks for a
keyframe; it gets one per version at most (a flood of requests costs one model each, not more).

The reference the workers hold is kept beside the checkpoint (``downlink_reference.safetensors``,
tagged with its version), so a restarted aggregator goes on sending diffs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

from safetensors import safe_open
from safetensors.torch import save_file

from aggregator.rounds import OpenRound
from fedmq.codecs import Codec
from fedmq.downlink import DownlinkEncoder, Frame
from fedmq.errors import Unroutable
from fedmq.messages import ModelBroadcast, TrainingConfig, encode
from fedmq.topology import BROADCAST_EXCHANGE, DEFAULT_EXCHANGE, inbox_queue
from fedmq.transport import Transport

log = logging.getLogger(__name__)

REFERENCE_FILE = "downlink_reference.safetensors"


class Broadcaster:
    """Sends the frames of each version; remembers which version each worker was sent."""

    def __init__(self, transport: Transport, run_id: str, training: TrainingConfig, codec: Codec) -> None:
        self.transport, self.run_id, self.training = transport, run_id, training
        self.encoder = DownlinkEncoder(codec)
        self.held: dict[str, int] = {}  # worker -> the version whose reconstruction it was sent
        self._keyframed: set[tuple[int, str]] = set()  # (version, worker) keyframes sent on request
        self._encoded: dict[tuple[int, int, bool], bytes] = {}  # (version, attempt, keyframe) -> message

    # -- versions -------------------------------------------------------------------------------
    def open(self, round_: OpenRound, weights) -> None:
        """Make the frames of the round's version from the true model ``weights``."""
        self.encoder.advance(round_.version, weights)

    def send(self, round_: OpenRound, recipients: list[str], live: list[str]) -> None:
        """Send the round's version (its current attempt) to ``recipients``; adds the bytes and
        copies to the round's downlink counters."""
        if not recipients:
            # Nobody to send to now (a resumed run before its workers are back): the version is
            # open all the same, and joiners get it as a keyframe.
            self._message(round_, self.encoder.keyframe())
            return
        frames = {w: self.encoder.frame_for(self.held.get(w)) for w in recipients}
        same = {id(f) for f in frames.values()}
        if recipients and set(recipients) == set(live) and len(same) == 1:
            frame = next(iter(frames.values()))
            sent = self.transport.send(BROADCAST_EXCHANGE, "", self._message(round_, frame), mandatory=False)
            round_.bytes_down += sent * len(live)  # the fanout copies it into every live inbox
            round_.copies_down += len(live)
            self.held.update({w: frame.version for w in recipients})
            return
        for worker_id, frame in frames.items():
            self._send_to(round_, worker_id, frame)

    def send_keyframe(self, round_: OpenRound, worker_id: str, *, requested: bool = False) -> bool:
        """Send a joiner (or a worker that asked) the whole model of the round's version; a
        request is answered once per version and worker. Returns whether it was sent."""
        if requested:
            if (round_.version, worker_id) in self._keyframed:
                return False
            self._keyframed.add((round_.version, worker_id))
        return self._send_to(round_, worker_id, self.encoder.keyframe())

    def forget(self, workers: Iterable[str]) -> None:
        for worker_id in workers:
            self.held.pop(worker_id, None)

    def _send_to(self, round_: OpenRound, worker_id: str, frame: Frame) -> bool:
        try:
            sent = self.transport.send(DEFAULT_EXCHANGE, inbox_queue(worker_id).name, self._message(round_, frame))
        except Unroutable:
            log.warning("version %d: worker %s has no inbox any more; not sent", round_.version, worker_id)
            self.held.pop(worker_id, None)
            return False
        round_.bytes_down += sent
        round_.copies_down += 1
        self.held[worker_id] = frame.version
        return True

    def _message(self, round_: OpenRound, frame: Frame) -> bytes:
        key = (round_.version, round_.attempt, frame.is_keyframe)
        body = self._encoded.get(key)
        if body is None:
            if len(self._encoded) > 8:
                self._encoded.clear()
            body = encode(ModelBroadcast(self.run_id, round_.version, self.training, round_.selected, frame.weights,
                                         round_.attempt, round_.awaited, frame.base_version, frame.digest))
            self._encoded[key] = body
        round_.broadcast = body
        return body

    # -- durability -----------------------------------------------------------------------------
    def save_reference(self, directory: Path) -> None:
        """Keep the workers' reference beside the checkpoint (only for lossy codecs)."""
        encoder = self.encoder
        if not encoder.codec.lossy or encoder.reference is None:
            return
        path = directory / REFERENCE_FILE
        tmp = path.with_name(path.name + ".tmp")
        tensors = {name: t.contiguous() for name, t in encoder.reference.items()}
        save_file(tensors, str(tmp), metadata={"run_id": self.run_id, "version": str(encoder.reference_version)})
        os.replace(tmp, path)

    def restore_reference(self, directory: Path, version: int, live_workers: Iterable[str]) -> None:
        """Go on from the reference of ``version - 1`` (what the checkpoint of ``version`` was
        written with) if it is there; the workers live then are taken to hold it (one that
        does not asks for a keyframe)."""
        path = directory / REFERENCE_FILE
        if not self.encoder.codec.lossy or not path.exists():
            return
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as exc:  # a damaged file only costs keyframes
            log.warning("%s unreadable (%s): every worker gets a keyframe", path, exc)
            return
        if meta.get("run_id") != self.run_id or meta.get("version") != str(version - 1):
            log.info("%s is of version %s, not %d: every worker gets a keyframe", path, meta.get("version"),
                     version - 1)
            return
        self.encoder.restore(tensors, version - 1)
        self.held = {w: version - 1 for w in live_workers}
