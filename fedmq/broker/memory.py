"""An in-memory broker with RabbitMQ's semantics, for the embedded mode and unit tests.

A :class:`MemoryHub` plays the server: exchanges, queues and bindings shared by every
:class:`MemoryBroker` connected to it, from any thread. It stores encoded bytes, so everything
that crosses it runs through the real codec, exactly as it would over RabbitMQ. What it copies
from RabbitMQ: fanout/direct/default-exchange routing, mandatory publishes, per-consumer
prefetch, manual acks, redelivery of unacknowledged messages when a connection closes,
dead-lettering on reject, and single-active-consumer queues.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from fedmq.broker.base import Broker, Delivery, DeliveryHandler
from fedmq.errors import BrokerConfigError, BrokerUnavailable, Unroutable
from fedmq.topology import DEFAULT_EXCHANGE, BindingSpec, ExchangeSpec, QueueSpec


@dataclass
class _Stored:
    body: bytes
    headers: dict[str, Any]
    persistent: bool
    redelivered: bool = False
    expires_at: float | None = None  # monotonic seconds, from a per-message TTL


class _Queue:
    def __init__(self, spec: QueueSpec) -> None:
        self.spec = spec
        self.messages: collections.deque[_Stored] = collections.deque()
        self.consumers: list["MemoryBroker"] = []  # in subscription order


class MemoryHub:
    """The shared state of an in-memory broker: what a RabbitMQ node holds."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self._exchanges: dict[str, str] = {DEFAULT_EXCHANGE: "direct"}
        self._queues: dict[str, _Queue] = {}
        self._bindings: dict[str, set[tuple[str, str]]] = collections.defaultdict(set)

    # -- server side, called with the condition held -------------------------------------------
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
                                          expires_at=stored.expires_at))
        self.condition.notify_all()

    # -- inspection, for tests and the embedded mode ------------------------------------------
    def queue_names(self) -> list[str]:
        with self.condition:
            return sorted(self._queues)

    def depth(self, queue: str) -> int:
        """Ready (not yet delivered) messages in ``queue``."""
        with self.condition:
            return len(self._queues[queue].messages)

    def peek(self, queue: str) -> list[tuple[bytes, dict[str, Any]]]:
        """Bodies and headers of the ready messages of ``queue``, oldest first."""
        with self.condition:
            return [(m.body, dict(m.headers)) for m in self._queues[queue].messages]

    def connect(self) -> "MemoryBroker":
        return MemoryBroker(self)


class MemoryBroker(Broker):
    """One connection to a :class:`MemoryHub`; used by one thread, like a pika connection."""

    _tags = itertools.count(1)

    def __init__(self, hub: MemoryHub) -> None:
        self.hub = hub
        self._handlers: dict[str, tuple[DeliveryHandler, int]] = {}
        self._unacked: dict[int, tuple[str, _Stored]] = {}
        self._callbacks: collections.deque[Callable[[], None]] = collections.deque()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerUnavailable("connection is closed")

    def declare_exchange(self, spec: ExchangeSpec) -> None:
        self._check_open()
        with self.hub.condition:
            known = self.hub._exchanges.setdefault(spec.name, spec.type)
            if known != spec.type:
                raise BrokerConfigError(f"406 PRECONDITION_FAILED: exchange {spec.name!r} is {known}")

    def declare_queue(self, spec: QueueSpec) -> None:
        self._check_open()
        with self.hub.condition:
            existing = self.hub._queues.get(spec.name)
            if existing is None:
                self.hub._queues[spec.name] = _Queue(spec)
            elif existing.spec.arguments != spec.arguments:
                raise BrokerConfigError(
                    f"406 PRECONDITION_FAILED: queue {spec.name!r} exists with other arguments"
                )

    def bind(self, spec: BindingSpec) -> None:
        self._check_open()
        with self.hub.condition:
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
        expires_at = None if ttl_s is None else time.monotonic() + ttl_s
        stored = _Stored(bytes(body), dict(headers or {}), persistent, expires_at=expires_at)
        with self.hub.condition:
            self.hub._enqueue(exchange, routing_key, stored, mandatory)

    def delete_queue(self, name: str) -> None:
        self._check_open()
        with self.hub.condition:
            self.hub._queues.pop(name, None)
            for bound in self.hub._bindings.values():
                bound.difference_update({b for b in bound if b[0] == name})

    def subscribe(self, queue: str, handler: DeliveryHandler, *, prefetch: int) -> None:
        self._check_open()
        with self.hub.condition:
            if queue not in self.hub._queues:
                raise BrokerConfigError(f"404 NOT_FOUND: no queue {queue!r}")
            consumers = self.hub._queues[queue].consumers
            if self not in consumers:  # subscribing again changes the handler and prefetch only
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
            dlx = queue.spec.argument("x-dead-letter-exchange")
            if dlx is not None:
                headers = dict(stored.headers)
                headers.setdefault("x-first-death-queue", queue_name)
                headers.setdefault("x-first-death-reason", "rejected")
                self.hub._enqueue(str(dlx), queue_name, _Stored(stored.body, headers, True), False)

    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        with self.hub.condition:
            self._callbacks.append(fn)
            self.hub.condition.notify_all()

    def _take(self) -> tuple[DeliveryHandler, Delivery] | None:
        """Pop one deliverable message for this connection (condition held)."""
        for queue_name, (handler, prefetch) in self._handlers.items():
            queue = self.hub._queues.get(queue_name)
            # Like RabbitMQ, expired messages are dropped when they reach the head of the queue.
            now = time.monotonic()
            while queue is not None and queue.messages and (queue.messages[0].expires_at or now + 1) <= now:
                queue.messages.popleft()
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
            delivery = Delivery(queue_name, stored.body, stored.headers, stored.redelivered, tag)
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

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self.hub.condition:
            for queue in self.hub._queues.values():
                if self in queue.consumers:
                    queue.consumers.remove(self)
            # Unacknowledged deliveries go back to the head of their queues, as in RabbitMQ.
            for queue_name, stored in reversed(list(self._unacked.values())):
                queue = self.hub._queues.get(queue_name)
                if queue is not None:
                    stored.redelivered = True
                    queue.messages.appendleft(stored)
            self._unacked.clear()
            self.hub.condition.notify_all()
