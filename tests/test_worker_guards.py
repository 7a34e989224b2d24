"""A worker refuses bad runs and models, survives failed publishes, and fails loudly.

Each test plays the aggregator by hand over the in-memory broker (real codec): it answers the
worker's hello, sends broadcasts into its inbox and reads what the worker publishes.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fedmq import messages as m
from fedmq.broker.memory import MemoryBroker, MemoryHub
from fedmq.errors import BrokerUnavailable, InvalidMessage
from fedmq.settings import DataSettings, Settings, WorkerSettings
from fedmq.task import build_model
from fedmq.topology import CONTROL_QUEUE, STATIC_TOPOLOGY, UPDATES_QUEUE, inbox_queue
from fedmq.transport import Transport
from worker.service import Worker

TASK = m.TaskSpec("mnist", "fedavg-2nn", "iid", 20, 0.5, 2, 0)
TRAINING = m.TrainingConfig(0, 2, 32, 0.05, "sgd", 0.0, 0.0)


def _decode(body: bytes):
    return m.decode(body)


class Harness:
    """A hub, the aggregator's side of it, and workers running in threads."""

    def __init__(self, data_root) -> None:
        self.hub = MemoryHub()
        self.admin = self.hub.connect()
        self.admin.declare(STATIC_TOPOLOGY)
        self.transport = Transport(self.admin)
        self.data_root = data_root
        self.threads: list[threading.Thread] = []
        self.workers: list[Worker] = []

    def start(self, worker_id: str, *, broker: MemoryBroker | None = None, **worker_settings) -> Worker:
        settings = Settings(data=DataSettings(data_root=str(self.data_root), download=False),
                            worker=WorkerSettings(worker_id=worker_id, heartbeat_interval_s=0.5, **worker_settings))
        worker = Worker(settings, broker or self.hub.connect())
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        self.threads.append(thread)
        self.workers.append(worker)
        self.wait(lambda: inbox_queue(worker_id).name in self.hub.queue_names())
        return worker

    def send(self, worker_id: str, message) -> None:
        self.transport.send("", inbox_queue(worker_id).name, message)

    def join(self, worker_id: str, partition: int = 0, task: m.TaskSpec = TASK) -> None:
        self.send(worker_id, m.JoinAccepted("run-1", worker_id, partition, task))

    def broadcast(self, worker_id: str, weights, version: int = 0) -> None:
        self.send(worker_id, m.ModelBroadcast("run-1", version, TRAINING, (), weights))

    def messages(self, queue: str) -> list:
        return [_decode(body) for body, _ in self.hub.peek(queue)]

    def updates(self) -> list[m.WeightUpdate]:
        return [msg for msg in self.messages(UPDATES_QUEUE) if isinstance(msg, m.WeightUpdate)]

    def goodbyes(self) -> list[m.WorkerGoodbye]:
        return [msg for msg in self.messages(CONTROL_QUEUE) if isinstance(msg, m.WorkerGoodbye)]

    @staticmethod
    def wait(condition, timeout: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)
        return condition()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        for thread in self.threads:
            thread.join(timeout=60)


@pytest.fixture
def harness(data_root):
    h = Harness(data_root)
    yield h
    h.stop()


def model_weights(spec: str = "fedavg-2nn"):
    return {k: v.detach().clone() for k, v in build_model(spec, seed=0).state_dict().items()}


# -- values checked at decode ----------------------------------------------------------------
@pytest.mark.parametrize("change", [dict(optimizer="lbfgs"), dict(learning_rate=-0.1), dict(learning_rate=0.0),
                                    dict(momentum=-0.5), dict(momentum=1.0), dict(weight_decay=-1e-4)])
def test_training_values_no_worker_can_use_are_refused_at_decode(change):
    fields = {**TRAINING.__dict__, **change}
    with pytest.raises(InvalidMessage) as refused:
        m.TrainingConfig.from_wire(fields)
    assert refused.value.reason == "schema"


@pytest.mark.parametrize("change", [dict(dataset="imagenet"), dict(partition_scheme="random"),
                                    dict(dirichlet_alpha=0.0), dict(dirichlet_alpha=-1.0)])
def test_task_values_no_worker_can_use_are_refused_at_decode(change):
    with pytest.raises(InvalidMessage) as refused:
        m.TaskSpec.from_wire({**TASK.__dict__, **change})
    assert refused.value.reason == "schema"


@pytest.mark.parametrize("worker_id", ["w" * 129, "w/1", "w 1", "w\u00e9"])
def test_identifiers_are_bounded_so_no_routing_key_overflows(worker_id):
    body = m.encode(m.WorkerHello(worker_id, -1, "cpu", time.time()))
    with pytest.raises(InvalidMessage) as refused:
        m.decode(body)
    assert refused.value.reason == "schema"
    assert m.decode(m.encode(m.WorkerHello("w" * 128, -1, "cpu", time.time()))).worker_id == "w" * 128


# -- the worker's own checks -----------------------------------------------------------------
def test_a_broadcast_that_does_not_match_the_model_is_never_trained(harness):
    harness.start("w1")
    harness.join("w1")
    harness.broadcast("w1", model_weights("fedavg-cnn"), version=0)  # the run's model is the 2NN
    harness.broadcast("w1", model_weights(), version=1)
    assert harness.wait(lambda: len(harness.updates()) == 1)
    time.sleep(0.5)
    assert [u.base_version for u in harness.updates()] == [1]
    assert harness.workers[0].failure is None


def test_a_failed_training_thread_says_goodbye_and_reports_failure(harness, monkeypatch):
    import worker.service as service

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(service, "train_locally", broken)
    worker = harness.start("w1")
    harness.join("w1")
    harness.broadcast("w1", model_weights())
    assert harness.wait(lambda: not harness.threads[0].is_alive())
    assert worker.failure and "simulated" in worker.failure
    assert [(g.reason, "simulated" in g.detail) for g in harness.goodbyes()] == [("failed", True)]


def test_the_worker_command_exits_non_zero_when_the_worker_failed(monkeypatch, data_root):
    import fedmq.broker.rabbitmq as rabbitmq
    import worker.service as service
    from fedmq_cli.__main__ import main

    hub = MemoryHub()
    monkeypatch.setattr(rabbitmq, "RabbitBroker", lambda *a, **k: hub.connect())

    def run_and_fail(self) -> int:
        self._fail("failed", "simulated")
        return 0

    monkeypatch.setattr(service.Worker, "run", run_and_fail)
    assert main(["worker", "--worker-id", "w1", "--data-root", str(data_root)]) == 1


def test_an_untrusted_model_is_refused_with_a_goodbye_and_a_non_zero_exit(harness):
    worker = harness.start("w1")
    harness.join("w1", task=m.TaskSpec("mnist", "evil.module:factory", "iid", 20, 0.5, 2, 0))
    assert harness.wait(lambda: not harness.threads[0].is_alive())
    assert worker.failure and "--trusted-models" in worker.failure
    goodbyes = harness.goodbyes()
    assert [(g.reason, g.run_id) for g in goodbyes] == [("refused", "run-1")]
    assert "evil.module:factory" in goodbyes[0].detail


class FlakyBroker(MemoryBroker):
    """Refuses the first ``failures`` publishes to the update queue, as a lost connection would."""

    def __init__(self, hub: MemoryHub, failures: int) -> None:
        super().__init__(hub)
        self.failures = failures

    def publish(self, exchange, routing_key, body, **kwargs):
        if routing_key == UPDATES_QUEUE and self.failures > 0:
            self.failures -= 1
            raise BrokerUnavailable("connection lost (simulated)")
        return super().publish(exchange, routing_key, body, **kwargs)


def test_an_update_whose_publish_fails_is_sent_again_and_counted_once(harness):
    flaky = FlakyBroker(harness.hub, failures=2)
    worker = harness.start("w1", broker=flaky)
    worker._outbox.first_retry_s = 0.05
    harness.join("w1")
    harness.broadcast("w1", model_weights())
    assert harness.wait(lambda: len(harness.updates()) == 1)
    assert flaky.failures == 0 and worker._outbox.failures == 2
    assert worker.updates_sent == 1
    assert harness.wait(lambda: worker._trained[1] == 0)  # trained only once confirmed
    time.sleep(0.5)
    assert len(harness.updates()) == 1  # not trained or sent twice


def test_two_workers_on_one_partition_send_different_updates(harness):
    for worker_id in ("w1", "w2"):
        harness.start(worker_id)
        harness.join(worker_id, partition=3)
    weights = model_weights()
    for worker_id in ("w1", "w2"):
        harness.broadcast(worker_id, weights)
    assert harness.wait(lambda: len(harness.updates()) == 2)
    first, second = harness.updates()
    assert first.partition == second.partition == 3
    assert any(not torch.equal(first.delta[k], second.delta[k]) for k in first.delta)
