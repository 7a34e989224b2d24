"""The broker users' permissions: fedmq/topology.py, fedmq/broker_users.py,
broker_config/definitions.json and start-broker.sh agree, and RabbitMQ's checks (simulated here
as RabbitMQ documents them) let each service do its work and a worker nothing else.

``tests/test_broker_permissions.py`` runs the same on a real RabbitMQ node.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from fedmq.broker_users import (DEFAULT_EXCHANGE_RESOURCE, Permissions, aggregator_permissions, check_user_name,
                                definitions, definitions_template, render_template, worker_permissions)
from fedmq.topology import (BROADCAST_EXCHANGE, CONTROL_QUEUE, DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE,
                            STATIC_TOPOLOGY, SUBMIT_EXCHANGE, UPDATES_QUEUE, inbox_topology)

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "broker_config" / "definitions.json"
START_BROKER = REPO / "broker_config" / "start-broker.sh"

VALUES = {"BROKER_AGGREGATOR_USER": "fedmq-aggregator", "BROKER_AGGREGATOR_PASSWORD": "agg-Secret.1",
          "BROKER_WORKER_USER": "site-a", "BROKER_WORKER_PASSWORD": "worker_Secret~2"}


# -- what RabbitMQ checks for each AMQP operation (its access-control documentation) ------------
def declare_exchange(name):
    return [("configure", name)]


def declare_queue(spec):
    needed = [("configure", spec.name)]
    dlx = spec.argument("x-dead-letter-exchange")
    if dlx:  # a dead-letter exchange: read on the queue, write on the exchange
        needed += [("read", spec.name), ("write", dlx)]
    return needed


def bind(spec):
    return [("write", spec.queue), ("read", spec.exchange)]


def publish(exchange):
    return [("write", exchange or DEFAULT_EXCHANGE_RESOURCE)]


def consume(queue):
    return [("read", queue)]


def delete_queue(queue):
    return [("configure", queue)]


def declare_all(topology):
    return ([declare_exchange(e.name) for e in topology.exchanges] + [declare_queue(q) for q in topology.queues]
            + [bind(b) for b in topology.bindings])


def allowed(permissions: Permissions, needed) -> bool:
    return all(permissions.allows(access, resource) for access, resource in needed)


# -- the file is what the module renders ----------------------------------------------------
def test_definitions_json_is_the_template_the_module_renders():
    assert json.loads(TEMPLATE.read_text()) == definitions_template(), (
        "regenerate broker_config/definitions.json from fedmq.broker_users.definitions_template()")


def test_the_definitions_hold_the_topology_and_two_users_but_no_guest():
    rendered = json.loads(render_template(TEMPLATE.read_text(), VALUES))
    assert rendered == definitions(("fedmq-aggregator", "agg-Secret.1"), {"site-a": "worker_Secret~2"})
    assert {u["name"] for u in rendered["users"]} == {"fedmq-aggregator", "site-a"}
    assert {e["name"] for e in rendered["exchanges"]} == {e.name for e in STATIC_TOPOLOGY.exchanges}
    assert {q["name"] for q in rendered["queues"]} == {q.name for q in STATIC_TOPOLOGY.queues}
    by_user = {p["user"]: p for p in rendered["permissions"]}
    assert by_user["site-a"]["read"] == worker_permissions("site-a").read
    assert by_user["fedmq-aggregator"]["write"] == aggregator_permissions().write
    assert "guest" not in TEMPLATE.read_text()


def test_workers_publish_through_the_submit_exchange_to_the_update_and_control_queues_only():
    routes = {(b.exchange, b.queue, b.routing_key) for b in STATIC_TOPOLOGY.bindings if b.exchange == SUBMIT_EXCHANGE}
    assert routes == {(SUBMIT_EXCHANGE, UPDATES_QUEUE, UPDATES_QUEUE), (SUBMIT_EXCHANGE, CONTROL_QUEUE, CONTROL_QUEUE)}
    assert {e.name: e.type for e in STATIC_TOPOLOGY.exchanges}[SUBMIT_EXCHANGE] == "direct"


# -- the aggregator can do its work ---------------------------------------------------------------
def test_the_aggregator_may_declare_consume_and_publish_what_it_does():
    agg = aggregator_permissions()
    for needed in declare_all(STATIC_TOPOLOGY) + [consume(UPDATES_QUEUE), consume(CONTROL_QUEUE),
                                                 publish(BROADCAST_EXCHANGE), publish(""),
                                                 publish(DEAD_LETTER_EXCHANGE), consume(DEAD_LETTER_QUEUE)]:
        assert allowed(agg, needed), needed


def test_the_aggregator_may_not_touch_inboxes_or_publish_as_a_worker():
    agg = aggregator_permissions()
    for needed in [consume("fedmq.inbox.site-a.w1"), delete_queue("fedmq.inbox.site-a.w1"),
                   publish(SUBMIT_EXCHANGE)]:
        assert not allowed(agg, needed), needed


# -- a worker can do its work and nothing else -----------------------------------------------------
def test_a_worker_may_declare_bind_consume_and_delete_its_inbox_and_submit():
    worker = worker_permissions("site-a")
    inbox = inbox_topology("site-a.host-12-ab3f")
    for needed in declare_all(inbox) + [consume(inbox.queues[0].name), delete_queue(inbox.queues[0].name),
                                        publish(SUBMIT_EXCHANGE), publish(DEAD_LETTER_EXCHANGE)]:
        assert allowed(worker, needed), needed


@pytest.mark.parametrize("what, needed", [
    ("publish a model broadcast", publish(BROADCAST_EXCHANGE)),
    ("publish through the default exchange (any queue, another inbox too)", publish("")),
    ("read the update queue", consume(UPDATES_QUEUE)),
    ("read the control queue", consume(CONTROL_QUEUE)),
    ("read the dead letters", consume(DEAD_LETTER_QUEUE)),
    ("read another user's inbox", consume("fedmq.inbox.site-b.w1")),
    ("read an inbox of a user whose name extends its own", consume("fedmq.inbox.site-ab.w1")),
    ("read an inbox without a user prefix", consume("fedmq.inbox.w1")),
    ("delete the update queue", delete_queue(UPDATES_QUEUE)),
    ("delete the control queue", delete_queue(CONTROL_QUEUE)),
    ("delete another user's inbox", delete_queue("fedmq.inbox.site-b.w1")),
    ("declare the shared topology", declare_exchange(BROADCAST_EXCHANGE)),
    ("bind its inbox to the submit exchange (and read other workers' updates)",
     [("read", SUBMIT_EXCHANGE)]),
    ("bind its inbox to the dead-letter exchange", [("read", DEAD_LETTER_EXCHANGE)]),
])
def test_a_worker_may_not(what, needed):
    assert not allowed(worker_permissions("site-a"), needed), what


def test_user_names_carry_no_dot_or_regex():
    for bad in ("site.a", "", "a" * 65, "site*", "@BROKER_WORKER_USER@"):
        with pytest.raises(ValueError):
            check_user_name(bad)
    with pytest.raises(ValueError, match="8-128"):
        definitions(("agg", "short"), {"site-a": "long-enough"})
    with pytest.raises(ValueError, match="unencoded"):
        definitions(("agg", "has@and/in-it"), {"site-a": "long-enough"})


# -- start-broker.sh renders the same file --------------------------------------------------------
def run_start_broker(tmp_path: Path, values: dict[str, str]) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **values,
           "DEFINITIONS_TEMPLATE": str(TEMPLATE), "DEFINITIONS_OUT": str(tmp_path / "definitions.json")}
    return subprocess.run(["sh", str(START_BROKER), "sh", "-c", "echo started with $0", "ok"], env=env,
                          capture_output=True, text=True, timeout=30)


def test_start_broker_renders_what_the_module_renders_then_starts_the_broker(tmp_path):
    done = run_start_broker(tmp_path, VALUES)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "started with ok"
    rendered = tmp_path / "definitions.json"
    assert json.loads(rendered.read_text()) == json.loads(render_template(TEMPLATE.read_text(), VALUES))
    assert rendered.stat().st_mode & 0o077 == 0  # passwords: readable by the broker's user only


@pytest.mark.parametrize("name, value, why", [
    ("BROKER_WORKER_USER", "site.a", "BROKER_WORKER_USER='site.a': want 1-64 letters"),
    ("BROKER_WORKER_USER", "", "BROKER_WORKER_USER='': want"),
    ("BROKER_WORKER_PASSWORD", 'quote"and\\slash', "BROKER_WORKER_PASSWORD: want letters"),
    ("BROKER_AGGREGATOR_PASSWORD", "short", "BROKER_AGGREGATOR_PASSWORD: want 8-128"),
    ("BROKER_AGGREGATOR_USER", "site-a", "two broker users"),
])
def test_start_broker_refuses_bad_names_and_passwords(tmp_path, name, value, why):
    done = run_start_broker(tmp_path, {**VALUES, name: value})
    assert done.returncode == 2 and why in done.stderr, done.stderr
    assert "started" not in done.stdout and not (tmp_path / "definitions.json").exists()


def test_the_readme_adds_a_site_with_the_permissions_the_module_grants():
    p = worker_permissions("site-b")
    command = f"set_permissions -p / site-b \\\n  '{p.configure}' '{p.write}' '{p.read}'"
    assert command in (REPO / "README.md").read_text()
