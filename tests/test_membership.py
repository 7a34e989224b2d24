"""The control queue: a worker that refuses the run is not joined again on its heartbeats."""

import threading

from aggregator.service import Aggregator
from fedmq import messages as m
from fedmq.broker.memory import MemoryHub
from federation_harness import ScriptedWorker, run_aggregator, wait_until
from test_embedded import embedded_settings


def test_a_worker_that_refuses_the_run_is_not_joined_again_until_it_says_hello(data_root, tmp_path):
    hub = MemoryHub()
    settings = embedded_settings(data_root, tmp_path, versions=1, start_workers=1)
    aggregator = Aggregator(settings, hub.connect())
    serving = threading.Thread(target=run_aggregator, args=(aggregator, 120), daemon=True)
    serving.start()
    # Heartbeats only once joined, as "joining": version 0 waits for a ready worker.
    refuser = ScriptedWorker(hub, "refuser", interval_s=0.05, state="joining", beat_before_join=False).start()
    probe = None
    try:
        assert wait_until(lambda: len(refuser.joins) == 1)
        refuser.run_id = ""  # what a worker that refused the run reports in its heartbeats
        refuser.say(m.WorkerGoodbye("refuser", "embedded-test", "refused", "model 'x:y' is not trusted"))
        beats = refuser.heartbeats_sent
        assert wait_until(lambda: refuser.heartbeats_sent >= beats + 10)
        # A ready worker opens version 0; its broadcast reaches the refuser's inbox after any
        # assignment the aggregator sent it while reading those heartbeats.
        probe = ScriptedWorker(hub, "probe").start()
        assert wait_until(lambda: len(refuser.broadcasts) == 1)
        assert len(refuser.joins) == 1 and "refuser" not in aggregator.registry.live_ids()
        assert aggregator.membership.refused == {"refuser": "model 'x:y' is not trusted"}
        # A new hello (a restarted, reconfigured worker) joins it again.
        refuser.say(m.WorkerHello("refuser", -1, "cpu", 0.0))
        assert wait_until(lambda: len(refuser.joins) >= 2)
    finally:
        aggregator.finished = True
        serving.join(timeout=30)
        for participant in (refuser, probe):
            if participant is not None:
                participant.stop()
