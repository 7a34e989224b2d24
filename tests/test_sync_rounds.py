"""Synchronous round rules on the embedded federation: client fraction, deadline, re-broadcast.

A "silent" participant (hello and heartbeats from the test, never training on its own) makes the
quorum wait for someone who does not deliver.
"""

import dataclasses
import threading

import torch

from fedmq import messages as m
from fedmq.broker.memory import MemoryHub
from fedmq.chunking import split_frames
from fedmq.task import build_model
from fedmq.topology import CONTROL_QUEUE, STATIC_TOPOLOGY, UPDATES_QUEUE, inbox_queue, inbox_topology
from fedmq.transport import Transport
from fedmq_cli.embedded import run_embedded
from test_embedded import embedded_settings


class SilentParticipant:
    """Joins, keeps heartbeating as ready, and sends an update only when told to."""

    def __init__(self, hub: MemoryHub, worker_id: str = "silent", *, join: bool = True) -> None:
        self.worker_id, self.join = worker_id, join
        self.broker = hub.connect()
        self.broker.declare(STATIC_TOPOLOGY)
        self.broker.declare(inbox_topology(worker_id))
        self.transport = Transport(self.broker, max_frame_bytes=256 * 1024)
        self.broadcasts: list[m.ModelBroadcast] = []
        self.broker.subscribe(inbox_queue(worker_id).name, self._on_inbox, prefetch=0)
        self.stop = threading.Event()
        self.send_update = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _on_inbox(self, delivery):
        received = self.transport.receive(delivery)
        if received is not None:
            for d in received.deliveries:
                self.broker.ack(d)
            if isinstance(received.message, m.ModelBroadcast):
                self.broadcasts.append(received.message)

    def _loop(self):
        if self.join:
            self.transport.send("", CONTROL_QUEUE, m.WorkerHello(self.worker_id, -1, "cpu"))
        while not self.stop.is_set():
            if self.join:
                self.transport.send("", CONTROL_QUEUE,
                                    m.Heartbeat(self.worker_id, "embedded-test", "ready", -1, -1, "cpu"))
            self.broker.run_for(0.3)
            if self.send_update.is_set() and self.broadcasts:
                self.send_update.clear()
                latest = self.broadcasts[-1]
                delta = {k: torch.zeros_like(v) for k, v in latest.weights.items()}
                self.transport.send("", UPDATES_QUEUE, m.WeightUpdate(
                    latest.run_id, latest.version, self.worker_id, -1, 100, 1.0, 0.1, 1, delta))


def test_the_deadline_closes_a_version_with_min_updates(data_root, tmp_path):
    hub = MemoryHub()
    silent = SilentParticipant(hub)
    silent.thread.start()
    try:
        settings = embedded_settings(data_root, tmp_path, versions=1, start_workers=4, num_partitions=4,
                                     round_timeout_s=4.0, min_updates=1)
        result = run_embedded(settings, hub=hub)
    finally:
        silent.stop.set()
    record = result.records[0]
    assert (record.participants, record.expected, record.rebroadcasts) == (3, 4, 0)


def test_too_few_updates_at_the_deadline_re_broadcast_and_the_version_closes_later(data_root, tmp_path):
    hub = MemoryHub()
    silent = SilentParticipant(hub)
    silent.thread.start()
    watcher_done = threading.Event()

    def release_after_rebroadcast():
        # Once the silent participant has seen version 0 twice (the re-broadcast), it reports.
        while not watcher_done.is_set():
            if sum(b.version == 0 for b in silent.broadcasts) >= 2:
                silent.send_update.set()
                return
            watcher_done.wait(0.1)

    threading.Thread(target=release_after_rebroadcast, daemon=True).start()
    try:
        settings = embedded_settings(data_root, tmp_path, versions=1, start_workers=4, num_partitions=4,
                                     round_timeout_s=3.0, min_updates=4)
        result = run_embedded(settings, hub=hub)
    finally:
        watcher_done.set()
        silent.stop.set()
    record = result.records[0]
    assert record.rebroadcasts >= 1 and record.participants == 4
    assert sum(b.version == 0 for b in silent.broadcasts) >= 2


def test_client_fraction_names_a_seeded_subset_and_only_they_train(data_root, tmp_path):
    hub = MemoryHub()
    observer = SilentParticipant(hub, "observer", join=False)  # reads the broadcasts, never joins
    observer.thread.start()
    try:
        settings = embedded_settings(data_root, tmp_path, versions=3, client_fraction=0.5, seed=3)
        settings = dataclasses.replace(settings, embedded=dataclasses.replace(settings.embedded, workers=4))
        result = run_embedded(settings, hub=hub)
    finally:
        observer.stop.set()
    # 4 live workers, ceil(0.5 * 4) = 2 named in each broadcast; only they train and report.
    named = [b.selected for b in observer.broadcasts]
    assert len(named) == 3 and all(len(s) == 2 for s in named), named
    assert len(set(named)) > 1  # the seeded choice changes with the version
    for record in result.records:
        assert (record.participants, record.expected, record.stale) == (2, 2, 0)
