"""The embedded mode: the real aggregator and workers over the in-memory broker, on real MNIST."""

import json

import torch
from safetensors.torch import load_file

from aggregator.checkpoint import CheckpointStore
from fedmq.broker.memory import MemoryHub
from fedmq.settings import DataSettings, EmbeddedSettings, RunSettings, Settings, WorkerSettings, BrokerSettings
from fedmq.task import build_model
from fedmq_cli.embedded import run_embedded


def embedded_settings(data_root, tmp_path, **run) -> Settings:
    defaults = dict(run_id="embedded-test", model="fedavg-2nn", versions=3, output_dir=str(tmp_path))
    defaults.update(run)
    return Settings(
        broker=BrokerSettings(max_frame_bytes=256 * 1024),  # the 2NN (0.8 MB) travels in chunks
        data=DataSettings(data_root=str(data_root), download=False),
        run=RunSettings(**defaults),
        worker=WorkerSettings(heartbeat_interval_s=1.0),
        embedded=EmbeddedSettings(workers=3),
    )


def test_three_workers_reach_95_percent_on_mnist_within_three_versions(data_root, tmp_path):
    printed = []
    hub = MemoryHub()
    result = run_embedded(embedded_settings(data_root, tmp_path), on_version=printed.append, hub=hub)
    assert [r.version for r in printed] == [1, 2, 3]
    assert all(r.participants == 3 for r in printed)
    assert max(r.test_accuracy for r in printed) >= 0.95, [r.test_accuracy for r in printed]
    assert all(r.bytes_up > 0 and r.bytes_down > 0 for r in printed)
    lines = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["version"] for line in lines] == [1, 2, 3] and lines[-1]["run_id"] == "embedded-test"
    # The final model loads without unpickling into a fresh 2NN and scores what the run reported.
    weights = load_file(str(result.output_dir / "final_model.safetensors"))
    model = build_model("fedavg-2nn")
    model.load_state_dict(weights)
    assert result.test_accuracy == printed[-1].test_accuracy
    assert hub.depth("fedmq.dead-letters") == 0
    assert hub.depth("fedmq.updates") == 0


def test_a_finished_run_resumes_from_its_checkpoint_and_goes_further(data_root, tmp_path):
    first = run_embedded(embedded_settings(data_root, tmp_path, versions=1))
    assert first.final_version == 1
    more = []
    second = run_embedded(embedded_settings(data_root, tmp_path, versions=2), on_version=more.append)
    assert [r.version for r in more] == [2] and second.final_version == 2
    saved = CheckpointStore(second.output_dir).load("embedded-test")
    assert saved.version == 2 and sorted(saved.partition_table.values()) == [0, 1, 2]
    assert {key[1] for key in saved.folded} == {1} and len(saved.folded) == 3  # version 1's updates


def test_the_run_stops_early_at_the_target_accuracy(data_root, tmp_path):
    result = run_embedded(embedded_settings(data_root, tmp_path, versions=5, target_accuracy=0.9))
    assert result.final_version < 5 and result.test_accuracy >= 0.9
    assert len(result.records) == result.final_version
    assert all(r.test_accuracy < 0.9 for r in result.records[:-1])
