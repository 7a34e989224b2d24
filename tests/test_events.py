"""The typed event stream: what a real embedded run emits, metrics.jsonl written from it, JSON logs."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from aggregator.rounds import VersionRecord
from fedmq import messages as m
from fedmq.broker.memory import MemoryHub
from fedmq.errors import InvalidMessage
from fedmq.event_log import log_event
from fedmq.events import (EventBus, EventRecorder, RunFinished, UpdateFolded, UpdateRefused, VersionClosed,
                          VersionOpened, WorkerJoined, WorkerProgress, event_name)
from fedmq.log_format import JsonLogFormatter
from fedmq.metrics_file import read_metrics
from fedmq.topology import UPDATES_QUEUE
from fedmq_cli.embedded import run_embedded
from test_embedded import embedded_settings


def test_version_closed_carries_every_field_of_a_metrics_line():
    record = VersionRecord("r", 3, 2, 2, 0.9, 0.3, 0.4, 10, 20, 1.5, 2, 1, 0, 0, 0, federated_accuracy=0.8)
    event = VersionClosed.from_line(record.to_json())
    assert event.line() == record.to_json() and event.federated_accuracy == 0.8 and event.bytes_up == 10
    # A field added to the record later still reaches the file.
    assert VersionClosed.from_line(dict(record.to_json(), codec="int8")).line()["codec"] == "int8"


def test_a_sink_that_raises_stops_the_emitter_and_sinks_run_in_order():
    seen = []
    bus = EventBus(lambda e: seen.append(("first", e)))
    bus.add(lambda e: seen.append(("second", e)))
    event = RunFinished("r", 1)
    bus.emit(event)
    assert seen == [("first", event), ("second", event)]

    def broken(_):
        raise OSError("disk full")

    bus.add(broken)
    with pytest.raises(OSError):
        bus.emit(event)
    assert event_name(event) == "run-finished" and event_name(WorkerProgress("r", "w", "idle", 0, 0, "", 0, 0, 0)) \
        == "worker-progress"


def test_an_embedded_run_emits_the_stream_and_metrics_jsonl_is_written_from_it(data_root, tmp_path):
    hub = MemoryHub()
    stranger = hub.connect()
    recorder = EventRecorder()

    def inject(record):
        if record.version == 1:
            stranger.publish("", UPDATES_QUEUE, b"\x00\xffnot msgpack")

    settings = embedded_settings(data_root, tmp_path, versions=2)
    settings = dataclasses.replace(settings, embedded=dataclasses.replace(settings.embedded, workers=2))
    result = run_embedded(settings, on_version=inject, hub=hub, events=EventBus(recorder))

    closed = recorder.of(VersionClosed)
    assert [e.version for e in closed] == [1, 2]
    assert [e.line() for e in closed] == read_metrics(result.output_dir / "metrics.jsonl")
    assert [e.version for e in recorder.of(VersionOpened)] == [0, 1]
    assert all(e.expected == 2 and e.live_workers == 2 and e.bytes_down > 0 for e in recorder.of(VersionOpened))
    folded = recorder.of(UpdateFolded)
    assert len(folded) == sum(e.participants for e in closed) == 4
    assert sorted((e.version, e.worker_id) for e in folded) == [(0, "worker-0"), (0, "worker-1"), (1, "worker-0"),
                                                                 (1, "worker-1")]
    assert sum(e.size for e in folded) == sum(e.bytes_up for e in closed)
    refused = recorder.of(UpdateRefused)
    assert [(e.reason, e.dead_lettered) for e in refused] == [("malformed", True)]
    assert sum(e.dead_lettered for e in closed) == 1
    assert sorted(e.worker_id for e in recorder.of(WorkerJoined)) == ["worker-0", "worker-1"]
    assert recorder.of(RunFinished) == [RunFinished(result.run_id, 2)]
    # Heartbeats carry the workers' training speed once they trained.
    progress = recorder.of(WorkerProgress)
    assert progress and {e.worker_id for e in progress} == {"worker-0", "worker-1"}
    assert all(0.0 <= e.progress <= 1.0 for e in progress)


def test_json_log_lines_carry_the_event_fields(caplog):
    caplog.set_level(logging.DEBUG, logger="fedmq.events")
    event = UpdateRefused("run-a", 3, "w1", "stale", False, 123)
    log_event(event)
    (record,) = [r for r in caplog.records if r.name == "fedmq.events"]
    line = json.loads(JsonLogFormatter().format(record))
    assert line["event"] == "update-refused" and line["reason"] == "stale" and line["worker_id"] == "w1"
    assert line["level"] == "DEBUG" and "stale" in line["message"] and line["time"].endswith("+00:00")
    closed = VersionClosed.from_line(dict(run_id="r", version=1, participants=2, expected=2, test_accuracy=0.9,
                                          test_loss=0.3, train_loss=0.4, bytes_up=10, bytes_down=20, seconds=4.0,
                                          live_workers=2, stale=0, duplicates=0, dead_lettered=0, rebroadcasts=0,
                                          bytes_up_ratio=0.25))
    caplog.clear()
    log_event(closed)
    line = json.loads(JsonLogFormatter().format(caplog.records[-1]))
    assert line["event"] == "version-closed" and line["bytes_up_ratio"] == 0.25 and "extra" not in line
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    assert json.loads(JsonLogFormatter().format(plain))["message"] == "hello there"


@pytest.mark.parametrize("fields, reason", [
    ({"progress": 1.5}, "schema"), ({"progress": -0.1}, "schema"), ({"samples_per_second": float("nan")}, "non-finite"),
    ({"samples_per_second": float("inf")}, "non-finite"), ({"progress": "half"}, "schema"),
])
def test_heartbeat_progress_fields_are_checked(fields, reason):
    beat = m.Heartbeat("w1", "run-a", "training", 2, 1, "cpu", 1.7e9, 0.5, 1000.0)
    assert m.decode(m.encode(beat)) == beat
    import msgpack

    raw = msgpack.unpackb(m.encode(beat), raw=False)
    raw.update(fields)
    with pytest.raises(InvalidMessage) as caught:
        m.decode(msgpack.packb(raw, use_bin_type=True))
    assert caught.value.reason == reason
    del raw["progress"]
    with pytest.raises(InvalidMessage):
        m.decode(msgpack.packb(raw, use_bin_type=True))


def test_prometheus_metrics_follow_the_events():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from fedmq.prometheus_metrics import AggregatorMetrics

    metrics = AggregatorMetrics()
    line = dict(run_id="r", version=1, participants=2, expected=2, test_accuracy=0.9, test_loss=0.3, train_loss=0.4,
                bytes_up=100, bytes_down=200, seconds=4.0, live_workers=2, stale=1, duplicates=0, dead_lettered=1,
                rebroadcasts=0, bytes_up_ratio=0.25, dp_epsilon=1.5)
    for event in (VersionOpened("r", 0, 2, 2, 200, 0.0, 300.0),
                  UpdateFolded("r", 0, "w1", 1, 2, 600, 0.3, 1.0, 50, 1.0),
                  UpdateRefused("r", 0, "w9", "stale", False, 50), UpdateRefused("r", 0, "", "malformed", True, 7),
                  UpdateFolded("r", 0, "w2", 2, 2, 600, 0.3, 1.0, 50, 2.0), VersionClosed.from_line(line)):
        metrics(event)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
               for s in family.samples}
    assert samples[("fedmq_model_version", ())] == 1 and samples[("fedmq_versions_total", ())] == 1
    assert samples[("fedmq_updates_folded_total", ())] == 2 and samples[("fedmq_open_version", ())] == -1
    assert samples[("fedmq_updates_dropped_total", (("reason", "stale"),))] == 1
    assert samples[("fedmq_dead_letters_total", (("reason", "malformed"),))] == 1
    assert samples[("fedmq_bytes_total", (("direction", "up"),))] == 100
    assert samples[("fedmq_bytes_total", (("direction", "down"),))] == 200
    assert samples[("fedmq_version_seconds_bucket", (("le", "5.0"),))] == 1
    assert samples[("fedmq_version_seconds_bucket", (("le", "2.0"),))] == 0
    assert samples[("fedmq_test_accuracy", ())] == 0.9 and samples[("fedmq_live_workers", ())] == 2
    assert samples[("fedmq_bytes_ratio_to_fp32", (("direction", "up"),))] == 0.25
    assert samples[("fedmq_dp_epsilon", ())] == 1.5
