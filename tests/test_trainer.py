"""Local training: step counts for epochs, fixed steps and FedSGD; deltas; early stop."""

import torch

from fedmq.messages import TrainingConfig
from fedmq.task import build_model
from worker.trainer import train_locally


def data(n=100):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def config(**changes) -> TrainingConfig:
    fields = dict(local_epochs=1, local_steps=0, batch_size=32, learning_rate=0.05, optimizer="sgd",
                  momentum=0.0, weight_decay=0.0)
    fields.update(changes)
    return TrainingConfig(**fields)


def test_epochs_steps_and_the_integer_batchnorm_buffer():
    model = build_model("cifar-cnn", seed=0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = data()
    result = train_locally(model, weights, images, labels, config(local_epochs=2), seed=1)
    assert result.completed and result.steps == 2 * 4 and result.num_samples == 100  # ceil(100/32) = 4 a epoch
    tracked = [k for k in weights if k.endswith("num_batches_tracked")]
    assert tracked and all(int(result.delta[k]) == 8 and result.delta[k].dtype == torch.int64 for k in tracked)
    assert all(result.delta[k].dtype == weights[k].dtype and result.delta[k].shape == weights[k].shape for k in weights)
    assert any(float(result.delta[k].abs().sum()) > 0 for k in weights if weights[k].is_floating_point())


def test_fixed_steps_and_fedsgd():
    model = build_model("cifar-cnn", seed=0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = data()
    assert train_locally(model, weights, images, labels, config(local_steps=3), seed=1).steps == 3
    fedsgd = train_locally(model, weights, images, labels, config(local_epochs=0, local_steps=1, batch_size=0), seed=1)
    tracked = next(k for k in weights if k.endswith("num_batches_tracked"))
    assert fedsgd.steps == 1 and int(fedsgd.delta[tracked]) == 1


def test_same_seed_same_delta_and_should_stop_cuts_training_short():
    model = build_model("cifar-cnn", seed=0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = data()
    a = train_locally(model, weights, images, labels, config(), seed=5)
    b = train_locally(model, weights, images, labels, config(), seed=5)
    assert all(torch.equal(a.delta[k], b.delta[k]) for k in weights)
    calls = []
    stopped = train_locally(model, weights, images, labels, config(local_epochs=3), seed=5,
                            should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert not stopped.completed and stopped.steps == 2


def test_a_worker_refuses_a_model_it_does_not_trust():
    from fedmq.broker.memory import MemoryHub
    from fedmq.messages import JoinAccepted, TaskSpec
    from fedmq.settings import Settings, WorkerSettings
    from worker.service import Worker

    def join(model):
        return JoinAccepted("run", "w", 0, TaskSpec("mnist", model, "iid", 2, 0.5, 2, 0))

    untrusting = Worker(Settings(worker=WorkerSettings(worker_id="w")), MemoryHub().connect())
    untrusting._on_join(join("os:getcwd"))
    assert untrusting._task is None  # nothing will be imported, loaded or trained
    untrusting._on_join(join("fedavg-2nn"))
    assert untrusting._task is not None and untrusting._task.model == "fedavg-2nn"
    trusting = Worker(Settings(worker=WorkerSettings(worker_id="w", trusted_models="mypkg.nets:small")),
                      MemoryHub().connect())
    trusting._on_join(join("mypkg.nets:small"))
    assert trusting._task is not None


def test_device_choice(monkeypatch):
    import pytest

    from fedmq.device import DeviceUnavailable, resolve_device

    assert resolve_device("cpu").type == "cpu"
    # What "auto" picks follows what CUDA reports, and the device it returns is one to compute on.
    auto = resolve_device("auto")
    assert (build_model("fedavg-2nn", seed=0).to(auto)(torch.zeros(2, 1, 28, 28, device=auto))).device.type == auto.type
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(DeviceUnavailable, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
