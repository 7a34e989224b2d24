"""The RabbitMQ :class:`fedmq.broker.base.Broker`; with ``rabbitmq_connections``,
``rabbitmq_consuming`` and ``rabbitmq_errors`` the only modules of fedmq that import pika.

Why it looks the way it does (see ``shared/BROKER_FACTS.md`` for the measurements): two
connections, one publishing with confirms and one consuming (``rabbitmq_connections``); handlers
run outside pika on buffered deliveries (``rabbitmq_consuming``); stale tags after a reconnection
are no-ops; 403/404/406 are configuration errors, everything else is retried with backoff.

- **Short ``process_data_events`` slices.** A pika ``BlockingConnection`` reads and writes its
  socket only while the thread is inside a pika call; heartbeats included. :meth:`run_for`
  therefore loops over short slices, servicing the consuming connection (which wakes up as soon
  as a delivery or a thread-safe callback arrives) and then the publishing connection, so both
  keep answering heartbeats however long the caller keeps calling ``run_for``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping

import pika
import pika.exceptions as pex

from fedmq.broker.amqp_rules import check_headers, check_name
from fedmq.broker.base import Broker, Delivery, DeliveryHandler
from fedmq.broker.rabbitmq_connections import _CONSUME, _OP_TRIES, _PUBLISH, _Subscription, _Tag, _wake
from fedmq.broker.rabbitmq_consuming import ConsumingSide
from fedmq.broker.rabbitmq_errors import PIKA_ERRORS, config_error, describe
from fedmq.errors import BrokerError, BrokerUnavailable, MessageTooLarge, Unroutable
from fedmq.topology import BindingSpec, ExchangeSpec, QueueSpec

log = logging.getLogger(__name__)


class RabbitBroker(ConsumingSide, Broker):
    """A :class:`Broker` over RabbitMQ: one publishing and one consuming pika connection.

    Connects in the constructor (retrying like a reconnection; ``connect_attempts=0`` retries
    forever). Owned by the thread that created it; other threads may only call
    :meth:`call_threadsafe`.
    """

    # -- the Broker interface -----------------------------------------------------------------
    def declare_exchange(self, spec: ExchangeSpec) -> None:
        self._declare(spec)

    def declare_queue(self, spec: QueueSpec) -> None:
        self._declare(spec)

    def bind(self, spec: BindingSpec) -> None:
        self._declare(spec)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        persistent: bool = True,
        mandatory: bool = True,
        ttl_s: float | None = None,
    ) -> None:
        self._check_open()
        check_name("an exchange name", exchange)
        check_name("a routing key", routing_key)
        data = bytes(body)
        if len(data) > self.max_message_bytes:
            raise MessageTooLarge(
                f"message of {len(data)} bytes exceeds max_message_bytes={self.max_message_bytes}; "
                "chunk it"
            )
        header_table = dict(headers) if headers else None
        if header_table:
            check_headers(header_table)
        properties = pika.BasicProperties(
            headers=header_table,
            delivery_mode=2 if persistent else 1,
            # Per-message TTL, in milliseconds as a string (AMQP 0.9.1's `expiration`).
            expiration=None if ttl_s is None else str(max(0, int(ttl_s * 1000))),
            # RabbitMQ refuses (406) a user_id other than the connection's user: a consumer can
            # trust it as the sender's identity (aggregator --require-worker-identity).
            user_id=self.user,
        )
        last = "unknown error"
        for _ in range(_OP_TRIES):
            channel = self._ensure_publish()
            try:
                channel.basic_publish(
                    exchange=exchange,
                    routing_key=routing_key,
                    body=data,
                    properties=properties,
                    mandatory=mandatory,
                )
                return
            except pex.UnroutableError:
                raise Unroutable(
                    f"no queue bound for exchange={exchange!r} routing_key={routing_key!r}"
                ) from None
            except pex.NackError:
                raise BrokerError(
                    f"the broker refused (nacked) a message to exchange={exchange!r} "
                    f"routing_key={routing_key!r}"
                ) from None
            except pex.ConnectionBlockedTimeout as exc:
                # A resource alarm kept the connection blocked for blocked_timeout_s; retrying
                # right away would block again. Let the caller decide.
                self._lost(_PUBLISH, describe(exc))
                raise BrokerUnavailable(
                    f"publishing blocked by a broker resource alarm for over "
                    f"{self._blocked_timeout_s:g} s"
                ) from None
            except (pex.UnsupportedAMQPFieldException, pex.InvalidFieldTypeException) as exc:
                self._lost(_PUBLISH, describe(exc))
                raise BrokerError(f"cannot encode the message properties: {exc}") from None
            except PIKA_ERRORS as exc:
                config = config_error(exc)
                if config is not None:
                    # The channel is closed now; _ensure_publish reopens it next time.
                    raise config from None
                # Lost before the confirm: the message may or may not have arrived. Send it
                # again (at-least-once; consumers deduplicate).
                last = describe(exc)
                self._lost(_PUBLISH, last)
        raise BrokerUnavailable(f"publish failed {_OP_TRIES} times: {last}")

    def delete_queue(self, name: str) -> None:
        self._check_open()
        check_name("a queue name", name)
        self._admin_op(lambda ch: ch.queue_delete(name))
        self._topology = [spec for spec in self._topology
                          if not (isinstance(spec, QueueSpec) and spec.name == name)
                          and not (isinstance(spec, BindingSpec) and spec.queue == name)]
        self._subscriptions.pop(name, None)

    def subscribe(self, queue: str, handler: DeliveryHandler, *, prefetch: int) -> None:
        self._check_open()
        check_name("a queue name", queue)
        sub = _Subscription(handler, int(prefetch))
        for _ in range(_OP_TRIES):
            self._check_queue_reconnecting(queue)
            old = self._subscriptions.get(queue)
            try:
                if old is not None and old.consumer_tag is not None:
                    # One consumer per queue and broker object, as in MemoryBroker.
                    self._con_ch.basic_cancel(old.consumer_tag)
                    old.consumer_tag = None
                self._start_consumer(queue, sub)
            except PIKA_ERRORS as exc:
                config = config_error(exc)
                if config is not None:
                    # basic.consume itself was refused: the consume channel is closed; the
                    # next _ensure_consume reopens it and resubscribes the others.
                    raise config from None
                last = describe(exc)
                self._lost(_CONSUME, last)
                continue
            self._subscriptions[queue] = sub
            return
        raise BrokerUnavailable(f"subscribe failed {_OP_TRIES} times: {last}")

    def _check_queue_reconnecting(self, queue: str) -> None:
        self._admin_op(lambda ch: ch.queue_declare(queue, passive=True))

    def _settle(self, delivery: Delivery, action: Callable[[Any, int], None]) -> None:
        tag = delivery.tag
        if (
            self._closed
            or not isinstance(tag, _Tag)
            or tag.generation != self._generation
            or tag.delivery_tag not in self._unacked
            or self._con_ch is None
        ):
            return  # stale (from before a reconnect) or already settled: the broker has it
        self._unacked.discard(tag.delivery_tag)
        try:
            action(self._con_ch, tag.delivery_tag)
        except PIKA_ERRORS as exc:
            # The channel is gone, so RabbitMQ requeues the message anyway.
            self._lost(_CONSUME, describe(exc))

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, lambda ch, tag: ch.basic_ack(tag))

    def reject(self, delivery: Delivery, *, requeue: bool) -> None:
        # requeue=False: RabbitMQ dead-letters through the queue's x-dead-letter-exchange.
        self._settle(delivery, lambda ch, tag: ch.basic_reject(tag, requeue=requeue))

    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        # The deque is the source of truth: run_for drains it after every slice, also after a
        # reconnection. The pika callback only wakes a slice that is waiting for I/O; it may fail
        # (connection mid-reconnect, closed), which costs at most one slice of latency.
        self._callbacks.append(fn)
        conn = self._con_conn
        if conn is not None:
            try:
                conn.add_callback_threadsafe(_wake)
            except Exception:
                pass

    def run_for(self, seconds: float) -> None:
        self._check_open()
        deadline = time.monotonic() + max(0.0, seconds)
        serviced = False
        if (self._callbacks or self._pending) and time.monotonic() - self._last_serviced >= self._slice_s:
            # Work is waiting, but a backlog of handlers (each run_for call runs one) must not
            # keep the sockets unread for longer than a slice: heartbeats are answered only
            # inside pika calls, and two missed ones make the broker drop the connection.
            self._service(0.0)
        while True:
            if self._callbacks:
                self._callbacks.popleft()()
                return
            if self._pending:
                delivery = self._pending.popleft()
                sub = self._subscriptions.get(delivery.queue)
                if sub is not None:
                    sub.handler(delivery)
                    return
                continue
            remaining = deadline - time.monotonic()
            if serviced and remaining <= 0:
                return
            self._service(max(0.0, min(remaining, self._slice_s)))
            serviced = True

    def _service(self, time_limit: float) -> None:
        """One slice: wait on the consuming connection, then let the publishing one breathe."""
        self._last_serviced = time.monotonic()
        self._ensure_consume()
        try:
            # Returns early once a delivery or a thread-safe wake-up is ready to dispatch.
            self._con_conn.process_data_events(time_limit=time_limit)
        except PIKA_ERRORS as exc:
            self._lost(_CONSUME, describe(exc))
        if self._pub_conn is not None:
            try:
                # Answers heartbeats (and connection.blocked notices) of the publisher.
                self._pub_conn.process_data_events(0)
            except PIKA_ERRORS as exc:
                self._lost(_PUBLISH, describe(exc))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Closing the consuming connection makes RabbitMQ requeue every unacked delivery.
        for conn in (self._con_conn, self._pub_conn):
            self._close_quietly(conn)
        self._con_conn = self._admin_ch = self._con_ch = None
        self._pub_conn = self._pub_ch = None
        self._generation += 1
        self._pending.clear()
        self._unacked.clear()
        log.info("%s: closed", self.connection_name)
