"""Large messages as numbered chunks, so no AMQP message exceeds the broker's limit.

RabbitMQ 4.x refuses messages above 16 MiB by default, and one huge message costs the broker far
more memory than the same bytes in pieces (BROKER_FACTS.md). A payload above ``max_frame_bytes``
(8 MiB by default) travels as :class:`fedmq.messages.Chunk` messages carrying the digest of the
whole; :class:`ChunkAssembler` puts them back together and verifies the digest.

The assembler keeps the broker handles of every chunk it holds, so the caller can acknowledge
(or dead-letter) all of them together once the whole message is dealt with.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgpack

from fedmq.errors import InvalidMessage
from fedmq.messages import SCHEMA_VERSION, Chunk

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 8 * 1024 * 1024

#: The smallest frame limit fedmq allows (settings refuse less), so no sender cuts a piece under
#: this many data bytes except the last one of a message.
MIN_CHUNK_DATA_BYTES = 32 * 1024

#: What holding one chunk costs at least, whatever its data: its delivery, headers, envelope.
CHUNK_OVERHEAD_BYTES = 512
#: Room kept in every chunk frame for the msgpack envelope around the data.
_ENVELOPE_BYTES = 1024

H = TypeVar("H")


def split_frames(payload: bytes, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> list[bytes]:
    """The AMQP bodies that carry ``payload``: itself if small enough, else chunk messages."""
    if len(payload) <= max_frame_bytes:
        return [payload]
    piece = max_frame_bytes - _ENVELOPE_BYTES
    if piece <= 0:
        raise ValueError(f"max_frame_bytes={max_frame_bytes} leaves no room for data")
    digest = hashlib.sha256(payload).digest()
    message_id = uuid.uuid4().hex
    count = -(-len(payload) // piece)
    view = memoryview(payload)
    frames = []
    for index in range(count):
        body = {
            "schema": SCHEMA_VERSION, "kind": Chunk.KIND, "message_id": message_id, "index": index,
            "count": count, "total_bytes": len(payload), "sha256": digest,
            "data": view[index * piece:(index + 1) * piece],
        }
        frames.append(msgpack.packb(body, use_bin_type=True))
    return frames


@dataclass
class _PendingSet(Generic[H]):
    count: int
    total_bytes: int
    sha256: bytes
    first_seen: float
    held: int = 0  # bytes counted against max_pending_bytes
    parts: dict[int, bytes] = field(default_factory=dict)
    handles: list[H] = field(default_factory=list)


class ChunkAssembler(Generic[H]):
    """Collects chunks by message id; returns the payload once every chunk is in.

    ``max_message_bytes`` bounds one reassembled message and ``max_pending_bytes`` everything
    held at once, so a flood of partial sets cannot exhaust memory. What a chunk holds is
    counted as at least :data:`CHUNK_OVERHEAD_BYTES` (its handle and envelope), so a set of
    zero-length chunks is bounded too, and a set may not announce more chunks than its bytes
    could fill.
    """

    def __init__(self, *, max_message_bytes: int = 1 << 30, max_pending_bytes: int = 2 << 30) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_pending_bytes = max_pending_bytes
        self._sets: dict[str, _PendingSet[H]] = {}
        self._held = 0

    @property
    def pending(self) -> int:
        """Number of incomplete messages held."""
        return len(self._sets)

    def add(self, chunk: Chunk, handle: H, *, wire_bytes: int = 0) -> tuple[bytes, list[H]] | None:
        """Take one chunk. Returns ``(payload, handles)`` when its message is complete.

        Raises :class:`InvalidMessage` (with the handles of the whole set in ``exc.handles``)
        when the chunk contradicts its set, the set is too large, or the digest fails; the set is
        dropped so the caller can dead-letter every chunk of it.
        """
        pending = self._sets.get(chunk.message_id)
        if pending is None:
            if chunk.total_bytes > self.max_message_bytes:
                raise _with_handles(InvalidMessage(
                    "oversize", f"chunked message of {chunk.total_bytes} bytes > {self.max_message_bytes}"), [handle])
            if chunk.count > chunk.total_bytes // MIN_CHUNK_DATA_BYTES + 1:
                raise _with_handles(InvalidMessage(
                    "schema", f"{chunk.count} chunks for {chunk.total_bytes} bytes: senders never cut pieces "
                    f"under {MIN_CHUNK_DATA_BYTES} bytes"), [handle])
            pending = _PendingSet(chunk.count, chunk.total_bytes, chunk.sha256, time.monotonic())
            self._sets[chunk.message_id] = pending
        pending.handles.append(handle)
        if (chunk.count, chunk.total_bytes, chunk.sha256) != (pending.count, pending.total_bytes, pending.sha256):
            raise self._fail(chunk.message_id, InvalidMessage("schema", "chunk header disagrees with its set"))
        if chunk.index in pending.parts:
            # A redelivered chunk (the broker repeats unacked messages after a reconnect).
            log.debug("duplicate chunk %d of %s ignored", chunk.index, chunk.message_id)
            return None
        size = sum(map(len, pending.parts.values())) + len(chunk.data)
        if size > pending.total_bytes:
            raise self._fail(chunk.message_id, InvalidMessage("oversize", "chunks exceed their declared size"))
        held = max(wire_bytes, len(chunk.data), CHUNK_OVERHEAD_BYTES)
        if self._held + held > self.max_pending_bytes:
            raise self._fail(chunk.message_id, InvalidMessage("oversize", "too many bytes in incomplete messages"))
        pending.parts[chunk.index] = chunk.data
        pending.held += held
        self._held += held
        if len(pending.parts) < pending.count:
            return None
        del self._sets[chunk.message_id]
        self._held -= pending.held
        payload = b"".join(pending.parts[i] for i in range(pending.count))
        if len(payload) != pending.total_bytes or hashlib.sha256(payload).digest() != pending.sha256:
            raise _with_handles(InvalidMessage("digest", f"message {chunk.message_id} failed its sha256 check"),
                                pending.handles)
        return payload, pending.handles

    def expire(self, older_than_s: float) -> list[tuple[str, list[H]]]:
        """Drop incomplete sets first seen more than ``older_than_s`` ago; returns their handles."""
        now = time.monotonic()
        dropped = []
        for message_id in [m for m, s in self._sets.items() if now - s.first_seen > older_than_s]:
            pending = self._sets.pop(message_id)
            self._held -= pending.held
            dropped.append((message_id, pending.handles))
        return dropped

    def _fail(self, message_id: str, error: InvalidMessage) -> InvalidMessage:
        pending = self._sets.pop(message_id)
        self._held -= pending.held
        return _with_handles(error, pending.handles)


def _with_handles(error: InvalidMessage, handles: list[Any]) -> InvalidMessage:
    error.handles = list(handles)  # type: ignore[attr-defined]
    return error
