"""The learning task: data sets as tensors, how they are split among workers, and the models.

- :mod:`fedmq.task.datasets`: load a data set split (MNIST, Fashion-MNIST, CIFAR-10) as
  normalised tensors from a local cache, a read-only mirror or the internet.
- :mod:`fedmq.task.partitions`: deterministic IID / Dirichlet / shard splits of sample indices.
- :mod:`fedmq.task.models`: build a model from a spec (a built-in name or ``module:factory``).
"""

from fedmq.task.datasets import DATASETS, TensorSplit, forget_cached_splits, input_shape, load_split
from fedmq.task.models import BUILTIN_MODELS, build_model, count_parameters
from fedmq.task.partitions import (
    SCHEMES,
    make_partitions,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)

__all__ = [
    "BUILTIN_MODELS",
    "DATASETS",
    "SCHEMES",
    "TensorSplit",
    "build_model",
    "count_parameters",
    "forget_cached_splits",
    "input_shape",
    "load_split",
    "make_partitions",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
]
