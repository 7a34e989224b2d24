"""The embedded mode: the aggregator and N workers in one process over an in-memory broker.

The same :class:`aggregator.service.Aggregator` and :class:`worker.service.Worker` run here as
over RabbitMQ; only the broker differs (and it still carries encoded bytes).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

from aggregator.rounds import VersionRecord
from aggregator.service import Aggregator, RunResult
from fedmq.broker.memory import MemoryHub
from fedmq.events import EventBus
from fedmq.settings import Settings
from worker.service import Worker

log = logging.getLogger(__name__)


def as_embedded(settings: Settings) -> Settings:
    """The settings as the embedded mode runs them (see the comments)."""
    workers = settings.embedded.workers
    run = settings.run
    # The embedded federation starts once all its workers are ready and, with the default
    # --num-partitions 0, splits the whole training set among exactly them.
    if run.start_workers == 1:
        run = dataclasses.replace(run, start_workers=workers)
    if run.num_partitions == 0:
        run = dataclasses.replace(run, num_partitions=workers)
    # A one-off process: each `fedmq run` is a new run unless it is named.
    if not run.run_id:
        run = dataclasses.replace(run, run_id=time.strftime("run-%Y%m%d-%H%M%S"))
    # The embedded workers build whatever model the run names: it is the same process's choice.
    worker = dataclasses.replace(settings.worker, exit_when_done=True, trusted_models=run.model)
    return dataclasses.replace(settings, run=run, worker=worker)


class EmbeddedWorkers:
    """``settings.embedded.workers`` workers (``worker-0``, ``worker-1`` ...), each in a thread
    with its own connection to ``hub``."""

    def __init__(self, hub: MemoryHub, settings: Settings) -> None:
        self.hub, self.settings = hub, settings
        self.errors: list[BaseException] = []
        self.instances: list[Worker] = []
        self.threads = [threading.Thread(target=self._serve, args=(i,), name=f"worker-{i}", daemon=True)
                        for i in range(settings.embedded.workers)]

    def start(self) -> "EmbeddedWorkers":
        for thread in self.threads:
            thread.start()
        return self

    def _serve(self, index: int) -> None:
        broker = self.hub.connect()
        worker_settings = dataclasses.replace(self.settings.worker, worker_id=f"worker-{index}")
        worker = Worker(dataclasses.replace(self.settings, worker=worker_settings), broker)
        self.instances.append(worker)
        try:
            worker.run()
        except BaseException as exc:  # surfaced by the caller after the run
            self.errors.append(exc)
            log.exception("embedded worker %d failed", index)
        finally:
            broker.close()

    def stop(self) -> None:
        for worker in self.instances:
            worker.stop()

    def join(self, timeout_s: float = 30.0) -> None:
        for thread in self.threads:
            thread.join(timeout=timeout_s)

    def raise_errors(self) -> None:
        """RuntimeError if a worker failed."""
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} embedded worker(s) failed") from self.errors[0]


def run_embedded(settings: Settings, *, on_version: Callable[[VersionRecord], None] | None = None,
                 hub: MemoryHub | None = None, clock: Callable[[], float] = time.monotonic,
                 events: EventBus | None = None) -> RunResult:
    """Run a whole federation in this process and return the aggregator's result.

    ``hub`` lets a caller (tests) share the in-memory broker to watch or inject messages;
    ``clock`` is the aggregator's (tests move it to pass deadlines); ``events`` receives the
    aggregator's events (:mod:`fedmq.events`).
    """
    settings = as_embedded(settings)
    hub = hub or MemoryHub()
    aggregator_broker = hub.connect()
    aggregator = Aggregator(settings, aggregator_broker, on_version=on_version, clock=clock, events=events)
    workers = EmbeddedWorkers(hub, settings).start()
    finished = False
    try:
        result = aggregator.run()
        finished = True
    finally:
        aggregator_broker.close()
        if not finished:
            # The aggregator failed: no run-complete will come, so stop the workers now.
            workers.stop()
        workers.join()
    workers.raise_errors()
    return result
