"""FedProx: the proximal term keeps a worker's local solution near the global model."""

from __future__ import annotations

import numpy as np
import torch

from fedmq import messages as m
from fedmq.task import build_model, load_split
from worker.trainer import train_locally


def test_the_proximal_term_travels_in_the_training_config():
    config = m.TrainingConfig(1, 0, 32, 0.05, "sgd", 0.0, 0.0, 0.5)
    assert m.TrainingConfig.from_wire(config.to_wire()).proximal_mu == 0.5


def test_fedprox_keeps_the_local_solution_closer_to_the_global_model(data_root):
    split = load_split("mnist", data_root, train=True, download=False)
    # One worker's skewed data: two classes only, where local training drifts furthest.
    index = np.flatnonzero(np.isin(split.labels.numpy(), [0, 1]))[:1500]
    images, labels = split.images[index], split.labels[index]
    model = build_model("fedavg-2nn", seed=0)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    distances = {}
    for mu in (0.0, 1.0):
        config = m.TrainingConfig(3, 0, 32, 0.05, "sgd", 0.0, 0.0, mu)
        delta = train_locally(model, weights, images, labels, config, seed=1).delta
        distances[mu] = float(torch.sqrt(sum(d.to(torch.float64).square().sum() for d in delta.values())))
    assert distances[1.0] < 0.8 * distances[0.0], distances
