"""Put a built-in data set's original files in a local cache, in torchvision's layout.

Files live in ``root`` as torchvision expects them (``root/MNIST/raw/*``,
``root/FashionMNIST/raw/*``, ``root/cifar-10-batches-py/...``). Missing files are taken, in
order, from a read-only ``mirror`` holding the same layout, then from the internet through
torchvision (when ``download`` is true). Several workers may share one cache: every file
appears by an atomic rename, whole or not at all.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torchvision
from torchvision.datasets.utils import extract_archive

from fedmq.errors import DataUnavailable

logger = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion-mnist", "cifar10")

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


def canonical_name(name: str) -> str:
    """``name`` as one of :data:`DATASETS` (case and spaces ignored); ValueError otherwise."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    return key


def dataset_class(name: str) -> type:
    """torchvision's class for canonical data set ``name``."""
    return {
        "mnist": torchvision.datasets.MNIST,
        "fashion-mnist": torchvision.datasets.FashionMNIST,
        "cifar10": torchvision.datasets.CIFAR10,
    }[name]


def idx_files(name: str, root: Path, *, train: bool) -> tuple[Path, Path]:
    """The unpacked (images, labels) idx files of MNIST-like data set ``name`` under ``root``."""
    folder = Path(root) / _IDX_FOLDERS[name]
    prefix = "train" if train else "t10k"
    return folder / f"{prefix}-images-idx3-ubyte", folder / f"{prefix}-labels-idx1-ubyte"


def ensure_files(name: str, root: Path, *, train: bool, mirror: Path | None, download: bool) -> Path:
    """Make every file of canonical data set ``name`` present and unpacked under ``root``.

    Returns ``root`` resolved. Raises :class:`DataUnavailable` naming the missing files when
    neither the cache, the mirror nor a download can provide them.
    """
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
            # Constructing the dataset downloads and unpacks.
            dataset_class(name)(str(root), train=train, download=True)
        except Exception as error:  # noqa: BLE001 - torchvision raises URLError, RuntimeError, OSError...
            raise _unavailable(
                name, _missing(required), mirror, f"the download failed ({error})"
            ) from error
    return root


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
