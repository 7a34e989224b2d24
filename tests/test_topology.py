"""fedmq/topology.py and broker_config/definitions.json describe the same topology."""

import json
from pathlib import Path

from fedmq.topology import STATIC_TOPOLOGY, inbox_queue, INBOX_PREFIX

DEFINITIONS = Path(__file__).resolve().parent.parent / "broker_config" / "definitions.json"


def load_definitions() -> dict:
    return json.loads(DEFINITIONS.read_text())


def test_exchanges_agree():
    defined = {(e["name"], e["type"], e["durable"]) for e in load_definitions()["exchanges"]}
    ours = {(e.name, e.type, e.durable) for e in STATIC_TOPOLOGY.exchanges}
    assert defined == ours


def test_queues_and_arguments_agree():
    defined = {q["name"]: (q["durable"], q["arguments"]) for q in load_definitions()["queues"]}
    ours = {q.name: (q.durable, dict(q.arguments)) for q in STATIC_TOPOLOGY.queues}
    assert defined == ours


def test_bindings_agree():
    defined = {(b["source"], b["destination"], b["routing_key"]) for b in load_definitions()["bindings"]}
    ours = {(b.exchange, b.queue, b.routing_key) for b in STATIC_TOPOLOGY.bindings}
    assert defined == ours


def test_definitions_define_a_user_with_permissions():
    # A node that imports definitions creates no default user: without one nobody can log in.
    definitions = load_definitions()
    users = {u["name"] for u in definitions["users"]}
    assert users and {p["user"] for p in definitions["permissions"]} <= users


def test_inbox_queues_are_per_worker_and_dead_letter():
    queue = inbox_queue("w-1")
    assert queue.name == INBOX_PREFIX + "w-1"
    assert queue.argument("x-dead-letter-exchange") == "fedmq.dead"
    assert queue.argument("x-expires") > 0
