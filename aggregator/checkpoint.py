"""The aggregator's durable state: one checkpoint file, metrics and the final model.

Files in ``<output_dir>/<run_id>/``:
- ``checkpoint.safetensors``: the global model of the last closed version AND the run state in
  the file's metadata (run id, version, partition table, the workers live when it was written,
  and the keys of the updates folded into it). One file, written to a temporary name, synced
  and renamed over the old one: a crash leaves either the old checkpoint or the new one, never
  weights of one version with the state of another. The aggregation pipeline's state (the server
  optimizer's moments, see :meth:`aggregator.pipeline.AggregationPipeline.state`) is in the same
  file, its tensors named ``pipeline/<name>``, with the run's mode and server optimizer in the
  metadata: a resumed run steps exactly as the one that wrote it would have.
- ``metrics.jsonl``: one JSON line per model version.
- ``final_model.safetensors``: the model the run ended with.

Models are stored with safetensors: loading never unpickles anything.

Checkpoints of the first format (weights in ``checkpoint.safetensors`` with only run id and
version in its metadata, the rest in ``state.json``) are still read: the version comes from the
weights' own file, so the two can never disagree; the partition table from ``state.json`` (a
stale table only costs a worker its old index).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedmq.errors import FedmqError

#: The metadata key holding the run state (a JSON object) in ``checkpoint.safetensors``.
STATE_KEY = "fedmq.state"
#: The metadata key holding the defence choices and the privacy ledger (a JSON object, see
#: :meth:`aggregator.defences.Defences.checkpoint_state`); absent in older checkpoints.
DEFENCES_KEY = "fedmq.defences"
FORMAT = 2
#: Prefix of the pipeline state's tensors in ``checkpoint.safetensors`` (model tensor names are
#: module paths joined by dots: they never hold a slash).
PIPELINE_PREFIX = "pipeline/"

UpdateKey = tuple[str, int, str]  # (run_id, base_version, worker_id)


class CheckpointError(FedmqError):
    """A checkpoint file exists but cannot be used (corrupt, or written by something else)."""


@dataclass(frozen=True)
class Checkpoint:
    """Everything a restarted aggregator needs to go on with version ``version``."""

    run_id: str
    version: int
    weights: dict[str, torch.Tensor]
    partition_table: dict[str, int]
    live_workers: tuple[str, ...] = ()  # live when the checkpoint was written
    folded: frozenset[UpdateKey] = field(default_factory=frozenset)  # updates folded into ``version``
    defences: dict[str, Any] = field(default_factory=dict)  # choices and privacy ledger
    pipeline_state: dict[str, torch.Tensor] = field(default_factory=dict)  # AggregationPipeline.state()
    #: How the run aggregates ({"mode": ..., "server_optimizer": ...}; empty in older checkpoints)
    #: and what pipeline stages keep besides tensors (JSON values, e.g. a privacy ledger).
    aggregation: dict[str, Any] = field(default_factory=dict)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    # The rename itself is durable only once the directory entry is on disk.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _tensors(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().contiguous() for name, t in weights.items()}


class CheckpointStore:
    """Reads and writes one run's files under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.directory / "checkpoint.safetensors"
        self.legacy_state_path = self.directory / "state.json"
        self.metrics_path = self.directory / "metrics.jsonl"
        self.final_path = self.directory / "final_model.safetensors"

    def save(self, run_id: str, version: int, weights: Mapping[str, torch.Tensor],
             partition_table: Mapping[str, int], *, live_workers: Iterable[str] = (),
             folded: Iterable[UpdateKey] = (), defences: Mapping[str, Any] | None = None,
             pipeline_state: Mapping[str, torch.Tensor] | None = None,
             aggregation: Mapping[str, Any] | None = None) -> None:
        """Make ``version`` durable in one atomic file: the updates folded into it (``folded``)
        may be acknowledged after this returns. ``pipeline_state`` (tensors) and ``aggregation``
        (JSON values) come back as they were given in :meth:`load`."""
        state = {
            "format": FORMAT, "run_id": run_id, "version": version,
            "partition_table": dict(partition_table), "live_workers": sorted(live_workers),
            "folded": sorted([r, b, w] for r, b, w in folded),
        }
        if aggregation:
            state["aggregation"] = dict(aggregation)
        meta = {STATE_KEY: json.dumps(state, sort_keys=True), "run_id": run_id, "version": str(version)}
        if defences:
            meta[DEFENCES_KEY] = json.dumps(defences, sort_keys=True)
        tensors = _tensors(weights)
        tensors.update({PIPELINE_PREFIX + name: t for name, t in _tensors(pipeline_state or {}).items()})
        _atomic_write(self.checkpoint_path, lambda p: save_file(tensors, str(p), metadata=meta))
        # A first-format state file beside a new checkpoint would only confuse a reader.
        self.legacy_state_path.unlink(missing_ok=True)

    def load(self, run_id: str) -> Checkpoint | None:
        """The last checkpoint of ``run_id``, or None if there is none (or it is another run's)."""
        if not self.checkpoint_path.exists():
            return None
        try:
            with safe_open(str(self.checkpoint_path), framework="pt") as handle:
                meta = handle.metadata() or {}
                weights = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise CheckpointError(f"{self.checkpoint_path}: unreadable: {exc}") from None
        try:
            if STATE_KEY in meta:
                checkpoint = self._from_state(run_id, json.loads(meta[STATE_KEY]), weights)
                if checkpoint is not None and DEFENCES_KEY in meta:
                    checkpoint = dataclasses.replace(checkpoint, defences=json.loads(meta[DEFENCES_KEY]))
                return checkpoint
            return self._from_legacy(run_id, meta, weights)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.checkpoint_path}: bad run state: {exc!r}") from None

    @staticmethod
    def _from_state(run_id: str, state: dict[str, Any], weights: dict[str, torch.Tensor]) -> Checkpoint | None:
        if state["run_id"] != run_id:
            return None
        folded = frozenset((str(r), int(b), str(w)) for r, b, w in state["folded"])
        pipeline = {name[len(PIPELINE_PREFIX):]: weights.pop(name) for name in list(weights)
                    if name.startswith(PIPELINE_PREFIX)}
        aggregation = state.get("aggregation", {})
        if not isinstance(aggregation, dict):
            raise ValueError(f"aggregation: want an object, got {type(aggregation).__name__}")
        return Checkpoint(run_id, int(state["version"]), weights,
                          {str(k): int(v) for k, v in state["partition_table"].items()},
                          tuple(str(w) for w in state["live_workers"]), folded,
                          pipeline_state=pipeline, aggregation=aggregation)

    def _from_legacy(self, run_id: str, meta: Mapping[str, str], weights: dict[str, torch.Tensor]) -> Checkpoint | None:
        if meta.get("run_id") != run_id:
            return None
        table: dict[str, int] = {}
        if self.legacy_state_path.exists():
            state = json.loads(self.legacy_state_path.read_text())
            if state.get("run_id") == run_id:
                table = {str(k): int(v) for k, v in state.get("partition_table", {}).items()}
        return Checkpoint(run_id, int(meta["version"]), weights, table)

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def save_final(self, run_id: str, version: int, weights: Mapping[str, torch.Tensor]) -> Path:
        tensors = _tensors(weights)
        meta = {"run_id": run_id, "version": str(version)}
        _atomic_write(self.final_path, lambda p: save_file(tensors, str(p), metadata=meta))
        return self.final_path
