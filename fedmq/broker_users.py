"""The broker users of a fedmq cluster, what each may do, and the definitions that create them.

Two kinds of RabbitMQ user, each limited to what its service does (RabbitMQ checks
*configure*, *write* and *read* regexes per virtual host, matched anywhere in a resource name,
hence the anchors):

- **the aggregator** declares the shared topology (:data:`fedmq.topology.STATIC_TOPOLOGY`),
  consumes the update and control queues (and may read the dead letters), publishes model versions on ``fedmq.broadcast`` and
  to single inboxes through the default exchange (``amq.default`` for permissions), and
  republishes invalid messages to ``fedmq.dead``.
- **a worker user** (one per site; a site's scaled replicas share it) declares, consumes and
  deletes only inboxes named ``fedmq.inbox.<user>.<anything>``, publishes through
  ``fedmq.submit`` (which reaches the update and control queues only) and to ``fedmq.dead``,
  and reads ``fedmq.broadcast`` only to bind its inbox to it. It cannot publish a model, read
  the update queue or another user's inbox, or delete or declare shared queues.

A worker user's name is letters, digits, ``-`` and ``_``: no dot, so the ``<user>.`` prefix of a
worker id and of an inbox name belongs to exactly one user, and no regex character sneaks in.
Passwords go into a broker URL unencoded, so they are URL-safe characters only.

``broker_config/definitions.json`` is :func:`definitions_template`: the topology and both users
with ``@BROKER_*@`` placeholders, which ``broker_config/start-broker.sh`` fills in from the
environment when the broker container starts (``tests/test_broker_users.py`` keeps the file,
this module and the topology in agreement).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping

from fedmq.errors import AccessRefused
from fedmq.topology import (BROADCAST_EXCHANGE, CONTROL_QUEUE, DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, INBOX_PREFIX,
                            STATUS_REPLY_PREFIX, STATIC_TOPOLOGY, SUBMIT_EXCHANGE, UPDATES_QUEUE, Topology,
                            inbox_topology)

log = logging.getLogger(__name__)

#: The default exchange's name in permission checks (it has no name on the wire).
DEFAULT_EXCHANGE_RESOURCE = "amq.default"

#: A broker user name a worker id and an inbox can carry as their ``<user>.`` prefix.
USER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Password characters that need no encoding in an ``amqp://user:password@host`` URL.
PASSWORD = re.compile(r"[A-Za-z0-9._~-]{8,128}")

#: The environment variables ``broker_config/start-broker.sh`` fills the template with; the
#: template holds each as ``@NAME@``.
TEMPLATE_VARIABLES = ("BROKER_AGGREGATOR_USER", "BROKER_AGGREGATOR_PASSWORD", "BROKER_WORKER_USER",
                      "BROKER_WORKER_PASSWORD")


@dataclass(frozen=True)
class Permissions:
    """One user's RabbitMQ permissions in a virtual host: three regexes over resource names."""

    configure: str
    write: str
    read: str

    def allows(self, access: str, resource: str) -> bool:
        """Whether RabbitMQ lets ``access`` (configure, write, read) on ``resource`` (an
        exchange or queue name; ``amq.default`` for the default exchange). Unanchored search,
        as RabbitMQ matches."""
        return re.search(getattr(self, access), resource) is not None


def _literal(name: str) -> str:
    # Resource names are letters, digits, "-", "_" and "."; only the dot means something in a regex.
    return name.replace(".", r"\.")


def _one_of(*names: str) -> str:
    return "^(" + "|".join(_literal(n) for n in names) + ")$"


def _shared_names(topology: Topology) -> tuple[str, ...]:
    return tuple(e.name for e in topology.exchanges) + tuple(q.name for q in topology.queues)


def aggregator_permissions(topology: Topology = STATIC_TOPOLOGY) -> Permissions:
    """The aggregator's: the shared topology, the two queues it consumes, the exchanges it
    publishes to. No inbox: it sends to one through the default exchange and never declares,
    reads or deletes one. ``fedmq status`` run with the aggregator's login declares, reads and
    deletes a reply queue of its own (``fedmq.status.<id>``)."""
    queues = tuple(q.name for q in topology.queues)
    sources = tuple(dict.fromkeys(b.exchange for b in topology.bindings))
    dead_lettering = tuple(q.name for q in topology.queues if q.argument("x-dead-letter-exchange"))
    # write: publishing (broadcast, default, dead), binding a queue (its destination), and
    # declaring a queue with a dead-letter exchange (write on that exchange).
    # read: consuming, binding (the source exchange), and declaring a dead-lettering queue; the
    # dead letters too, so that an operator can inspect them with the aggregator's login.
    status = _literal(STATUS_REPLY_PREFIX) + ".+"
    return Permissions(
        configure=_one_of(*_shared_names(topology))[:-2] + f"|{status})$",
        write=_one_of(DEFAULT_EXCHANGE_RESOURCE, BROADCAST_EXCHANGE, DEAD_LETTER_EXCHANGE, *queues),
        read=_one_of(*dict.fromkeys((*sources, UPDATES_QUEUE, CONTROL_QUEUE, *dead_lettering, DEAD_LETTER_QUEUE)))[:-2]
        + f"|{status})$")


def worker_inbox_pattern(user: str) -> str:
    """The inbox names of ``user``'s workers, as a regex fragment: ``fedmq.inbox.<user>.*``."""
    return _literal(INBOX_PREFIX + user + ".") + ".+"


def worker_permissions(user: str) -> Permissions:
    """A worker user's: its own inboxes; ``fedmq.submit`` and ``fedmq.dead`` to publish;
    ``fedmq.broadcast`` to bind its inbox to (a bind reads the source exchange)."""
    check_user_name(user)
    return _worker_permissions(user)


def _worker_permissions(user: str) -> Permissions:
    inbox = worker_inbox_pattern(user)
    return Permissions(
        configure=f"^{inbox}$",
        write=f"^({_literal(SUBMIT_EXCHANGE)}|{_literal(DEAD_LETTER_EXCHANGE)}|{inbox})$",
        read=f"^({_literal(BROADCAST_EXCHANGE)}|{inbox})$")


def check_user_name(user: str) -> None:
    if not USER_NAME.fullmatch(user):
        raise ValueError(f"broker user {user!r}: want 1-64 letters, digits, - or _ (no dot: it ends the "
                         "prefix of worker ids and inbox names)")


def check_password(what: str, password: str) -> None:
    if not PASSWORD.fullmatch(password):
        raise ValueError(f"{what}: want 8-128 letters, digits, . _ ~ - (it goes into a broker URL unencoded)")


def definitions(aggregator: tuple[str, str], workers: Mapping[str, str], *, vhost: str = "/") -> dict[str, Any]:
    """RabbitMQ definitions (``rabbitmqctl import_definitions``, or ``load_definitions`` at
    boot) of the topology, the aggregator user ``(name, password)`` and one worker user per
    ``{name: password}``; no ``guest``. Passwords are plain: the broker hashes them on import."""
    for user, password in (aggregator, *workers.items()):
        check_user_name(user)
        check_password(f"the password of {user!r}", password)
    return _definitions(aggregator, workers, vhost)


def definitions_template() -> dict[str, Any]:
    """``broker_config/definitions.json``: :func:`definitions` with ``@BROKER_*@`` placeholders
    for one worker user's and the aggregator's names and passwords."""
    a_user, a_password, w_user, w_password = (f"@{name}@" for name in TEMPLATE_VARIABLES)
    return _definitions((a_user, a_password), {w_user: w_password}, "/")


def render_template(text: str, values: Mapping[str, str]) -> str:
    """``text`` (the template file) with each ``@BROKER_*@`` placeholder replaced, as
    ``start-broker.sh`` does; the values are checked first, so nothing needs escaping."""
    check_user_name(values["BROKER_AGGREGATOR_USER"])
    check_user_name(values["BROKER_WORKER_USER"])
    check_password("BROKER_AGGREGATOR_PASSWORD", values["BROKER_AGGREGATOR_PASSWORD"])
    check_password("BROKER_WORKER_PASSWORD", values["BROKER_WORKER_PASSWORD"])
    for name in TEMPLATE_VARIABLES:
        text = text.replace(f"@{name}@", values[name])
    return text


def _definitions(aggregator: tuple[str, str], workers: Mapping[str, str], vhost: str) -> dict[str, Any]:
    a_user, a_password = aggregator
    granted = [(a_user, aggregator_permissions())] + [(user, _worker_permissions(user)) for user in workers]
    return {
        "rabbit_version": "3.10.8",
        # "monitoring": the management UI shows the cluster with the aggregator's login.
        "users": [{"name": a_user, "password": a_password, "tags": ["monitoring"]}]
                 + [{"name": user, "password": password, "tags": []} for user, password in workers.items()],
        "vhosts": [{"name": vhost}],
        "permissions": [{"user": user, "vhost": vhost, "configure": p.configure, "write": p.write, "read": p.read}
                        for user, p in granted],
        "exchanges": [{"name": e.name, "vhost": vhost, "type": e.type, "durable": e.durable, "auto_delete": False,
                       "internal": False, "arguments": {}} for e in STATIC_TOPOLOGY.exchanges],
        "queues": [{"name": q.name, "vhost": vhost, "durable": q.durable, "auto_delete": False,
                    "arguments": dict(q.arguments)} for q in STATIC_TOPOLOGY.queues],
        "bindings": [{"source": b.exchange, "vhost": vhost, "destination": b.queue, "destination_type": "queue",
                      "routing_key": b.routing_key, "arguments": {}} for b in STATIC_TOPOLOGY.bindings],
    }


def declare_shared_topology(broker: Any, who: str) -> bool:
    """Declare the shared topology if ``broker``'s user may (a development broker's ``guest``);
    a worker user may not, and relies on the definitions or the aggregator having declared it.
    Returns whether it was declared."""
    try:
        broker.declare(STATIC_TOPOLOGY)
    except AccessRefused as exc:
        log.info("%s: may not declare the shared topology (%s); using the broker's", who, exc)
        return False
    return True


def declare_inbox(broker: Any, worker_id: str) -> None:
    """Declare ``worker_id``'s inbox and bind it to the broadcasts; a refusal (403) says what
    the worker id must look like for the broker user."""
    try:
        broker.declare(inbox_topology(worker_id))
    except AccessRefused as exc:
        raise AccessRefused(f"{exc} (a worker's id must start with its broker user and a dot, "
                            f"'{broker.user}.<name>': leave --worker-id empty or name it so)") from None
