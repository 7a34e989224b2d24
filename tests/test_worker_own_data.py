"""A worker on its own data: held-out rows scored before training, the FedAvg weight is what
it trains on, data that does not fit the run is refused with a goodbye that says why.

The test plays the aggregator by hand (see test_worker_guards.Harness): real worker, real
codec, in-memory broker, real MNIST.
"""

from __future__ import annotations

import textwrap
import time
import uuid

import pytest

from fedmq import messages as m
from fedmq.broker.memory import MemoryHub
from fedmq.topology import UPDATES_QUEUE
from test_data_sources import write_mnist_pngs
from test_worker_guards import Harness, model_weights


@pytest.fixture
def harness(data_root):
    h = Harness(data_root)
    yield h
    h.stop()


def published(harness) -> list:
    return harness.messages(UPDATES_QUEUE)


def test_held_out_rows_are_scored_before_training_and_not_trained_on(harness):
    # TASK splits MNIST's 60,000 training images in 20 IID partitions: 3,000 each.
    harness.start("w1", eval_fraction=0.1)
    harness.join("w1", partition=4)
    harness.broadcast("w1", model_weights(), version=0)
    assert harness.wait(lambda: len(harness.updates()) == 1)
    score, update = published(harness)
    assert isinstance(score, m.EvaluationReport), "the score goes first, before the update"
    assert (score.run_id, score.version, score.worker_id, score.num_samples) == ("run-1", 0, "w1", 300)
    assert 0.0 <= score.accuracy <= 0.3, "an untrained 2NN is near chance"
    assert score.loss > 1.5
    assert (update.num_samples, update.partition) == (2700, 4), "its FedAvg weight is what it trained on"


def test_the_final_version_is_scored_on_request_and_not_trained(harness):
    harness.start("w1", eval_fraction=0.05)
    harness.join("w1")
    harness.wait(lambda: harness.workers[0]._data is not None)
    harness.send("w1", m.EvaluationRequest("run-1", 3, (), model_weights()))
    assert harness.wait(lambda: len(published(harness)) == 1)
    (score,) = published(harness)
    assert isinstance(score, m.EvaluationReport) and (score.version, score.num_samples) == (3, 150)
    harness.send("w1", m.EvaluationRequest("run-1", 4, ("someone-else",), model_weights()))
    harness.send("w1", m.EvaluationRequest("run-1", 3, (), model_weights()))  # the same request again
    harness.send("w1", m.EvaluationRequest("run-1", 5, ("w1",), model_weights()))
    assert harness.wait(lambda: len(published(harness)) == 2)
    assert [s.version for s in published(harness)] == [3, 5], "once per version, only when selected"


def test_without_eval_fraction_nothing_is_scored(harness):
    harness.start("w1")
    harness.join("w1")
    harness.broadcast("w1", model_weights())
    assert harness.wait(lambda: len(harness.updates()) == 1)
    assert len(published(harness)) == 1 and harness.updates()[0].num_samples == 3000


def test_an_image_folder_trains_as_the_workers_own_data(harness, data_root, tmp_path):
    write_mnist_pngs(data_root, tmp_path, list(range(10)), 12)
    harness.start("w1", data=str(tmp_path), eval_fraction=0.25)
    harness.join("w1", partition=7)
    harness.broadcast("w1", model_weights())
    assert harness.wait(lambda: len(harness.updates()) == 1)
    score, update = published(harness)
    assert score.num_samples == 30 and update.num_samples == 90
    assert update.partition == -1, "its own data, not partition 7 of the run's data set"


@pytest.fixture
def colour_factory(tmp_path, monkeypatch) -> str:
    name = f"fedmq_test_colour_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch

        def images():
            return torch.rand(20, 3, 32, 32), torch.arange(20) % 10
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:images"


def test_data_that_does_not_fit_the_runs_model_is_refused_with_a_goodbye(harness, colour_factory):
    worker = harness.start("w1", data=colour_factory, trusted_data_factories=colour_factory)
    harness.join("w1")
    assert harness.wait(lambda: not harness.threads[0].is_alive())
    goodbyes = harness.goodbyes()
    assert [(g.reason, g.run_id) for g in goodbyes] == [("refused", "run-1")]
    assert "[3, 32, 32]" in goodbyes[0].detail and "fedavg-2nn" in goodbyes[0].detail
    assert worker.failure and colour_factory in worker.failure
    assert harness.updates() == []


def test_the_worker_command_refuses_an_untrusted_data_factory(monkeypatch, data_root, capsys):
    import fedmq.broker.rabbitmq as rabbitmq
    from fedmq_cli.__main__ import main

    hub = MemoryHub()
    monkeypatch.setattr(rabbitmq, "RabbitBroker", lambda *a, **k: hub.connect())
    code = main(["worker", "--worker-id", "w1", "--data-root", str(data_root), "--data", "site_data.loader:make"])
    assert code == 2
    assert "--trusted-data-factories" in capsys.readouterr().err


def test_a_bad_evaluation_request_is_dead_lettered_from_the_inbox_and_a_mismatched_one_not_scored(harness):
    from fedmq.topology import DEAD_LETTER_QUEUE, REASON_HEADER

    harness.start("w1", eval_fraction=0.05)
    harness.join("w1")
    harness.wait(lambda: harness.workers[0]._data is not None)
    weights = model_weights()
    nan = dict(weights, **{"fc1.bias": weights["fc1.bias"] * float("nan")})
    harness.send("w1", m.encode(m.EvaluationRequest("run-1", 1, (), nan)))
    harness.send("w1", m.EvaluationRequest("run-1", 2, (), model_weights("fedavg-cnn")))  # not the run's model
    harness.send("w1", m.EvaluationRequest("another-run", 3, (), weights))  # not the run it joined
    harness.send("w1", m.EvaluationRequest("run-1", 4, (), weights))
    assert harness.wait(lambda: len(published(harness)) == 1)
    time.sleep(0.5)
    assert [s.version for s in published(harness)] == [4]
    reasons = [headers[REASON_HEADER].split(":")[0] for _, headers in harness.hub.peek(DEAD_LETTER_QUEUE)]
    assert reasons == ["non-finite"]
    assert harness.workers[0].failure is None


def test_embedded_workers_hold_rows_out_and_the_run_is_measured_by_them_alone(data_root, tmp_path):
    import dataclasses

    from fedmq_cli.embedded import run_embedded
    from test_embedded import embedded_settings

    settings = embedded_settings(data_root, tmp_path, versions=2, eval_data="none")
    settings = dataclasses.replace(settings, worker=dataclasses.replace(settings.worker, eval_fraction=0.1))
    result = run_embedded(settings)
    # 3 workers on 20,000 images each hold out 2,000 each.
    assert [(r.version, r.test_accuracy, r.federated_samples, r.federated_workers) for r in result.records] == \
        [(1, None, 6000, 3), (2, None, 6000, 3)]
    assert result.records[-1].federated_accuracy >= 0.9, [r.federated_accuracy for r in result.records]
    assert all(r.participants == 3 for r in result.records)
