"""Where a worker's training data comes from: the seam behind ``--data``.

- ``--data`` empty: :class:`BuiltinPartition`, this worker's partition of the run's built-in
  data set (the simulation mode). Only the partition's rows are converted to tensors.
- ``--data PATH``: :class:`ImageFolderSource`, a folder of images, one sub-folder per class.
- ``--data package.module:factory``: :class:`FactorySource`, whatever a function of the site's
  own returns: a torch ``Dataset`` of (input, label) pairs, a ``TensorDataset`` or a pair of
  tensors (inputs, labels). Importing a module runs its code, so only factories listed in the
  operator's ``--trusted-data-factories`` are imported.

:func:`prepare_local_data` turns any source into what the trainer needs: the data checked
against the run's model, with the held-out evaluation rows set apart.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

from fedmq.messages import TaskSpec
from fedmq.task import forget_cached_splits, input_shape, load_labels, load_rows, make_partitions
from fedmq.task.factories import looks_like_factory, resolve_factory
from worker.image_folder import read_image_folder
from worker.local_data import DataMismatch, LocalData, LocalDataError, UntrustedFactory, check_fits, hold_out

log = logging.getLogger(__name__)


class DataSource(Protocol):
    """One worker's data. ``key`` says what the loaded data depends on: the worker loads again
    only when the key changes (an image folder does not care which partition index it holds).
    ``partitioned`` is True when the data is a partition of the run's data set (its updates name
    the partition index), False for a site's own data (they say -1)."""

    partitioned: bool

    def describe(self) -> str: ...

    def key(self, task: TaskSpec, partition: int) -> tuple: ...

    def load(self, task: TaskSpec, partition: int) -> LocalData: ...


@dataclass(frozen=True)
class BuiltinPartition:
    """Partition ``partition`` of the run's built-in data set, from the cache at ``root``."""

    root: Path
    mirror: Path | None = None
    download: bool = True
    partitioned = True

    def describe(self) -> str:
        return "the built-in partition"

    def key(self, task: TaskSpec, partition: int) -> tuple:
        return (task, partition)

    def load(self, task: TaskSpec, partition: int) -> LocalData:
        labels = load_labels(task.dataset, self.root, train=True, mirror=self.mirror, download=self.download)
        parts = make_partitions(task.partition_scheme, labels, task.num_partitions, seed=task.seed,
                                alpha=task.dirichlet_alpha, shards_per_partition=task.shards_per_partition)
        rows = load_rows(task.dataset, self.root, parts[partition], train=True, mirror=self.mirror,
                         download=False)
        forget_cached_splits()  # CIFAR-10's uint8 arrays; the idx files are only memory-mapped
        return LocalData(rows.images, rows.labels)


@dataclass(frozen=True)
class ImageFolderSource:
    """The images under ``path``, shaped and normalised as the run's data set."""

    path: Path
    partitioned = False

    def describe(self) -> str:
        return f"the image folder {self.path}"

    def key(self, task: TaskSpec, partition: int) -> tuple:
        return (task.dataset,)  # it names the image size and normalisation

    def load(self, task: TaskSpec, partition: int) -> LocalData:
        return read_image_folder(self.path, dataset=task.dataset)


@dataclass(frozen=True)
class FactorySource:
    """What the trusted zero-argument function ``spec`` (``package.module:factory``) returns."""

    spec: str
    partitioned = False

    def describe(self) -> str:
        return f"the data factory {self.spec}"

    def key(self, task: TaskSpec, partition: int) -> tuple:
        return ()

    def load(self, task: TaskSpec, partition: int) -> LocalData:
        try:
            factory = resolve_factory(self.spec, what="data")
        except (ValueError, TypeError) as error:
            raise LocalDataError(str(error)) from error
        return dataset_to_tensors(factory(), self.spec)


def open_data_source(spec: str, *, trusted_factories: str | Iterable[str] = (), root: Path | str = ".",
                     mirror: Path | str | None = None, download: bool = True) -> DataSource:
    """The source ``--data spec`` names: empty for the built-in partition (from ``root``,
    ``mirror``, ``download``), an existing folder, or a trusted ``package.module:factory``.

    Nothing is read or imported here; an untrusted factory raises :class:`UntrustedFactory`.
    """
    spec = spec.strip()
    if not spec:
        return BuiltinPartition(Path(root), Path(mirror) if mirror else None, download)
    if Path(spec).expanduser().is_dir() or not looks_like_factory(spec):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise LocalDataError(f"--data {spec}: no such folder (nor a package.module:factory)")
        return ImageFolderSource(path)
    trusted = {s.strip() for s in (trusted_factories.split(",") if isinstance(trusted_factories, str)
                                   else trusted_factories) if s.strip()}
    if spec not in trusted:
        raise UntrustedFactory(
            f"--data {spec} names a data factory this worker does not trust, so it is not imported; "
            "list it in --trusted-data-factories (FEDMQ_TRUSTED_DATA_FACTORIES) to allow it")
    return FactorySource(spec)


@dataclass(frozen=True)
class PreparedData:
    """Data ready for training: ``train`` (its size is the FedAvg weight), ``held_out`` for
    federated evaluation (None with no eval fraction), ``num_classes`` the model's outputs."""

    train: LocalData
    held_out: LocalData | None
    num_classes: int


def prepare_local_data(source: DataSource, task: TaskSpec, partition: int, *, model: nn.Module,
                       eval_fraction: float) -> PreparedData:
    """Load ``source``'s data, check it fits ``model`` (DataMismatch otherwise), hold out the
    evaluation rows. The split's seed depends on the run's seed and the source's key only, so a
    restarted worker holds out the same rows."""
    data = source.load(task, partition)
    classes = check_fits(data, model, model_name=task.model, task_shape=input_shape(task.dataset))
    seed = zlib.crc32(repr((task.seed, source.key(task, partition))).encode())
    train, held_out = hold_out(data, eval_fraction, seed=seed)
    return PreparedData(train, held_out, classes)


def dataset_to_tensors(result: object, spec: str) -> LocalData:
    """A factory's result as one :class:`LocalData`: tensors are used as they are (floating
    inputs as float32), a map-style ``Dataset`` is read once, item by item, into one tensor."""
    class_names = tuple(str(c) for c in getattr(result, "classes", ()) or ())
    if isinstance(result, TensorDataset) and len(result.tensors) == 2:
        inputs, labels = result.tensors
    elif isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(t, torch.Tensor) for t in result):
        inputs, labels = result
    elif isinstance(result, IterableDataset) or not (hasattr(result, "__len__") and hasattr(result, "__getitem__")):
        raise LocalDataError(f"data factory {spec} returned {type(result).__name__}; want a map-style torch "
                             "Dataset of (input, label) pairs, a TensorDataset or a pair of tensors")
    else:
        inputs, labels = _read_items(result, spec)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise LocalDataError(f"data factory {spec}: labels must be a 1-D tensor of class indices")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DataMismatch(f"data factory {spec}: labels must be integer class indices, got {labels.dtype}")
    if inputs.dtype.is_floating_point:
        inputs = inputs.to(torch.float32)  # no copy when it already is
    return LocalData(inputs.contiguous(), labels.to(torch.int64).contiguous(), class_names)


def _read_items(dataset: object, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise LocalDataError(f"data factory {spec} returned an empty data set")
    inputs: torch.Tensor | None = None
    labels = torch.empty(n, dtype=torch.int64)
    for index in range(n):
        item = dataset[index]  # type: ignore[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise LocalDataError(f"data factory {spec}: item {index} is {type(item).__name__}, "
                                 "want an (input, label) pair")
        example = _as_tensor(item[0], spec, index)
        if inputs is None:
            inputs = torch.empty((n, *example.shape), dtype=example.dtype)
        elif example.shape != inputs.shape[1:]:
            raise DataMismatch(f"data factory {spec}: item {index}'s input has shape {list(example.shape)}, "
                               f"item 0's {list(inputs.shape[1:])}; every input must have the same shape")
        inputs[index] = example
        labels[index] = _as_label(item[1], spec, index)
    assert inputs is not None
    return inputs, labels


def _as_tensor(value: object, spec: str, index: int) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise LocalDataError(f"data factory {spec}: item {index}'s input is {type(value).__name__}; return tensors "
                         "(for PIL images add torchvision.transforms.ToTensor() and the normalisation)")


def _as_label(value: object, spec: str, index: int) -> int:
    if isinstance(value, (torch.Tensor, np.ndarray)) and np.prod(value.shape) == 1:
        value = value.item()  # a 0-d tensor or one-element array, as many datasets return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise DataMismatch(f"data factory {spec}: item {index}'s label is {value!r}; want an integer class index")
    return int(value)
