"""Read a folder of images in torchvision's ``ImageFolder`` layout into one :class:`LocalData`.

``PATH/<class>/<image>``: one sub-folder per class, class names sorted to indices (torchvision's
rule: "10" sorts before "2", so zero-pad numbers). Every image is decoded once, converted to the
run's channels (grey or RGB), resized to the run's height and width when it differs, and the whole
folder is normalised at once with the run's data set statistics: the same arithmetic as the
built-in data sets, so an image folder written from MNIST gives exactly MNIST's tensors.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder

from fedmq.task import input_shape, normalise
from worker.local_data import LocalData, LocalDataError

log = logging.getLogger(__name__)

_MODES = {1: "L", 3: "RGB"}


def read_image_folder(path: Path | str, *, dataset: str) -> LocalData:
    """Every image under ``path`` as the run's data set ``dataset`` shapes and normalises it.

    Raises :class:`LocalDataError` for a missing folder, a folder without class sub-folders or
    images, or an image that cannot be decoded (naming the file).
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise LocalDataError(f"--data {path}: no such folder")
    channels, height, width = input_shape(dataset)
    mode = _MODES.get(channels)
    if mode is None:
        raise LocalDataError(f"data set {dataset!r} wants {channels} channels; image folders give 1 or 3")
    try:
        # allow_empty: a site may lack a class yet must keep its (empty) folder so that the
        # class indices are the same at every site.
        folder = ImageFolder(str(path), allow_empty=True)
    except (FileNotFoundError, OSError) as error:
        raise LocalDataError(f"--data {path}: {error} (want one sub-folder per class)") from error
    if not folder.samples:
        raise LocalDataError(f"--data {path}: the class folders {folder.classes} hold no images")
    started = time.perf_counter()
    pixels = torch.empty((len(folder.samples), channels, height, width), dtype=torch.uint8)
    for row, (file, _) in enumerate(folder.samples):
        pixels[row] = _read_image(Path(file), mode, (width, height))
    labels = torch.tensor(folder.targets, dtype=torch.int64)
    counts = torch.bincount(labels, minlength=len(folder.classes)).tolist()
    log.info("image folder %s: %d images in %d classes (%s) read in %.1f s", path, len(labels),
             len(folder.classes), ", ".join(f"{name}: {n}" for name, n in zip(folder.classes, counts)),
             time.perf_counter() - started)
    return LocalData(normalise(pixels, dataset), labels, tuple(folder.classes))


def _read_image(file: Path, mode: str, size: tuple[int, int]) -> torch.Tensor:
    """One image as uint8 [C, H, W] in ``mode``, resized to ``size`` (width, height) if needed."""
    try:
        with Image.open(file) as image:
            image = image.convert(mode)
            if image.size != size:
                image = image.resize(size, Image.Resampling.BILINEAR)
            array = np.array(image, dtype=np.uint8)  # a writable copy torch may own
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise LocalDataError(f"image {file} cannot be read: {error}") from error
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1)
