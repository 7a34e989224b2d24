"""Models: exact sizes, forward shapes, seeded initialisation, module:factory specs, errors."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from fedmq.task.models import BUILTIN_MODELS, build_model, count_parameters

# cifar-cnn by hand: conv1 3*32*9 = 864 (no bias), bn1 2*32 = 64, conv2 32*64*9 = 18,432,
# bn2 2*64 = 128, fc1 (64*8*8)*256 + 256 = 1,048,832, fc2 256*10 + 10 = 2,570.
CIFAR_CNN_PARAMETERS = 864 + 64 + 18_432 + 128 + 1_048_832 + 2_570
assert CIFAR_CNN_PARAMETERS == 1_070_890


@pytest.mark.parametrize(
    "spec,count",
    [("fedavg-cnn", 1_663_370), ("fedavg-2nn", 199_210), ("cifar-cnn", CIFAR_CNN_PARAMETERS)],
)
def test_parameter_counts(spec: str, count: int) -> None:
    assert count_parameters(build_model(spec)) == count


def test_count_parameters_skips_frozen() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))  # 8 + 3
    model[0].weight.requires_grad_(False)
    assert count_parameters(model) == 11 - 6


@pytest.mark.parametrize(
    "spec,shape", [("fedavg-cnn", (1, 28, 28)), ("fedavg-2nn", (1, 28, 28)), ("cifar-cnn", (3, 32, 32))]
)
def test_forward_shape(spec: str, shape: tuple[int, int, int]) -> None:
    model = build_model(spec, seed=0)
    with torch.no_grad():
        logits = model(torch.randn(4, *shape))
    assert logits.shape == (4, 10)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_cifar_cnn_has_batchnorm_buffers() -> None:
    buffers = dict(build_model("cifar-cnn").named_buffers())
    assert buffers["bn1.running_mean"].dtype == torch.float32
    assert buffers["bn2.running_var"].dtype == torch.float32
    assert buffers["bn1.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("spec", BUILTIN_MODELS)
def test_seed_gives_identical_weights(spec: str) -> None:
    first = build_model(spec, seed=123).state_dict()
    again = build_model(spec, seed=123).state_dict()
    other = build_model(spec, seed=124).state_dict()
    assert first.keys() == again.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)


def test_seed_leaves_global_rng_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(5)
    torch.manual_seed(7)
    build_model("fedavg-2nn", seed=99)
    assert torch.equal(torch.rand(5), expected)


def test_without_seed_weights_follow_global_rng() -> None:
    torch.manual_seed(5)
    first = build_model("fedavg-2nn").state_dict()
    second = build_model("fedavg-2nn").state_dict()
    assert not torch.equal(first["fc1.weight"], second["fc1.weight"])


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module importable from sys.path with good and bad factories; returns its name."""
    name = f"fedmq_test_factory_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def tiny():
                return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))

            class Zoo:
                @staticmethod
                def make():
                    return nn.Linear(2, 2)

            def not_a_model():
                return 42

            NOT_CALLABLE = 5
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_module_factory_spec(factory_module: str) -> None:
    model = build_model(f"{factory_module}:tiny")
    assert count_parameters(model) == (4 * 3 + 3) + (3 * 2 + 2)
    assert isinstance(build_model(f"{factory_module}:Zoo.make"), nn.Linear)


def test_module_factory_spec_is_seeded(factory_module: str) -> None:
    first = build_model(f"{factory_module}:tiny", seed=1).state_dict()
    again = build_model(f"{factory_module}:tiny", seed=1).state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)


def test_unknown_name_lists_builtins_and_factory_form() -> None:
    with pytest.raises(ValueError) as caught:
        build_model("resnet-9000")
    message = str(caught.value)
    assert all(name in message for name in BUILTIN_MODELS)
    assert "module:factory" in message


def test_factory_errors_name_the_spec(factory_module: str) -> None:
    with pytest.raises(ValueError, match="no_such_module_xyz:make"):
        build_model("no_such_module_xyz:make")
    with pytest.raises(ValueError, match="has no attribute"):
        build_model(f"{factory_module}:missing")
    with pytest.raises(TypeError, match="not callable"):
        build_model(f"{factory_module}:NOT_CALLABLE")
    with pytest.raises(TypeError, match=f"{factory_module}:not_a_model.*int"):
        build_model(f"{factory_module}:not_a_model")


@pytest.mark.parametrize("spec", ["", "   ", ":tiny", "module:"])
def test_malformed_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        build_model(spec)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed(seed: object) -> None:
    with pytest.raises(ValueError, match="seed"):
        build_model("fedavg-2nn", seed=seed)  # type: ignore[arg-type]
