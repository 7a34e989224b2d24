"""The embedded mode: the aggregator and N workers in one process over an in-memory broker.

The same :class:`aggregator.service.Aggregator` and :class:`worker.service.Worker` run here as
over RabbitMQ; only the broker differs (and it still carries encoded bytes).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Callable

from aggregator.rounds import VersionRecord
from aggregator.service import Aggregator, RunResult
from fedmq.broker.memory import MemoryHub
from fedmq.settings import Settings
from worker.service import Worker

log = logging.getLogger(__name__)


def run_embedded(settings: Settings, *, on_version: Callable[[VersionRecord], None] | None = None,
                 hub: MemoryHub | None = None) -> RunResult:
    """Run a whole federation in this process and return the aggregator's result.

    ``hub`` lets a caller (tests) share the in-memory broker to watch or inject messages.
    """
    workers = settings.embedded.workers
    run = settings.run
    # The embedded federation starts once all its workers are ready (and, with the default
    # --num-partitions 0, splits the data among exactly them).
    if run.start_workers == 1:
        run = dataclasses.replace(run, start_workers=workers)
    # The embedded workers build whatever model the run names: it is the same process's choice.
    worker = dataclasses.replace(settings.worker, exit_when_done=True, trusted_models=run.model)
    settings = dataclasses.replace(settings, run=run, worker=worker)
    hub = hub or MemoryHub()
    aggregator_broker = hub.connect()
    aggregator = Aggregator(settings, aggregator_broker, on_version=on_version)
    errors: list[BaseException] = []
    instances: list[Worker] = []

    def serve(index: int) -> None:
        broker = hub.connect()
        worker_settings = dataclasses.replace(settings.worker, worker_id=f"worker-{index}")
        worker = Worker(dataclasses.replace(settings, worker=worker_settings), broker)
        instances.append(worker)
        try:
            worker.run()
        except BaseException as exc:  # surfaced by the caller after the run
            errors.append(exc)
            log.exception("embedded worker %d failed", index)
        finally:
            broker.close()

    threads = [threading.Thread(target=serve, args=(i,), name=f"worker-{i}", daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    finished = False
    try:
        result = aggregator.run()
        finished = True
    finally:
        aggregator_broker.close()
        if not finished:
            # The aggregator failed: no run-complete will come, so stop the workers now.
            for worker in instances:
                worker.stop()
        for thread in threads:
            thread.join(timeout=30)
    if errors:
        raise RuntimeError(f"{len(errors)} embedded worker(s) failed") from errors[0]
    return result
