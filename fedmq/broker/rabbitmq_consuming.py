"""The consuming side of :class:`fedmq.broker.rabbitmq.RabbitBroker`: the admin channel that
declares, the consume channel and its consumers, buffered deliveries.

- **Configuration errors close a channel, not the consumers.** In AMQP a failed ``*.declare``
  or ``queue.bind`` closes the channel it ran on. Declarations therefore run on their own
  "admin" channel of the consuming connection, so a 406 never takes the consumers down; the
  channel is simply reopened.
- **Deliveries are buffered, handlers run outside pika.** pika's consumer callback only appends
  the message to a local queue; :meth:`run_for` hands one item to its handler after pika has
  returned. Handlers can then publish, ack and raise freely, and each ``run_for`` call handles one
  delivery or callback, like :class:`fedmq.broker.memory.MemoryBroker`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import pika

from fedmq.broker.amqp_rules import check_name
from fedmq.broker.base import Delivery
from fedmq.broker.rabbitmq_connections import _CONSUME, _OP_TRIES, RabbitConnections, _Subscription, _Tag
from fedmq.broker.rabbitmq_errors import PIKA_ERRORS, config_error, describe
from fedmq.errors import BrokerConfigError, BrokerUnavailable
from fedmq.topology import DEFAULT_EXCHANGE, BindingSpec, ExchangeSpec, QueueSpec

log = logging.getLogger("fedmq.broker.rabbitmq")  # one logger for the whole RabbitMQ broker


def _names(spec: ExchangeSpec | QueueSpec | BindingSpec) -> list[tuple[str, str]]:
    """The AMQP short strings a declaration carries, named for an error message."""
    if isinstance(spec, ExchangeSpec):
        return [("an exchange name", spec.name)]
    if isinstance(spec, QueueSpec):
        return [("a queue name", spec.name)]
    return [("an exchange name", spec.exchange), ("a queue name", spec.queue), ("a routing key", spec.routing_key)]


class ConsumingSide(RabbitConnections):
    """Declarations on the admin channel, consumers on the consume channel (see the module doc)."""

    def _setup_consume(self, conn: pika.BlockingConnection) -> None:
        name = f"{self.connection_name}/{_CONSUME}"
        self._admin_ch = conn.channel()
        self._redeclare(self._admin_ch, name)
        self._con_conn = conn
        self._open_consume_channel()

    def _open_consume_channel(self) -> None:
        """Open the consume channel and subscribe every consumer again (new generation)."""
        self._forget_deliveries()
        channel = self._con_conn.channel()
        channel.add_on_cancel_callback(self._on_cancel)
        self._con_ch = channel
        for queue, sub in list(self._subscriptions.items()):
            try:
                self._check_queue(queue)
            except BrokerConfigError as exc:
                # The queue vanished (deleted by someone, expired) and we never declared it.
                # Drop the subscription and report it once the connection is up again.
                log.error(
                    "%s: dropping the subscription to %r: %s", self.connection_name, queue, exc
                )
                del self._subscriptions[queue]
                self._dropped.append(f"{queue!r}: {exc}")
                continue
            self._start_consumer(queue, sub)
        if self._subscriptions:
            log.info(
                "%s/%s: subscribed %d consumers",
                self.connection_name, _CONSUME, len(self._subscriptions),
            )

    def _ensure_consume(self) -> None:
        self._check_open()
        if self._con_conn is not None and not self._con_conn.is_open:
            self._lost(_CONSUME, "connection closed")
        if self._con_conn is None:
            self._con_conn = self._connect(_CONSUME, self._setup_consume_guarded)
            self._raise_dropped()
            return
        try:
            if self._admin_ch is None or not self._admin_ch.is_open:
                self._admin_ch = self._con_conn.channel()
            if self._cancelled_by_broker or self._con_ch is None or not self._con_ch.is_open:
                # consumer_timeout (a delivery held unacked too long) closes the channel without
                # pika raising anything; a deleted queue cancels its consumers. Start afresh.
                reason = (
                    f"consumers cancelled by the broker: {self._cancelled_by_broker}"
                    if self._cancelled_by_broker
                    else "consume channel closed by the broker"
                )
                log.warning("%s/%s: %s; resubscribing", self.connection_name, _CONSUME, reason)
                if self._con_ch is not None and self._con_ch.is_open:
                    self._con_ch.close()
                self._open_consume_channel()
        except PIKA_ERRORS as exc:
            self._lost(_CONSUME, describe(exc))
            self._ensure_consume()
        self._raise_dropped()

    def _raise_dropped(self) -> None:
        if self._dropped:
            dropped, self._dropped = self._dropped, []
            raise BrokerConfigError("subscriptions dropped, " + "; ".join(dropped))

    def _setup_consume_guarded(self, conn: pika.BlockingConnection) -> None:
        try:
            self._setup_consume(conn)
        except BaseException:
            self._con_conn, self._admin_ch, self._con_ch = None, None, None
            raise

    def _on_cancel(self, method_frame: Any) -> None:
        self._cancelled_by_broker.append(method_frame.method.consumer_tag)

    def _on_message(
        self, queue: str, generation: int, _channel: Any, method: Any, properties: Any, body: bytes
    ) -> None:
        # Runs inside pika's dispatch: only buffer; run_for hands it to the handler.
        if generation != self._generation:
            return  # a straggler from a channel we already gave up; it will be redelivered
        self._unacked.add(method.delivery_tag)
        self._pending.append(
            Delivery(
                queue=queue,
                body=bytes(body),
                headers=dict(properties.headers or {}),
                redelivered=bool(method.redelivered),
                tag=_Tag(generation, method.delivery_tag),
                user_id=properties.user_id,
            )
        )

    def _check_queue(self, queue: str) -> None:
        """404 -> BrokerConfigError, checked on the admin channel.

        A basic.consume on a missing queue would close the consume channel and with it every
        other consumer; a passive declare on the admin channel costs only that channel.
        """
        self._admin_op(lambda ch: ch.queue_declare(queue, passive=True), reconnect=False)

    def _start_consumer(self, queue: str, sub: _Subscription) -> None:
        # basic.qos without global applies to consumers created after it on this channel:
        # a per-consumer prefetch.
        self._con_ch.basic_qos(prefetch_count=sub.prefetch)
        sub.consumer_tag = self._con_ch.basic_consume(
            queue,
            functools.partial(self._on_message, queue, self._generation),
            auto_ack=False,
        )

    def _admin_op(self, op: Callable[[Any], Any], *, reconnect: bool = True) -> Any:
        """Run ``op`` on the admin channel; map errors; reconnect on transient failures."""
        for attempt in range(1, _OP_TRIES + 1):
            if reconnect:
                self._ensure_consume()
            try:
                return op(self._admin_ch)
            except PIKA_ERRORS as exc:
                config = config_error(exc)
                if config is not None:
                    # The broker closed the admin channel; reopen it so the object stays usable.
                    try:
                        if self._con_conn is not None and self._con_conn.is_open:
                            self._admin_ch = self._con_conn.channel()
                    except PIKA_ERRORS:
                        if not reconnect:
                            raise  # mid-(re)connection: the caller retries the whole connection
                        self._lost(_CONSUME, "cannot reopen the admin channel")
                    raise config from None
                if not reconnect:
                    raise
                self._lost(_CONSUME, describe(exc))
                if attempt == _OP_TRIES:
                    raise BrokerUnavailable(
                        f"broker operation failed {_OP_TRIES} times: {describe(exc)}"
                    ) from None
        raise AssertionError("unreachable")

    @staticmethod
    def _declare_on(channel: Any, spec: ExchangeSpec | QueueSpec | BindingSpec) -> None:
        if isinstance(spec, ExchangeSpec):
            if spec.name == DEFAULT_EXCHANGE:
                return  # always exists; RabbitMQ refuses to declare it (403)
            channel.exchange_declare(spec.name, exchange_type=spec.type, durable=spec.durable)
        elif isinstance(spec, QueueSpec):
            channel.queue_declare(
                spec.name, durable=spec.durable, arguments=dict(spec.arguments) or None
            )
        else:
            channel.queue_bind(spec.queue, spec.exchange, routing_key=spec.routing_key)

    def _declare(self, spec: ExchangeSpec | QueueSpec | BindingSpec) -> None:
        self._check_open()
        for what, name in _names(spec):
            check_name(what, name)
        self._admin_op(lambda ch: self._declare_on(ch, spec))
        if spec not in self._topology:
            self._topology.append(spec)
