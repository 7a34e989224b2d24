"""The aggregator's durable state: model checkpoint, run state, metrics and the final model.

Files in ``<output_dir>/<run_id>/``:
- ``checkpoint.safetensors``: the global model of the last closed version.
- ``state.json``: run id, version, partition table (written after the checkpoint; both by
  write-to-temp then rename, so a crash never leaves a half-written file).
- ``metrics.jsonl``: one JSON line per model version.
- ``final_model.safetensors``: the model the run ended with.

Models are stored with safetensors: loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    version: int
    weights: dict[str, torch.Tensor]
    partition_table: dict[str, int]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CheckpointStore:
    """Reads and writes one run's files under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.directory / "checkpoint.safetensors"
        self.state_path = self.directory / "state.json"
        self.metrics_path = self.directory / "metrics.jsonl"
        self.final_path = self.directory / "final_model.safetensors"

    def save(self, run_id: str, version: int, weights: Mapping[str, torch.Tensor],
             partition_table: Mapping[str, int]) -> None:
        """Make ``version`` durable: the updates folded into it may be acknowledged after this."""
        tensors = {name: t.detach().cpu().contiguous() for name, t in weights.items()}
        meta = {"run_id": run_id, "version": str(version)}
        _atomic_write(self.checkpoint_path, lambda p: save_file(tensors, str(p), metadata=meta))
        state = {"run_id": run_id, "version": version, "partition_table": dict(partition_table)}
        _atomic_write(self.state_path, lambda p: p.write_text(json.dumps(state, sort_keys=True)))

    def load(self, run_id: str) -> Checkpoint | None:
        """The last checkpoint of ``run_id``, or None if there is none."""
        if not (self.state_path.exists() and self.checkpoint_path.exists()):
            return None
        state = json.loads(self.state_path.read_text())
        if state.get("run_id") != run_id:
            return None
        weights = load_file(str(self.checkpoint_path))
        return Checkpoint(run_id, int(state["version"]), weights, {k: int(v) for k, v in state["partition_table"].items()})

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def save_final(self, run_id: str, version: int, weights: Mapping[str, torch.Tensor]) -> Path:
        tensors = {name: t.detach().cpu().contiguous() for name, t in weights.items()}
        meta = {"run_id": run_id, "version": str(version)}
        _atomic_write(self.final_path, lambda p: save_file(tensors, str(p), metadata=meta))
        return self.final_path
