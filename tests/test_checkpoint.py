"""The checkpoint is one atomic file: a crash while writing it never mixes two versions."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from aggregator.checkpoint import CheckpointError, CheckpointStore


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3, 3), value), "n": torch.tensor(int(value))}


class Crash(Exception):
    pass


def test_a_crash_at_any_step_of_a_save_leaves_one_whole_version(tmp_path, monkeypatch):
    """Crash at every os.replace / os.fsync of saving version 2 over version 1: what loads is
    version 1 with version 1's weights or version 2 with version 2's, nothing in between."""
    real_replace, real_fsync = os.replace, os.fsync
    for crash_at in range(6):
        directory = tmp_path / f"crash-{crash_at}"
        store = CheckpointStore(directory)
        store.save("run", 1, weights(1.0), {"a": 0}, live_workers=["a"], folded=[("run", 0, "a")])
        calls = []

        def counted(real):
            def call(*args):
                calls.append(real)
                if len(calls) > crash_at:
                    raise Crash()
                return real(*args)
            return call

        monkeypatch.setattr(os, "replace", counted(real_replace))
        monkeypatch.setattr(os, "fsync", counted(real_fsync))
        try:
            store.save("run", 2, weights(2.0), {"a": 0, "b": 1}, live_workers=["a", "b"],
                       folded=[("run", 1, "a"), ("run", 1, "b")])
        except Crash:
            pass
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
            monkeypatch.setattr(os, "fsync", real_fsync)
        loaded = CheckpointStore(directory).load("run")
        assert loaded is not None
        assert float(loaded.weights["w"][0, 0]) == loaded.version, (crash_at, loaded.version)
        assert len(loaded.partition_table) == loaded.version and len(loaded.live_workers) == loaded.version
        assert {k[1] for k in loaded.folded} == {loaded.version - 1}


def test_the_state_round_trips_and_another_runs_checkpoint_is_not_taken(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.load("run") is None
    store.save("run", 4, weights(4.0), {"a": 0, "b": 1}, live_workers=["b", "a"],
               folded=[("run", 3, "b"), ("run", 3, "a")])
    loaded = store.load("run")
    assert (loaded.version, loaded.partition_table, loaded.live_workers) == (4, {"a": 0, "b": 1}, ("a", "b"))
    assert loaded.folded == {("run", 3, "a"), ("run", 3, "b")}
    assert torch.equal(loaded.weights["n"], torch.tensor(4))
    assert store.load("another-run") is None
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]


def test_a_first_format_checkpoint_is_read_with_the_version_of_its_weights(tmp_path):
    # The first format: weights (with run id and version) and state.json, written one after the
    # other. A crash between them left the weights of version 3 beside the state of version 2.
    save_file(weights(3.0), str(tmp_path / "checkpoint.safetensors"), metadata={"run_id": "run", "version": "3"})
    (tmp_path / "state.json").write_text(json.dumps({"run_id": "run", "version": 2, "partition_table": {"a": 1}}))
    loaded = CheckpointStore(tmp_path).load("run")
    assert loaded.version == 3 and float(loaded.weights["w"][0, 0]) == 3.0
    assert loaded.partition_table == {"a": 1} and loaded.folded == frozenset()
    # The next save writes the one-file format and drops the old state file.
    CheckpointStore(tmp_path).save("run", 4, weights(4.0), {"a": 1})
    assert not (tmp_path / "state.json").exists() and CheckpointStore(tmp_path).load("run").version == 4


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        CheckpointStore(tmp_path).load("run")


def test_an_aggregator_restarted_with_default_settings_resumes_its_run(data_root, tmp_path):
    from aggregator.service import Aggregator
    from fedmq.broker.memory import MemoryHub
    from test_embedded import embedded_settings

    settings = embedded_settings(data_root, tmp_path, run_id="")
    first = Aggregator(settings, MemoryHub().connect())
    first.store.save(first.run_id, 3, first.weights, {"w": 0}, live_workers=["w"])
    second = Aggregator(settings, MemoryHub().connect())  # the container came back
    assert second.run_id == "default" and second.resumed and second.version == 3
    assert second.registry.live_ids() == ["w"]


def test_the_pipeline_state_and_the_aggregation_round_trip_bit_for_bit(tmp_path):
    store = CheckpointStore(tmp_path)
    moments = {"m.w": torch.randn(3, 3), "v.w": torch.rand(3, 3, dtype=torch.float64)}
    ledger = {"mode": "async", "server_optimizer": "fedadam", "privacy": {"steps": [[1.1, 0.01, 3]]}}
    store.save("run", 2, weights(2.0), {}, pipeline_state=moments, aggregation=ledger)
    loaded = store.load("run")
    assert sorted(loaded.weights) == ["n", "w"]  # the pipeline's tensors are not the model's
    assert loaded.pipeline_state.keys() == moments.keys()
    assert all(torch.equal(loaded.pipeline_state[k], moments[k]) and loaded.pipeline_state[k].dtype == moments[k].dtype
               for k in moments)
    assert loaded.aggregation == ledger


def test_a_run_resumes_only_with_the_aggregation_it_was_checkpointed_with(data_root, tmp_path):
    import dataclasses

    from aggregator.service import Aggregator
    from fedmq.broker.memory import MemoryHub
    from test_embedded import embedded_settings

    base = embedded_settings(data_root, tmp_path, run_id="opt")
    settings = dataclasses.replace(base, run=dataclasses.replace(base.run, server_optimizer="fedavgm"))
    first = Aggregator(settings, MemoryHub().connect())
    momentum = {f"m.{name}": torch.randn_like(t) for name, t in first.weights.items() if t.is_floating_point()}
    first.store.save(first.run_id, 3, first.weights, {}, pipeline_state=momentum,
                     aggregation={"mode": "sync", "server_optimizer": "fedavgm"})
    resumed = Aggregator(settings, MemoryHub().connect())
    assert resumed.version == 3
    assert all(torch.equal(resumed.pipeline.state()[k], momentum[k]) for k in momentum)
    with pytest.raises(CheckpointError, match="--server-optimizer fedavgm; this aggregator is set to .* fedavg"):
        Aggregator(base, MemoryHub().connect())
    asynchronous = dataclasses.replace(settings, run=dataclasses.replace(settings.run, mode="async"))
    with pytest.raises(CheckpointError, match="--mode sync"):
        Aggregator(asynchronous, MemoryHub().connect())
