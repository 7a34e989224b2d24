"""Read a built-in data set (MNIST, Fashion-MNIST, CIFAR-10) as normalised in-memory tensors.

The files come through :mod:`fedmq.task.data_files` (cache, mirror, download). Two ways to read:

- :func:`load_split`: a whole split as one float tensor (the aggregator's test set). The
  conversion is done on the whole uint8 array at once rather than through per-item PIL
  transforms, which would be far too slow.
- :func:`load_labels` then :func:`load_rows`: a worker reads the labels (to compute the
  partitions), then converts only its own partition's rows to float. For MNIST-like data the
  images file is memory-mapped, so a worker does not even read the other rows; 10 workers on
  one host no longer each build the whole 188 MB float training set.

Both give bit-identical rows: the same uint8 pixels go through the same float operations.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedmq.errors import DataUnavailable
from fedmq.task.data_files import DATASETS, canonical_name, dataset_class, ensure_files, idx_files

logger = logging.getLogger(__name__)

__all__ = ["DATASETS", "TensorSplit", "forget_cached_splits", "input_shape", "load_labels", "load_rows",
           "load_split", "normalisation", "normalise"]

# Per-channel mean and standard deviation of the training images, pixel values in [0, 1].
_NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}

_NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10}


@dataclass(frozen=True)
class TensorSplit:
    """One split of a data set, in memory.

    ``images``: float32 [N, C, H, W], normalised with the data set's mean/std.
    ``labels``: int64 [N], class indices in ``range(num_classes)``.

    Splits returned by :func:`load_split` are shared by every caller in the process: read
    them, do not modify them in place (use :meth:`subset` for a private copy).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.dtype != torch.float32 or self.images.dim() != 4:
            raise ValueError(
                f"images must be float32 [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"labels must be int64 [N], got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "TensorSplit":
        """A new split holding copies of the rows at ``indices`` (1-D integers), contiguous."""
        rows = torch.from_numpy(_check_rows(indices, len(self)))
        # index_select allocates new, contiguous storage: the subset shares nothing.
        return TensorSplit(
            images=self.images.index_select(0, rows),
            labels=self.labels.index_select(0, rows),
            num_classes=self.num_classes,
        )


def input_shape(name: str) -> tuple[int, int, int]:
    """The shape (C, H, W) of one image of data set ``name``."""
    return _INPUT_SHAPES[canonical_name(name)]


def normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of data set ``name``'s training images, pixels in [0, 1]."""
    return _NORMALISATION[canonical_name(name)]


def normalise(pixels: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 pixels [N, C, H, W] to float32 normalised as data set ``name`` is (a new tensor)."""
    mean, std = normalisation(name)
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != len(mean):
        raise ValueError(f"want uint8 pixels [N, {len(mean)}, H, W], got {pixels.dtype} {tuple(pixels.shape)}")
    images = pixels.to(torch.float32).div_(255.0).contiguous()
    channel_shape = (1, len(mean), 1, 1)
    images.sub_(torch.tensor(mean).view(channel_shape)).div_(torch.tensor(std).view(channel_shape))
    return images


def load_split(
    name: str,
    root: Path,
    *,
    train: bool,
    mirror: Path | None = None,
    download: bool = True,
) -> TensorSplit:
    """Load the training (``train=True``) or test split of data set ``name``.

    ``root`` is the cache directory (created if needed); missing files are copied from
    ``mirror`` (never written to) when it holds them, else downloaded by torchvision when
    ``download`` is true. Raises :class:`DataUnavailable` naming the missing files when the
    data cannot be had. Repeated loads of the same split from the same root in one process
    return the same (shared, read-only by convention) object.
    """
    name = canonical_name(name)
    root = ensure_files(name, root, train=train, mirror=mirror, download=download)
    return _read_split(name, str(root), bool(train))


def load_labels(
    name: str, root: Path, *, train: bool, mirror: Path | None = None, download: bool = True
) -> np.ndarray:
    """The int64 label of every row of a split, in order (what partitioning needs)."""
    name = canonical_name(name)
    root = ensure_files(name, root, train=train, mirror=mirror, download=download)
    if name == "cifar10":
        return _cifar_arrays(str(root), bool(train))[1]
    _, labels_file = idx_files(name, root, train=train)
    return np.asarray(_idx_array(labels_file, ndim=1), dtype=np.int64)


def load_rows(
    name: str,
    root: Path,
    rows: np.ndarray,
    *,
    train: bool,
    mirror: Path | None = None,
    download: bool = True,
) -> TensorSplit:
    """Only the rows at ``rows`` (1-D integers) of a split, converted and normalised.

    Equal, bit for bit, to ``load_split(...).subset(rows)`` without ever converting the other
    rows; the result is private to the caller.
    """
    name = canonical_name(name)
    root = ensure_files(name, root, train=train, mirror=mirror, download=download)
    if name == "cifar10":
        data, labels = _cifar_arrays(str(root), bool(train))
        index = _check_rows(rows, len(labels))
        pixels = torch.from_numpy(data[index]).permute(0, 3, 1, 2)  # [N, H, W, C] -> [N, C, H, W]
    else:
        images_file, labels_file = idx_files(name, root, train=train)
        images = _idx_array(images_file, ndim=3)
        labels = _idx_array(labels_file, ndim=1)
        if len(images) != len(labels):
            raise DataUnavailable(f"{images_file} holds {len(images)} images but {labels_file} {len(labels)} labels")
        index = _check_rows(rows, len(labels))
        # Fancy indexing a memory map reads just these rows from the page cache.
        pixels = torch.from_numpy(np.ascontiguousarray(images[index])).unsqueeze(1)
    return TensorSplit(normalise(pixels, name), torch.from_numpy(np.asarray(labels[index], dtype=np.int64)),
                       _NUM_CLASSES[name])


def forget_cached_splits() -> None:
    """Drop the splits this module keeps in memory (a worker calls this once it has
    copied its partition: the full MNIST training set alone is 188 MB of float32)."""
    _read_split.cache_clear()
    _cifar_arrays.cache_clear()


@functools.lru_cache(maxsize=4)
def _read_split(name: str, root: str, train: bool) -> TensorSplit:
    """Read a split whose files are all in ``root`` and convert it to tensors (cached)."""
    dataset = _open(name, root, train)
    if name == "cifar10":
        # CIFAR10.data is a numpy uint8 array [N, H, W, C]; the models want [N, C, H, W].
        pixels = torch.from_numpy(np.asarray(dataset.data)).permute(0, 3, 1, 2)
        labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    else:
        # MNIST.data is a uint8 tensor [N, H, W]; add the channel axis.
        pixels = dataset.data.unsqueeze(1)
        labels = dataset.targets.to(torch.int64)
    images = normalise(pixels, name)
    logger.info("loaded %s %s split: %d images", name, "train" if train else "test", len(labels))
    return TensorSplit(images=images, labels=labels.contiguous(), num_classes=len(dataset.classes))


@functools.lru_cache(maxsize=2)
def _cifar_arrays(root: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's uint8 pixels [N, H, W, C] and int64 labels (cached: labels, then rows)."""
    dataset = _open("cifar10", root, train)
    return np.asarray(dataset.data), np.asarray(dataset.targets, dtype=np.int64)


def _open(name: str, root: str, train: bool):  # noqa: ANN202 - a torchvision dataset
    try:
        return dataset_class(name)(root, train=train, download=False)
    except Exception as error:  # noqa: BLE001 - a present but unreadable file (truncated, corrupt)
        raise DataUnavailable(
            f"data set {name!r} in {root} could not be read ({error}); delete the damaged "
            "files and load again to fetch fresh copies"
        ) from error


def _idx_array(path: Path, *, ndim: int) -> np.ndarray:
    """The uint8 array of an idx file (MNIST's format), memory-mapped, not read.

    The format: two zero bytes, a type byte (0x08: unsigned byte), the number of dimensions,
    then each dimension as a big-endian int32, then the data in C order.
    """
    try:
        with open(path, "rb") as handle:
            header = handle.read(4 + 4 * ndim)
        size = path.stat().st_size
    except OSError as error:
        raise DataUnavailable(f"{path} could not be read ({error})") from error
    if len(header) < 4 + 4 * ndim or header[:3] != b"\x00\x00\x08" or header[3] != ndim:
        raise DataUnavailable(f"{path} is not an idx file of {ndim}-D unsigned bytes; delete it and load again")
    shape = tuple(int(d) for d in np.frombuffer(header[4:], dtype=">i4"))
    if size != len(header) + int(np.prod(shape)):
        raise DataUnavailable(f"{path} is {size} bytes, its header says {shape}: truncated? delete it and load again")
    return np.memmap(path, dtype=np.uint8, mode="r", offset=len(header), shape=shape)


def _check_rows(indices: object, length: int) -> np.ndarray:
    """``indices`` as a 1-D int64 array within ``[0, length)``; ValueError otherwise."""
    array = np.asarray(indices)
    if array.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"indices must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and (array.min() < 0 or array.max() >= length):
        raise ValueError(
            f"indices must lie in [0, {length}), got values from {array.min()} to {array.max()}"
        )
    return np.ascontiguousarray(array)
