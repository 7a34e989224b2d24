"""The learning task: data sets as tensors, how they are split among workers, and the models.

- :mod:`fedmq.task.data_files`: put a data set's files in a local cache (mirror, download).
- :mod:`fedmq.task.datasets`: read a data set split (MNIST, Fashion-MNIST, CIFAR-10), or only
  some of its rows, as normalised tensors.
- :mod:`fedmq.task.factories`: resolve ``package.module:factory`` specs (models, local data).
- :mod:`fedmq.task.partitions`: deterministic IID / Dirichlet / shard splits of sample indices.
- :mod:`fedmq.task.models`: build a model from a spec (a built-in name or ``module:factory``).
"""

from fedmq.task.datasets import (
    DATASETS,
    TensorSplit,
    forget_cached_splits,
    input_shape,
    load_labels,
    load_rows,
    load_split,
    normalisation,
    normalise,
)
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
    "load_labels",
    "load_rows",
    "load_split",
    "normalisation",
    "normalise",
    "make_partitions",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
]
