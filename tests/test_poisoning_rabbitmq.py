"""Model poisoning over the real RabbitMQ: 10 workers, 2 of them send their update scaled by -10.

The two poisoners train honestly like the others; the TEST then publishes their update sign-flipped
and scaled (a subclass of the worker rewrites the encoded update before it goes out: the product
has no attack switch). Four runs with the same seeds and the same worker ids, one after the
other on one vhost: clean FedAvg, then FedAvg, trimmed mean (20 % cut at each end: 2 of 10) and
median under attack. Model: the FedAvg paper's 2NN on MNIST, IID partitions of 6,000 rows,
E=1, B=10, SGD lr 0.05, 3 versions. FedAvg's mean is then (8d - 20d)/10 = -1.2 times an honest
update: it climbs the loss and collapses; the robust rules stay within 1 point of the clean run.
Measured (2 shared CPU cores, about 140 s for the four runs): clean 0.9598, FedAvg attacked
0.0958, trimmed mean 0.9548, median 0.9543. Both robust rules land below the clean run: with the
poisoners always at one end, each coordinate keeps the lower honest values (a bias that shrinks
the step); B=10 brings the runs near enough the plateau for that to cost half a point.

Aggregator and workers run as threads of this process, each with its own connection.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest

from aggregator.service import Aggregator
from fedmq.broker.rabbitmq import RabbitBroker
from fedmq.messages import decode, encode
from fedmq.settings import BrokerSettings, DataSettings, RunSettings, Settings, WorkerSettings
from federation_harness import run_aggregator
from federation_processes import dead_letters, purge_fedmq_queues
from worker.service import Worker

pytestmark = pytest.mark.rabbitmq

WORKERS, POISONERS, SCALE, VERSIONS = 10, 2, 10.0, 3


class SignFlippingWorker(Worker):
    """Trains honestly, then sends ``-SCALE`` times its update."""

    def _queue_update(self, key, body):
        update = decode(body)
        flipped = {k: -SCALE * t if t.is_floating_point() else t for k, t in update.delta.items()}
        super()._queue_update(key, encode(dataclasses.replace(update, delta=flipped)))


def federate(url, data_root, tmp_path, run_id, *, poisoners, **run):
    purge_fedmq_queues(url)
    settings = Settings(
        broker=BrokerSettings(broker_url=url),
        data=DataSettings(data_root=str(data_root), download=False),
        run=RunSettings(run_id=run_id, model="fedavg-2nn", versions=VERSIONS, start_workers=WORKERS,
                        num_partitions=WORKERS, batch_size=10, output_dir=str(tmp_path), **run),
        worker=WorkerSettings(heartbeat_interval_s=1.0))
    errors: list[BaseException] = []

    def serve(index: int) -> None:
        # The same ids in every run: the same partitions and training seeds, only the rule differs.
        cls = SignFlippingWorker if index < poisoners else Worker
        worker_settings = dataclasses.replace(settings, worker=dataclasses.replace(settings.worker,
                                                                                   worker_id=f"poison-{index}"))
        try:
            with RabbitBroker(url, connection_name=f"{run_id}-{index}") as broker:
                cls(worker_settings, broker).run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(i,), daemon=True) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    with RabbitBroker(url, connection_name=f"{run_id}-aggregator") as broker:
        aggregator = Aggregator(settings, broker)
        result = run_aggregator(aggregator, limit_s=300)
    for thread in threads:
        thread.join(timeout=60)
    assert not aggregator.hung and not errors, errors
    assert [(r.version, r.participants) for r in result.records] == [(v, WORKERS) for v in range(1, VERSIONS + 1)]
    return result


def test_two_sign_flipping_workers_break_fedavg_but_not_trimmed_mean_or_median(rabbitmq_url, data_root, tmp_path):
    clean = federate(rabbitmq_url, data_root, tmp_path, "clean", poisoners=0)
    attacked = {rule: federate(rabbitmq_url, data_root, tmp_path, f"attacked-{rule}", poisoners=POISONERS,
                               aggregation=rule, trim_fraction=0.2)
                for rule in ("fedavg", "trimmed-mean", "median")}
    accuracy = {"clean": clean.test_accuracy, **{rule: r.test_accuracy for rule, r in attacked.items()}}
    print(f"accuracy after {VERSIONS} versions: {accuracy}")
    assert clean.test_accuracy >= 0.93, accuracy
    assert attacked["fedavg"].test_accuracy < 0.5, accuracy  # collapsed
    assert attacked["trimmed-mean"].test_accuracy >= clean.test_accuracy - 0.01, accuracy
    assert attacked["median"].test_accuracy >= clean.test_accuracy - 0.01, accuracy
    for result in attacked.values():
        assert all(r.defences["aggregation"] == result.records[0].defences["aggregation"] for r in result.records)
    assert dead_letters(rabbitmq_url) == []
