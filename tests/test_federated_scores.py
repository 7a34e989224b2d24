"""Federated evaluation on the aggregator: the workers' scores of each version, weighted by their
held-out samples, in each version's metrics line; bad scores dead-lettered, late and duplicate
ones not counted. Scripted participants (real codec, in-memory broker) send exactly the scores
a test needs; nothing trains, so every number is known in advance."""

from __future__ import annotations

import math

import pytest

from aggregator.service import Aggregator
from fedmq import messages as m
from fedmq.broker.memory import MemoryHub
from fedmq.errors import InvalidMessage
from fedmq.settings import BrokerSettings, DataSettings, RunSettings, Settings, WorkerSettings
from fedmq.topology import DEAD_LETTER_QUEUE, REASON_HEADER, UPDATES_QUEUE
from federation_harness import LogTrigger, ScriptedWorker, SteppedClock, run_aggregator

NEVER = 10_000.0
SCORES = {"big": (300, 0.3, 0.9), "small": (100, 1.0, 0.5)}  # samples, loss, accuracy
# Weighted by samples: (300 * 0.9 + 100 * 0.5) / 400 and (300 * 0.3 + 100 * 1.0) / 400.
FEDERATED_ACCURACY, FEDERATED_LOSS = 0.8, 0.475


def settings(tmp_path, **run) -> Settings:
    values = dict(run_id="scored", model="fedavg-2nn", versions=2, start_workers=2, num_partitions=2,
                  eval_data="none", output_dir=str(tmp_path), worker_timeout_s=NEVER, round_timeout_s=NEVER)
    values.update(run)
    return Settings(broker=BrokerSettings(max_frame_bytes=256 * 1024), data=DataSettings(download=False),
                    run=RunSettings(**values), worker=WorkerSettings())


def report(run_id: str, version: int, worker_id: str, samples: int, loss: float, accuracy: float) -> m.EvaluationReport:
    return m.EvaluationReport(run_id, version, worker_id, samples, loss, accuracy)


def scorer(extra=None, answer_requests: bool = True):
    """A participant's behaviour: score each version on receipt (before its update), and the
    final version when asked; ``extra(participant, broadcast)`` runs between the two."""

    def on_broadcast(p: ScriptedWorker, b: m.ModelBroadcast) -> None:
        p.publish_update_queue(report(b.run_id, b.version, p.worker_id, *SCORES[p.worker_id]))
        if extra is not None:
            extra(p, b)
        p.send_update(b)

    def on_request(p: ScriptedWorker, r: m.EvaluationRequest) -> None:
        if answer_requests:
            p.publish_update_queue(report(r.run_id, r.version, p.worker_id, *SCORES[p.worker_id]))

    return dict(on_broadcast=on_broadcast, on_request=on_request)


def run(hub, config, participants, clock=None):
    aggregator = Aggregator(config, hub.connect(), clock=clock or SteppedClock())
    try:
        result = run_aggregator(aggregator)
    finally:
        for p in participants:
            p.stop()
    assert not aggregator.hung
    return result


def dead_letter_reasons(hub) -> list[str]:
    return sorted(headers[REASON_HEADER].split(":")[0] for _, headers in hub.peek(DEAD_LETTER_QUEUE))


def test_each_version_records_the_sample_weighted_score_and_the_final_version_is_scored_on_request(tmp_path):
    hub = MemoryHub()
    workers = [ScriptedWorker(hub, name, **scorer()).start() for name in SCORES]
    result = run(hub, settings(tmp_path), workers)
    assert [r.version for r in result.records] == [1, 2]
    for record in result.records:
        assert record.test_accuracy is None and record.test_loss is None  # --eval-data none
        assert record.federated_accuracy == pytest.approx(FEDERATED_ACCURACY)
        assert record.federated_loss == pytest.approx(FEDERATED_LOSS)
        assert (record.federated_samples, record.federated_workers) == (400, 2)
    # Version 2 is the last: no broadcast follows it, so it was sent to be scored.
    assert [(r.version, r.selected) for r in workers[0].requests] == [(2, ())]
    assert result.federated_accuracy == pytest.approx(FEDERATED_ACCURACY) and math.isnan(result.test_accuracy)
    lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"federated_accuracy": 0.8' in lines[1] and '"test_accuracy": null' in lines[1]
    assert hub.depth(UPDATES_QUEUE) == 0 and hub.depth(DEAD_LETTER_QUEUE) == 0


def bad_scores(run_id: str) -> dict[str, bytes]:
    good = m.encode(report(run_id, 1, "big", 300, 0.3, 0.9))
    return {
        "truncated": good[:-4],
        "schema version": good.replace(b"\xa6schema\x01", b"\xa6schema\x09"),
        "accuracy above 1": m.encode(report(run_id, 1, "big", 300, 0.3, 1.5)),
        "no samples": m.encode(report(run_id, 1, "big", 0, 0.3, 0.9)),
        "NaN loss": m.encode(report(run_id, 1, "big", 300, float("nan"), 0.9)),
        "another run": m.encode(report("another-run", 1, "big", 300, 0.3, 0.9)),
        "a version not made yet": m.encode(report(run_id, 7, "big", 300, 0.3, 0.9)),
    }


def test_bad_scores_are_dead_lettered_and_late_or_duplicate_ones_not_counted(tmp_path):
    hub = MemoryHub()

    def misbehave(p: ScriptedWorker, b: m.ModelBroadcast) -> None:
        if b.version != 1:
            return
        p.publish_update_queue(report(b.run_id, 1, p.worker_id, 5000, 9.0, 0.0))  # again: a duplicate
        p.publish_update_queue(report(b.run_id, 0, p.worker_id, 5000, 9.0, 0.0))  # version 0's line is gone
        for body in bad_scores(b.run_id).values():
            p.publish_update_queue(body)

    workers = [ScriptedWorker(hub, "big", **scorer(misbehave)).start(), ScriptedWorker(hub, "small", **scorer()).start()]
    result = run(hub, settings(tmp_path), workers)
    assert [(r.federated_accuracy, r.federated_samples) for r in result.records] == \
        [(pytest.approx(FEDERATED_ACCURACY), 400)] * 2
    assert dead_letter_reasons(hub) == sorted(["malformed", "schema", "schema", "schema", "non-finite", "wrong-run",
                                               "future-version"])
    assert hub.depth(UPDATES_QUEUE) == 0, "late and duplicate scores are acknowledged"
    assert result.records[1].dead_lettered == 7  # counted in round 1, whose line is version 2's


@pytest.mark.parametrize("name", ["truncated", "schema version", "accuracy above 1", "no samples", "NaN loss"])
def test_bad_scores_do_not_decode(name):
    with pytest.raises(InvalidMessage):
        m.decode(bad_scores("scored")[name])


def test_a_score_that_never_comes_holds_the_line_only_until_its_deadline(tmp_path):
    hub, clock = MemoryHub(), SteppedClock()
    workers = [ScriptedWorker(hub, "big", **scorer(answer_requests=False)).start(),
               ScriptedWorker(hub, "small", **scorer()).start()]
    # Once "small" has scored the final version, the deadline passes ("big" stays live).
    with LogTrigger("aggregator.version_lines", "version 1: score from small", lambda: clock.jump(NEVER)):
        result = run(hub, settings(tmp_path, versions=1, worker_timeout_s=3 * NEVER), workers, clock)
    (record,) = result.records
    # Only "small" scored the final version before the deadline passed.
    assert (record.federated_accuracy, record.federated_samples, record.federated_workers) == (0.5, 100, 1)


def test_the_run_stops_when_the_workers_scores_reach_the_target(tmp_path):
    hub = MemoryHub()
    workers = [ScriptedWorker(hub, name, **scorer()).start() for name in SCORES]
    result = run(hub, settings(tmp_path, versions=5, target_accuracy=0.75), workers)
    # Version 1 scores 0.8 (its line is written while version 1 trains): the run ends with it.
    assert result.final_version == 1 and [r.version for r in result.records] == [1]
    assert result.federated_accuracy == pytest.approx(FEDERATED_ACCURACY)
    assert workers[0].requests == [], "version 1 was scored on receipt: it is not sent again to be scored"


def test_without_held_out_rows_lines_are_written_at_once_and_say_nothing_was_measured(tmp_path):
    hub = MemoryHub()

    def train_only(p: ScriptedWorker, b: m.ModelBroadcast) -> None:
        p.send_update(b)

    workers = [ScriptedWorker(hub, name, on_broadcast=train_only).start() for name in SCORES]
    result = run(hub, settings(tmp_path), workers)
    assert [(r.version, r.accuracy, r.federated_samples) for r in result.records] == [(1, None, 0), (2, None, 0)]
    assert workers[0].requests == [], "nobody scores: the final version is not sent to be scored"
