"""RabbitMQ connections for :class:`fedmq.broker.rabbitmq.RabbitBroker`: opening, losing and
reopening them, with backoff; the publishing side's channel.

- **Two connections.** RabbitMQ's memory and disk alarms block *publishing* connections: the
  broker stops reading from any connection that publishes while an alarm is raised. If the
  same connection also carried our consumer, a full disk would stop us from draining (and
  acknowledging) the very queues whose draining would clear the alarm. So one connection
  publishes (a confirm-mode channel) and another consumes (manual acks, per-consumer prefetch),
  and ``blocked_connection_timeout`` turns a publish that stays blocked into an error instead of
  a hang.
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
"""

from __future__ import annotations

import collections
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import pika

from fedmq.broker.base import Delivery, DeliveryHandler
from fedmq.broker.rabbitmq_errors import PIKA_ERRORS, config_error, describe
from fedmq.broker.rabbitmq_tls import TlsFiles, client_context, tls_cut_off_without_certificate, tls_refusal
from fedmq.errors import BrokerConfigError, BrokerUnavailable
from fedmq.topology import BindingSpec, ExchangeSpec, QueueSpec

log = logging.getLogger("fedmq.broker.rabbitmq")  # one logger for the whole RabbitMQ broker

#: How often one operation (publish, declare, subscribe) is tried again after a reconnection
#: before giving up; bounds the loop when the broker accepts connections but keeps dropping them.
_OP_TRIES = 5

#: A connection that dies within this many seconds of opening does not reset the backoff.
_STABLE_AFTER_S = 5.0

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

def _wake() -> None:
    """Posted with ``add_callback_threadsafe``: its only job is to end a waiting slice."""


class RabbitConnections:
    """The two pika connections of one broker object and their (re)connection; the publishing
    channel. :class:`fedmq.broker.rabbitmq_consuming.ConsumingSide` adds the consuming side."""

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
        tls: TlsFiles = TlsFiles(),
    ) -> None:
        self._url = url
        self._tls = tls
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
        # The user the URL logs in as (pika's default: guest); None for EXTERNAL (certificate)
        # logins, whose user name the broker takes from the certificate.
        credentials = self._params[_PUBLISH].credentials
        self.user: str | None = getattr(credentials, "username", None) or None

        self._closed = False
        self._last_serviced = time.monotonic()  # when run_for last read the sockets
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
        if self._url.lower().startswith("amqps://"):
            # Our own context, not pika's default: the broker is verified against the CA given
            # (certificate chain and host name), and a client certificate is presented if given.
            params.ssl_options = pika.SSLOptions(client_context(self._tls), server_hostname=params.host)
        elif self._tls.given:
            raise BrokerConfigError("TLS files are given (--broker-ca-file, --broker-cert-file, --broker-key-file) "
                                    "but the broker URL is not amqps://")
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
            except (*PIKA_ERRORS, OSError) as exc:
                # OSError: pika resolves the host name itself and lets socket.gaierror through;
                # in a compose stack the broker's name may not resolve until it has started.
                self._close_quietly(conn)
                config = config_error(exc) or (tls_refusal(exc, self._tls.ca_file) if params.ssl_options else None)
                if config is not None:
                    log.error("%s: not retrying (a configuration error): %s", name, config)
                    raise config from None
                if self._connect_attempts and attempt >= self._connect_attempts:
                    log.error("%s: giving up after %d attempts: %s", name, attempt, describe(exc))
                    cut_off = tls_cut_off_without_certificate(exc, self._tls) if params.ssl_options else None
                    if cut_off is not None:
                        raise cut_off from None
                    raise BrokerUnavailable(
                        f"cannot reach the broker after {attempt} attempts: {describe(exc)}"
                    ) from None
                log.warning("%s: attempt %d failed: %s", name, attempt, describe(exc))
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
            except PIKA_ERRORS:
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
            except PIKA_ERRORS as exc:
                self._lost(_PUBLISH, describe(exc))
                return self._ensure_publish()
        return self._pub_ch

    def _setup_publish_channel_only(self) -> None:
        channel = self._pub_conn.channel()
        channel.confirm_delivery()
        self._pub_ch = channel

    # consuming side
