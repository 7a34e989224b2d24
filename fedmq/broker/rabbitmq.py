"""The RabbitMQ :class:`fedmq.broker.base.Broker`; the only module of fedmq that imports pika.

Why it looks the way it does (see ``shared/BROKER_FACTS.md`` for the measurements):

- **Two connections.** RabbitMQ's memory and disk alarms block *publishing* connections: the
  broker stops reading from any connection that publishes while an alarm is raised. If the
  same connection also carried our consumer, a full disk would stop us from draining (and
  acknowledging) the very queues whose draining would clear the alarm. So one connection
  publishes (a confirm-mode channel) and another consumes (manual acks, per-consumer prefetch),
  and ``blocked_connection_timeout`` turns a publish that stays blocked into an error instead of
  a hang.
- **Short ``process_data_events`` slices.** A pika ``BlockingConnection`` reads and writes its
  socket only while the thread is inside a pika call; heartbeats included. :meth:`run_for`
  therefore loops over short slices, servicing the consuming connection (which wakes up as soon
  as a delivery or a thread-safe callback arrives) and then the publishing connection, so both
  keep answering heartbeats however long the caller keeps calling ``run_for``.
- **Deliveries are buffered, handlers run outside pika.** pika's consumer callback only appends
  the message to a local queue; :meth:`run_for` hands one item to its handler after pika has
  returned. Handlers can then publish, ack and raise freely, and each ``run_for`` call handles one
  delivery or callback, like :class:`fedmq.broker.memory.MemoryBroker`.
- **Stale tags.** An AMQP delivery tag is a number that only means something on the channel
  that received the delivery. When a channel or connection closes, RabbitMQ puts every
  unacknowledged message back in its queue and redelivers it (``redelivered=True``) on the new
  channel, whose tags start again at 1. Acking an old tag on the new channel would ack a
  *different* message or close the channel with 406 "unknown delivery tag". So every tag
  carries the generation of the channel it came from; ack/reject of an older generation is a
  silent no-op.
- **Reconnection.** 320 CONNECTION_FORCED (broker stopping, or an operator closing the
  connection), lost sockets, missed heartbeats and other non-configuration failures are retried
  with exponential backoff and jitter, the topology declared so far is declared again (queues
  may be non-durable, the broker may have restarted) and every consumer is subscribed again.
  403/404/406 are configuration errors: retrying will not fix them, so they surface as
  :class:`fedmq.errors.BrokerConfigError` with the broker's reply text.
- **Configuration errors close a channel, not the consumers.** In AMQP a failed ``*.declare``
  or ``queue.bind`` closes the channel it ran on. Declarations therefore run on their own
  "admin" channel of the consuming connection, so a 406 never takes the consumers down; the
  channel is simply reopened.
"""

from __future__ import annotations

import collections
import functools
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Callable, Mapping

import pika
import pika.exceptions as pex

from fedmq.broker.base import Broker, Delivery, DeliveryHandler
from fedmq.errors import (
    BrokerConfigError,
    BrokerError,
    BrokerUnavailable,
    MessageTooLarge,
    Unroutable,
)
from fedmq.topology import DEFAULT_EXCHANGE, BindingSpec, ExchangeSpec, QueueSpec

log = logging.getLogger(__name__)

#: AMQP reply codes that mean "your request is wrong", not "try again later":
#: 403 ACCESS_REFUSED, 404 NOT_FOUND, 406 PRECONDITION_FAILED, 530 NOT_ALLOWED (unknown vhost).
CONFIG_REPLY_CODES = frozenset({403, 404, 406, 530})

#: How often one operation (publish, declare, subscribe) is tried again after a reconnection
#: before giving up; bounds the loop when the broker accepts connections but keeps dropping them.
_OP_TRIES = 5

#: A connection that dies within this many seconds of opening does not reset the backoff.
_STABLE_AFTER_S = 5.0

#: Header value types pika can encode into an AMQP field table.
_HEADER_TYPES = (str, bytes, bool, int, Decimal, datetime, dict, list, type(None))

#: Everything pika raises; nothing of it may leave this module.
_PIKA_ERRORS = (pex.AMQPError, pex.ChannelError, pex.ReentrancyError)

_PUBLISH = "publish"
_CONSUME = "consume"


@dataclass(frozen=True)
class _Tag:
    """An ack handle: the AMQP delivery tag plus the channel generation it belongs to."""

    generation: int
    delivery_tag: int


@dataclass
class _Subscription:
    handler: DeliveryHandler
    prefetch: int
    consumer_tag: str | None = None


def _reply(exc: BaseException) -> tuple[int | None, str]:
    """The AMQP reply code and text of a pika exception (code ``None`` when there is none)."""
    if isinstance(exc, (pex.ChannelClosed, pex.ConnectionClosed)):
        return exc.reply_code, exc.reply_text
    if isinstance(exc, (pex.ProbableAuthenticationError, pex.AuthenticationError)):
        return 403, f"authentication refused: {exc}"
    if isinstance(exc, pex.ProbableAccessDeniedError):
        return 530, f"access to the virtual host refused: {exc}"
    return None, f"{type(exc).__name__}: {exc}"


def _config_error(exc: BaseException) -> BrokerConfigError | None:
    """The :class:`BrokerConfigError` for ``exc`` if retrying cannot help, else ``None``."""
    code, text = _reply(exc)
    if code in CONFIG_REPLY_CODES:
        return BrokerConfigError(f"{code} {text}")
    return None


def _describe(exc: BaseException) -> str:
    code, text = _reply(exc)
    return f"{code} {text}" if code is not None else text


def _check_headers(headers: Mapping[str, Any]) -> None:
    """Refuse header values pika cannot encode before anything reaches the socket."""

    def check(value: Any, path: str) -> None:
        if not isinstance(value, _HEADER_TYPES):
            raise BrokerError(
                f"header {path} has type {type(value).__name__}, which an AMQP 0.9.1 field "
                "table cannot carry (use str, bytes, bool, int, Decimal, datetime, dict, list)"
            )
        if isinstance(value, dict):
            for key, item in value.items():
                check(item, f"{path}.{key}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                check(item, f"{path}[{index}]")

    for key, value in headers.items():
        if not isinstance(key, str):
            raise BrokerError(f"header name {key!r} is not a str")
        check(value, repr(key))


def _wake() -> None:
    """Posted with ``add_callback_threadsafe``: its only job is to end a waiting slice."""


class RabbitBroker(Broker):
    """A :class:`Broker` over RabbitMQ: one publishing and one consuming pika connection.

    Connects in the constructor (retrying like a reconnection; ``connect_attempts=0`` retries
    forever). Owned by the thread that created it; other threads may only call
    :meth:`call_threadsafe`.
    """

    def __init__(
        self,
        url: str,
        *,
        connection_name: str = "fedmq",
        heartbeat_s: int = 30,
        blocked_timeout_s: float = 60.0,
        max_message_bytes: int = 8 * 1024 * 1024,
        reconnect_initial_s: float = 0.5,
        reconnect_max_s: float = 15.0,
        connect_attempts: int = 0,
    ) -> None:
        self._url = url
        self.connection_name = connection_name
        self._heartbeat_s = int(heartbeat_s)
        self._blocked_timeout_s = float(blocked_timeout_s)
        self.max_message_bytes = int(max_message_bytes)
        self._reconnect_initial_s = max(0.0, float(reconnect_initial_s))
        self._reconnect_max_s = max(self._reconnect_initial_s, float(reconnect_max_s))
        self._connect_attempts = max(0, int(connect_attempts))
        # A slice short enough that the publishing connection's heartbeat timer (pika sends
        # one every heartbeat/2 seconds) fires on time even while we wait on the other one.
        self._slice_s = min(0.5, max(0.05, self._heartbeat_s / 8)) if self._heartbeat_s else 0.5
        self._params = {role: self._parameters(role) for role in (_PUBLISH, _CONSUME)}

        self._closed = False
        #: Successful reconnections so far (the first connection does not count).
        self.reconnects = 0

        # Everything declared so far, in order, replayed on every new connection.
        self._topology: list[ExchangeSpec | QueueSpec | BindingSpec] = []
        self._subscriptions: dict[str, _Subscription] = {}

        # Publishing side.
        self._pub_conn: pika.BlockingConnection | None = None
        self._pub_ch: Any = None
        # Consuming side: the admin channel runs declarations, the consume channel consumers.
        self._con_conn: pika.BlockingConnection | None = None
        self._admin_ch: Any = None
        self._con_ch: Any = None
        self._generation = 0
        self._cancelled_by_broker: list[str] = []
        self._dropped: list[str] = []  # subscriptions whose queue vanished, reported once
        self._pending: collections.deque[Delivery] = collections.deque()
        self._unacked: set[int] = set()

        # Filled by any thread (deque appends are atomic), drained by run_for.
        self._callbacks: collections.deque[Callable[[], None]] = collections.deque()

        # Reconnection bookkeeping per role.
        self._ever_connected = {_PUBLISH: False, _CONSUME: False}
        self._opened_at = {_PUBLISH: 0.0, _CONSUME: 0.0}
        self._streak = {_PUBLISH: 0, _CONSUME: 0}

        try:
            self._ensure_consume()
            self._ensure_publish()
        except BaseException:
            self.close()
            raise

    # -- connection management ----------------------------------------------------------------
    def _parameters(self, role: str) -> pika.URLParameters:
        try:
            params = pika.URLParameters(self._url)
        except Exception as exc:  # pika raises ValueError and friends for a bad URL
            raise BrokerConfigError(f"invalid broker URL: {exc}") from None
        params.heartbeat = self._heartbeat_s
        params.blocked_connection_timeout = self._blocked_timeout_s
        # We retry ourselves, with backoff, jitter and logging.
        params.connection_attempts = 1
        params.retry_delay = 0
        # Shows up in the management UI and `rabbitmqctl list_connections client_properties`.
        params.client_properties = {"connection_name": f"{self.connection_name}/{role}"}
        return params

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerUnavailable("connection is closed")

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter; ``attempt`` counts from 1."""
        ceiling = min(self._reconnect_max_s, self._reconnect_initial_s * 2 ** min(attempt - 1, 30))
        # "Equal jitter": at least half the ceiling, so a herd of clients spreads out but
        # nobody hammers a broker that is still starting.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _connect(
        self, role: str, setup: Callable[[pika.BlockingConnection], None]
    ) -> pika.BlockingConnection:
        """Open the ``role`` connection and run ``setup`` on it, retrying as configured."""
        name = f"{self.connection_name}/{role}"
        reconnecting = self._ever_connected[role]
        attempt = 0
        while True:
            attempt += 1
            if reconnecting or attempt > 1:
                # n counts failures in a row, including connections that died right after
                # opening (a flapping broker must not turn into a reconnect storm).
                n = self._streak[role] + attempt if reconnecting else attempt - 1
                delay = (
                    self._backoff(n) if n > 1 else random.uniform(0, self._reconnect_initial_s)
                )
                log.warning("%s: reconnecting, attempt %d in %.2f s", name, attempt, delay)
                self._pause(delay, role)
            conn = None
            params = self._params[role]
            try:
                conn = pika.BlockingConnection(params)
                log.info(
                    "%s: connected to %s:%s (attempt %d, heartbeat %s s)",
                    name, params.host, params.port, attempt, self._heartbeat_s,
                )
                setup(conn)
            except BrokerConfigError:
                self._close_quietly(conn)
                raise
            except (*_PIKA_ERRORS, OSError) as exc:
                # OSError: pika resolves the host name itself and lets socket.gaierror through;
                # in a compose stack the broker's name may not resolve until it has started.
                self._close_quietly(conn)
                config = _config_error(exc)
                if config is not None:
                    log.error("%s: refused by the broker, not retrying: %s", name, config)
                    raise config from None
                if self._connect_attempts and attempt >= self._connect_attempts:
                    log.error("%s: giving up after %d attempts: %s", name, attempt, _describe(exc))
                    raise BrokerUnavailable(
                        f"cannot reach the broker after {attempt} attempts: {_describe(exc)}"
                    ) from None
                log.warning("%s: attempt %d failed: %s", name, attempt, _describe(exc))
                continue
            if reconnecting:
                self.reconnects += 1
            self._ever_connected[role] = True
            self._opened_at[role] = time.monotonic()
            return conn

    def _pause(self, delay: float, role: str) -> None:
        """Wait ``delay`` seconds, keeping the *other* connection's heartbeats alive if it is up."""
        deadline = time.monotonic() + delay
        other = self._con_conn if role == _PUBLISH else self._pub_conn
        while (remaining := deadline - time.monotonic()) > 0:
            if other is None or not other.is_open:
                time.sleep(remaining)
                return
            try:
                other.process_data_events(time_limit=min(remaining, self._slice_s))
            except _PIKA_ERRORS:
                other = None  # noticed and handled on its next use

    def _lost(self, role: str, reason: str) -> None:
        """Forget a broken connection; the next operation that needs it reconnects."""
        name = f"{self.connection_name}/{role}"
        if time.monotonic() - self._opened_at[role] < _STABLE_AFTER_S:
            self._streak[role] += 1
        else:
            self._streak[role] = 0
        log.warning("%s: connection lost: %s", name, reason)
        if role == _PUBLISH:
            conn, self._pub_conn, self._pub_ch = self._pub_conn, None, None
        else:
            conn, self._con_conn, self._admin_ch, self._con_ch = self._con_conn, None, None, None
            self._forget_deliveries()
        self._close_quietly(conn)

    def _forget_deliveries(self) -> None:
        # Buffered and unacknowledged deliveries of the old channel: RabbitMQ requeues them
        # when the channel closes and redelivers them; their tags are meaningless from now on.
        self._generation += 1
        self._pending.clear()
        self._unacked.clear()
        self._cancelled_by_broker.clear()

    @staticmethod
    def _close_quietly(conn: Any) -> None:
        if conn is None:
            return
        try:
            if conn.is_open:
                conn.close()
        except Exception:  # already gone; nothing to do
            pass

    def _redeclare(self, channel: Any, name: str) -> None:
        if not self._topology:
            return
        for spec in self._topology:
            self._declare_on(channel, spec)
        queues = sum(isinstance(spec, QueueSpec) for spec in self._topology)
        exchanges = sum(isinstance(spec, ExchangeSpec) for spec in self._topology)
        bindings = len(self._topology) - queues - exchanges
        log.info(
            "%s: re-declared %d queues, %d exchanges, %d bindings",
            name, queues, exchanges, bindings,
        )

    # publishing side
    def _setup_publish(self, conn: pika.BlockingConnection) -> None:
        channel = conn.channel()
        channel.confirm_delivery()
        if self._ever_connected[_PUBLISH]:
            # After a broker restart a non-durable queue is gone until someone declares it
            # again, and the retried publish must not find it missing.
            self._redeclare(channel, f"{self.connection_name}/{_PUBLISH}")
        self._pub_ch = channel

    def _ensure_publish(self) -> Any:
        self._check_open()
        if self._pub_conn is not None and not self._pub_conn.is_open:
            self._lost(_PUBLISH, "connection closed")
        if self._pub_conn is None:
            self._pub_conn = self._connect(_PUBLISH, self._setup_publish)
        elif self._pub_ch is None or not self._pub_ch.is_open:
            # The broker closed the channel (404 on publish, 406 oversize...): reopen it.
            try:
                self._setup_publish_channel_only()
            except _PIKA_ERRORS as exc:
                self._lost(_PUBLISH, _describe(exc))
                return self._ensure_publish()
        return self._pub_ch

    def _setup_publish_channel_only(self) -> None:
        channel = self._pub_conn.channel()
        channel.confirm_delivery()
        self._pub_ch = channel

    # consuming side
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
        except _PIKA_ERRORS as exc:
            self._lost(_CONSUME, _describe(exc))
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
            except _PIKA_ERRORS as exc:
                config = _config_error(exc)
                if config is not None:
                    # The broker closed the admin channel; reopen it so the object stays usable.
                    try:
                        if self._con_conn is not None and self._con_conn.is_open:
                            self._admin_ch = self._con_conn.channel()
                    except _PIKA_ERRORS:
                        if not reconnect:
                            raise  # mid-(re)connection: the caller retries the whole connection
                        self._lost(_CONSUME, "cannot reopen the admin channel")
                    raise config from None
                if not reconnect:
                    raise
                self._lost(_CONSUME, _describe(exc))
                if attempt == _OP_TRIES:
                    raise BrokerUnavailable(
                        f"broker operation failed {_OP_TRIES} times: {_describe(exc)}"
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
        self._admin_op(lambda ch: self._declare_on(ch, spec))
        if spec not in self._topology:
            self._topology.append(spec)

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
        data = bytes(body)
        if len(data) > self.max_message_bytes:
            raise MessageTooLarge(
                f"message of {len(data)} bytes exceeds max_message_bytes={self.max_message_bytes}; "
                "chunk it"
            )
        header_table = dict(headers) if headers else None
        if header_table:
            _check_headers(header_table)
        properties = pika.BasicProperties(
            headers=header_table,
            delivery_mode=2 if persistent else 1,
            # Per-message TTL, in milliseconds as a string (AMQP 0.9.1's `expiration`).
            expiration=None if ttl_s is None else str(max(0, int(ttl_s * 1000))),
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
                self._lost(_PUBLISH, _describe(exc))
                raise BrokerUnavailable(
                    f"publishing blocked by a broker resource alarm for over "
                    f"{self._blocked_timeout_s:g} s"
                ) from None
            except (pex.UnsupportedAMQPFieldException, pex.InvalidFieldTypeException) as exc:
                self._lost(_PUBLISH, _describe(exc))
                raise BrokerError(f"cannot encode the message properties: {exc}") from None
            except _PIKA_ERRORS as exc:
                config = _config_error(exc)
                if config is not None:
                    # The channel is closed now; _ensure_publish reopens it next time.
                    raise config from None
                # Lost before the confirm: the message may or may not have arrived. Send it
                # again (at-least-once; consumers deduplicate).
                last = _describe(exc)
                self._lost(_PUBLISH, last)
        raise BrokerUnavailable(f"publish failed {_OP_TRIES} times: {last}")

    def delete_queue(self, name: str) -> None:
        self._check_open()
        self._admin_op(lambda ch: ch.queue_delete(name))
        self._topology = [spec for spec in self._topology
                          if not (isinstance(spec, QueueSpec) and spec.name == name)
                          and not (isinstance(spec, BindingSpec) and spec.queue == name)]
        self._subscriptions.pop(name, None)

    def subscribe(self, queue: str, handler: DeliveryHandler, *, prefetch: int) -> None:
        self._check_open()
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
            except _PIKA_ERRORS as exc:
                config = _config_error(exc)
                if config is not None:
                    # basic.consume itself was refused: the consume channel is closed; the
                    # next _ensure_consume reopens it and resubscribes the others.
                    raise config from None
                last = _describe(exc)
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
        except _PIKA_ERRORS as exc:
            # The channel is gone, so RabbitMQ requeues the message anyway.
            self._lost(_CONSUME, _describe(exc))

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
        self._ensure_consume()
        try:
            # Returns early once a delivery or a thread-safe wake-up is ready to dispatch.
            self._con_conn.process_data_events(time_limit=time_limit)
        except _PIKA_ERRORS as exc:
            self._lost(_CONSUME, _describe(exc))
        if self._pub_conn is not None:
            try:
                # Answers heartbeats (and connection.blocked notices) of the publisher.
                self._pub_conn.process_data_events(0)
            except _PIKA_ERRORS as exc:
                self._lost(_PUBLISH, _describe(exc))

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
