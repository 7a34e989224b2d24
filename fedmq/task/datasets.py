"""Load a data set split as normalised in-memory tensors.

Files live in a cache directory ``root`` in torchvision's layout (``root/MNIST/raw/*.gz``,
``root/FashionMNIST/raw/*.gz``, ``root/cifar-10-batches-py/...``). Missing files are taken,
in order, from a read-only ``mirror`` holding the same layout, then from the internet through
torchvision (when ``download`` is true). The whole split is turned into one float tensor at
once rather than through per-item PIL transforms, which would be far too slow.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch
import torchvision
from torchvision.datasets.utils import extract_archive

from fedmq.errors import DataUnavailable

logger = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion-mnist", "cifar10")

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

# The folders torchvision's MNIST and FashionMNIST classes read from, under root.
_IDX_FOLDERS = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}
# torchvision reads the unpacked files, but downloads (and mirrors hold) the .gz ones.
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"


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
        array = np.asarray(indices)
        if array.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"indices must be integers, got dtype {array.dtype}")
        array = array.astype(np.int64, copy=False)
        if array.size and (array.min() < 0 or array.max() >= len(self)):
            raise ValueError(
                f"indices must lie in [0, {len(self)}), got values from {array.min()} "
                f"to {array.max()}"
            )
        rows = torch.from_numpy(np.ascontiguousarray(array))
        # index_select allocates new, contiguous storage: the subset shares nothing.
        return TensorSplit(
            images=self.images.index_select(0, rows),
            labels=self.labels.index_select(0, rows),
            num_classes=self.num_classes,
        )


def input_shape(name: str) -> tuple[int, int, int]:
    """The shape (C, H, W) of one image of data set ``name``."""
    return _INPUT_SHAPES[_canonical(name)]


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
    name = _canonical(name)
    root = Path(root).expanduser().resolve()
    required = _required_files(name, root)
    if mirror is not None and _missing(required):
        _copy_from_mirror(name, root, Path(mirror).expanduser().resolve())
    # Always: a cache may hold only the .gz files, which torchvision does not read itself.
    _unpack_local(name, root)
    missing = _missing(required)
    if missing:
        if not download:
            raise _unavailable(name, missing, mirror, "downloading is disabled (download=False)")
        logger.info("downloading %s into %s", name, root)
        try:
            # Constructing the dataset downloads and unpacks; it is read again (cached) below.
            _dataset_class(name)(str(root), train=train, download=True)
        except Exception as error:  # noqa: BLE001 - torchvision raises URLError, RuntimeError, OSError...
            raise _unavailable(
                name, _missing(required), mirror, f"the download failed ({error})"
            ) from error
    return _read_split(name, str(root), bool(train))


def forget_cached_splits() -> None:
    """Drop the splits :func:`load_split` keeps in memory (a worker calls this once it has
    copied its partition: the full MNIST training set alone is 188 MB of float32)."""
    _read_split.cache_clear()


@functools.lru_cache(maxsize=4)
def _read_split(name: str, root: str, train: bool) -> TensorSplit:
    """Read a split whose files are all in ``root`` and convert it to tensors (cached)."""
    try:
        dataset = _dataset_class(name)(root, train=train, download=False)
    except Exception as error:  # noqa: BLE001 - a present but unreadable file (truncated, corrupt)
        raise DataUnavailable(
            f"data set {name!r} in {root} could not be read ({error}); delete the damaged "
            "files and load again to fetch fresh copies"
        ) from error
    mean, std = _NORMALISATION[name]
    if name == "cifar10":
        # CIFAR10.data is a numpy uint8 array [N, H, W, C]; the models want [N, C, H, W].
        pixels = torch.from_numpy(np.asarray(dataset.data)).permute(0, 3, 1, 2)
        labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    else:
        # MNIST.data is a uint8 tensor [N, H, W]; add the channel axis.
        pixels = dataset.data.unsqueeze(1)
        labels = dataset.targets.to(torch.int64)
    images = pixels.to(torch.float32).div_(255.0).contiguous()
    channel_shape = (1, len(mean), 1, 1)
    images.sub_(torch.tensor(mean).view(channel_shape)).div_(torch.tensor(std).view(channel_shape))
    logger.info("loaded %s %s split: %d images", name, "train" if train else "test", len(labels))
    return TensorSplit(images=images, labels=labels.contiguous(), num_classes=len(dataset.classes))


def _canonical(name: str) -> str:
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    return key


def _dataset_class(name: str) -> type:
    return {
        "mnist": torchvision.datasets.MNIST,
        "fashion-mnist": torchvision.datasets.FashionMNIST,
        "cifar10": torchvision.datasets.CIFAR10,
    }[name]


def _required_files(name: str, root: Path) -> list[tuple[Path, ...]]:
    """Per needed file, the paths that satisfy it (any one of them will do).

    torchvision's MNIST reads unpacked idx files but they unpack from the ``.gz`` ones
    without the network, so either form counts as present. The gzip is listed first: it is
    the name people download and mirrors hold, so error messages name it.
    """
    if name == "cifar10":
        return [(root / _CIFAR_FOLDER / file,) for file in _CIFAR_FILES]
    folder = root / _IDX_FOLDERS[name]
    return [(folder / f"{file}.gz", folder / file) for file in _IDX_FILES]


def _missing(required: list[tuple[Path, ...]]) -> list[Path]:
    return [choices[0] for choices in required if not any(path.is_file() for path in choices)]


def _copy_from_mirror(name: str, root: Path, mirror: Path) -> None:
    """Copy the files ``root`` lacks from ``mirror`` (same layout); the mirror is only read."""
    if mirror == root:
        return
    for choices in _required_files(name, root):
        if any(path.is_file() for path in choices):
            continue
        for path in choices:
            source = mirror / path.relative_to(root)
            if source.is_file():
                logger.info("copying %s from mirror %s", path.relative_to(root), mirror)
                _atomic_copy(source, path)
                break
    if name == "cifar10" and _missing(_required_files(name, root)):
        # A mirror may hold the original archive instead of the unpacked batches.
        archive = mirror / _CIFAR_ARCHIVE
        if archive.is_file() and not (root / _CIFAR_ARCHIVE).is_file():
            logger.info("copying %s from mirror %s", _CIFAR_ARCHIVE, mirror)
            _atomic_copy(archive, root / _CIFAR_ARCHIVE)


def _unpack_local(name: str, root: Path) -> None:
    """Unpack archives already in ``root`` so that torchvision finds its files offline."""
    if name == "cifar10":
        archive = root / _CIFAR_ARCHIVE
        if archive.is_file() and _missing(_required_files(name, root)):
            logger.info("unpacking %s", archive)
            _extract_cifar(archive, root)
        return
    for packed, unpacked in _required_files(name, root):
        if packed.is_file() and not unpacked.is_file():
            logger.info("unpacking %s", packed)
            with gzip.open(packed, "rb") as source:
                _atomic_write(unpacked, lambda target: shutil.copyfileobj(source, target))


def _extract_cifar(archive: Path, root: Path) -> None:
    # Extract beside the final folder, then move files into place one by one, so another
    # process loading the same cache never sees a half-written batch file.
    with tempfile.TemporaryDirectory(dir=root, prefix=".unpack-") as scratch:
        extract_archive(str(archive), scratch)
        (root / _CIFAR_FOLDER).mkdir(parents=True, exist_ok=True)
        for file in _CIFAR_FILES:
            unpacked = Path(scratch) / _CIFAR_FOLDER / file
            if unpacked.is_file() and not (root / _CIFAR_FOLDER / file).is_file():
                os.replace(unpacked, root / _CIFAR_FOLDER / file)


def _atomic_copy(source: Path, target: Path) -> None:
    with open(source, "rb") as reader:
        _atomic_write(target, lambda writer: shutil.copyfileobj(reader, writer))


def _atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``target`` through a temporary file in the same folder, then rename it.

    Several workers may share one cache; the rename makes a file appear whole or not at all.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "wb") as writer:
            write(writer)
        # mkstemp makes the file private (0600); a shared cache must be readable by all.
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _unavailable(
    name: str, missing: list[Path], mirror: Path | None, reason: str
) -> DataUnavailable:
    files = "\n".join(f"  {path}" for path in missing)
    searched = f"the mirror {mirror} does not hold them" if mirror else "no mirror was given"
    return DataUnavailable(
        f"data set {name!r} is not available: {reason}, {searched}, and these files are "
        f"missing:\n{files}\n"
        "Pass a folder that holds them in the same layout as a mirror (--data-mirror or "
        "FEDMQ_DATA_MIRROR), or run with internet access so torchvision can download them."
    )
