"""The federation end to end: an aggregator and worker processes over a real RabbitMQ, real MNIST.

Model: the FedAvg paper's 2NN (199,210 parameters), IID partitions, E=1, B=32, SGD lr 0.05.
"""

import pytest
import torch

from fedmq import messages as m
from fedmq.chunking import split_frames
from fedmq.task import build_model
from fedmq.topology import REASON_HEADER

from federation_processes import Federation, dead_letters, purge_fedmq_queues

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
    fed = federation(FEDMQ_VERSIONS=3, FEDMQ_START_WORKERS=3)
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
    reasons = {(headers["x-fedmq-source-queue"], headers[REASON_HEADER].split(":")[0])
               for _, headers in dead_letters(rabbitmq_url)}
    assert reasons == {("fedmq.updates", reason) for reason in bad} | {("fedmq.control", "malformed")}
    log = fed.log("aggregator")
    assert all(f"dead-lettered 1 message(s) from fedmq.updates: {reason}" in log for reason in bad)


def test_a_worker_killed_mid_round_does_not_stall_the_federation(federation):
    fed = federation(FEDMQ_VERSIONS=4, FEDMQ_START_WORKERS=3, FEDMQ_LOCAL_EPOCHS=2, FEDMQ_ROUND_TIMEOUT_S=120)
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
