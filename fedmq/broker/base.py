"""The broker interface both services program against.

Two implementations sit side by side: :class:`fedmq.broker.rabbitmq.RabbitBroker` (pika, the
only module that imports it) and :class:`fedmq.broker.memory.MemoryBroker` (one process, the
embedded mode and most unit tests). Both carry bytes, so the codec always runs.

Threading: a broker object belongs to the thread that created it. Another thread may only call
:meth:`Broker.call_threadsafe`, which runs a function on the owner thread during
:meth:`Broker.run_for`. This mirrors pika, whose connections are not thread-safe.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from fedmq.topology import BindingSpec, ExchangeSpec, QueueSpec, Topology


@dataclass(frozen=True)
class Delivery:
    """One message handed to a consumer.

    ``tag`` is an opaque handle for :meth:`Broker.ack` / :meth:`Broker.reject`; after a
    reconnection it goes stale (acking it is a no-op) and the broker redelivers the message.
    ``user_id``: the broker user that published it (AMQP ``user_id``, which RabbitMQ refuses
    unless it is the publishing connection's user), None if the publisher set none.
    """

    queue: str
    body: bytes
    headers: Mapping[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    tag: Any = None
    user_id: str | None = None


DeliveryHandler = Callable[[Delivery], None]


class Broker(abc.ABC):
    """A connection to a message broker, with publisher confirms and manual acknowledgements.

    ``user``: the broker user it authenticated as (None when unknown); every message it
    publishes carries it as the AMQP ``user_id``, which the broker validates.
    """

    user: str | None = None

    @abc.abstractmethod
    def declare_exchange(self, spec: ExchangeSpec) -> None:
        """Create the exchange if it does not exist (idempotent)."""

    @abc.abstractmethod
    def declare_queue(self, spec: QueueSpec) -> None:
        """Create the queue if it does not exist (idempotent)."""

    @abc.abstractmethod
    def bind(self, spec: BindingSpec) -> None:
        """Bind a queue to an exchange (idempotent)."""

    def declare(self, topology: Topology) -> None:
        """Declare every exchange, queue and binding of ``topology``."""
        for exchange in topology.exchanges:
            self.declare_exchange(exchange)
        for queue in topology.queues:
            self.declare_queue(queue)
        for binding in topology.bindings:
            self.bind(binding)

    @abc.abstractmethod
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
        """Publish and return once the broker has confirmed the message.

        ``ttl_s``: the broker drops the message if nobody consumed it within that many seconds
        (a per-message TTL). Raises :class:`fedmq.errors.Unroutable` when ``mandatory`` and no
        queue took it.
        """

    @abc.abstractmethod
    def delete_queue(self, name: str) -> None:
        """Delete a queue and its messages (no error if it does not exist)."""

    @abc.abstractmethod
    def subscribe(self, queue: str, handler: DeliveryHandler, *, prefetch: int) -> None:
        """Deliver messages of ``queue`` to ``handler`` during :meth:`run_for`.

        At most ``prefetch`` deliveries are unacknowledged at once (0: no limit).
        """

    @abc.abstractmethod
    def ack(self, delivery: Delivery) -> None:
        """Acknowledge a delivery: the broker forgets the message."""

    @abc.abstractmethod
    def reject(self, delivery: Delivery, *, requeue: bool) -> None:
        """Give a delivery back (``requeue``) or drop it (to the queue's dead-letter exchange)."""

    @abc.abstractmethod
    def run_for(self, seconds: float) -> None:
        """Dispatch deliveries and thread-safe callbacks on this thread for up to ``seconds``.

        Returns early after at least one delivery or callback was handled, so the caller's loop
        can check its timers. Keeps the connection's heartbeats alive.
        """

    @abc.abstractmethod
    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the broker's own thread during a later :meth:`run_for` (any thread)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection; unacknowledged deliveries go back to their queues."""

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
