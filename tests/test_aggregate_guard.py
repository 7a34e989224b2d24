"""A non-finite aggregate never becomes a version: it is refused, the model stays, the updates
that made it are dead-lettered and the version is asked for again.

Two scripted workers push the model towards float32's limit: version 1 holds weights near 3e38
(finite), and the same step again would overflow to Inf.
"""

import math

import torch

from aggregator.checkpoint import CheckpointStore
from aggregator.service import Aggregator
from fedmq.broker.memory import MemoryHub
from fedmq.topology import DEAD_LETTER_QUEUE, UPDATES_QUEUE
from federation_harness import ScriptedWorker, run_aggregator
from test_embedded import embedded_settings

HUGE = 3.0e38  # below float32's largest (3.4e38); twice it is not


def push_to_the_limit_then_behave(participant, broadcast):
    if broadcast.attempt > 0:
        if broadcast.asks_again(participant.worker_id):
            participant.send_update(broadcast, fill=0.0)
    elif broadcast.version <= 1:
        participant.send_update(broadcast, fill=HUGE)


def test_a_non_finite_aggregate_is_refused_and_the_version_asked_for_again(data_root, tmp_path):
    hub = MemoryHub()
    workers = [ScriptedWorker(hub, f"w{i}", on_broadcast=push_to_the_limit_then_behave).start() for i in range(2)]
    settings = embedded_settings(data_root, tmp_path, versions=2, start_workers=2, num_partitions=2)
    aggregator = Aggregator(settings, hub.connect())
    try:
        result = run_aggregator(aggregator, limit_s=120)
    finally:
        for worker in workers:
            worker.stop()
    assert not aggregator.hung
    assert [(r.version, r.participants, r.refused_steps) for r in result.records] == [(1, 2, 0), (2, 2, 1)]
    # No broadcast ever carried a non-finite model (a worker would have refused to decode it) ...
    assert all(not w.invalid for w in workers)
    assert [(b.version, b.attempt > 0) for b in workers[0].broadcasts] == [(0, False), (1, False), (1, True)]
    # ... nor did any checkpoint: version 2 is version 1's model moved by two zero updates.
    saved = CheckpointStore(result.output_dir).load("embedded-test")
    assert saved.version == 2 and all(bool(torch.isfinite(t).all()) for t in saved.weights.values())
    first = next(iter(saved.weights.values()))
    assert math.isclose(float(first.flatten()[0]), HUGE, rel_tol=1e-3)
    # The two updates that overflowed (4 chunks each) went to the dead letters, by the broker's
    # own dead-lettering: the aggregator kept no bodies to republish.
    dead = hub.peek(DEAD_LETTER_QUEUE)
    assert len(dead) == 2 * 4 and all(h.get("x-first-death-reason") == "rejected" for _, h in dead)
    assert hub.depth(UPDATES_QUEUE) == 0
