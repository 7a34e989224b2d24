"""Two sites, each with its own folder of images, and an aggregator without any data, over the
real RabbitMQ: the run is measured only by the workers' scores of their held-out rows.

The sites' PNGs are written by the test from MNIST's training set: disjoint, class-skewed halves
(site A holds 80 % of the images of digits 0-4 and 20 % of 5-9, site B the rest), 3,000 images
each, 20 % of them held out. Model: the FedAvg paper's 2NN, E=2, B=32, SGD lr 0.05.
"""

from __future__ import annotations

import numpy as np
import pytest
import torchvision
from PIL import Image

from federation_processes import Federation, dead_letters, purge_fedmq_queues

pytestmark = pytest.mark.rabbitmq

PER_CLASS = 600  # images of each digit, split 80/20 between the sites
EVAL_FRACTION = 0.2


def write_sites(data_root, folder) -> dict[str, int]:
    """The two sites' image folders under ``folder``; returns the images each holds."""
    mnist = torchvision.datasets.MNIST(str(data_root), train=True, download=False)
    labels = mnist.targets.numpy()
    counts = {"site-a": 0, "site-b": 0}
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)[:PER_CLASS]
        share_a = 0.8 if digit < 5 else 0.2
        cut = int(share_a * len(rows))
        for site, part in (("site-a", rows[:cut]), ("site-b", rows[cut:])):
            target = folder / site / str(digit)
            target.mkdir(parents=True, exist_ok=True)
            for row in part:
                Image.fromarray(mnist.data[row].numpy(), mode="L").save(target / f"{row:05d}.png")
            counts[site] += len(part)
    return counts


def test_two_sites_with_their_own_images_reach_90_percent_federated_accuracy(tmp_path, data_root, rabbitmq_url,
                                                                              unique_name):
    purge_fedmq_queues(rabbitmq_url)
    counts = write_sites(data_root, tmp_path / "sites")
    assert counts == {"site-a": 3000, "site-b": 3000}
    fed = Federation(tmp_path, data_root, rabbitmq_url, f"sites-{unique_name}", FEDMQ_VERSIONS=4,
                     FEDMQ_START_WORKERS=2, FEDMQ_LOCAL_EPOCHS=2, FEDMQ_EVAL_DATA="none",
                     FEDMQ_EVAL_FRACTION=EVAL_FRACTION)
    try:
        for site in counts:
            fed.worker(site, "--data", str(tmp_path / "sites" / site))
        fed.aggregator()
        assert fed.wait_aggregator(300) == 0, fed.log("aggregator")[-3000:]
        assert fed.wait_workers(60) == {"site-a": 0, "site-b": 0}
    finally:
        fed.close()
    records = fed.records()
    accuracies = [r["federated_accuracy"] for r in records]
    assert [r["version"] for r in records] == [1, 2, 3, 4]
    assert all(r["test_accuracy"] is None for r in records), "the aggregator has no test set"
    # Every version scored by both sites on all their held-out rows (600 each).
    assert all((r["federated_samples"], r["federated_workers"]) == (1200, 2) for r in records), records
    assert max(accuracies) >= 0.90, accuracies
    assert "federated accuracy" in fed.log("aggregator")
    for site in counts:
        assert "the image folder" in fed.log(site) and "2400 samples to train on, 600 held out" in fed.log(site)
    assert dead_letters(rabbitmq_url) == []
