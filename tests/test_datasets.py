"""Data sets: real MNIST / Fashion-MNIST from the shared copies, a fake CIFAR-10, errors."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision

from fedmq.errors import DataUnavailable
from fedmq.task import datasets
from fedmq.task.datasets import DATASETS, TensorSplit, input_shape, load_split

CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


@pytest.fixture(autouse=True)
def fresh_split_cache():
    """Each test starts with an empty split cache, and frees the tensors it loaded."""
    datasets._read_split.cache_clear()
    yield
    datasets._read_split.cache_clear()


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.md5(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_mnist_train(data_root: Path) -> None:
    split = load_split("mnist", data_root, train=True, download=False)
    assert len(split) == 60000
    assert split.images.shape == (60000, 1, 28, 28)
    assert split.images.dtype == torch.float32
    assert split.images.is_contiguous()
    assert split.labels.dtype == torch.int64
    assert split.num_classes == 10
    assert set(split.labels.unique().tolist()) == set(range(10))
    # Normalised with the training set's own statistics: mean 0, std 1.
    assert abs(split.images.mean().item()) < 0.01
    assert abs(split.images.std().item() - 1.0) < 0.01


def test_fashion_mnist_test_split(data_root: Path) -> None:
    split = load_split("fashion-mnist", data_root, train=False, download=False)
    assert split.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(split.labels).tolist() == [1000] * 10
    # Fashion-MNIST's test set is a bit darker than its training set, but close.
    assert abs(split.images.mean().item()) < 0.05


def test_same_split_is_cached(data_root: Path) -> None:
    first = load_split("mnist", data_root, train=False, download=False)
    assert load_split("MNIST", data_root, train=False, download=False) is first
    assert load_split("mnist", data_root, train=True, download=False) is not first


def test_subset_copies_rows(data_root: Path) -> None:
    split = load_split("mnist", data_root, train=False, download=False)
    indices = np.array([5, 0, 9999, 5], dtype=np.int64)
    part = split.subset(indices)
    assert len(part) == 4
    assert part.images.is_contiguous() and part.labels.is_contiguous()
    assert torch.equal(part.images, split.images[torch.from_numpy(indices)])
    assert torch.equal(part.labels, split.labels[torch.from_numpy(indices)])
    before = split.images[5].clone()
    part.images.zero_()
    assert torch.equal(split.images[5], before), "the subset shares no storage"
    assert len(split.subset(np.array([], dtype=np.int64))) == 0


@pytest.mark.parametrize(
    "indices", [np.array([0, 10000]), np.array([-1]), np.array([0.5]), np.zeros((2, 2), np.int64)]
)
def test_subset_rejects_bad_indices(indices: np.ndarray) -> None:
    split = TensorSplit(torch.zeros(10000, 1, 2, 2), torch.zeros(10000, dtype=torch.int64), 10)
    with pytest.raises(ValueError):
        split.subset(indices)


def test_tensor_split_validates() -> None:
    with pytest.raises(ValueError):
        TensorSplit(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.int64), 10)
    with pytest.raises(ValueError):
        TensorSplit(torch.zeros(3, 1, 2, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), 10)


def test_mirror_fills_an_empty_cache(data_root: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "MNIST" / "raw").mkdir(parents=True)
    for gz in (data_root / "MNIST" / "raw").glob("*.gz"):
        shutil.copyfile(gz, mirror / "MNIST" / "raw" / gz.name)
    before = tree_digest(mirror)
    root = tmp_path / "cache"  # does not exist yet

    train = load_split("mnist", root, train=True, mirror=mirror, download=False)
    test = load_split("mnist", root, train=False, mirror=mirror, download=False)

    assert len(train) == 60000 and len(test) == 10000
    assert tree_digest(mirror) == before, "the mirror is never written"
    assert (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file()
    assert not [p for p in (root / "MNIST" / "raw").iterdir() if p.name.startswith(".")], (
        "no temporary files are left behind"
    )


@pytest.mark.parametrize(
    "name,expected",
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte.gz"),
        ("fashion-mnist", "FashionMNIST/raw/t10k-labels-idx1-ubyte.gz"),
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
    ],
)
def test_missing_files_raise_a_clear_error(name: str, expected: str, tmp_path: Path) -> None:
    with pytest.raises(DataUnavailable) as caught:
        load_split(name, tmp_path, train=True, download=False)
    message = str(caught.value)
    assert str(tmp_path / expected) in message
    assert name in message
    assert "--data-mirror" in message and "FEDMQ_DATA_MIRROR" in message


def test_mirror_without_the_files_still_raises(tmp_path: Path) -> None:
    (tmp_path / "mirror" / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(DataUnavailable, match="train-labels-idx1-ubyte.gz"):
        load_split("mnist", tmp_path / "cache", train=True, mirror=tmp_path / "mirror", download=False)


def write_fake_cifar(root: Path, per_batch: int, seed: int = 0) -> dict[str, dict]:
    """A tiny cifar-10-batches-py in torchvision's pickle format; returns the batches."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in CIFAR_FILES[:-1]:
        # Like the real files: rows of 3072 bytes, the R plane then G then B (row-major 32x32).
        batch = {
            "data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, size=per_batch).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        batches[name] = batch
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class-{i}" for i in range(10)]}, f)
    return batches


@pytest.fixture
def no_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake files cannot match CIFAR-10's md5 sums: check only that they exist."""
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    # _load_meta checks batches.meta's md5 through the module-level function.
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path)
    )


def test_cifar10_from_fake_batches(tmp_path: Path, no_cifar_md5: None) -> None:
    batches = write_fake_cifar(tmp_path, per_batch=3)

    train = load_split("cifar10", tmp_path, train=True, download=False)
    test = load_split("cifar10", tmp_path, train=False, download=False)

    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.images.dtype == torch.float32 and train.images.is_contiguous()
    assert train.num_classes == 10
    raw = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    expected = (torch.from_numpy(raw).view(-1, 3, 32, 32).float() / 255 - CIFAR_MEAN) / CIFAR_STD
    assert torch.allclose(train.images, expected, atol=1e-5), "CHW planes, per-channel normalised"
    labels = sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    assert train.labels.tolist() == labels
    assert test.labels.tolist() == batches["test_batch"]["labels"]


def test_cifar10_from_mirror(tmp_path: Path, no_cifar_md5: None) -> None:
    write_fake_cifar(tmp_path / "mirror", per_batch=2)
    before = tree_digest(tmp_path / "mirror")
    split = load_split("cifar10", tmp_path / "cache", train=False, mirror=tmp_path / "mirror", download=False)
    assert len(split) == 2
    assert tree_digest(tmp_path / "mirror") == before
    assert sorted(p.name for p in (tmp_path / "cache" / "cifar-10-batches-py").iterdir()) == sorted(
        CIFAR_FILES
    )


def test_cifar10_from_mirrored_archive(tmp_path: Path, no_cifar_md5: None) -> None:
    # A mirror may hold the original cifar-10-python.tar.gz instead of the unpacked folder.
    write_fake_cifar(tmp_path / "unpacked", per_batch=2)
    (tmp_path / "mirror").mkdir()
    with tarfile.open(tmp_path / "mirror" / "cifar-10-python.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "unpacked" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    split = load_split("cifar10", tmp_path / "cache", train=True, mirror=tmp_path / "mirror", download=False)
    assert len(split) == 10
    assert sorted(p.name for p in (tmp_path / "cache" / "cifar-10-batches-py").iterdir()) == sorted(
        CIFAR_FILES
    )


def test_failed_download_raises_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self) -> None:  # noqa: ANN001
        raise URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataUnavailable, match="download failed") as caught:
        load_split("mnist", tmp_path, train=True, download=True)
    assert "train-images-idx3-ubyte.gz" in str(caught.value)


def test_input_shape() -> None:
    assert input_shape("mnist") == (1, 28, 28)
    assert input_shape("fashion-mnist") == (1, 28, 28)
    assert input_shape("cifar10") == (3, 32, 32)
    assert set(DATASETS) == {"mnist", "fashion-mnist", "cifar10"}


def test_unknown_data_set(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mnist, fashion-mnist, cifar10"):
        load_split("imagenet", tmp_path, train=True)
    with pytest.raises(ValueError):
        input_shape("svhn")
