"""Synchronous round rules on the embedded federation: client fraction, deadline, re-broadcast.

A scripted participant (hello and heartbeats from the test, never training on its own) makes the
quorum wait for someone who does not deliver. Deadlines pass when the test moves the
aggregator's clock, once the updates it waits for are in: nothing depends on how fast the
machine trains.
"""

import dataclasses
import logging
import re

from fedmq.broker.memory import MemoryHub
from fedmq_cli.embedded import run_embedded
from federation_harness import LogTrigger, ScriptedWorker, SteppedClock
from test_embedded import embedded_settings

NEVER = 10_000.0  # seconds: a deadline or timeout that only a clock jump reaches


def test_the_deadline_closes_a_version_with_min_updates(data_root, tmp_path):
    hub, clock = MemoryHub(), SteppedClock()
    silent = ScriptedWorker(hub, "silent").start()
    settings = embedded_settings(data_root, tmp_path, versions=1, start_workers=4, num_partitions=4,
                                 round_timeout_s=NEVER, worker_timeout_s=3 * NEVER, min_updates=1)
    try:
        # The three real workers are in: the deadline passes.
        with LogTrigger("aggregator.intake", "update 3/4", lambda: clock.jump(NEVER)):
            result = run_embedded(settings, hub=hub, clock=clock)
    finally:
        silent.stop()
    record = result.records[0]
    assert (record.participants, record.expected, record.rebroadcasts) == (3, 4, 0)


def test_too_few_updates_at_the_deadline_re_broadcast_to_the_awaited_and_the_version_closes(data_root, tmp_path):
    hub, clock = MemoryHub(), SteppedClock()

    def answer_when_asked_again(participant, broadcast):
        if broadcast.asks_again(participant.worker_id):
            participant.send_update(broadcast)

    silent = ScriptedWorker(hub, "silent", on_broadcast=answer_when_asked_again).start()
    settings = embedded_settings(data_root, tmp_path, versions=1, start_workers=4, num_partitions=4,
                                 round_timeout_s=NEVER, worker_timeout_s=3 * NEVER, min_updates=4)
    try:
        with LogTrigger("aggregator.intake", "update 3/4", lambda: clock.jump(NEVER)):
            result = run_embedded(settings, hub=hub, clock=clock)
    finally:
        silent.stop()
    record = result.records[0]
    assert record.rebroadcasts == 1 and record.participants == 4
    again = [b for b in silent.broadcasts if b.version == 0 and b.attempt > 0]
    # The re-broadcast asks only the worker whose update is missing to train again.
    assert len(again) == 1 and again[0].awaited == ("silent",)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_client_fraction_names_a_seeded_subset_and_only_they_train(data_root, tmp_path):
    hub = MemoryHub()
    # Only the selected workers receive a version (aggregator.broadcasting): who received which
    # version is who was named.
    lines, logger = _Lines(), logging.getLogger("worker.service")
    logger.addHandler(lines)
    level, logger.level = logger.level, logging.INFO
    try:
        settings = embedded_settings(data_root, tmp_path, versions=3, client_fraction=0.5, seed=3)
        settings = dataclasses.replace(settings, embedded=dataclasses.replace(settings.embedded, workers=4))
        result = run_embedded(settings, hub=hub)
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    named: dict[int, set[str]] = {}
    for line in lines.lines:
        found = re.match(r"worker (\S+): model version (\d+) of run \S+ received", line)
        if found:
            named.setdefault(int(found[2]), set()).add(found[1])
    # 4 live workers, ceil(0.5 * 4) = 2 named in each broadcast; only they receive, train and report.
    assert sorted(named) == [0, 1, 2] and all(len(s) == 2 for s in named.values()), named
    assert len({frozenset(s) for s in named.values()}) > 1  # the seeded choice changes with the version
    for record in result.records:
        assert (record.participants, record.expected, record.stale) == (2, 2, 0)
