"""RabbitBroker against a real broker that drops its connections, and heartbeats under load.

Connections are force-closed from the server side with ``rabbitmqctl close_connection``, found
by the client-provided connection name this test gave its broker (other people share the broker:
never close connections that are not ours).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time

import pika
import pytest

from fedmq.broker.base import Delivery
from fedmq.broker.rabbitmq import RabbitBroker
from fedmq.errors import BrokerConfigError, BrokerUnavailable
from fedmq.topology import BindingSpec, ExchangeSpec, QueueSpec

pytestmark = pytest.mark.rabbitmq

EXPIRES_MS = 60_000


def _rabbitmqctl(*args: str) -> str:
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        pytest.skip("rabbitmqctl is not available to close connections from the server side")
    result = subprocess.run([tool, "-q", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"rabbitmqctl {args[0]} failed: {result.stderr.strip()}")
    return result.stdout


def close_connections(name_prefix: str) -> int:
    """Force-close (320 CONNECTION_FORCED) every connection whose name starts with the prefix."""
    listing = _rabbitmqctl("list_connections", "--no-table-headers", "pid", "client_properties")
    closed = 0
    for line in listing.splitlines():
        pid, _, properties = line.partition("\t")
        if f'{{"connection_name","{name_prefix}' in properties:
            _rabbitmqctl("close_connection", pid.strip(), "fedmq test: forced close")
            closed += 1
    return closed


def temp_queue(name: str) -> QueueSpec:
    """A queue the broker deletes a minute after its last consumer left, should cleanup fail."""
    return QueueSpec(name, durable=False, arguments=(("x-expires", EXPIRES_MS),))


def pump(broker: RabbitBroker, until, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        broker.run_for(0.05)
    return until()


@pytest.fixture
def names(rabbitmq_url: str, unique_name: str):
    """Unique names; deletes the queues and exchanges it handed out afterwards."""
    made: dict[str, list[str]] = {"queue": [], "exchange": []}

    def make(kind: str, label: str) -> str:
        name = f"test.{unique_name}.{label}"
        made[kind].append(name)
        return name

    yield make
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        for name in made["queue"]:
            try:
                connection.channel().queue_delete(name)
            except pika.exceptions.AMQPError:
                pass
        for name in made["exchange"]:
            try:
                connection.channel().exchange_delete(name)
            except pika.exceptions.AMQPError:
                pass
    finally:
        connection.close()


def test_consumer_survives_forced_close(
    rabbitmq_url: str, unique_name: str, names, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedmq.broker.rabbitmq")
    connection_name = f"fedmq-test-{unique_name}"
    broker = RabbitBroker(
        rabbitmq_url, connection_name=connection_name, reconnect_initial_s=0.05, reconnect_max_s=0.5
    )
    try:
        exchange = ExchangeSpec(names("exchange", "fan"), "fanout", durable=False)
        queue = temp_queue(names("queue", "inbox"))
        broker.declare_exchange(exchange)
        broker.declare_queue(queue)
        broker.bind(BindingSpec(exchange.name, queue.name))
        got: list[Delivery] = []
        broker.subscribe(queue.name, got.append, prefetch=5)

        broker.publish(exchange.name, "", b"before")
        assert pump(broker, lambda: len(got) == 1)
        stale = got[0]
        assert stale.redelivered is False

        # Both of our connections go; nobody else's.
        assert close_connections(connection_name + "/") == 2
        # While we are disconnected, delete the exchange: only a re-declaration brings it back.
        admin = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
        try:
            admin.channel().exchange_delete(exchange.name)
        finally:
            admin.close()
        # A callback posted while the connection is dead still runs after the reconnection.
        ran: list[str] = []
        thread = threading.Thread(target=lambda: broker.call_threadsafe(lambda: ran.append("cb")))
        thread.start()
        thread.join()

        # The unacked delivery comes back, flagged as redelivered.
        assert pump(broker, lambda: len(got) == 2 and ran == ["cb"])
        assert got[1].body == b"before" and got[1].redelivered is True
        assert broker.reconnects >= 1
        broker.ack(stale)  # a tag from the old channel: silently ignored
        broker.reject(stale, requeue=True)  # also ignored
        broker.ack(got[1])

        # The publishing connection reconnects and the exchange and binding are back.
        broker.publish(exchange.name, "", b"after")
        assert pump(broker, lambda: len(got) == 3)
        assert got[2].body == b"after" and got[2].redelivered is False
        broker.ack(got[2])

        time.sleep(0.3)
        broker.run_for(0.3)
        assert len(got) == 3  # the stale ack did not requeue or duplicate anything

        messages = [record.getMessage() for record in caplog.records]
        assert any("connection lost" in m and "320" in m for m in messages), messages
        assert any("reconnecting, attempt 1 in" in m for m in messages), messages
        assert any("re-declared 1 queues, 1 exchanges, 1 bindings" in m for m in messages), messages
    finally:
        broker.close()


def test_publish_retries_across_a_forced_close(rabbitmq_url: str, unique_name: str, names) -> None:
    connection_name = f"fedmq-test-{unique_name}"
    broker = RabbitBroker(rabbitmq_url, connection_name=connection_name, reconnect_initial_s=0.05)
    try:
        queue = temp_queue(names("queue", "q"))
        broker.declare_queue(queue)
        assert close_connections(connection_name + "/publish") == 1
        time.sleep(0.2)  # let the close frame reach our socket
        broker.publish("", queue.name, b"retried")  # must not raise
        got: list[Delivery] = []
        broker.subscribe(queue.name, got.append, prefetch=1)
        assert pump(broker, lambda: len(got) == 1)
        assert got[0].body == b"retried"
    finally:
        broker.close()


def test_a_backlog_of_slow_handlers_still_reads_the_sockets(rabbitmq_url: str, unique_name: str, names) -> None:
    """Each run_for call runs one handler; a backlog of them must not keep the sockets unread,
    or heartbeats go unanswered and the broker drops the connection mid-backlog. Checked by
    the order of events, not by waiting for a heartbeat timeout."""
    broker = RabbitBroker(rabbitmq_url, connection_name=f"fedmq-test-{unique_name}", heartbeat_s=2)
    events: list[str] = []
    service = broker._service

    def spy(time_limit: float) -> None:
        events.append("read")
        service(time_limit)

    try:
        queue = temp_queue(names("queue", "q"))
        broker.declare_queue(queue)
        for i in range(6):
            broker.publish("", queue.name, b"%d" % i)

        def slow(delivery: Delivery) -> None:
            events.append("handle")
            time.sleep(broker._slice_s * 1.5)  # longer than a slice, like a large update's decode
            broker.ack(delivery)

        broker.subscribe(queue.name, slow, prefetch=0)  # all six arrive in one read: a backlog
        broker._service = spy  # type: ignore[method-assign]
        assert pump(broker, lambda: events.count("handle") == 6)
        handled = [i for i, e in enumerate(events) if e == "handle"]
        for first, second in zip(handled, handled[1:]):
            assert "read" in events[first + 1:second], events
        assert broker.reconnects == 0
    finally:
        broker.close()


def test_silence_longer_than_the_heartbeat_is_survived(
    rabbitmq_url: str, unique_name: str, names
) -> None:
    """The counter-check: without pika calls the broker drops us, and we come back."""
    broker = RabbitBroker(
        rabbitmq_url,
        connection_name=f"fedmq-test-{unique_name}",
        heartbeat_s=1,
        reconnect_initial_s=0.05,
    )
    try:
        queue = temp_queue(names("queue", "q"))
        broker.declare_queue(queue)
        got: list[Delivery] = []
        broker.subscribe(queue.name, got.append, prefetch=1)
        time.sleep(4.5)  # no pika call: heartbeats go unanswered, RabbitMQ closes both connections
        broker.publish("", queue.name, b"back")
        assert pump(broker, lambda: len(got) == 1)
        assert got[0].body == b"back"
        assert broker.reconnects >= 1
    finally:
        broker.close()


def test_wrong_credentials_are_a_config_error_not_retried(rabbitmq_url: str) -> None:
    params = pika.URLParameters(rabbitmq_url)
    url = f"amqp://guest:not-the-password@{params.host}:{params.port}/%2F"
    began = time.monotonic()
    with pytest.raises(BrokerConfigError, match="403"):
        RabbitBroker(url, connect_attempts=0)  # 0 = retry forever, yet this must not retry
    assert time.monotonic() - began < 10


@pytest.mark.parametrize(
    "url",
    ["amqp://guest:guest@127.0.0.1:1/%2F", "amqp://guest:guest@no-such-host.invalid:5672/%2F"],
    ids=["refused", "unresolvable"],
)
def test_unreachable_broker_gives_up_after_connect_attempts(url: str) -> None:
    began = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="3 attempts"):
        RabbitBroker(url, connect_attempts=3, reconnect_initial_s=0.01, reconnect_max_s=0.05)
    assert time.monotonic() - began < 30


def test_consume_channel_closed_by_the_broker_is_reopened(
    rabbitmq_url: str, unique_name: str, names
) -> None:
    """Like consumer_timeout: the broker closes the channel and pika raises nothing."""
    broker = RabbitBroker(rabbitmq_url, connection_name=f"fedmq-test-{unique_name}")
    try:
        queue = temp_queue(names("queue", "q"))
        broker.declare_queue(queue)
        got: list[Delivery] = []
        broker.subscribe(queue.name, got.append, prefetch=5)
        broker.publish("", queue.name, b"held")
        assert pump(broker, lambda: len(got) == 1)
        # Provoke a 406 channel close on the consume channel from underneath the broker.
        broker._con_ch.basic_ack(delivery_tag=999_999)
        assert pump(broker, lambda: len(got) == 2)
        assert got[1].body == b"held" and got[1].redelivered is True
        broker.ack(got[0])  # stale: ignored
        broker.ack(got[1])
        broker.publish("", queue.name, b"next")
        assert pump(broker, lambda: len(got) == 3)
        assert got[2].body == b"next"
    finally:
        broker.close()


def test_deleted_queue_drops_the_subscription(rabbitmq_url: str, unique_name: str, names) -> None:
    """A queue deleted under its consumer (and never declared by us) ends that subscription."""
    admin = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    broker = RabbitBroker(rabbitmq_url, connection_name=f"fedmq-test-{unique_name}")
    try:
        gone = names("queue", "gone")
        kept = temp_queue(names("queue", "kept"))
        admin.channel().queue_declare(gone, arguments={"x-expires": EXPIRES_MS})
        broker.declare_queue(kept)
        got: list[Delivery] = []
        broker.subscribe(gone, got.append, prefetch=1)
        broker.subscribe(kept.name, got.append, prefetch=1)
        admin.channel().queue_delete(gone)
        with pytest.raises(BrokerConfigError, match="404"):
            pump(broker, lambda: False, timeout=3.0)
        broker.publish("", kept.name, b"still here")
        assert pump(broker, lambda: len(got) == 1)
        assert got[0].queue == kept.name
    finally:
        broker.close()
        admin.close()
