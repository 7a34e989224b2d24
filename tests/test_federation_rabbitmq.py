"""The federation end to end: an aggregator and worker processes over a real RabbitMQ, real MNIST.

Model: the FedAvg paper's 2NN (199,210 parameters), IID partitions, E=1, B=32, SGD lr 0.05.
"""

import pytest
import torch

from fedmq import messages as m
from fedmq.chunking import split_frames
from fedmq.task import build_model
from fedmq.topology import REASON_HEADER

from federation_processes import Federation, close_connection, dead_letters, find_connections, purge_fedmq_queues

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def federation(tmp_path, data_root, rabbitmq_url, unique_name):
    purge_fedmq_queues(rabbitmq_url)
    made = []

    def make(**env):
        fed = Federation(tmp_path, data_root, rabbitmq_url, f"test-{unique_name}", **env)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.close()


def publish_raw(url: str, queue: str, body: bytes) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for frame in split_frames(body):
            channel.basic_publish("", queue, frame, pika.BasicProperties(delivery_mode=2))
    finally:
        connection.close()


def bad_updates(run_id: str) -> dict[str, bytes]:
    delta = {k: torch.zeros_like(v) for k, v in build_model("fedavg-2nn").state_dict().items()}
    nan = dict(delta)
    nan["fc1.bias"] = torch.full_like(delta["fc1.bias"], float("nan"))
    wrong_shape = dict(delta)
    wrong_shape["fc1.bias"] = torch.zeros(3)
    wrong_schema = m.encode(m.WorkerGoodbye("x", run_id)).replace(b"\xa6schema\x01", b"\xa6schema\x09")

    def update(run, d):
        return m.encode(m.WeightUpdate(run, 0, "stranger", -1, 10, 0.1, 0.1, 1, d))

    return {"malformed": b"\x93garbage\xc1", "schema": wrong_schema, "shape": update(run_id, wrong_shape),
            "non-finite": update(run_id, nan), "wrong-run": update("another-run", delta)}


def test_workers_first_then_aggregator_reach_95_percent_and_bad_input_is_dead_lettered(federation, rabbitmq_url):
    fed = federation(FEDMQ_VERSIONS=3, FEDMQ_START_WORKERS=3, FEDMQ_NUM_PARTITIONS=3)
    bad = bad_updates(fed.run_id)
    for body in bad.values():
        publish_raw(rabbitmq_url, "fedmq.updates", body)
    publish_raw(rabbitmq_url, "fedmq.control", b"not a control message")
    for i in range(3):  # workers first: they wait for an aggregator
        fed.worker(f"w{i}")
    fed.aggregator()
    assert fed.wait_aggregator(240) == 0, fed.log("aggregator")[-3000:]
    records = fed.records()
    assert [r["version"] for r in records] == [1, 2, 3]
    assert all(r["participants"] == 3 for r in records)
    assert max(r["test_accuracy"] for r in records) >= 0.95, [r["test_accuracy"] for r in records]
    assert fed.wait_workers(30) == {"w0": 0, "w1": 0, "w2": 0}  # they leave when the run completes
    # What fedmq dead-lettered (with its reason header). Hellos and heartbeats that expired while
    # no aggregator ran may be there too or not, depending on timing: they are not counted.
    reasons = {(headers["x-fedmq-source-queue"], headers[REASON_HEADER].split(":")[0])
               for _, headers in dead_letters(rabbitmq_url) if REASON_HEADER in headers}
    assert reasons == {("fedmq.updates", reason) for reason in bad} | {("fedmq.control", "malformed")}
    log = fed.log("aggregator")
    assert all(f"dead-lettered 1 message(s) from fedmq.updates: {reason}" in log for reason in bad)


def test_a_worker_killed_mid_round_does_not_stall_the_federation(federation):
    fed = federation(FEDMQ_VERSIONS=4, FEDMQ_START_WORKERS=3, FEDMQ_NUM_PARTITIONS=3, FEDMQ_LOCAL_EPOCHS=2,
                     FEDMQ_ROUND_TIMEOUT_S=120)
    fed.aggregator()
    for i in range(3):
        fed.worker(f"w{i}")
    fed.wait_for_version(1, 180)
    fed.kill("w2")  # SIGKILL: no goodbye, its heartbeats just stop
    assert fed.wait_aggregator(240) == 0
    records = fed.records()
    assert [r["version"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["participants"] == 2 and records[-1]["live_workers"] == 2
    assert "w2 silent for over 5 s: considered dead" in fed.log("aggregator")
    assert records[-1]["test_accuracy"] >= 0.95


def test_a_worker_started_after_the_first_broadcast_contributes_to_the_next_version(federation):
    fed = federation(FEDMQ_VERSIONS=8, FEDMQ_START_WORKERS=2, FEDMQ_NUM_PARTITIONS=3, FEDMQ_LOCAL_EPOCHS=3)
    fed.aggregator()
    fed.worker("w0")
    fed.worker("w1")
    first = fed.wait_for_version(1, 180)
    assert first[0]["participants"] == 2
    fed.worker("late")
    assert fed.wait_aggregator(300) == 0
    records = fed.records()
    assert len(records) == 8
    assert any(r["participants"] == 3 for r in records[1:]), [r["participants"] for r in records]
    log = fed.log("aggregator")
    assert "worker late joined" in log and "from late" in log
    assert "model version" in fed.log("late")


def fedmq_dead_letters(url: str) -> list[str]:
    """Reasons of the messages fedmq itself dead-lettered (expired control messages aside)."""
    return [headers[REASON_HEADER] for _, headers in dead_letters(url) if REASON_HEADER in headers]


def test_aggregator_killed_mid_version_twice_restarts_and_the_run_finishes_with_every_update_once(
        federation, rabbitmq_url, tmp_path):
    # One training slot: the three workers train one after the other, so a version stays open
    # between its first and its last update and the kill lands mid-version.
    fed = federation(FEDMQ_VERSIONS=3, FEDMQ_START_WORKERS=3, FEDMQ_NUM_PARTITIONS=3, FEDMQ_TRAINING_SLOTS=1,
                     FEDMQ_TRAINING_SLOTS_DIR=str(tmp_path / "slots"), FEDMQ_ROUND_TIMEOUT_S=600)
    fed.aggregator()
    for i in range(3):
        fed.worker(f"w{i}")
    # 1) Killed before the first checkpoint, one update of version 0 folded and not acknowledged.
    fed.wait_for_log("aggregator", "version 0: update 1/3", 180)
    fed.kill("aggregator")
    assert not fed.records()
    fed.aggregator(name="aggregator-2")
    # 2) Killed mid-version again, after the checkpoint of version 1.
    fed.wait_for_log("aggregator-2", "version 1: update 1/3", 180)
    fed.kill("aggregator-2")
    # 3) Restarted with the default --start-workers 1: the resumed version still waits for all
    # three workers live at the checkpoint.
    fed.env["FEDMQ_START_WORKERS"] = "1"
    fed.aggregator(name="aggregator-3")
    assert fed.wait_aggregator(300) == 0, fed.log("aggregator-3")[-3000:]
    records = fed.records()
    assert [(r["version"], r["participants"], r["stale"]) for r in records] == [(1, 3, 0), (2, 3, 0), (3, 3, 0)]
    assert records[-1]["test_accuracy"] >= 0.9
    assert "resuming from the checkpoint of version 1" in fed.log("aggregator-3")
    # Nothing was turned away: no "future-version" (or any other) dead letter.
    assert fedmq_dead_letters(rabbitmq_url) == []
    # Each closed version's checkpoint names each worker's update once.
    from aggregator.checkpoint import CheckpointStore

    saved = CheckpointStore(fed.metrics_path.parent).load(fed.run_id)
    assert saved.version == 3 and sorted(saved.folded) == [(fed.run_id, 2, f"w{i}") for i in range(3)]
    assert fed.wait_workers(60) == {"w0": 0, "w1": 0, "w2": 0}


def test_the_aggregators_connection_forced_closed_mid_fold_loses_and_doubles_nothing(federation, rabbitmq_url,
                                                                                       tmp_path):
    fed = federation(FEDMQ_VERSIONS=2, FEDMQ_START_WORKERS=3, FEDMQ_NUM_PARTITIONS=3, FEDMQ_TRAINING_SLOTS=1,
                     FEDMQ_TRAINING_SLOTS_DIR=str(tmp_path / "slots"), FEDMQ_ROUND_TIMEOUT_S=600)
    fed.aggregator()
    # w1 and w2 are stragglers: whichever update comes first, the next one is many training
    # times behind it, so the forced close (rabbitmqctl takes seconds) lands mid-fold.
    fed.worker("w0")
    for i in (1, 2):
        fed.worker(f"w{i}", "--slowdown", "10")
    fed.wait_for_log("aggregator", "version 0: broadcast", 180)
    [consuming] = find_connections(rabbitmq_url, "fedmq-aggregator/consume")  # rabbitmqctl takes seconds
    fed.wait_for_log("aggregator", "version 0: update 1/3", 180)
    # The broker drops the connection the aggregator consumes on: its unacknowledged updates
    # come back on the new connection.
    close_connection(consuming)
    assert fed.wait_aggregator(300) == 0, fed.log("aggregator")[-3000:]
    records = fed.records()
    assert [(r["version"], r["participants"]) for r in records] == [(1, 3), (2, 3)]
    log = fed.log("aggregator")
    assert "connection lost: 320 CONNECTION_FORCED" in log
    assert "version 1:" not in log.split("CONNECTION_FORCED")[0]  # it was closed while version 0 was open
    assert "duplicate update from" in log  # the folded one came back, and was not folded again
    assert fedmq_dead_letters(rabbitmq_url) == []
    assert queue_depth(rabbitmq_url, "fedmq.updates") == 0  # every copy was acknowledged


def queue_depth(url: str, queue: str) -> int:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def test_raising_the_update_prefetch_keeps_the_deliveries_held_so_far(rabbitmq_url):
    # The aggregator subscribes again with a larger prefetch as workers join, while it holds
    # folded updates unacknowledged: they must stay ackable and must not come back.
    from fedmq.broker.rabbitmq import RabbitBroker
    from fedmq.topology import STATIC_TOPOLOGY

    purge_fedmq_queues(rabbitmq_url)
    held = []
    with RabbitBroker(rabbitmq_url, connection_name="fedmq-test-prefetch") as broker:
        broker.declare(STATIC_TOPOLOGY)
        for i in range(6):
            broker.publish("", "fedmq.updates", bytes([i]))
        broker.subscribe("fedmq.updates", held.append, prefetch=2)
        while len(held) < 2:
            broker.run_for(0.2)
        broker.run_for(0.5)
        assert len(held) == 2  # the prefetch stops the broker
        broker.subscribe("fedmq.updates", held.append, prefetch=10)
        while len(held) < 6:
            broker.run_for(0.2)
        for delivery in held:
            broker.ack(delivery)
        broker.run_for(0.2)
    assert sorted(d.body[0] for d in held) == list(range(6)) and not any(d.redelivered for d in held)
    assert queue_depth(rabbitmq_url, "fedmq.updates") == 0
