"""The worker's data sources: an ImageFolder of PNGs written from real MNIST, module:factory
data sets, the fit check against the run's model, trust, and the held-out evaluation split."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from fedmq.messages import TaskSpec
from fedmq.task import build_model, load_rows, load_split, make_partitions
from fedmq.task.datasets import forget_cached_splits
from worker.data_sources import (BuiltinPartition, FactorySource, ImageFolderSource, open_data_source,
                                 prepare_local_data)
from worker.image_folder import read_image_folder
from worker.local_data import DataMismatch, LocalData, LocalDataError, UntrustedFactory, check_fits, hold_out

PER_CLASS = 20


def task(model: str = "fedavg-2nn", dataset: str = "mnist", partitions: int = 4) -> TaskSpec:
    return TaskSpec(dataset, model, "iid", partitions, 0.5, 2, 0)


def write_mnist_pngs(data_root: Path, folder: Path, classes: list[int], per_class: int) -> list[int]:
    """PNGs of the first ``per_class`` test images of each class in ``classes``, one
    zero-padded sub-folder per class; returns the test-set rows written, in folder order."""
    mnist = torchvision.datasets.MNIST(str(data_root), train=False, download=False)
    labels = mnist.targets.numpy()
    written = []
    for label in classes:
        (folder / f"{label:02d}").mkdir(parents=True, exist_ok=True)
        for row in np.flatnonzero(labels == label)[:per_class]:
            Image.fromarray(mnist.data[row].numpy(), mode="L").save(folder / f"{label:02d}" / f"img{row:05d}.png")
            written.append(int(row))
    return written


@pytest.fixture(scope="module")
def mnist_folder(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    folder = tmp_path_factory.mktemp("site") / "images"
    return folder, write_mnist_pngs(data_root, folder, list(range(10)), PER_CLASS)


def test_image_folder_of_mnist_pngs_gives_mnist_tensors(data_root: Path, mnist_folder) -> None:
    folder, rows = mnist_folder
    data = read_image_folder(folder, dataset="mnist")
    expected = load_rows("mnist", data_root, np.array(rows), train=False, download=False)
    assert data.class_names == tuple(f"{c:02d}" for c in range(10))
    assert data.inputs.shape == (10 * PER_CLASS, 1, 28, 28) and data.inputs.dtype == torch.float32
    # Files sort by name within a class folder, and the names follow the test-set rows.
    assert torch.equal(data.labels, expected.labels)
    assert torch.equal(data.inputs, expected.images), "PNG round trip + the same normalisation"


def test_image_folder_converts_and_resizes_to_the_runs_shape(tmp_path: Path) -> None:
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "a" / "red.png")
    Image.new("L", (28, 28), 0).save(tmp_path / "b" / "black.png")
    grey = read_image_folder(tmp_path, dataset="mnist")
    colour = read_image_folder(tmp_path, dataset="cifar10")
    assert grey.inputs.shape == (2, 1, 28, 28)
    assert colour.inputs.shape == (2, 3, 32, 32)
    assert grey.labels.tolist() == [0, 1]
    black = (0.0 - 0.1307) / 0.3081
    assert torch.allclose(grey.inputs[1], torch.full((1, 28, 28), black))
    red = colour.inputs[0, :, 16, 16]
    assert red[0] > 1.0 and red[1] < -1.0 and red[2] < -1.0, "RGB kept, CIFAR-10 normalisation applied"


def test_image_folder_feeds_the_model(mnist_folder) -> None:
    folder, _ = mnist_folder
    source = open_data_source(str(folder))
    assert isinstance(source, ImageFolderSource)
    prepared = prepare_local_data(source, task(), 3, model=build_model("fedavg-cnn"), eval_fraction=0.1)
    assert prepared.num_classes == 10
    assert len(prepared.train) == 180 and len(prepared.held_out) == 20
    assert source.key(task(), 0) == source.key(task(), 3), "the partition index does not reload a folder"


def test_image_folder_with_fewer_classes_than_the_model_is_refused(data_root: Path, tmp_path: Path) -> None:
    write_mnist_pngs(data_root, tmp_path, [c for c in range(10) if c != 3], 2)
    data = read_image_folder(tmp_path, dataset="mnist")
    with pytest.raises(DataMismatch, match=r"9 classes \(00, 01, 02, 04.*10 outputs.*empty one"):
        check_fits(data, build_model("fedavg-2nn"), model_name="fedavg-2nn")
    (tmp_path / "03").mkdir()  # an empty folder keeps the indices aligned with other sites
    data = read_image_folder(tmp_path, dataset="mnist")
    assert check_fits(data, build_model("fedavg-2nn"), model_name="fedavg-2nn") == 10
    assert data.labels.max() == 9 and 3 not in data.labels.tolist()


def test_image_folder_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(LocalDataError, match="no such folder"):
        read_image_folder(tmp_path / "missing", dataset="mnist")
    with pytest.raises(LocalDataError, match="sub-folder per class"):
        read_image_folder(tmp_path, dataset="mnist")
    (tmp_path / "cat").mkdir()
    with pytest.raises(LocalDataError, match="hold no images"):
        read_image_folder(tmp_path, dataset="mnist")
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(LocalDataError, match="broken.png"):
        read_image_folder(tmp_path, dataset="mnist")


FACTORIES = """
    import pathlib
    import torch
    from torch.utils.data import Dataset, TensorDataset

    pathlib.Path({marker!r}).write_text("imported")

    class Pairs(Dataset):
        classes = [str(i) for i in range(10)]
        def __init__(self, n=30, shape=(1, 28, 28), top=10):
            g = torch.Generator().manual_seed(1)
            self.x = torch.randn((n, *shape), generator=g, dtype=torch.float64)
            self.y = torch.arange(n) % top
        def __len__(self):
            return len(self.y)
        def __getitem__(self, i):
            return self.x[i], self.y[i]

    def pairs():
        return Pairs()

    def tensors():
        return TensorDataset(torch.randn(12, 1, 28, 28), torch.arange(12) % 10)

    def pair_of_tensors():
        return torch.randn(8, 784), torch.arange(8)

    def colour_images():
        return Pairs(shape=(3, 32, 32))

    def twelve_classes():
        data = Pairs(top=12)
        data.classes = None  # only the labels say how many classes there are
        return data

    def named_twelve():
        data = Pairs(top=5)
        data.classes = [f"c{{i}}" for i in range(12)]
        return data

    class Ragged(Dataset):
        def __len__(self):
            return 2
        def __getitem__(self, i):
            return torch.zeros(1, 28, 28 + i), 0

    def ragged():
        return Ragged()

    def float_labels():
        return torch.randn(4, 784), torch.tensor([0.0, 1.5, 2.0, 3.0])

    def not_a_dataset():
        return 42
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    name = f"fedmq_test_data_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported.txt"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORIES.format(marker=str(marker))))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, marker


def load_factory(module: str, factory: str, model: str = "fedavg-2nn", eval_fraction: float = 0.0):
    spec = f"{module}:{factory}"
    source = open_data_source(spec, trusted_factories=f"other.module:make, {spec}")
    assert isinstance(source, FactorySource)
    return prepare_local_data(source, task(model), 0, model=build_model(model), eval_fraction=eval_fraction)


def test_factory_dataset_of_pairs(factory_module) -> None:
    module, marker = factory_module
    prepared = load_factory(module, "pairs", "fedavg-cnn", eval_fraction=0.2)
    assert marker.read_text() == "imported"
    assert len(prepared.train) == 24 and len(prepared.held_out) == 6, "30 items, 20 % held out"
    assert prepared.train.inputs.dtype == torch.float32, "float64 inputs become float32"
    assert prepared.train.class_names == tuple(str(i) for i in range(10))
    everything = torch.cat([prepared.train.labels, prepared.held_out.labels]).sort().values
    assert torch.equal(everything, (torch.arange(30) % 10).sort().values)


@pytest.mark.parametrize("factory,count,shape", [("tensors", 12, (1, 28, 28)), ("pair_of_tensors", 8, (784,))])
def test_factory_tensors_are_used_as_they_are(factory_module, factory: str, count: int, shape: tuple) -> None:
    prepared = load_factory(factory_module[0], factory)
    assert len(prepared.train) == count and prepared.held_out is None
    assert prepared.train.example_shape == shape


def test_inputs_of_the_wrong_shape_are_refused(factory_module) -> None:
    with pytest.raises(DataMismatch) as caught:
        load_factory(factory_module[0], "colour_images", "fedavg-cnn")
    message = str(caught.value)
    assert "[3, 32, 32]" in message and "[1, 28, 28]" in message and "fedavg-cnn" in message


def test_labels_beyond_the_models_outputs_are_refused(factory_module) -> None:
    with pytest.raises(DataMismatch, match=r"labels run up to 11 \(12 classes\).*fedavg-2nn.*10 outputs"):
        load_factory(factory_module[0], "twelve_classes")


def test_named_classes_must_match_the_models_outputs(factory_module) -> None:
    with pytest.raises(DataMismatch, match="12 classes .c0, c1.*10 outputs"):
        load_factory(factory_module[0], "named_twelve")


@pytest.mark.parametrize("factory,error,match", [
    ("ragged", DataMismatch, r"item 1's input has shape \[1, 28, 29\]"),
    ("float_labels", DataMismatch, "integer class indices"),
    ("not_a_dataset", LocalDataError, "returned int"),
    ("missing", LocalDataError, "has no attribute"),
])
def test_bad_factory_data_is_refused(factory_module, factory: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        load_factory(factory_module[0], factory)


def test_untrusted_factory_is_refused_and_never_imported(factory_module) -> None:
    module, marker = factory_module
    with pytest.raises(UntrustedFactory, match="--trusted-data-factories"):
        open_data_source(f"{module}:pairs", trusted_factories=f"{module}:tensors")
    with pytest.raises(UntrustedFactory):
        open_data_source(f"{module}:pairs")
    assert module not in sys.modules and not marker.exists()


def test_a_path_that_is_neither_folder_nor_factory(tmp_path: Path) -> None:
    with pytest.raises(LocalDataError, match="no such folder"):
        open_data_source(str(tmp_path / "nowhere"))
    assert isinstance(open_data_source("", root=tmp_path), BuiltinPartition)


def test_builtin_partition_is_the_same_rows_as_before(data_root: Path) -> None:
    spec = TaskSpec("mnist", "fedavg-2nn", "dirichlet", 5, 0.3, 2, 7)
    whole = load_split("mnist", data_root, train=True, download=False)
    parts = make_partitions("dirichlet", whole.labels.numpy(), 5, seed=7, alpha=0.3)
    before = whole.subset(parts[2])
    forget_cached_splits()
    after = BuiltinPartition(data_root, download=False).load(spec, 2)
    assert torch.equal(after.inputs, before.images) and torch.equal(after.labels, before.labels)


def test_hold_out_is_seeded_disjoint_and_complete() -> None:
    data = LocalData(torch.arange(100, dtype=torch.float32).view(100, 1), torch.arange(100) % 10)
    train, held = hold_out(data, 0.25, seed=5)
    again, held_again = hold_out(data, 0.25, seed=5)
    _, other = hold_out(data, 0.25, seed=6)
    assert len(train) == 75 and len(held) == 25
    assert torch.equal(held.inputs, held_again.inputs) and torch.equal(train.inputs, again.inputs)
    assert not torch.equal(held.inputs, other.inputs)
    rows = torch.cat([train.inputs, held.inputs]).flatten().sort().values
    assert torch.equal(rows, torch.arange(100, dtype=torch.float32))
    assert hold_out(data, 0.0, seed=5) == (data, None)
    assert len(hold_out(data, 0.001, seed=5)[1]) == 1, "a positive fraction holds out at least one row"
    with pytest.raises(ValueError):
        hold_out(data, 1.0, seed=5)
