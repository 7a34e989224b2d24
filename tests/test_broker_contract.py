"""One contract, two brokers: MemoryBroker and RabbitBroker must look the same to a caller.

Every test gets a :class:`Env` that connects brokers of one kind and names queues and exchanges
uniquely. RabbitMQ test queues carry ``x-expires`` so they vanish even if cleanup fails; the
fixture deletes what the test declared (and only that) with a plain pika connection.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import pytest

from fedmq.broker.base import Broker, Delivery
from fedmq.broker.memory import MemoryHub
from fedmq.errors import BrokerConfigError, BrokerError, BrokerUnavailable, InvalidName, MessageTooLarge, Unroutable
from fedmq.topology import BindingSpec, ExchangeSpec, QueueSpec

EXPIRES_MS = 60_000


class Env:
    """Connects brokers of one kind and hands out unique, self-expiring topology."""

    def __init__(self, kind: str, suffix: str, url: str | None) -> None:
        self.kind = kind
        self.suffix = suffix
        self.url = url
        self.hub = MemoryHub() if kind == "memory" else None
        self.brokers: list[Broker] = []
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    def connect(self, **kwargs: Any) -> Broker:
        if self.kind == "memory":
            broker: Broker = self.hub.connect(**kwargs)
        else:
            from fedmq.broker.rabbitmq import RabbitBroker

            kwargs.setdefault("connection_name", f"fedmq-test-{self.suffix}")
            broker = RabbitBroker(self.url, **kwargs)
        self.brokers.append(broker)
        return broker

    def queue(self, label: str, *arguments: tuple[str, object]) -> QueueSpec:
        name = f"test.{self.suffix}.{label}"
        self.queues.append(name)
        return QueueSpec(name, durable=False, arguments=(("x-expires", EXPIRES_MS),) + arguments)

    def exchange(self, label: str, kind: str) -> ExchangeSpec:
        name = f"test.{self.suffix}.{label}"
        self.exchanges.append(name)
        return ExchangeSpec(name, kind, durable=False)

    def cleanup(self) -> None:
        for broker in self.brokers:
            broker.close()
        if self.kind != "rabbit" or not (self.queues or self.exchanges):
            return
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            for name in self.queues:
                channel = connection.channel()
                try:
                    channel.queue_delete(name)
                except pika.exceptions.AMQPError:
                    pass
            for name in self.exchanges:
                channel = connection.channel()
                try:
                    channel.exchange_delete(name)
                except pika.exceptions.AMQPError:
                    pass
        finally:
            connection.close()


@pytest.fixture(params=["memory", pytest.param("rabbit", marks=pytest.mark.rabbitmq)])
def env(request: pytest.FixtureRequest, unique_name: str):
    url = request.getfixturevalue("rabbitmq_url") if request.param == "rabbit" else None
    environment = Env(request.param, unique_name, url)
    try:
        yield environment
    finally:
        environment.cleanup()


def pump(broker: Broker, until: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Call ``run_for`` until ``until()`` holds or ``timeout`` passes; returns ``until()``."""
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        broker.run_for(0.05)
    return until()


def settle(broker: Broker, seconds: float) -> None:
    """Keep dispatching for ``seconds`` (to see that nothing more arrives)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        broker.run_for(0.05)


# -- routing -----------------------------------------------------------------------------------
def test_round_trip_bytes_and_headers(env: Env) -> None:
    broker = env.connect()
    queue = env.queue("q")
    broker.declare_queue(queue)
    got: list[Delivery] = []
    broker.subscribe(queue.name, got.append, prefetch=10)
    body = bytes(range(256)) * 10
    headers = {"x-kind": "update", "round": 7, "ok": True, "raw": b"\x00\xff"}
    broker.publish("", queue.name, body, headers=headers)

    assert pump(broker, lambda: len(got) == 1)
    delivery = got[0]
    assert delivery.queue == queue.name
    assert delivery.body == body and isinstance(delivery.body, bytes)
    assert dict(delivery.headers) == headers
    assert delivery.redelivered is False
    broker.ack(delivery)
    broker.ack(delivery)  # a second ack of the same delivery is a no-op


def test_no_headers_gives_empty_mapping(env: Env) -> None:
    broker = env.connect()
    queue = env.queue("q")
    broker.declare_queue(queue)
    got: list[Delivery] = []
    broker.subscribe(queue.name, got.append, prefetch=1)
    broker.publish("", queue.name, b"x", persistent=False)
    assert pump(broker, lambda: len(got) == 1)
    assert dict(got[0].headers) == {}


def test_fanout_reaches_every_bound_queue(env: Env) -> None:
    publisher, consumer = env.connect(), env.connect()
    exchange = env.exchange("fan", "fanout")
    first, second, unbound = env.queue("a"), env.queue("b"), env.queue("c")
    consumer.declare(
        _topology(
            exchanges=(exchange,),
            queues=(first, second, unbound),
            bindings=(
                BindingSpec(exchange.name, first.name),
                BindingSpec(exchange.name, second.name),
            ),
        )
    )
    got: list[Delivery] = []
    for queue in (first, second, unbound):
        consumer.subscribe(queue.name, got.append, prefetch=5)
    publisher.publish(exchange.name, "ignored-by-fanout", b"model-v1", headers={"v": 1})

    assert pump(consumer, lambda: len(got) == 2)
    settle(consumer, 0.3)
    assert sorted(d.queue for d in got) == sorted([first.name, second.name])
    assert all(d.body == b"model-v1" and d.headers["v"] == 1 for d in got)


def test_direct_exchange_routes_by_key(env: Env) -> None:
    broker = env.connect()
    exchange = env.exchange("direct", "direct")
    red, blue = env.queue("red"), env.queue("blue")
    broker.declare_exchange(exchange)
    broker.declare_queue(red)
    broker.declare_queue(blue)
    broker.bind(BindingSpec(exchange.name, red.name, "red"))
    broker.bind(BindingSpec(exchange.name, blue.name, "blue"))
    got: list[Delivery] = []
    broker.subscribe(red.name, got.append, prefetch=5)
    broker.subscribe(blue.name, got.append, prefetch=5)
    broker.publish(exchange.name, "blue", b"to-blue")
    assert pump(broker, lambda: len(got) == 1)
    settle(broker, 0.2)
    assert [(d.queue, d.body) for d in got] == [(blue.name, b"to-blue")]


def test_default_exchange_sends_to_the_named_queue(env: Env) -> None:
    sender, receiver = env.connect(), env.connect()
    inbox, other = env.queue("inbox"), env.queue("other")
    receiver.declare_queue(inbox)
    receiver.declare_queue(other)
    got: list[Delivery] = []
    receiver.subscribe(inbox.name, got.append, prefetch=5)
    receiver.subscribe(other.name, got.append, prefetch=5)
    for i in range(3):
        sender.publish("", inbox.name, f"direct-{i}".encode())
    assert pump(receiver, lambda: len(got) == 3)
    assert [d.body for d in got] == [b"direct-0", b"direct-1", b"direct-2"]  # in order
    assert {d.queue for d in got} == {inbox.name}


def test_mandatory_unroutable_raises(env: Env) -> None:
    broker = env.connect()
    with pytest.raises(Unroutable):
        broker.publish("", f"test.{env.suffix}.nobody-home", b"lost")
    exchange = env.exchange("empty-fan", "fanout")
    broker.declare_exchange(exchange)
    with pytest.raises(Unroutable):
        broker.publish(exchange.name, "", b"lost")
    # Without mandatory the message is dropped silently.
    broker.publish(exchange.name, "", b"dropped", mandatory=False)
    # And the broker keeps working afterwards.
    queue = env.queue("after")
    broker.declare_queue(queue)
    broker.bind(BindingSpec(exchange.name, queue.name))
    broker.publish(exchange.name, "", b"routed")
    got: list[Delivery] = []
    broker.subscribe(queue.name, got.append, prefetch=1)
    assert pump(broker, lambda: len(got) == 1)
    assert got[0].body == b"routed"


def test_publish_to_missing_exchange_is_a_config_error(env: Env) -> None:
    broker = env.connect()
    with pytest.raises(BrokerConfigError, match="404"):
        broker.publish(f"test.{env.suffix}.no-such-exchange", "", b"x")
    queue = env.queue("q")
    broker.declare_queue(queue)
    broker.publish("", queue.name, b"still fine")


# -- flow control and acknowledgements ---------------------------------------------------------
def test_prefetch_limits_unacked_deliveries(env: Env) -> None:
    producer, consumer = env.connect(), env.connect()
    queue = env.queue("work")
    consumer.declare_queue(queue)
    for i in range(5):
        producer.publish("", queue.name, f"m{i}".encode())
    got: list[Delivery] = []
    consumer.subscribe(queue.name, got.append, prefetch=2)

    assert pump(consumer, lambda: len(got) == 2)
    settle(consumer, 0.5)
    assert len(got) == 2, "prefetch=2 must hold back the rest until an ack"

    consumer.ack(got[0])
    assert pump(consumer, lambda: len(got) == 3)
    settle(consumer, 0.3)
    assert len(got) == 3

    for delivery in got[1:]:
        consumer.ack(delivery)
    assert pump(consumer, lambda: len(got) == 5)
    assert [d.body for d in got] == [b"m0", b"m1", b"m2", b"m3", b"m4"]


def test_unacked_deliveries_come_back_redelivered_after_close(env: Env) -> None:
    producer, first = env.connect(), env.connect()
    queue = env.queue("q")
    first.declare_queue(queue)
    producer.publish("", queue.name, b"one")
    producer.publish("", queue.name, b"two")
    taken: list[Delivery] = []
    first.subscribe(queue.name, taken.append, prefetch=10)
    assert pump(first, lambda: len(taken) == 2)
    assert not any(d.redelivered for d in taken)
    first.close()
    first.ack(taken[0])  # after close: a no-op, the broker already took the message back

    second = env.connect()
    again: list[Delivery] = []
    second.subscribe(queue.name, again.append, prefetch=10)
    assert pump(second, lambda: len(again) == 2)
    assert sorted(d.body for d in again) == [b"one", b"two"]
    assert all(d.redelivered for d in again)


def test_reject_with_requeue_redelivers(env: Env) -> None:
    broker = env.connect()
    queue = env.queue("q")
    broker.declare_queue(queue)
    got: list[Delivery] = []
    broker.subscribe(queue.name, got.append, prefetch=1)
    broker.publish("", queue.name, b"again")
    assert pump(broker, lambda: len(got) == 1)
    broker.reject(got[0], requeue=True)
    assert pump(broker, lambda: len(got) == 2)
    assert got[1].body == b"again" and got[1].redelivered is True
    broker.ack(got[1])


def test_reject_without_requeue_dead_letters(env: Env) -> None:
    broker = env.connect()
    dlx = env.exchange("dlx", "fanout")
    dead = env.queue("dead")
    work = env.queue("work", ("x-dead-letter-exchange", dlx.name))
    broker.declare(
        _topology(
            exchanges=(dlx,), queues=(dead, work), bindings=(BindingSpec(dlx.name, dead.name),)
        )
    )
    got: list[Delivery] = []
    broker.subscribe(work.name, got.append, prefetch=1)
    broker.subscribe(dead.name, got.append, prefetch=1)
    broker.publish("", work.name, b"poison", headers={"x-fedmq-reason": "schema"})
    assert pump(broker, lambda: len(got) == 1)
    assert got[0].queue == work.name
    broker.reject(got[0], requeue=False)

    assert pump(broker, lambda: len(got) == 2)
    dead_letter = got[1]
    assert dead_letter.queue == dead.name
    assert dead_letter.body == b"poison"
    assert dead_letter.headers["x-fedmq-reason"] == "schema"
    assert dead_letter.headers["x-first-death-queue"] == work.name
    assert dead_letter.headers["x-first-death-reason"] == "rejected"
    broker.ack(dead_letter)
    settle(broker, 0.2)
    assert len(got) == 2  # not requeued to the work queue


# -- threading and the loop --------------------------------------------------------------------
def test_call_threadsafe_runs_on_the_owner_thread(env: Env) -> None:
    broker = env.connect()
    ran_on: list[int] = []
    started = threading.Event()

    def other_thread() -> None:
        started.set()
        time.sleep(0.2)  # post while run_for is already waiting
        broker.call_threadsafe(lambda: ran_on.append(threading.get_ident()))

    thread = threading.Thread(target=other_thread)
    thread.start()
    started.wait()
    broker.run_for(30.0)  # returns once the callback ran: one call, no pump
    thread.join()
    assert ran_on == [threading.get_ident()]


def test_callbacks_run_in_order_one_per_run_for(env: Env) -> None:
    broker = env.connect()
    seen: list[int] = []
    for i in range(3):
        broker.call_threadsafe(lambda i=i: seen.append(i))
    broker.run_for(1.0)
    assert seen == [0]
    assert pump(broker, lambda: len(seen) == 3)
    assert seen == [0, 1, 2]


def test_run_for_waits_for_a_delivery_that_arrives_while_idle(env: Env) -> None:
    broker, sender = env.connect(), env.connect()
    queue = env.queue("idle")
    broker.declare_queue(queue)
    got: list[Delivery] = []
    broker.subscribe(queue.name, got.append, prefetch=1)
    broker.run_for(0)  # a zero wait only polls
    assert got == []
    ready = threading.Event()

    def publish_later() -> None:
        ready.wait()
        time.sleep(0.2)
        sender.publish("", queue.name, b"late")

    if env.kind == "memory":
        thread = threading.Thread(target=publish_later)
    else:  # a pika connection belongs to one thread: the sender publishes from a fresh one
        def publish_later_own_connection() -> None:
            from fedmq.broker.rabbitmq import RabbitBroker

            ready.wait()
            time.sleep(0.2)
            with RabbitBroker(env.url, connection_name=f"fedmq-test-{env.suffix}-late") as late:
                late.publish("", queue.name, b"late")
        thread = threading.Thread(target=publish_later_own_connection)
    thread.start()
    ready.set()
    broker.run_for(30.0)  # one call: it waits, then hands over what arrived
    thread.join()
    assert [d.body for d in got] == [b"late"]
    broker.close()


def test_handler_may_publish_and_ack(env: Env) -> None:
    broker = env.connect()
    ping, pong = env.queue("ping"), env.queue("pong")
    broker.declare_queue(ping)
    broker.declare_queue(pong)
    answers: list[Delivery] = []

    def answer(delivery: Delivery) -> None:
        broker.publish("", pong.name, delivery.body + b"!")
        broker.ack(delivery)

    broker.subscribe(ping.name, answer, prefetch=1)
    broker.subscribe(pong.name, answers.append, prefetch=1)
    broker.publish("", ping.name, b"hi")
    assert pump(broker, lambda: len(answers) == 1)
    assert answers[0].body == b"hi!"


# -- errors ------------------------------------------------------------------------------------
def test_redeclare_with_other_arguments_is_a_config_error_and_broker_stays_usable(env: Env) -> None:
    broker = env.connect()
    queue = env.queue("q")
    broker.declare_queue(queue)
    broker.declare_queue(queue)  # same arguments: idempotent
    got: list[Delivery] = []
    broker.subscribe(queue.name, got.append, prefetch=5)

    clash = QueueSpec(queue.name, durable=False, arguments=(("x-expires", EXPIRES_MS // 2),))
    with pytest.raises(BrokerConfigError) as info:
        broker.declare_queue(clash)
    if env.kind == "rabbit":
        assert "406" in str(info.value) and "PRECONDITION_FAILED" in str(info.value)

    exchange = env.exchange("fan", "fanout")
    broker.declare_exchange(exchange)
    with pytest.raises(BrokerConfigError):
        broker.declare_exchange(ExchangeSpec(exchange.name, "direct", durable=False))

    # Declarations, publishes and the existing subscription all still work.
    other = env.queue("other")
    broker.declare_queue(other)
    broker.bind(BindingSpec(exchange.name, queue.name))
    broker.publish(exchange.name, "", b"after the error")
    assert pump(broker, lambda: len(got) == 1)
    assert got[0].body == b"after the error"
    broker.ack(got[0])


def test_missing_queue_or_exchange_is_a_config_error(env: Env) -> None:
    broker = env.connect()
    queue = env.queue("q")
    broker.declare_queue(queue)
    got: list[Delivery] = []
    broker.subscribe(queue.name, got.append, prefetch=1)
    with pytest.raises(BrokerConfigError, match="404"):
        broker.subscribe(f"test.{env.suffix}.missing", got.append, prefetch=1)
    with pytest.raises(BrokerConfigError, match="404"):
        broker.bind(BindingSpec(f"test.{env.suffix}.missing-exchange", queue.name))
    # The subscription made before the errors still receives.
    broker.publish("", queue.name, b"ok")
    assert pump(broker, lambda: len(got) == 1)


def test_closed_broker(env: Env) -> None:
    broker = env.connect()
    broker.close()
    broker.close()  # idempotent
    with pytest.raises(BrokerUnavailable):
        broker.publish("", "anything", b"x")
    with pytest.raises(BrokerUnavailable):
        broker.run_for(0.01)


def test_oversize_body_is_refused_before_sending(env: Env) -> None:
    broker = env.connect(max_message_bytes=1024)
    queue = env.queue("q")
    broker.declare_queue(queue)
    with pytest.raises(MessageTooLarge):
        broker.publish("", queue.name, b"x" * 1025)
    broker.publish("", queue.name, b"x" * 1024)  # at the limit: fine
    got: list[Delivery] = []
    broker.subscribe(queue.name, got.append, prefetch=1)
    assert pump(broker, lambda: len(got) == 1)
    assert got[0].body == b"x" * 1024


def test_names_over_255_bytes_are_refused_and_the_broker_stays_usable(env: Env) -> None:
    broker = env.connect()
    queue = env.queue("q")
    broker.declare_queue(queue)
    too_long = "w" * 256
    with pytest.raises(InvalidName):
        broker.publish("", too_long, b"m")
    with pytest.raises(InvalidName):
        broker.declare_queue(QueueSpec("x" * 300, durable=False))
    with pytest.raises(InvalidName):
        broker.publish("", queue.name, b"m", headers={"k" * 256: "v"})
    broker.publish("", queue.name, b"after")  # nothing was left broken
    got: list[Delivery] = []
    broker.subscribe(queue.name, got.append, prefetch=1)
    assert pump(broker, lambda: len(got) == 1) and got[0].body == b"after"


@pytest.mark.parametrize("headers", [{"f": 1.5}, {"big": 2 ** 64}, {"nested": {"x": object()}}])
def test_header_values_amqp_cannot_carry_are_refused_not_retried(env: Env, headers) -> None:
    broker = env.connect()
    queue = env.queue("q")
    broker.declare_queue(queue)
    with pytest.raises(BrokerError) as refused:
        broker.publish("", queue.name, b"m", headers=headers)
    assert not isinstance(refused.value, BrokerUnavailable)
    broker.publish("", queue.name, b"ok", headers={"fine": 1})
    got: list[Delivery] = []
    broker.subscribe(queue.name, got.append, prefetch=1)
    assert pump(broker, lambda: len(got) == 1) and got[0].body == b"ok"


@pytest.mark.rabbitmq
def test_rabbit_sets_connection_options(rabbitmq_url: str, unique_name: str) -> None:
    from fedmq.broker import rabbitmq

    environment = Env("rabbit", unique_name, rabbitmq_url)
    try:
        broker = environment.connect(heartbeat_s=7, blocked_timeout_s=12.5)
        assert isinstance(broker, rabbitmq.RabbitBroker)
        for role in ("publish", "consume"):
            params = broker._params[role]
            assert params.heartbeat == 7
            assert params.blocked_connection_timeout == 12.5
            assert params.client_properties["connection_name"] == f"fedmq-test-{unique_name}/{role}"
        # Two distinct connections: an alarm that blocks publishing must not stop consuming.
        assert broker._pub_conn is not broker._con_conn
    finally:
        environment.cleanup()


def _topology(**parts: Any):
    from fedmq.topology import Topology

    return Topology(**parts)


# -- expiry and deletion -----------------------------------------------------------------------
def test_an_expired_message_is_never_delivered(env: Env) -> None:
    broker = env.connect()
    queue = env.queue("ttl")
    broker.declare_queue(queue)
    broker.publish("", queue.name, b"stale", ttl_s=0.2)
    broker.publish("", queue.name, b"fresh", ttl_s=60)
    time.sleep(0.5)
    got: list[Delivery] = []
    broker.subscribe(queue.name, got.append, prefetch=10)
    assert pump(broker, lambda: len(got) >= 1)
    settle(broker, 0.3)
    assert [d.body for d in got] == [b"fresh"]


def test_an_expired_message_goes_to_the_dead_letter_exchange_when_the_queue_has_one(env: Env) -> None:
    broker = env.connect()
    dead_exchange = env.exchange("dlx", "fanout")
    broker.declare_exchange(dead_exchange)
    dead = env.queue("dead")
    broker.declare_queue(dead)
    broker.bind(BindingSpec(dead_exchange.name, dead.name))
    queue = env.queue("ttl-dlx", ("x-dead-letter-exchange", dead_exchange.name))
    broker.declare_queue(queue)
    broker.publish("", queue.name, b"beat", ttl_s=0.1)
    got: list[Delivery] = []
    broker.subscribe(dead.name, got.append, prefetch=10)  # nobody consumes `queue` itself
    assert pump(broker, lambda: len(got) == 1, timeout=15)
    assert got[0].body == b"beat"
    assert got[0].headers.get("x-first-death-reason") == "expired"


def test_an_unused_queue_with_x_expires_is_deleted(env: Env) -> None:
    broker = env.connect()
    name = f"test.{env.suffix}.short-lived"
    env.queues.append(name)
    broker.declare_queue(QueueSpec(name, durable=False, arguments=(("x-expires", 300),)))

    def gone() -> bool:
        try:
            broker.subscribe(name, lambda d: None, prefetch=1)
        except BrokerConfigError:
            return True
        return False

    # Poll without consuming (a consumer would keep the queue alive): RabbitMQ checks expiry on
    # its own timer, so wait for it rather than for a fixed time.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and name in _queue_names(env, broker):
        time.sleep(0.2)
    assert name not in _queue_names(env, broker)
    assert gone()


def _queue_names(env: Env, broker: Broker) -> set[str]:
    if env.kind == "memory":
        return set(env.hub.queue_names())
    # Asked of the node itself: a (passive) queue.declare would count as use and keep the queue
    # from expiring.
    import subprocess
    from urllib.parse import unquote, urlparse

    vhost = unquote(urlparse(env.url).path.lstrip("/")) or "/"
    listed = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name"], capture_output=True,
                            text=True, timeout=60, check=True).stdout.split()
    return set(listed) & set(env.queues)


def test_memory_drop_connection_redelivers_unacked_and_stales_old_tags() -> None:
    hub = MemoryHub()
    broker = hub.connect()
    queue = QueueSpec("q")
    broker.declare_queue(queue)
    for body in (b"a", b"b"):
        broker.publish("", "q", body)
    got: list[Delivery] = []
    broker.subscribe("q", got.append, prefetch=0)
    assert pump(broker, lambda: len(got) == 2)
    broker.ack(got[0])
    broker.drop_connection()
    assert pump(broker, lambda: len(got) == 3)
    assert got[2].body == b"b" and got[2].redelivered
    broker.ack(got[1])  # stale: must not ack the redelivered copy
    broker.reject(got[2], requeue=True)
    assert pump(broker, lambda: len(got) == 4) and got[3].body == b"b"


def test_a_deleted_queue_no_longer_receives_from_its_exchange(env: Env) -> None:
    broker = env.connect()
    exchange = env.exchange("fan", "fanout")
    kept, doomed = env.queue("kept"), env.queue("doomed")
    broker.declare_exchange(exchange)
    for queue in (kept, doomed):
        broker.declare_queue(queue)
        broker.bind(BindingSpec(exchange.name, queue.name))
    broker.delete_queue(doomed.name)
    broker.delete_queue(doomed.name)  # deleting what is gone is not an error
    broker.publish(exchange.name, "", b"m")
    got: list[Delivery] = []
    broker.subscribe(kept.name, got.append, prefetch=10)
    assert pump(broker, lambda: len(got) == 1)
    with pytest.raises(BrokerConfigError):
        broker.subscribe(doomed.name, got.append, prefetch=1)
