"""Names and shapes of every exchange and queue fedmq uses.

This module and ``broker_config/definitions.json`` describe the same topology;
``tests/test_topology.py`` keeps them in agreement. The aggregator declares this shared
topology on every (re)connection, so a broker started without the definitions file works too; a
worker declares its inbox, and the shared topology only where its broker user may configure it
(a development broker's ``guest``; never in the compose cluster, whose definitions hold it).

Flow:
- ``fedmq.broadcast`` (fanout) carries model versions to every worker's inbox queue
  ``fedmq.inbox.<worker_id>``. The aggregator also sends straight to one inbox through the
  default exchange (a joining worker's assignment and the current model).
- ``fedmq.updates`` (durable) carries weight updates to the aggregator. Single active consumer:
  a standby aggregator can attach without two aggregators folding the same updates.
- ``fedmq.submit`` (direct) is how workers publish: bound to ``fedmq.updates`` and
  ``fedmq.control`` with their names as routing keys. Workers never publish through the default
  exchange, which reaches every queue (another worker's inbox too); RabbitMQ's permissions are
  per exchange, so a worker's broker user may write to ``fedmq.submit`` and nothing that carries
  models (see :mod:`fedmq.broker_users`).
- ``fedmq.control`` (durable) carries hellos, heartbeats and goodbyes to the aggregator. It has
  no dead-letter exchange on purpose: these messages carry a per-message TTL, and with one every
  heartbeat sent while no aggregator consumes would expire into the dead letters. Expired
  control messages vanish; an invalid one is still republished to ``fedmq.dead`` with its reason.
- ``fedmq.dead`` (fanout) -> ``fedmq.dead-letters``: invalid messages, with the reason in the
  ``x-fedmq-reason`` header. Bounded: past :data:`DEAD_LETTER_MAX_MESSAGES` the oldest go.

Upgrading a broker that holds the first topology: ``fedmq.control`` and ``fedmq.dead-letters``
changed arguments, and RabbitMQ refuses a declaration that disagrees with an existing queue
(406). Delete the two queues once (``rabbitmqctl delete_queue fedmq.control`` and
``fedmq.dead-letters``; the aggregator must be stopped) or import the new definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BROADCAST_EXCHANGE = "fedmq.broadcast"
SUBMIT_EXCHANGE = "fedmq.submit"
DEAD_LETTER_EXCHANGE = "fedmq.dead"
DEFAULT_EXCHANGE = ""

UPDATES_QUEUE = "fedmq.updates"
CONTROL_QUEUE = "fedmq.control"
DEAD_LETTER_QUEUE = "fedmq.dead-letters"
INBOX_PREFIX = "fedmq.inbox."
#: Every ``fedmq status`` reply queue's name starts so (then an id): an aggregator answers
#: nowhere else, so a status request cannot make it publish into fedmq's own queues.
STATUS_REPLY_PREFIX = "fedmq.status."

#: Headers set on a dead-lettered message.
REASON_HEADER = "x-fedmq-reason"
SOURCE_QUEUE_HEADER = "x-fedmq-source-queue"
#: The broker user that sent a dead-lettered message (its AMQP user_id; the copy in the dead
#: letters is published by whoever refused it).
SENDER_USER_HEADER = "x-fedmq-sender-user"

#: An inbox without a consumer for this long is deleted by the broker (ms): a worker killed
#: without a goodbye stops costing a copy of every broadcast after a minute. A worker that
#: reconnects later declares its inbox again and is sent the current model on its heartbeat.
#: (A worker that exits cleanly deletes its inbox itself.)
INBOX_EXPIRES_MS = 60 * 1000

#: The dead-letter queue keeps the newest this many messages (RabbitMQ drops from the head), so
#: a flood of garbage cannot fill the broker's disk; each is logged and counted when it arrives.
DEAD_LETTER_MAX_MESSAGES = 10_000


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: str  # "fanout" or "direct"
    durable: bool = True


@dataclass(frozen=True)
class QueueSpec:
    name: str
    durable: bool = True
    arguments: tuple[tuple[str, object], ...] = ()

    def argument(self, key: str, default: object = None) -> object:
        return dict(self.arguments).get(key, default)


@dataclass(frozen=True)
class BindingSpec:
    exchange: str
    queue: str
    routing_key: str = ""


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[ExchangeSpec, ...] = ()
    queues: tuple[QueueSpec, ...] = ()
    bindings: tuple[BindingSpec, ...] = field(default=())


_DEAD_LETTERING = (("x-dead-letter-exchange", DEAD_LETTER_EXCHANGE),)

STATIC_TOPOLOGY = Topology(
    exchanges=(
        ExchangeSpec(BROADCAST_EXCHANGE, "fanout"),
        ExchangeSpec(SUBMIT_EXCHANGE, "direct"),
        ExchangeSpec(DEAD_LETTER_EXCHANGE, "fanout"),
    ),
    queues=(
        QueueSpec(UPDATES_QUEUE, arguments=(("x-single-active-consumer", True),) + _DEAD_LETTERING),
        QueueSpec(CONTROL_QUEUE),
        QueueSpec(DEAD_LETTER_QUEUE, arguments=(("x-max-length", DEAD_LETTER_MAX_MESSAGES),
                                                ("x-overflow", "drop-head"))),
    ),
    bindings=(BindingSpec(SUBMIT_EXCHANGE, UPDATES_QUEUE, UPDATES_QUEUE),
              BindingSpec(SUBMIT_EXCHANGE, CONTROL_QUEUE, CONTROL_QUEUE),
              BindingSpec(DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE)),
)


def inbox_queue(worker_id: str) -> QueueSpec:
    """The queue one worker consumes model broadcasts and direct messages from.

    A worker's default id begins with its broker user (``<user>.``), and so does its inbox's
    name after the prefix: the worker user's permissions cover exactly those inboxes.
    """
    return QueueSpec(
        INBOX_PREFIX + worker_id,
        arguments=(("x-expires", INBOX_EXPIRES_MS),) + _DEAD_LETTERING,
    )


def inbox_topology(worker_id: str) -> Topology:
    """The inbox queue of one worker and its binding to the broadcast exchange."""
    queue = inbox_queue(worker_id)
    return Topology(queues=(queue,), bindings=(BindingSpec(BROADCAST_EXCHANGE, queue.name),))
