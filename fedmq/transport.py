"""Messages over a :class:`~fedmq.broker.base.Broker`: encode, chunk, publish; receive,
reassemble, decode; dead-letter what is invalid, with the reason.

Both services talk through a :class:`Transport`; neither touches frames or chunks itself.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from fedmq.broker.amqp_rules import dead_letter_headers
from fedmq.broker.base import Broker, Delivery
from fedmq.chunking import MAX_FRAME_BYTES, ChunkAssembler, split_frames
from fedmq.errors import BrokerError, BrokerUnavailable, InvalidMessage
from fedmq.messages import Chunk, Message, decode, decode_chunk, encode
from fedmq.topology import DEAD_LETTER_EXCHANGE, REASON_HEADER, SENDER_USER_HEADER, SOURCE_QUEUE_HEADER

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceivedBytes:
    """A whole message's bytes (reassembled if chunked) and every delivery that carried it."""

    data: bytes
    deliveries: tuple[Delivery, ...]
    size: int  # bytes on the wire, all chunks together


@dataclass(frozen=True)
class Received:
    """A whole message and every delivery that carried it (one, or one per chunk)."""

    message: Message
    deliveries: tuple[Delivery, ...]
    size: int  # bytes on the wire, all chunks together


class Transport:
    """Sends and receives :mod:`fedmq.messages` through one broker connection.

    ``max_message_bytes`` bounds one chunked message and ``max_pending_bytes`` every incomplete
    one together (both in wire bytes): a larger message is invalid (reason ``oversize``). The
    defaults only guard a transport nobody bounded; a service calls :meth:`bound_messages` with
    limits derived from its model's size. ``dead_letters`` counts what it dead-lettered, by
    reason; ``dead_letter_rejects`` how many of those went by reject (see :meth:`dead_letter`).
    """

    def __init__(self, broker: Broker, *, max_frame_bytes: int = MAX_FRAME_BYTES,
                 max_message_bytes: int = 1 << 30, max_pending_bytes: int = 2 << 30) -> None:
        self.broker = broker
        self.max_frame_bytes = max_frame_bytes
        self._assembler: ChunkAssembler[Delivery] = ChunkAssembler(
            max_message_bytes=max_message_bytes, max_pending_bytes=max_pending_bytes)
        self.dead_letters: Counter[str] = Counter()
        self.dead_letter_rejects = 0
        #: Elements a received message's compressed tensors may declare (None: the codec's
        #: default bound); a service sets it to its model's size.
        self.max_decoded_elements: int | None = None

    @property
    def max_message_bytes(self) -> int:
        return self._assembler.max_message_bytes

    def bound_messages(self, max_message_bytes: int, max_pending_bytes: int) -> None:
        """Limit one reassembled message and all incomplete ones together (bytes).

        Typically ``max_message_bytes`` is what the largest legitimate message (a model, an
        update) can encode to, and ``max_pending_bytes`` that times the senders expected at once.
        """
        if max_message_bytes < 1 or max_pending_bytes < max_message_bytes:
            raise ValueError(f"need 0 < max_message_bytes <= max_pending_bytes, got {max_message_bytes}, "
                             f"{max_pending_bytes}")
        self._assembler.max_message_bytes = max_message_bytes
        self._assembler.max_pending_bytes = max_pending_bytes

    @property
    def incomplete(self) -> int:
        """Chunked messages held while their other chunks are missing."""
        return self._assembler.pending

    def send(self, exchange: str, routing_key: str, message: Message | bytes, *,
             persistent: bool = True, mandatory: bool = True, ttl_s: float | None = None) -> int:
        """Publish one message (chunked if needed), each frame confirmed. Returns bytes sent.

        ``message`` may be already-encoded bytes, to send one encoding to several places.
        """
        payload = message if isinstance(message, bytes) else encode(message)
        frames = split_frames(payload, max_frame_bytes=self.max_frame_bytes)
        for frame in frames:
            self.broker.publish(exchange, routing_key, frame, persistent=persistent, mandatory=mandatory, ttl_s=ttl_s)
        return sum(map(len, frames))

    def receive(self, delivery: Delivery) -> Received | None:
        """Decode one delivery. ``None`` while a chunked message is incomplete.

        Raises :class:`InvalidMessage`; its ``deliveries`` attribute lists every delivery to
        dead-letter (all chunks of a broken set, or just this one).
        """
        raw = self.receive_bytes(delivery)
        if raw is None:
            return None
        return Received(self.decode(raw), raw.deliveries, raw.size)

    def receive_bytes(self, delivery: Delivery) -> "ReceivedBytes | None":
        """Like :meth:`receive`, but hand over the whole message's bytes undecoded, so a caller
        can look at a few fields (:func:`fedmq.messages.peek_update`) before decoding tensors."""
        try:
            # Senders never publish a frame above max_frame_bytes; a larger one is refused before
            # it is decoded (RabbitMQ 4.x would have refused it above 16 MiB anyway).
            if len(delivery.body) > self.max_frame_bytes:
                raise InvalidMessage("oversize", f"frame of {len(delivery.body)} bytes > {self.max_frame_bytes}")
            message = decode_chunk(delivery.body)
        except InvalidMessage as exc:
            exc.deliveries = (delivery,)  # type: ignore[attr-defined]
            raise
        if message is None:
            return ReceivedBytes(delivery.body, (delivery,), len(delivery.body))
        try:
            done = self._assembler.add(message, delivery, wire_bytes=len(delivery.body))
        except InvalidMessage as exc:
            exc.deliveries = tuple(exc.handles)  # type: ignore[attr-defined]
            raise
        if done is None:
            return None
        payload, deliveries = done
        return ReceivedBytes(payload, tuple(deliveries), sum(len(d.body) for d in deliveries))

    def decode(self, raw: "ReceivedBytes") -> Message:
        """The message in ``raw``; InvalidMessage (with ``deliveries``) if it is not one."""
        try:
            whole = decode(raw.data, max_elements=self.max_decoded_elements)
            if isinstance(whole, Chunk):
                raise InvalidMessage("schema", "a chunk inside a chunked message")
        except InvalidMessage as exc:
            exc.deliveries = raw.deliveries  # type: ignore[attr-defined]
            raise
        return whole

    def expire_incomplete(self, older_than_s: float) -> int:
        """Dead-letter chunk sets that stayed incomplete too long; returns how many sets."""
        expired = self._assembler.expire(older_than_s)
        for message_id, deliveries in expired:
            self.dead_letter(deliveries, "incomplete", f"chunked message {message_id} never completed")
        return len(expired)

    def dead_letter(self, deliveries: tuple[Delivery, ...] | list[Delivery], reason: str, detail: str) -> None:
        """Move deliveries to the dead-letter exchange with the reason in a header, then ack.

        The copy is published (and confirmed) before the original is acknowledged, so nothing is
        lost if the process dies in between (at worst the message is dead-lettered twice).
        RabbitMQ's own dead-lettering on reject cannot carry a reason, hence the republish.

        When the copy cannot be published (a frame above our own size limit, a header or name
        no AMQP table can carry again), the delivery is rejected without requeue instead: every
        queue has a dead-letter exchange, so RabbitMQ moves the original there without our
        reason, which is logged here. Never raising for these keeps one bad message from
        wedging a service that would otherwise get it back after every restart. A lost
        connection (BrokerUnavailable) still raises: the message comes back and is tried again.
        """
        for delivery in deliveries:
            headers = dead_letter_headers(delivery.headers)
            headers[REASON_HEADER] = f"{reason}: {detail}"[:1000]
            headers[SOURCE_QUEUE_HEADER] = delivery.queue
            headers.pop(SENDER_USER_HEADER, None)  # only the broker's word counts, not a sender's header
            if delivery.user_id:
                headers[SENDER_USER_HEADER] = delivery.user_id
            try:
                self.broker.publish(DEAD_LETTER_EXCHANGE, delivery.queue, delivery.body,
                                    headers=headers, persistent=True, mandatory=False)
            except BrokerUnavailable:
                raise
            except BrokerError as exc:
                log.warning("cannot republish a %d-byte message from %s to the dead letters (%s); "
                            "rejecting it to the queue's dead-letter exchange without the reason header",
                            len(delivery.body), delivery.queue, exc)
                self.broker.reject(delivery, requeue=False)
                self.dead_letter_rejects += 1
                continue
            self.broker.ack(delivery)
        self.dead_letters[reason] += 1
        log.warning("dead-lettered %d message(s) from %s: %s: %s (%d %s so far)",
                    len(deliveries), deliveries[0].queue if deliveries else "?", reason, detail,
                    self.dead_letters[reason], reason)
