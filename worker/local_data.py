"""A worker's examples in memory, its held-out evaluation split, and whether they fit the model.

Every data source (:mod:`worker.data_sources`) ends in one :class:`LocalData`: two tensors
held once in memory, whatever the source. Before training, :func:`check_fits` runs the run's
model on two examples and compares its outputs with the labels, so a site whose images, shape
or classes disagree with the run is told what disagrees instead of failing mid-training (or,
worse, training with shifted class indices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedmq.errors import FedmqError

# How many class names an error message lists before "...".
_NAMES_SHOWN = 12


class LocalDataError(FedmqError):
    """The worker's own data cannot be used (missing, unreadable, empty); the message says why."""


class DataMismatch(LocalDataError):
    """The worker's data does not fit the run's model (input shape, number of classes)."""


class UntrustedFactory(LocalDataError):
    """``--data package.module:factory`` names a factory the operator has not listed as trusted."""


@dataclass(frozen=True)
class LocalData:
    """``inputs`` [N, ...] (float32, or integers for models that take indices) and ``labels``
    int64 [N], class indices. ``class_names`` names the classes by index when the source
    knows them (an image folder's sub-folders), else it is empty."""

    inputs: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise LocalDataError(f"labels must be int64 [N], got {self.labels.dtype} {tuple(self.labels.shape)}")
        if self.inputs.dim() < 1 or len(self.inputs) != len(self.labels):
            raise LocalDataError(f"{len(self.labels)} labels but inputs of shape {tuple(self.inputs.shape)}")
        if len(self.labels) and int(self.labels.min()) < 0:
            raise DataMismatch(f"labels must be class indices >= 0, found {int(self.labels.min())}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def example_shape(self) -> tuple[int, ...]:
        """The shape of one input, without the batch axis."""
        return tuple(self.inputs.shape[1:])

    def rows(self, index: torch.Tensor) -> "LocalData":
        """A copy holding the rows at ``index`` (1-D int64), contiguous."""
        return LocalData(self.inputs.index_select(0, index), self.labels.index_select(0, index), self.class_names)

    def to(self, device: torch.device) -> "LocalData":
        return LocalData(self.inputs.to(device), self.labels.to(device), self.class_names)


def hold_out(data: LocalData, fraction: float, *, seed: int) -> tuple[LocalData, LocalData | None]:
    """Split ``data`` into (train, held-out evaluation) rows; the same seed gives the same split.

    ``fraction`` 0 keeps everything for training (held-out is None, nothing is copied).
    Otherwise ``round(fraction * N)`` rows, at least one, are held out and at least one row is
    left to train on. A site's split must stay the same across restarts, or held-out rows
    would leak into training: pass a seed that depends only on the run and the data.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be within [0, 1), got {fraction}")
    if fraction == 0.0:
        return data, None
    n = len(data)
    if n < 2:
        raise LocalDataError(f"{n} example(s) cannot be split into training and evaluation rows")
    count = min(max(1, round(fraction * n)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    # Sorted, so both parts keep the source's order (cheaper to read back, easier to debug).
    held, kept = order[:count].sort().values, order[count:].sort().values
    return data.rows(kept), data.rows(held)


def check_fits(data: LocalData, model: nn.Module, *, model_name: str,
               task_shape: tuple[int, ...] | None = None) -> int:
    """The number of classes the model predicts, once ``data`` is known to fit it.

    Raises :class:`DataMismatch` saying what disagrees: the model fails on the inputs (shape,
    dtype), its output is not [batch, classes], the data names a different number of classes,
    or a label is beyond the model's outputs. ``task_shape`` (the run's data set's input
    shape) only makes the message clearer.
    """
    if len(data) == 0:
        raise LocalDataError("the worker's data holds no examples")
    probe = data.inputs[:2]
    parameter = next(iter(model.parameters()), None)
    if parameter is not None:
        probe = probe.to(parameter.device)
    was_training = model.training
    model.eval()  # BatchNorm must not learn from the probe
    try:
        with torch.no_grad():
            output = model(probe)
    except Exception as error:  # noqa: BLE001 - any failure of user code on these inputs is a mismatch
        expected = f"; the run's task uses inputs of shape {list(task_shape)}" if task_shape else ""
        raise DataMismatch(
            f"this worker's data does not fit the run's model {model_name!r}: its inputs have shape "
            f"{list(data.example_shape)} ({data.inputs.dtype}){expected}, and the model fails on them: "
            f"{type(error).__name__}: {error}"
        ) from error
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != len(probe):
        shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise DataMismatch(f"the run's model {model_name!r} gives {shape} for a batch of {len(probe)} "
                           f"inputs of shape {list(data.example_shape)}; want [batch, classes]")
    classes = int(output.shape[1])
    if data.class_names and len(data.class_names) != classes:
        names = ", ".join(data.class_names[:_NAMES_SHOWN]) + (", ..." if len(data.class_names) > _NAMES_SHOWN else "")
        raise DataMismatch(
            f"this worker's data has {len(data.class_names)} classes ({names}) but the run's model "
            f"{model_name!r} has {classes} outputs; every site needs the same classes in the same "
            "order (in an image folder: one sub-folder per class, sorted by name, an empty one for a "
            "class the site lacks)")
    top = int(data.labels.max())
    if top >= classes:
        raise DataMismatch(f"this worker's labels run up to {top} ({top + 1} classes) but the run's model "
                           f"{model_name!r} has {classes} outputs")
    return classes
