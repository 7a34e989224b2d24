"""Transport: bad input never wedges a consumer; chunk reassembly is bounded; over both brokers.

The dead-letter path is checked where it used to raise: a frame above our own size limit (its
republish is refused as MessageTooLarge), headers an AMQP table cannot carry again, and names
over 255 bytes. Each must end with the message in the dead letters and the consumer going on.
"""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
import torch

from fedmq.broker.amqp_rules import check_headers, dead_letter_headers
from fedmq.broker.base import Broker, Delivery
from fedmq.broker.memory import MemoryHub
from fedmq.chunking import CHUNK_OVERHEAD_BYTES, ChunkAssembler, split_frames
from fedmq.errors import InvalidMessage
from fedmq.messages import Chunk, RunComplete, WeightUpdate, encode
from fedmq.topology import CONTROL_QUEUE, DEAD_LETTER_QUEUE, REASON_HEADER, STATIC_TOPOLOGY, UPDATES_QUEUE
from fedmq.transport import Transport

FRAME = 64 * 1024


def _pump(broker: Broker, until, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        broker.run_for(0.05)
    return until()


class Consumer:
    """A service's receive loop in miniature: decode, dead-letter what is invalid, ack the rest."""

    def __init__(self, broker: Broker, *, max_frame_bytes: int = FRAME) -> None:
        self.broker = broker
        self.transport = Transport(broker, max_frame_bytes=max_frame_bytes)
        self.messages: list = []
        broker.subscribe(UPDATES_QUEUE, self.on_delivery, prefetch=16)

    def on_delivery(self, delivery: Delivery) -> None:
        try:
            received = self.transport.receive(delivery)
        except InvalidMessage as exc:
            self.transport.dead_letter(exc.deliveries, exc.reason, exc.detail)  # type: ignore[attr-defined]
            return
        if received is not None:
            self.messages.append(received.message)
            for d in received.deliveries:
                self.broker.ack(d)


class DeadLetters:
    def __init__(self, broker: Broker) -> None:
        self.got: list[Delivery] = []
        broker.subscribe(DEAD_LETTER_QUEUE, self._take, prefetch=16)
        self.broker = broker

    def _take(self, delivery: Delivery) -> None:
        self.got.append(delivery)
        self.broker.ack(delivery)


def _connect(kind: str, request: pytest.FixtureRequest, hub: MemoryHub | None, *, max_message_bytes: int) -> Broker:
    if kind == "memory":
        return hub.connect(max_message_bytes=max_message_bytes)
    from fedmq.broker.rabbitmq import RabbitBroker

    return RabbitBroker(request.getfixturevalue("rabbitmq_url"), connection_name="fedmq-test-transport",
                        max_message_bytes=max_message_bytes)


@pytest.fixture(params=["memory", pytest.param("rabbit", marks=pytest.mark.rabbitmq)])
def brokers(request: pytest.FixtureRequest):
    """(sender that may send anything up to 1 MiB, consumer with the 64 KiB frame limit)."""
    hub = MemoryHub() if request.param == "memory" else None
    sender = _connect(request.param, request, hub, max_message_bytes=1 << 20)
    consumer = _connect(request.param, request, hub, max_message_bytes=FRAME)
    sender.declare(STATIC_TOPOLOGY)
    consumer.declare(STATIC_TOPOLOGY)
    try:
        yield sender, consumer
    finally:
        sender.close()
        consumer.close()


def _valid(n: int) -> bytes:
    return encode(RunComplete(f"run-{n}", n, 0.5))


def test_a_frame_above_our_limit_is_rejected_to_the_dead_letters_and_the_consumer_goes_on(brokers):
    sender, broker = brokers
    consumer, dead = Consumer(broker), DeadLetters(broker)
    sender.publish("", UPDATES_QUEUE, b"\x00" * (FRAME + 1))  # below the broker's limit, above ours
    sender.publish("", UPDATES_QUEUE, _valid(1))
    assert _pump(broker, lambda: len(consumer.messages) == 1 and len(dead.got) == 1)
    assert consumer.messages[0].run_id == "run-1"
    assert len(dead.got[0].body) == FRAME + 1
    # Republishing it would break our own limit, so it went by reject, without our reason.
    assert dead.got[0].headers.get("x-first-death-reason") == "rejected"
    assert consumer.transport.dead_letter_rejects == 1
    assert consumer.transport.dead_letters["oversize"] == 1


def test_invalid_messages_with_headers_no_table_can_carry_again_are_dead_lettered_with_a_reason(brokers, request):
    sender, broker = brokers
    consumer, dead = Consumer(broker), DeadLetters(broker)
    if isinstance(sender, type(MemoryHub().connect())):
        # What pika hands over from a foreign client: a non-UTF-8 key arrives as bytes.
        sender._check_open()  # the memory broker stores headers as given; bypass its checks
        with sender.hub.condition:
            from fedmq.broker.memory import _Stored
            sender.hub._enqueue("", UPDATES_QUEUE, _Stored(b"garbage", {b"\xff\xfe": "x", "f": 2.5}, True), True)
    else:
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(request.getfixturevalue("rabbitmq_url")))
        try:
            # pika encodes a bytes key as it is; RabbitMQ delivers it back as bytes.
            properties = pika.BasicProperties(headers={b"\xff\xfe": "x", "d": Decimal("1.5"), "n": None})
            connection.channel().basic_publish("", UPDATES_QUEUE, b"garbage", properties)
        finally:
            connection.close()
    sender.publish("", UPDATES_QUEUE, _valid(2))
    assert _pump(broker, lambda: len(consumer.messages) == 1 and len(dead.got) == 1)
    got = dead.got[0]
    assert got.body == b"garbage"
    assert str(got.headers[REASON_HEADER]).startswith("malformed")
    assert consumer.transport.dead_letter_rejects == 0


def test_a_chunked_message_round_trips(brokers):
    sender, broker = brokers
    consumer = Consumer(broker)
    sender_transport = Transport(sender, max_frame_bytes=FRAME)
    # 300 KB of tensor data makes an update five frames long.
    huge = WeightUpdate("run-1", 0, "w1", 0, 10, 0.5, 1.0, 3, {"w": torch.arange(75_000, dtype=torch.float32)})
    sent = sender_transport.send("", UPDATES_QUEUE, huge)
    assert sent > 4 * FRAME
    assert _pump(broker, lambda: len(consumer.messages) == 1)
    got = consumer.messages[0]
    assert got.key == huge.key and torch.equal(got.delta["w"], huge.delta["w"])
    assert consumer.transport.incomplete == 0


def test_chunk_sets_announcing_more_chunks_than_their_bytes_could_fill_are_refused():
    assembler: ChunkAssembler[int] = ChunkAssembler()
    with pytest.raises(InvalidMessage) as refused:
        assembler.add(Chunk("z", 0, 1_000_000, 10, b"\x00" * 32, b""), 0)
    assert refused.value.reason == "schema"
    assert assembler.pending == 0


def test_zero_length_chunks_count_against_the_pending_bound():
    assembler: ChunkAssembler[int] = ChunkAssembler(max_message_bytes=1 << 20,
                                                    max_pending_bytes=3 * CHUNK_OVERHEAD_BYTES)
    for n in range(3):  # empty chunks still hold a delivery each: counted at the overhead
        assert assembler.add(Chunk(f"set{n}", 0, 2, 40_000, b"\x00" * 32, b""), n) is None
    with pytest.raises(InvalidMessage) as refused:
        assembler.add(Chunk("set3", 0, 2, 40_000, b"\x00" * 32, b""), 3)
    assert refused.value.reason == "oversize"
    assert assembler.pending == 3


def test_transport_bounds_set_by_the_caller_refuse_larger_sets():
    hub = MemoryHub()
    broker = hub.connect()
    transport = Transport(broker, max_frame_bytes=FRAME)
    transport.bound_messages(100_000, 200_000)
    frames = split_frames(b"y" * 150_000, max_frame_bytes=FRAME)
    with pytest.raises(InvalidMessage) as refused:
        transport.receive(Delivery(UPDATES_QUEUE, frames[0], {}, False, 1))
    assert refused.value.reason == "oversize"
    with pytest.raises(ValueError):
        transport.bound_messages(10, 5)


def test_dead_letter_headers_are_always_publishable():
    raw = {b"\xff\xfe": "x", "f": 1.5, "nan": float("nan"), "big": 2 ** 70, "k" * 300: 1,
           "nested": {"d": Decimal("1E+400"), "l": [1.0, object()]}, "ok": "text", "b": b"\x00"}
    safe = dead_letter_headers(raw)
    check_headers(safe)  # raises if pika could not encode it
    assert safe["ok"] == "text" and safe["b"] == b"\x00" and safe["f"] == "1.5"
    assert safe["big"] == str(2 ** 70) and "\ufffd\ufffd" in safe
    assert len(raw) == len(safe)  # nothing dropped


def test_expired_control_messages_vanish_instead_of_filling_the_dead_letters(brokers, request):
    sender, broker = brokers
    for i in range(5):  # heartbeats while no aggregator consumes the control queue
        sender.publish("", CONTROL_QUEUE, _valid(i), persistent=False, ttl_s=0.1)

    def depth(queue: str) -> int:
        if hasattr(broker, "hub"):
            return broker.hub.depth(queue)
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(request.getfixturevalue("rabbitmq_url")))
        try:
            return connection.channel().queue_declare(queue, passive=True).method.message_count
        finally:
            connection.close()

    deadline = time.monotonic() + 15
    while depth(CONTROL_QUEUE) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert depth(CONTROL_QUEUE) == 0
    assert depth(DEAD_LETTER_QUEUE) == 0
