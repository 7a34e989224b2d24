"""Broker-authenticated identity: with --require-worker-identity the aggregator refuses worker
messages whose worker id does not belong to the broker user that sent them (AMQP user_id).

In-memory broker here (each connection stamps its user, as RabbitMQ enforces);
tests/test_broker_permissions.py shows RabbitMQ refusing a forged user_id and the check over it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from aggregator.sender_identity import identity_refusal, owner_of
from aggregator.service import Aggregator
from fedmq import messages as m
from fedmq.broker.base import Delivery
from fedmq.broker.memory import MemoryHub
from fedmq.task import build_model
from fedmq.topology import (CONTROL_QUEUE, DEAD_LETTER_QUEUE, REASON_HEADER, SENDER_USER_HEADER, STATIC_TOPOLOGY,
                            SUBMIT_EXCHANGE, UPDATES_QUEUE)
from fedmq.transport import ReceivedBytes, Transport
from federation_harness import ScriptedWorker, run_aggregator
from test_embedded import embedded_settings
from worker.service import default_worker_id


def received(data: bytes, *users: str | None) -> ReceivedBytes:
    deliveries = tuple(Delivery(UPDATES_QUEUE, data, {}, False, i, user) for i, user in enumerate(users))
    return ReceivedBytes(data, deliveries, len(data))


HELLO = m.encode(m.WorkerHello("site-a.w0", -1, "cpu", 1.0))


def test_a_worker_id_belongs_to_the_user_before_its_first_dot():
    assert owner_of("site-a.host-1-ab12") == "site-a"
    assert owner_of("site-a.b.c") == "site-a"
    assert owner_of("nodot") == "nodot"
    assert default_worker_id("site-a").startswith("site-a.")


@pytest.mark.parametrize("data, users, refusal", [
    (HELLO, ("site-a",), None),
    (HELLO, ("site-a", "site-a"), None),  # two chunks, one sender
    (HELLO, ("site-b",), "worker id 'site-a.w0' does not belong to broker user 'site-b' (want site-b.<name>)"),
    (HELLO, ("site",), "does not belong to broker user 'site'"),  # a prefix of the user is not the user
    (HELLO, (None,), "no AMQP user_id"),
    (HELLO, ("site-a", "site-b"), "the chunks of one message come from several broker users ['site-a', 'site-b']"),
    (b"\x93not a map", ("site-b",), None),  # no worker id to check: decoding refuses it as malformed
])
def test_the_refusal_when_identity_is_required(data, users, refusal):
    got = identity_refusal(received(data, *users), required=True)
    if refusal is None:
        assert got is None
    else:
        assert got[0] == "identity" and refusal in got[1], got
    assert identity_refusal(received(data, *users), required=False) is None


@pytest.mark.parametrize("required", [True, False])
def test_messages_in_another_sites_name_are_refused_and_the_run_goes_on(data_root, tmp_path, required):
    hub = MemoryHub()
    settings = embedded_settings(data_root, tmp_path, versions=2, start_workers=1, num_partitions=2)
    settings = dataclasses.replace(settings, run=dataclasses.replace(settings.run, require_worker_identity=required))
    # Site b's broker user sends an update and a goodbye in site a's workers' names.
    intruder = hub.connect(user="site-b")
    intruder.declare(STATIC_TOPOLOGY)
    weights = build_model("fedavg-2nn", seed=0).state_dict()
    forged = m.WeightUpdate(settings.run.run_id, 0, "site-a.w1", -1, 100, 1.0, 0.1, 1,
                            {k: torch.zeros_like(v) for k, v in weights.items()})
    Transport(intruder, max_frame_bytes=256 * 1024).send(SUBMIT_EXCHANGE, UPDATES_QUEUE, forged)
    Transport(intruder).send(SUBMIT_EXCHANGE, CONTROL_QUEUE, m.WorkerGoodbye("site-a.w0", "", "leaving", ""))

    def answer(participant, broadcast):
        if broadcast.attempt == 0:
            participant.send_update(broadcast)

    honest = ScriptedWorker(hub, "site-a.w0", user="site-a", on_broadcast=answer).start()
    aggregator = Aggregator(settings, hub.connect(user="fedmq-aggregator"))
    try:
        result = run_aggregator(aggregator, limit_s=120)
    finally:
        honest.stop()
    assert not aggregator.hung
    # The honest worker's own updates pass; without the check the forged update is folded too.
    assert [r.participants for r in result.records] == ([1, 1] if required else [2, 1])
    refused = [(h[REASON_HEADER], h.get(SENDER_USER_HEADER)) for _, h in hub.peek(DEAD_LETTER_QUEUE)
               if h[REASON_HEADER].startswith("identity")]
    if required:
        assert sorted(set(refused)) == [  # (the forged update came in chunks: each is dead-lettered)
            ("identity: worker id 'site-a.w0' does not belong to broker user 'site-b' (want site-b.<name>)", "site-b"),
            ("identity: worker id 'site-a.w1' does not belong to broker user 'site-b' (want site-b.<name>)", "site-b")]
    else:
        assert refused == []
