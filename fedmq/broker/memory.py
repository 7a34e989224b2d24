"""An in-memory broker with RabbitMQ's semantics, for the embedded mode and unit tests.

A :class:`MemoryHub` plays the server: exchanges, queues and bindings shared by every
:class:`MemoryBroker` connected to it, from any thread. It stores encoded bytes, so everything
that crosses it runs through the real codec, exactly as it would over RabbitMQ. What it copies
from RabbitMQ: fanout/direct/default-exchange routing, mandatory publishes, per-consumer
prefetch, manual acks, redelivery of unacknowledged messages when a connection closes,
dead-lettering on reject, and single-active-consumer queues.

It also enforces what RabbitMQ enforces and the code depends on, so a unit test fails where
production would: the message size limit (``MessageTooLarge``), AMQP's 255-byte names and the
header types pika can encode (:mod:`fedmq.broker.amqp_rules`), dead-lettering of expired
messages on queues with a dead-letter exchange, queue expiry (``x-expires``), and
:meth:`MemoryBroker.drop_connection` for tests that need a connection lost mid-work.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from fedmq.broker.amqp_rules import check_headers, check_name
from fedmq.broker.base import Broker, Delivery, DeliveryHandler
from fedmq.chunking import MAX_FRAME_BYTES
from fedmq.errors import BrokerConfigError, BrokerUnavailable, MessageTooLarge, Unroutable
from fedmq.topology import DEFAULT_EXCHANGE, BindingSpec, ExchangeSpec, QueueSpec


@dataclass
class _Stored:
    body: bytes
    headers: dict[str, Any]
    persistent: bool
    redelivered: bool = False
    expires_at: float | None = None  # monotonic seconds, from a per-message TTL
    user_id: str | None = None  # the publishing connection's user


class _Queue:
    def __init__(self, spec: QueueSpec) -> None:
        self.spec = spec
        self.messages: collections.deque[_Stored] = collections.deque()
        self.consumers: list["MemoryBroker"] = []  # in subscription order
        self.unused_since = time.monotonic()  # for x-expires: no consumer since then
        expires_ms = spec.argument("x-expires")
        self.expires_s = None if expires_ms is None else float(expires_ms) / 1000.0


class MemoryHub:
    """The shared state of an in-memory broker: what a RabbitMQ node holds."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self._exchanges: dict[str, str] = {DEFAULT_EXCHANGE: "direct"}
        self._queues: dict[str, _Queue] = {}
        self._bindings: dict[str, set[tuple[str, str]]] = collections.defaultdict(set)

    # -- server side, called with the condition held -------------------------------------------
    def _sweep(self) -> None:
        """What RabbitMQ does on its own clock: expire unused queues and expired messages."""
        now = time.monotonic()
        for name, queue in list(self._queues.items()):
            if queue.expires_s is not None and not queue.consumers and now - queue.unused_since >= queue.expires_s:
                self._delete(name)
                continue
            self._expire_messages(name, queue, now)

    def _expire_messages(self, name: str, queue: _Queue, now: float) -> None:
        # Like RabbitMQ, expired messages leave from the head of the queue; with a dead-letter
        # exchange they go there (reason "expired"), otherwise they vanish.
        while queue.messages and queue.messages[0].expires_at is not None and queue.messages[0].expires_at <= now:
            stored = queue.messages.popleft()
            self._dead_letter(name, queue, stored, "expired")

    def _dead_letter(self, name: str, queue: _Queue, stored: _Stored, reason: str) -> None:
        dlx = queue.spec.argument("x-dead-letter-exchange")
        if dlx is None:
            return
        headers = dict(stored.headers)
        headers.setdefault("x-first-death-queue", name)
        headers.setdefault("x-first-death-reason", reason)
        self._enqueue(str(dlx), name, _Stored(stored.body, headers, True, user_id=stored.user_id), False)

    def _delete(self, name: str) -> None:
        self._queues.pop(name, None)
        for bound in self._bindings.values():
            bound.difference_update({b for b in bound if b[0] == name})

    def _route(self, exchange: str, routing_key: str) -> list[_Queue]:
        if exchange == DEFAULT_EXCHANGE:
            queue = self._queues.get(routing_key)
            return [queue] if queue is not None else []
        kind = self._exchanges.get(exchange)
        if kind is None:
            raise BrokerConfigError(f"404 NOT_FOUND: no exchange {exchange!r}")
        names = sorted(
            name for name, key in self._bindings[exchange] if kind == "fanout" or key == routing_key
        )
        return [self._queues[name] for name in names if name in self._queues]

    def _enqueue(self, exchange: str, routing_key: str, stored: _Stored, mandatory: bool) -> None:
        targets = self._route(exchange, routing_key)
        if not targets and mandatory:
            raise Unroutable(f"no queue bound for exchange={exchange!r} routing_key={routing_key!r}")
        for queue in targets:
            # Each queue gets its own record (redelivery flags differ); the bytes are shared.
            queue.messages.append(_Stored(stored.body, dict(stored.headers), stored.persistent,
                                          expires_at=stored.expires_at, user_id=stored.user_id))
        self.condition.notify_all()

    # -- inspection, for tests and the embedded mode ------------------------------------------
    def queue_names(self) -> list[str]:
        with self.condition:
            self._sweep()
            return sorted(self._queues)

    def depth(self, queue: str) -> int:
        """Ready (not yet delivered) messages in ``queue``."""
        with self.condition:
            self._sweep()
            return len(self._queues[queue].messages)

    def peek(self, queue: str) -> list[tuple[bytes, dict[str, Any]]]:
        """Bodies and headers of the ready messages of ``queue``, oldest first."""
        with self.condition:
            self._sweep()
            return [(m.body, dict(m.headers)) for m in self._queues[queue].messages]

    def connect(self, *, max_message_bytes: int = MAX_FRAME_BYTES, user: str | None = None) -> "MemoryBroker":
        return MemoryBroker(self, max_message_bytes=max_message_bytes, user=user)


class MemoryBroker(Broker):
    """One connection to a :class:`MemoryHub`; used by one thread, like a pika connection."""

    _tags = itertools.count(1)

    def __init__(self, hub: MemoryHub, *, max_message_bytes: int = MAX_FRAME_BYTES, user: str | None = None) -> None:
        self.hub = hub
        #: Stamped on every message this connection publishes, as RabbitBroker does (a
        #: connection cannot publish in another user's name).
        self.user = user
        #: Like RabbitBroker's: a larger publish raises MessageTooLarge before it is sent.
        self.max_message_bytes = int(max_message_bytes)
        self._handlers: dict[str, tuple[DeliveryHandler, int]] = {}
        self._unacked: dict[int, tuple[str, _Stored]] = {}
        self._callbacks: collections.deque[Callable[[], None]] = collections.deque()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerUnavailable("connection is closed")

    def declare_exchange(self, spec: ExchangeSpec) -> None:
        self._check_open()
        check_name("an exchange name", spec.name)
        with self.hub.condition:
            known = self.hub._exchanges.setdefault(spec.name, spec.type)
            if known != spec.type:
                raise BrokerConfigError(f"406 PRECONDITION_FAILED: exchange {spec.name!r} is {known}")

    def declare_queue(self, spec: QueueSpec) -> None:
        self._check_open()
        check_name("a queue name", spec.name)
        with self.hub.condition:
            self.hub._sweep()
            existing = self.hub._queues.get(spec.name)
            if existing is None:
                self.hub._queues[spec.name] = _Queue(spec)
            elif existing.spec.arguments != spec.arguments:
                raise BrokerConfigError(
                    f"406 PRECONDITION_FAILED: queue {spec.name!r} exists with other arguments"
                )
            else:
                existing.unused_since = time.monotonic()  # a redeclaration counts as use

    def bind(self, spec: BindingSpec) -> None:
        self._check_open()
        check_name("a routing key", spec.routing_key)
        with self.hub.condition:
            self.hub._sweep()
            if spec.exchange not in self.hub._exchanges:
                raise BrokerConfigError(f"404 NOT_FOUND: no exchange {spec.exchange!r}")
            if spec.queue not in self.hub._queues:
                raise BrokerConfigError(f"404 NOT_FOUND: no queue {spec.queue!r}")
            self.hub._bindings[spec.exchange].add((spec.queue, spec.routing_key))

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
        if len(body) > self.max_message_bytes:
            raise MessageTooLarge(f"message of {len(body)} bytes exceeds max_message_bytes="
                                  f"{self.max_message_bytes}; chunk it")
        if headers:
            check_headers(headers)
        expires_at = None if ttl_s is None else time.monotonic() + ttl_s
        stored = _Stored(bytes(body), dict(headers or {}), persistent, expires_at=expires_at, user_id=self.user)
        with self.hub.condition:
            self.hub._sweep()
            self.hub._enqueue(exchange, routing_key, stored, mandatory)

    def delete_queue(self, name: str) -> None:
        self._check_open()
        check_name("a queue name", name)
        with self.hub.condition:
            self.hub._delete(name)

    def subscribe(self, queue: str, handler: DeliveryHandler, *, prefetch: int) -> None:
        self._check_open()
        check_name("a queue name", queue)
        with self.hub.condition:
            self.hub._sweep()
            if queue not in self.hub._queues:
                raise BrokerConfigError(f"404 NOT_FOUND: no queue {queue!r}")
            consumers = self.hub._queues[queue].consumers
            if self not in consumers:  # subscribing again changes the handler, not the consumer list
                consumers.append(self)
        self._handlers[queue] = (handler, prefetch)

    def ack(self, delivery: Delivery) -> None:
        # A tag from before a close is stale: the message was already requeued.
        self._unacked.pop(delivery.tag, None)

    def reject(self, delivery: Delivery, *, requeue: bool) -> None:
        entry = self._unacked.pop(delivery.tag, None)
        if entry is None:
            return
        queue_name, stored = entry
        with self.hub.condition:
            queue = self.hub._queues.get(queue_name)
            if queue is None:
                return
            if requeue:
                stored.redelivered = True
                queue.messages.appendleft(stored)
                self.hub.condition.notify_all()
                return
            self.hub._dead_letter(queue_name, queue, stored, "rejected")

    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        with self.hub.condition:
            self._callbacks.append(fn)
            self.hub.condition.notify_all()

    def _take(self) -> tuple[DeliveryHandler, Delivery] | None:
        """Pop one deliverable message for this connection (condition held)."""
        self.hub._sweep()
        for queue_name, (handler, prefetch) in self._handlers.items():
            queue = self.hub._queues.get(queue_name)
            if queue is None or not queue.messages:
                continue
            if queue.spec.argument("x-single-active-consumer") and queue.consumers[:1] != [self]:
                continue
            in_flight = sum(1 for name, _ in self._unacked.values() if name == queue_name)
            if prefetch and in_flight >= prefetch:
                continue
            stored = queue.messages.popleft()
            tag = next(self._tags)
            self._unacked[tag] = (queue_name, stored)
            delivery = Delivery(queue_name, stored.body, stored.headers, stored.redelivered, tag, stored.user_id)
            return handler, delivery
        return None

    def run_for(self, seconds: float) -> None:
        self._check_open()
        deadline = time.monotonic() + max(0.0, seconds)
        while True:
            with self.hub.condition:
                callback = self._callbacks.popleft() if self._callbacks else None
                work = None if callback else self._take()
                if callback is None and work is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    self.hub.condition.wait(remaining)
                    continue
            # Handlers and callbacks run without the hub lock: they publish and ack.
            if callback is not None:
                callback()
            else:
                handler, delivery = work
                handler(delivery)
            return

    def drop_connection(self) -> None:
        """What a lost connection does, for tests: every unacknowledged delivery goes back to
        its queue (redelivered), old tags go stale, and the consumers subscribe again at the end
        of each queue's consumer list, as :class:`~fedmq.broker.rabbitmq.RabbitBroker` does
        when it reconnects."""
        self._check_open()
        with self.hub.condition:
            self._requeue_unacked()
            for queue_name in self._handlers:
                queue = self.hub._queues.get(queue_name)
                if queue is not None and self in queue.consumers:
                    queue.consumers.remove(self)
                    queue.consumers.append(self)
            self.hub.condition.notify_all()

    def _requeue_unacked(self) -> None:
        # Unacknowledged deliveries go back to the head of their queues, as in RabbitMQ.
        for queue_name, stored in reversed(list(self._unacked.values())):
            queue = self.hub._queues.get(queue_name)
            if queue is not None:
                stored.redelivered = True
                queue.messages.appendleft(stored)
        self._unacked.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self.hub.condition:
            now = time.monotonic()
            for queue in self.hub._queues.values():
                if self in queue.consumers:
                    queue.consumers.remove(self)
                    if not queue.consumers:
                        queue.unused_since = now
            self._requeue_unacked()
            self.hub.condition.notify_all()
