"""Broker-authenticated worker identity: a worker id belongs to the broker user that sent it.

RabbitMQ refuses a message whose AMQP ``user_id`` is not the publishing connection's user, and
every fedmq broker connection sets it (:class:`fedmq.broker.base.Broker`), so a delivery's
``user_id`` says which broker user sent it. A worker's id starts with its broker user and a dot
(``site-a.host-12-ab3f``; :func:`worker.service.default_worker_id`), the same prefix its user's
permissions give its inbox (:mod:`fedmq.broker_users`). With ``--require-worker-identity`` the
aggregator refuses (dead-letters, reason ``identity``) every update, evaluation report, hello,
heartbeat and goodbye whose worker id is not its sender's: one site cannot send updates, or say
goodbye, in another site's name.
"""

from __future__ import annotations

from fedmq.messages import peek_worker_id
from fedmq.transport import ReceivedBytes

REASON = "identity"


def owner_of(worker_id: str) -> str:
    """The broker user a worker id belongs to: what comes before its first dot."""
    return worker_id.partition(".")[0]


def identity_refusal(raw: ReceivedBytes, *, required: bool) -> tuple[str, str] | None:
    """``(reason, detail)`` if ``raw`` must be refused for its sender, else None.

    Only with ``required``: then the sender must be known (``user_id`` on every delivery of the
    message, one user for all its chunks) and own the message's worker id. A message without a
    readable worker id passes here; decoding it refuses it for what it is.
    """
    if not required:
        return None
    users = sorted({str(d.user_id) for d in raw.deliveries})
    if any(d.user_id is None for d in raw.deliveries):
        return REASON, "no AMQP user_id: the sender's broker user is unknown (identity is required)"
    if len(users) > 1:
        return REASON, f"the chunks of one message come from several broker users {users}"
    worker_id = peek_worker_id(raw.data)
    if worker_id is None:
        return None
    (user,) = users
    if owner_of(worker_id) != user:
        return REASON, (f"worker id {worker_id[:128]!r} does not belong to broker user {user!r} "
                        f"(want {user}.<name>)")
    return None
