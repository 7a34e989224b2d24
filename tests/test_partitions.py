"""Partitions: sizes, disjointness, coverage, determinism, label skew, argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.task.partitions import (
    SCHEMES,
    make_partitions,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)


def mnist_like_labels(seed: int = 0, num_samples: int = 6000) -> np.ndarray:
    """Ten classes of uneven size in random order, like MNIST's 5421..6742 per digit."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.9, 1.1, size=10)
    return rng.choice(10, size=num_samples, p=weights / weights.sum()).astype(np.int64)


def assert_valid_partition(parts: list[np.ndarray], num_samples: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert part.ndim == 1
        assert np.all(np.diff(part) > 0), "each partition is sorted, without repeats"
    merged = np.concatenate(parts)
    assert len(merged) == num_samples, "disjoint and covering: every index exactly once"
    assert np.array_equal(np.sort(merged), np.arange(num_samples))


def label_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean over partitions of the largest class share (0.1 is uniform over 10 classes)."""
    shares = [np.bincount(labels[part], minlength=10).max() / len(part) for part in parts]
    return float(np.mean(shares))


@pytest.mark.parametrize("num_samples,num_partitions", [(10, 1), (10, 10), (103, 7), (60000, 100)])
def test_iid_sizes_and_coverage(num_samples: int, num_partitions: int) -> None:
    parts = partition_iid(num_samples, num_partitions, seed=3)
    assert len(parts) == num_partitions
    assert_valid_partition(parts, num_samples)
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_shuffled() -> None:
    parts = partition_iid(1000, 2, seed=0)
    # A contiguous split would put 0..499 in the first partition.
    assert not np.array_equal(parts[0], np.arange(500))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_a_partition(scheme: str) -> None:
    labels = mnist_like_labels()
    parts = make_partitions(scheme, labels, 10, seed=1, alpha=0.5, shards_per_partition=2)
    assert len(parts) == 10
    assert_valid_partition(parts, len(labels))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_by_seed(scheme: str) -> None:
    labels = mnist_like_labels()
    first = make_partitions(scheme, labels, 8, seed=42)
    again = make_partitions(scheme, labels, 8, seed=42)
    other = make_partitions(scheme, labels, 8, seed=43)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))


def test_dirichlet_skew_grows_as_alpha_falls() -> None:
    labels = mnist_like_labels(num_samples=20000)
    skew = {
        alpha: label_skew(partition_dirichlet(labels, 20, alpha=alpha, seed=5), labels)
        for alpha in (100.0, 1.0, 0.1)
    }
    assert skew[100.0] < skew[1.0] < skew[0.1]
    assert skew[100.0] < 0.15, "alpha=100 is close to IID (uniform share 0.1)"
    assert skew[0.1] > 0.5, "alpha=0.1 gives most of a partition to one class"


def test_dirichlet_min_size() -> None:
    labels = mnist_like_labels()
    # With this seed the first draws leave a partition under 200 samples: resampling kicks in.
    parts = partition_dirichlet(labels, 10, alpha=0.3, seed=3, min_size=200)
    assert min(len(part) for part in parts) >= 200
    assert_valid_partition(parts, len(labels))


def test_dirichlet_unreachable_min_size_raises() -> None:
    # Four classes, each must go almost whole to one partition: 40 partitions of >= 20 is
    # possible in principle (800 <= 1000) but never happens with alpha that small.
    labels = np.repeat(np.arange(4), 250)
    with pytest.raises(ValueError, match="raise alpha"):
        partition_dirichlet(labels, 40, alpha=0.001, seed=0, min_size=20)


def test_shards_hold_few_labels_when_classes_fill_whole_shards() -> None:
    # 10 classes x 600 samples, 20 partitions x 2 shards of 150: no shard crosses a class.
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 600))
    parts = partition_shards(labels, 20, shards_per_partition=2, seed=4)
    assert_valid_partition(parts, len(labels))
    assert all(len(part) == 300 for part in parts)
    assert all(len(np.unique(labels[part])) <= 2 for part in parts)


def test_shards_on_uneven_mnist_like_labels() -> None:
    labels = mnist_like_labels()
    parts = partition_shards(labels, 100, shards_per_partition=2, seed=7)
    assert_valid_partition(parts, len(labels))
    distinct = np.array([len(np.unique(labels[part])) for part in parts])
    # Each shard holds one label, or two where it straddles a class boundary (9 at most).
    assert distinct.max() <= 2 + 2
    assert (distinct > 2 + 1).sum() <= 1
    assert distinct.mean() <= 2.3
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 2, "shard sizes differ by at most one sample"


def test_shards_keep_leftover_samples() -> None:
    labels = np.arange(103) % 5
    parts = partition_shards(labels, 5, shards_per_partition=2, seed=0)
    assert_valid_partition(parts, 103)


@pytest.mark.parametrize(
    "call",
    [
        lambda: partition_iid(10, 0, seed=0),
        lambda: partition_iid(10, 11, seed=0),
        lambda: partition_iid(0, 1, seed=0),
        lambda: partition_iid(10, 2.5, seed=0),
        lambda: partition_iid(10, True, seed=0),
        lambda: partition_iid(10, 2, seed=-1),
        lambda: partition_dirichlet(np.zeros(100, np.int64), 2, alpha=0.0, seed=0),
        lambda: partition_dirichlet(np.zeros(100, np.int64), 2, alpha=float("nan"), seed=0),
        lambda: partition_dirichlet(np.zeros(100, np.int64), 20, alpha=1.0, seed=0, min_size=10),
        lambda: partition_dirichlet(np.zeros(100, np.int64), 2, alpha=1.0, seed=0, min_size=-1),
        lambda: partition_dirichlet(np.zeros(100, np.float32), 2, alpha=1.0, seed=0),
        lambda: partition_dirichlet(np.zeros((10, 10), np.int64), 2, alpha=1.0, seed=0),
        lambda: partition_dirichlet(np.zeros(0, np.int64), 1, alpha=1.0, seed=0),
        lambda: partition_shards(np.zeros(10, np.int64), 6, shards_per_partition=2, seed=0),
        lambda: partition_shards(np.zeros(10, np.int64), 2, shards_per_partition=0, seed=0),
        lambda: make_partitions("random", np.zeros(10, np.int64), 2, seed=0),
    ],
)
def test_bad_arguments_raise(call) -> None:  # noqa: ANN001
    with pytest.raises(ValueError):
        call()


def test_unknown_scheme_lists_the_schemes() -> None:
    with pytest.raises(ValueError, match="iid, dirichlet, shards"):
        make_partitions("powerlaw", np.zeros(10, np.int64), 2, seed=0)
