"""Crash recovery on the embedded federation (real workers, 2NN, real MNIST).

An aggregator "crashes" when the test stops its loop at a chosen log line and closes its broker
connection without acknowledging anything, as a killed process would; another aggregator with
the same settings then takes over. The process-level version (SIGKILL over RabbitMQ) is in
``test_federation_rabbitmq.py``.
"""

import dataclasses

from aggregator.service import Aggregator
from fedmq.broker.memory import MemoryHub
from fedmq.messages import peek_update
from fedmq.settings import BrokerSettings
from fedmq.topology import DEAD_LETTER_QUEUE, UPDATES_QUEUE
from fedmq_cli.embedded import EmbeddedWorkers, as_embedded
from federation_harness import LogTrigger, SteppedClock, run_aggregator
from test_embedded import embedded_settings

NEVER = 10_000.0


def crash_at(hub, settings, logger: str, text: str) -> Aggregator:
    """Run an aggregator until ``text`` is logged, then drop it like a killed process."""
    aggregator = Aggregator(settings, hub.connect())
    with LogTrigger(logger, text, lambda: setattr(aggregator, "finished", True)) as trigger:
        run_aggregator(aggregator, limit_s=120)
    assert trigger.fired.is_set(), "the aggregator never got to the crash point"
    aggregator.broker.close()  # its unacknowledged deliveries go back to their queues
    return aggregator


def test_updates_redelivered_after_a_crash_before_the_first_checkpoint_are_folded(data_root, tmp_path):
    hub = MemoryHub()
    settings = as_embedded(embedded_settings(data_root, tmp_path, versions=1))
    workers = EmbeddedWorkers(hub, settings).start()
    try:
        crash_at(hub, settings, "aggregator.intake", "version 0: update 2/3")
        assert not (tmp_path / "embedded-test" / "checkpoint.safetensors").exists()
        second = Aggregator(settings, hub.connect())
        result = run_aggregator(second, limit_s=120)
    finally:
        workers.stop()
        workers.join()
    assert not second.hung
    # The two updates folded by the crashed aggregator came back and were folded again, not
    # dead-lettered; the third worker's was awaited: every worker's update is in version 1.
    assert [(r.version, r.participants, r.expected) for r in result.records] == [(1, 3, 3)]
    assert hub.depth(DEAD_LETTER_QUEUE) == 0 and hub.depth(UPDATES_QUEUE) == 0


def test_a_resumed_version_waits_for_the_workers_live_at_the_checkpoint(data_root, tmp_path):
    hub = MemoryHub()
    settings = as_embedded(embedded_settings(data_root, tmp_path, versions=2))
    workers = EmbeddedWorkers(hub, settings).start()
    try:
        crash_at(hub, settings, "aggregator.intake", "version 1: update 1/3")
        # Restarted with the default --start-workers 1: it must still wait for all three.
        restarted = dataclasses.replace(settings, run=dataclasses.replace(settings.run, start_workers=1))
        second = Aggregator(restarted, hub.connect())
        assert second.resumed and second.version == 1
        result = run_aggregator(second, limit_s=120)
    finally:
        workers.stop()
        workers.join()
    assert not second.hung
    record = result.records[0]
    assert (record.version, record.participants, record.expected, record.stale) == (2, 3, 3, 0)
    assert result.test_accuracy >= 0.9
    assert hub.depth(DEAD_LETTER_QUEUE) == 0 and hub.depth(UPDATES_QUEUE) == 0


class LossyHub(MemoryHub):
    """Loses the first update ``victim`` publishes, as if the broker never had it; then calls
    ``on_loss``."""

    def __init__(self, victim: str) -> None:
        super().__init__()
        self.victim, self.lost, self.on_loss = victim, [], lambda: None

    def _enqueue(self, exchange, routing_key, stored, mandatory):
        if routing_key == UPDATES_QUEUE and not self.lost:
            header = peek_update(stored.body)
            if header is not None and header.worker_id == self.victim:
                self.lost.append(header)
                self.on_loss()
                return
        super()._enqueue(exchange, routing_key, stored, mandatory)


def test_a_re_broadcast_makes_a_worker_whose_update_was_lost_train_again(data_root, tmp_path):
    hub, clock = LossyHub("worker-0"), SteppedClock()
    settings = as_embedded(embedded_settings(data_root, tmp_path, versions=1, round_timeout_s=NEVER,
                                             worker_timeout_s=3 * NEVER, min_updates=3))
    # Updates in one frame each, so the hub can lose one whole.
    settings = dataclasses.replace(settings, broker=BrokerSettings(max_frame_bytes=8 << 20))
    workers = EmbeddedWorkers(hub, settings).start()
    aggregator = Aggregator(settings, hub.connect(), clock=clock)
    seen = set()

    def once_both(event: str):
        # The deadline passes once both other updates are in and worker-0's is gone.
        seen.add(event)
        if seen == {"lost", "two folded"}:
            clock.jump(NEVER)

    hub.on_loss = lambda: once_both("lost")
    try:
        with LogTrigger("aggregator.intake", "update 2/3", lambda: once_both("two folded")):
            result = run_aggregator(aggregator, limit_s=120)
    finally:
        workers.stop()
        workers.join()
    assert not aggregator.hung and hub.lost[0].base_version == 0
    record = result.records[0]
    # worker-0 trained version 0 a second time, asked by the re-broadcast.
    assert (record.participants, record.rebroadcasts) == (3, 1)
