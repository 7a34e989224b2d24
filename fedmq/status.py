"""``fedmq status`` over the broker: the asker's request, the aggregator's answer.

The asker declares a reply queue of its own (``fedmq.status.<id>``, non-durable, deleted by the
broker a minute after it is left) and puts a :class:`~fedmq.status_messages.StatusRequest` on the
control queue with a time-to-live of its timeout: with no aggregator consuming, the request
expires instead of being answered by an aggregator started an hour later. The aggregator
answers from its :class:`~fedmq.federation_state.FederationState`.
"""

from __future__ import annotations

import logging
import math
import time
import uuid

from fedmq.broker.base import Broker, Delivery
from fedmq.broker_users import declare_shared_topology
from fedmq.errors import InvalidMessage, Unroutable
from fedmq.federation_state import FederationSnapshot
from fedmq.status_messages import StatusReply, StatusRequest
from fedmq.topology import CONTROL_QUEUE, DEFAULT_EXCHANGE, STATUS_REPLY_PREFIX, QueueSpec
from fedmq.transport import Transport

log = logging.getLogger(__name__)

#: The broker deletes a reply queue left unused this long (ms).
REPLY_QUEUE_EXPIRES_MS = 60_000


def status_reply(request_id: str, snapshot: FederationSnapshot) -> StatusReply:
    """The answer to request ``request_id`` from the federation's ``snapshot``."""
    last = snapshot.last
    return StatusReply(request_id, snapshot.run_id, snapshot.version, snapshot.versions, snapshot.open_version,
                       snapshot.expected, snapshot.folded, snapshot.elapsed_s, snapshot.estimate_s,
                       _finite(last.test_accuracy) if last else None, _finite(last.test_loss) if last else None,
                       _finite(last.federated_accuracy) if last else None, snapshot.dead_letters, snapshot.finished,
                       snapshot.workers)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def answer_status(transport: Transport, request: StatusRequest, snapshot: FederationSnapshot) -> None:
    """Send the answer to ``request``; an asker that is gone (no reply queue) is logged only."""
    try:
        transport.send(DEFAULT_EXCHANGE, request.reply_to, status_reply(request.request_id, snapshot),
                       persistent=False)
    except Unroutable:
        log.info("status request %s: the asker's queue %s is gone; not answered", request.request_id,
                 request.reply_to)
        return
    log.info("status request %s answered: version %d, %d live workers", request.request_id, snapshot.version,
             len(snapshot.workers))


def ask_status(broker: Broker, timeout_s: float) -> StatusReply | None:
    """Ask the aggregator on ``broker``; its answer, or None when none came within ``timeout_s``."""
    transport = Transport(broker)
    request_id = uuid.uuid4().hex
    reply_queue = STATUS_REPLY_PREFIX + request_id
    declare_shared_topology(broker, "fedmq status")
    broker.declare_queue(QueueSpec(reply_queue, durable=False, arguments=(("x-expires", REPLY_QUEUE_EXPIRES_MS),)))
    answers: list[StatusReply] = []

    def on_reply(delivery: Delivery) -> None:
        try:
            received = transport.receive(delivery)
        except InvalidMessage as exc:
            log.warning("status: unreadable reply ignored: %s", exc)
            for d in getattr(exc, "deliveries", (delivery,)):
                broker.ack(d)
            return
        if received is None:
            return
        for d in received.deliveries:
            broker.ack(d)
        message = received.message
        if isinstance(message, StatusReply) and message.request_id == request_id:
            answers.append(message)

    broker.subscribe(reply_queue, on_reply, prefetch=0)
    try:
        transport.send(DEFAULT_EXCHANGE, CONTROL_QUEUE, StatusRequest(request_id, reply_queue, time.time()),
                       persistent=False, ttl_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        while not answers and time.monotonic() < deadline:
            broker.run_for(min(0.1, max(0.0, deadline - time.monotonic())))
    finally:
        broker.delete_queue(reply_queue)
    return answers[0] if answers else None
