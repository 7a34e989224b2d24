"""Partition-only loading: a worker's rows, read without converting the whole split, are
exactly the rows the whole-split path gives."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmq.errors import DataUnavailable
from fedmq.task import datasets, make_partitions
from fedmq.task.datasets import load_labels, load_rows, load_split
from tests.test_datasets import no_cifar_md5, write_fake_cifar  # noqa: F401 - fixture


@pytest.fixture(autouse=True)
def fresh_split_cache():
    datasets.forget_cached_splits()
    yield
    datasets.forget_cached_splits()


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_rows_equal_the_whole_split_path(data_root: Path, scheme: str) -> None:
    whole = load_split("mnist", data_root, train=True, download=False)
    labels = load_labels("mnist", data_root, train=True, download=False)
    assert labels.dtype == np.int64
    assert np.array_equal(labels, whole.labels.numpy())
    parts = make_partitions(scheme, labels, 10, seed=3, alpha=0.3)
    for index in (0, 7):
        before = whole.subset(parts[index])
        after = load_rows("mnist", data_root, parts[index], train=True, download=False)
        assert after.images.shape == before.images.shape == (len(parts[index]), 1, 28, 28)
        assert torch.equal(after.images, before.images), "bit-identical pixels"
        assert torch.equal(after.labels, before.labels)
        assert after.num_classes == before.num_classes == 10
        assert after.images.is_contiguous()


def test_rows_keep_the_order_asked_for(data_root: Path) -> None:
    whole = load_split("fashion-mnist", data_root, train=False, download=False)
    rows = np.array([9999, 3, 3, 500], dtype=np.int64)
    part = load_rows("fashion-mnist", data_root, rows, train=False, download=False)
    assert torch.equal(part.images, whole.images[torch.from_numpy(rows)])
    assert part.labels.tolist() == whole.labels[torch.from_numpy(rows)].tolist()


def test_cifar_rows_equal_the_whole_split_path(tmp_path: Path, no_cifar_md5: None) -> None:  # noqa: F811
    write_fake_cifar(tmp_path, per_batch=4)
    whole = load_split("cifar10", tmp_path, train=True, download=False)
    labels = load_labels("cifar10", tmp_path, train=True, download=False)
    assert labels.tolist() == whole.labels.tolist()
    rows = np.array([0, 19, 5], dtype=np.int64)
    part = load_rows("cifar10", tmp_path, rows, train=True, download=False)
    assert torch.equal(part.images, whole.images[torch.from_numpy(rows)])
    assert torch.equal(part.labels, whole.labels[torch.from_numpy(rows)])


@pytest.mark.parametrize("rows", [np.array([60000]), np.array([-1]), np.array([0.5]), np.zeros((2, 2), np.int64)])
def test_bad_rows_are_refused(data_root: Path, rows: np.ndarray) -> None:
    with pytest.raises(ValueError):
        load_rows("mnist", data_root, rows, train=True, download=False)


def test_truncated_images_file_is_named(data_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    shutil.copytree(data_root / "MNIST", root / "MNIST")
    load_labels("mnist", root, train=False, download=False)  # unpacks the .gz files
    images = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100_000])
    with pytest.raises(DataUnavailable, match="t10k-images-idx3-ubyte.*truncated"):
        load_rows("mnist", root, np.array([0]), train=False, download=False)


def test_missing_files_raise_the_same_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailable, match="--data-mirror"):
        load_labels("mnist", tmp_path, train=True, download=False)
