"""The broker users on a real RabbitMQ node: a worker user gets 403 for everything but its own
work, the aggregator user runs a federation, and the AMQP ``user_id`` cannot be forged.

The node is a private one on free ports (the machine's shared broker is never reconfigured),
booted the way the compose cluster boots its broker: ``start-broker.sh`` renders
``broker_config/definitions.json`` with users from the environment, and the node imports it (so
it has no ``guest``). A second site's user is added the way README says an operator adds one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pika
import pika.exceptions as pex
import pytest
import torch

from fedmq.broker.rabbitmq import RabbitBroker
from fedmq.broker_users import declare_shared_topology, worker_permissions
from fedmq.errors import AccessRefused
from fedmq.messages import WeightUpdate, WorkerHello
from fedmq.topology import (BROADCAST_EXCHANGE, CONTROL_QUEUE, DEAD_LETTER_QUEUE, DEFAULT_EXCHANGE,
                            STATIC_TOPOLOGY, SUBMIT_EXCHANGE, UPDATES_QUEUE, BindingSpec, inbox_queue,
                            inbox_topology)
from fedmq.transport import Transport

from federation_processes import Federation, dead_letters
from private_rabbitmq import PrivateRabbit, rabbitmq_installed

pytestmark = pytest.mark.rabbitmq

REPO = Path(__file__).resolve().parent.parent
USERS = {"BROKER_AGGREGATOR_USER": "fedmq-aggregator", "BROKER_AGGREGATOR_PASSWORD": "aggregator-pw-1",
         "BROKER_WORKER_USER": "site-a", "BROKER_WORKER_PASSWORD": "site-a-pw-1"}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    if not rabbitmq_installed():
        pytest.skip("RabbitMQ (rabbitmq-server) is not installed")
    base = tmp_path_factory.mktemp("perms")
    rendered = base / "definitions.json"
    done = subprocess.run(["sh", str(REPO / "broker_config" / "start-broker.sh"), "true"], capture_output=True,
                          text=True, timeout=30, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **USERS,
                                                      "DEFINITIONS_TEMPLATE": str(REPO / "broker_config" / "definitions.json"),
                                                      "DEFINITIONS_OUT": str(rendered)})
    assert done.returncode == 0, done.stderr
    config = ["definitions.import_backend = local_filesystem", f"definitions.local.path = {rendered}"]
    with PrivateRabbit(base / "node", config) as node:
        # Another site: its own user with the same kind of permissions (README: adding a site).
        p = worker_permissions("site-b")
        node.ctl("add_user", "site-b", "site-b-pw-1")
        node.ctl("set_permissions", "-p", "/", "site-b", p.configure, p.write, p.read)
        yield node


def url(node: PrivateRabbit, user: str, password: str) -> str:
    return f"amqp://{user}:{password}@127.0.0.1:{node.amqp_port}/%2F"


def connect(node: PrivateRabbit, who: str) -> RabbitBroker:
    credentials = {"aggregator": ("fedmq-aggregator", "aggregator-pw-1"), "site-a": ("site-a", "site-a-pw-1"),
                   "site-b": ("site-b", "site-b-pw-1")}[who]
    return RabbitBroker(url(node, *credentials), connection_name=f"fedmq-test-{who}", connect_attempts=3,
                        reconnect_initial_s=0.05)


def test_the_node_has_the_two_users_and_no_guest(node):
    users = node.ctl("-q", "list_users").stdout
    assert "fedmq-aggregator" in users and "site-a" in users and "guest" not in users
    with pytest.raises(AccessRefused):
        RabbitBroker(f"amqp://guest:guest@127.0.0.1:{node.amqp_port}/%2F", connect_attempts=1)


def test_a_worker_declares_only_its_inbox_and_submits_updates_the_aggregator_reads(node):
    with connect(node, "aggregator") as aggregator, connect(node, "site-a") as worker:
        assert declare_shared_topology(aggregator, "aggregator")
        assert not declare_shared_topology(worker, "worker")  # 403, and the worker goes on
        worker.declare(inbox_topology("site-a.w1"))
        received = []
        worker.subscribe(inbox_queue("site-a.w1").name, received.append, prefetch=0)
        Transport(worker).send(SUBMIT_EXCHANGE, CONTROL_QUEUE, WorkerHello("site-a.w1", -1, "cpu", 1.0))
        Transport(worker).send(SUBMIT_EXCHANGE, UPDATES_QUEUE, b"an update's bytes")
        got = {}
        aggregator.subscribe(CONTROL_QUEUE, lambda d: got.setdefault("control", d), prefetch=1)
        aggregator.subscribe(UPDATES_QUEUE, lambda d: got.setdefault("updates", d), prefetch=1)
        for _ in range(100):
            if len(got) == 2:
                break
            aggregator.run_for(0.1)
        assert got["updates"].body == b"an update's bytes"
        assert got["control"].user_id == got["updates"].user_id == "site-a"  # stamped and checked by RabbitMQ
        for d in got.values():
            aggregator.ack(d)
        # The aggregator reaches the inbox: the fanout and the default exchange.
        aggregator.publish(BROADCAST_EXCHANGE, "", b"model", mandatory=False)
        aggregator.publish(DEFAULT_EXCHANGE, inbox_queue("site-a.w1").name, b"assignment")
        for _ in range(100):
            if len(received) == 2:
                break
            worker.run_for(0.1)
        assert sorted(d.body for d in received) == [b"assignment", b"model"]
        assert {d.user_id for d in received} == {"fedmq-aggregator"}
        worker.delete_queue(inbox_queue("site-a.w1").name)  # its own: allowed


@pytest.fixture(scope="module")
def site_b_inbox(node):
    with connect(node, "site-b") as other:
        other.declare(inbox_topology("site-b.w9"))
        yield inbox_queue("site-b.w9").name
        other.delete_queue(inbox_queue("site-b.w9").name)


REFUSED = {
    "publish a model broadcast": lambda w, other: w.publish(BROADCAST_EXCHANGE, "", b"fake model", mandatory=False),
    "publish into another inbox through the default exchange":
        lambda w, other: w.publish(DEFAULT_EXCHANGE, other, b"fake model"),
    "read the update queue": lambda w, other: w.subscribe(UPDATES_QUEUE, lambda d: None, prefetch=1),
    "read the control queue": lambda w, other: w.subscribe(CONTROL_QUEUE, lambda d: None, prefetch=1),
    "read the dead letters": lambda w, other: w.subscribe(DEAD_LETTER_QUEUE, lambda d: None, prefetch=1),
    "read another user's inbox": lambda w, other: w.subscribe(other, lambda d: None, prefetch=1),
    "delete the update queue": lambda w, other: w.delete_queue(UPDATES_QUEUE),
    "delete the control queue": lambda w, other: w.delete_queue(CONTROL_QUEUE),
    "delete another user's inbox": lambda w, other: w.delete_queue(other),
    "declare the shared topology": lambda w, other: w.declare(STATIC_TOPOLOGY),
    "declare an inbox in another user's name": lambda w, other: w.declare(inbox_topology("site-b.w1")),
    "bind its inbox to the submit exchange (other workers' updates)":
        lambda w, other: w.bind(BindingSpec(SUBMIT_EXCHANGE, inbox_queue("site-a.w2").name, UPDATES_QUEUE)),
}


@pytest.mark.parametrize("what", list(REFUSED))
def test_a_worker_user_gets_403(node, site_b_inbox, what):
    with connect(node, "site-a") as worker:
        worker.declare(inbox_topology("site-a.w2"))
        with pytest.raises(AccessRefused, match="403 ACCESS_REFUSED"):
            REFUSED[what](worker, site_b_inbox)
        # The refusal closed a channel, not the connection: the worker goes on working.
        worker.publish(SUBMIT_EXCHANGE, CONTROL_QUEUE, b"still here", ttl_s=1)
        worker.delete_queue(inbox_queue("site-a.w2").name)
    assert all(queue_exists(node, q) for q in (UPDATES_QUEUE, CONTROL_QUEUE, site_b_inbox))  # nothing was deleted


def queue_exists(node: PrivateRabbit, queue: str) -> bool:
    """A passive declare (RabbitMQ checks no permission for it), as the aggregator."""
    connection = pika.BlockingConnection(pika.URLParameters(url(node, "fedmq-aggregator", "aggregator-pw-1")))
    try:
        connection.channel().queue_declare(queue, passive=True)
        return True
    except pex.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404
        return False
    finally:
        if connection.is_open:
            connection.close()


def test_a_forged_user_id_is_refused_by_the_broker(node):
    connection = pika.BlockingConnection(pika.URLParameters(url(node, "site-a", "site-a-pw-1")))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        with pytest.raises(pex.ChannelClosedByBroker) as refused:
            channel.basic_publish(SUBMIT_EXCHANGE, UPDATES_QUEUE, b"update in site-b's name",
                                  pika.BasicProperties(user_id="site-b"))
        assert refused.value.reply_code == 406
        assert "user_id property set to 'site-b' but authenticated user was 'site-a'" in refused.value.reply_text
    finally:
        connection.close()


def test_a_federation_runs_with_the_aggregator_and_worker_users_and_refuses_forged_identities(
        node, tmp_path, data_root):
    aggregator_url = url(node, "fedmq-aggregator", "aggregator-pw-1")
    fed = Federation(tmp_path, data_root, aggregator_url, "perms-run",
                     FEDMQ_VERSIONS=2, FEDMQ_START_WORKERS=2, FEDMQ_LOCAL_STEPS=30)
    site_a = ("--broker-url", url(node, "site-a", "site-a-pw-1"))
    # Site b's user says hello and sends an update in the name of a worker of site a.
    with connect(node, "site-b") as intruder:
        transport = Transport(intruder)
        transport.send(SUBMIT_EXCHANGE, CONTROL_QUEUE, WorkerHello("site-a.w7", -1, "cpu", 1.0))
        transport.send(SUBMIT_EXCHANGE, UPDATES_QUEUE, WeightUpdate("perms-run", 0, "site-a.w7", -1, 100, 1.0, 0.1, 1,
                                                                    {"w": torch.zeros(2)}))
    try:
        fed.aggregator("--require-worker-identity")
        fed.worker("site-a.w0", *site_a)
        fed.worker("site-b.w1", "--broker-url", url(node, "site-b", "site-b-pw-1"))
        assert fed.wait_aggregator(240) == 0, fed.log("aggregator")[-3000:]
        records = fed.records()
        assert [r["version"] for r in records] == [1, 2]
        assert records[-1]["participants"] == 2
        assert records[-1]["test_accuracy"] >= 0.8  # 2 versions of 30 steps each on real MNIST
        assert fed.wait_workers(60) == {"site-a.w0": 0, "site-b.w1": 0}
        assert "may not declare the shared topology" in fed.log("site-a.w0")
    finally:
        fed.close()
    refused = sorted((h["x-fedmq-reason"], h["x-fedmq-source-queue"], h["x-fedmq-sender-user"])
                     for _, h in dead_letters(aggregator_url))  # the aggregator's login reads them
    assert refused == [
        ("identity: worker id 'site-a.w7' does not belong to broker user 'site-b' (want site-b.<name>)", queue, "site-b")
        for queue in (CONTROL_QUEUE, UPDATES_QUEUE)]


def test_a_worker_whose_id_is_not_its_users_cannot_get_an_inbox(node, tmp_path):
    env = {**os.environ, "FEDMQ_BROKER_URL": url(node, "site-a", "site-a-pw-1"), "FEDMQ_DOWNLOAD": "false"}
    done = subprocess.run([sys.executable, "-m", "fedmq_cli", "worker", "--worker-id", "site-b.w5"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "403 ACCESS_REFUSED" in done.stderr and "fedmq.inbox.site-b.w5" in done.stderr
    assert "a worker's id must start with its broker user and a dot, 'site-a.<name>'" in done.stderr
