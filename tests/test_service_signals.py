"""SIGTERM (what `docker stop` sends) stops each service cleanly, over a real RabbitMQ.

A worker says goodbye (the aggregator drops it at once, not after the heartbeat timeout) and
exits 0. The aggregator exits 0 between events: its checkpoint is that of the last closed
version, and an aggregator restarted with the same run id resumes from it and finishes the run.
"""

import pytest

from aggregator.checkpoint import CheckpointStore
from federation_processes import Federation, purge_fedmq_queues

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def fed(tmp_path, data_root, rabbitmq_url, unique_name):
    purge_fedmq_queues(rabbitmq_url)
    # A long worker timeout: only a goodbye can make the aggregator drop a worker quickly.
    federation = Federation(tmp_path, data_root, rabbitmq_url, f"signals-{unique_name}", FEDMQ_VERSIONS=30,
                            FEDMQ_START_WORKERS=2, FEDMQ_WORKER_TIMEOUT_S=120, FEDMQ_LOCAL_STEPS=20)
    yield federation
    federation.close()


def test_sigterm_worker_says_goodbye_and_aggregator_resumes_from_its_checkpoint(fed):
    fed.aggregator()
    fed.worker("w0")
    fed.worker("w1")
    fed.wait_for_version(1, 180)

    assert fed.terminate("w1") == 0
    assert "worker w1 stopped after" in fed.log("w1")
    before = len(fed.records())
    fed.wait_for_version(before + 1, 60)  # with w1 gone, w0 alone closes the next version
    assert "worker w1 left (leaving) (1 live)" in fed.log("aggregator")

    assert fed.terminate("aggregator") == 0
    assert "stopped at version" in fed.log("aggregator")
    checkpoint = CheckpointStore(fed.metrics_path.parent).load(fed.run_id)
    stopped_at = checkpoint.version
    assert stopped_at == fed.records()[-1]["version"]  # the checkpoint is the last closed version
    assert set(checkpoint.weights) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"}

    fed.env["FEDMQ_VERSIONS"] = str(stopped_at + 2)
    fed.aggregator()  # same run id: resumes
    assert fed.wait_aggregator(180) == 0, fed.log("aggregator")[-3000:]
    assert f"resuming from the checkpoint of version {stopped_at}" in fed.log("aggregator")
    versions = [r["version"] for r in fed.records()]
    assert versions == list(range(1, stopped_at + 3)), versions
    assert (fed.metrics_path.parent / "final_model.safetensors").exists()
    assert fed.wait_workers(30)["w0"] == 0  # the run completed: w0 leaves
