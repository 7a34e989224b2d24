"""Split a data set's sample indices among federated workers.

Every function returns one sorted ``int64`` index array per partition (indices into the
data set's rows). The partitions are disjoint, together cover every sample exactly once, and
depend only on the arguments: the same ``seed`` gives the same partitions on every machine,
which is how workers agree on who holds what without exchanging any data.

Schemes:

- ``"iid"``: a uniform random split; sizes differ by at most one sample.
- ``"dirichlet"``: label skew; for each class the share of every partition is drawn from
  Dir(alpha). A small ``alpha`` (0.1) is very skewed, a large one (100) nearly IID.
- ``"shards"``: the pathological non-IID split of the FedAvg paper (McMahan et al. 2017):
  sort by label, cut into equal shards, give every partition a few random shards.

Pure numpy: no torch, no I/O.
"""

from __future__ import annotations

import logging
import numbers

import numpy as np

logger = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "shards")

# How many Dirichlet draws to try before concluding that `min_size` is out of reach. A draw is
# cheap (one Dir(alpha) sample per class), so this bound only matters for hopeless settings.
_MAX_DIRICHLET_ATTEMPTS = 10_000


def partition_iid(num_samples: int, num_partitions: int, *, seed: int) -> list[np.ndarray]:
    """Split ``range(num_samples)`` uniformly at random into ``num_partitions`` parts.

    Sizes differ by at most one: the first ``num_samples % num_partitions`` partitions hold
    one extra sample.
    """
    num_samples = _check_count("num_samples", num_samples, minimum=1)
    num_partitions = _check_partitions(num_partitions, num_samples)
    rng = _rng(seed)
    permutation = rng.permutation(num_samples)
    return [_finish(part) for part in np.array_split(permutation, num_partitions)]


def partition_dirichlet(
    labels: np.ndarray,
    num_partitions: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Label-skewed split: per class, partition shares are drawn from Dir(``alpha``).

    ``labels`` is the 1-D integer label of every sample. Draws are repeated (from the same
    seeded generator, so still deterministic) until every partition holds at least
    ``min_size`` samples; after a bounded number of attempts a ValueError says to raise
    ``alpha`` or lower ``min_size``.
    """
    labels = _check_labels(labels)
    num_partitions = _check_partitions(num_partitions, len(labels))
    alpha = _check_alpha(alpha)
    min_size = _check_count("min_size", min_size, minimum=0)
    if min_size * num_partitions > len(labels):
        raise ValueError(
            f"min_size={min_size} per partition is impossible: {num_partitions} partitions "
            f"x {min_size} > {len(labels)} samples"
        )
    rng = _rng(seed)

    # Shuffle each class once; each attempt then only redraws the proportions, which is
    # enough randomness because a shuffled class cut at any points is a uniform assignment.
    classes = np.unique(labels)
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    class_sizes = np.array([len(m) for m in members])

    for attempt in range(1, _MAX_DIRICHLET_ATTEMPTS + 1):
        proportions = rng.dirichlet(np.full(num_partitions, alpha), size=len(classes))
        # Cut points per class: floor of the cumulative share, so every class's samples are
        # all handed out (the last partition takes the rounding remainder).
        cuts = np.floor(np.cumsum(proportions, axis=1)[:, :-1] * class_sizes[:, None]).astype(np.int64)
        bounds = np.concatenate(
            [np.zeros((len(classes), 1), np.int64), cuts, class_sizes[:, None]], axis=1
        )
        sizes = np.diff(bounds, axis=1).sum(axis=0)
        if sizes.min() >= min_size:
            break
    else:
        raise ValueError(
            f"dirichlet partition: no draw in {_MAX_DIRICHLET_ATTEMPTS} attempts gave every one "
            f"of {num_partitions} partitions at least min_size={min_size} samples "
            f"(alpha={alpha}, {len(labels)} samples); raise alpha, lower min_size or use "
            "fewer partitions"
        )
    logger.debug("dirichlet partition (alpha=%s) found after %d attempt(s)", alpha, attempt)

    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for class_members, class_bounds in zip(members, bounds):
        for p in range(num_partitions):
            parts[p].append(class_members[class_bounds[p] : class_bounds[p + 1]])
    return [_finish(np.concatenate(chunks)) for chunks in parts]


def partition_shards(
    labels: np.ndarray,
    num_partitions: int,
    *,
    shards_per_partition: int = 2,
    seed: int,
) -> list[np.ndarray]:
    """The FedAvg paper's pathological non-IID split.

    Samples are sorted by label (in random order within a label), cut into
    ``num_partitions * shards_per_partition`` contiguous shards, and each partition gets
    ``shards_per_partition`` shards picked at random. When the number of samples is not a
    multiple of the number of shards, the first ``num_samples % num_shards`` shards hold one
    extra sample (``np.array_split``), so no sample is dropped and shard sizes differ by at
    most one. A shard that straddles a class boundary holds two labels, so a partition holds
    ``shards_per_partition`` labels, or a few more where its shards sit at boundaries.
    """
    labels = _check_labels(labels)
    num_partitions = _check_partitions(num_partitions, len(labels))
    shards_per_partition = _check_count("shards_per_partition", shards_per_partition, minimum=1)
    num_shards = num_partitions * shards_per_partition
    if num_shards > len(labels):
        raise ValueError(
            f"{num_partitions} partitions x {shards_per_partition} shards = {num_shards} "
            f"shards, more than the {len(labels)} samples"
        )
    rng = _rng(seed)
    # Shuffle first, then a stable sort: samples of one label end up in random order, so a
    # shard does not depend on how the data set happens to be ordered.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_partitions, shards_per_partition)
    return [_finish(np.concatenate([shards[s] for s in row])) for row in assignment]


def make_partitions(
    scheme: str,
    labels: np.ndarray,
    num_partitions: int,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
) -> list[np.ndarray]:
    """Partition by ``scheme`` (one of :data:`SCHEMES`); other arguments as in each scheme.

    ``alpha`` is used by ``"dirichlet"`` only, ``shards_per_partition`` by ``"shards"`` only.
    """
    if scheme == "iid":
        labels = _check_labels(labels)
        return partition_iid(len(labels), num_partitions, seed=seed)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_partitions, alpha=alpha, seed=seed)
    if scheme == "shards":
        return partition_shards(
            labels, num_partitions, shards_per_partition=shards_per_partition, seed=seed
        )
    raise ValueError(f"unknown partition scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")


def _finish(indices: np.ndarray) -> np.ndarray:
    return np.sort(indices).astype(np.int64, copy=False)


def _rng(seed: int) -> np.random.Generator:
    seed = _check_count("seed", seed, minimum=0)
    return np.random.default_rng(seed)


def _check_count(name: str, value: object, *, minimum: int) -> int:
    # bool is an int subclass; True partitions is a bug, not a count.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_partitions(num_partitions: object, num_samples: int) -> int:
    num_partitions = _check_count("num_partitions", num_partitions, minimum=1)
    if num_partitions > num_samples:
        raise ValueError(
            f"num_partitions={num_partitions} is more than the {num_samples} samples"
        )
    return num_partitions


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"alpha must be a number, got {alpha!r}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    return float(alpha)


def _check_labels(labels: object) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {array.shape}")
    if len(array) == 0:
        raise ValueError("labels is empty: there is nothing to partition")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {array.dtype}")
    return array
