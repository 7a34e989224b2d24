"""Test tools for federations on the in-memory broker, driven by events instead of waiting.

- :class:`SteppedClock`: the aggregator's clock; a test makes a deadline pass by moving it.
- :class:`LogTrigger`: runs a function when a log line appears (on the logging thread, at once).
- :class:`ScriptedWorker`: a participant that joins and heartbeats like a worker but sends only
  the updates a test tells it to, and records everything it receives.
- :func:`run_aggregator`: runs an aggregator in the calling thread with a watchdog that ends a
  run that hangs (the test then fails on what it asserts, instead of never returning).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from fedmq import messages as m
from fedmq.broker.memory import MemoryHub
from fedmq.errors import InvalidMessage
from fedmq.topology import CONTROL_QUEUE, STATIC_TOPOLOGY, UPDATES_QUEUE, inbox_queue, inbox_topology
from fedmq.transport import Transport


class SteppedClock:
    """``time.monotonic()`` plus the jumps a test makes."""

    def __init__(self) -> None:
        self.jumped = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.jumped

    def jump(self, seconds: float) -> None:
        self.jumped += seconds


class LogTrigger(logging.Handler):
    """Calls ``action`` once, the first time a record of ``logger`` contains ``text``."""

    def __init__(self, logger: str, text: str, action: Callable[[], None]) -> None:
        super().__init__(logging.DEBUG)
        self.text, self.action, self.fired = text, action, threading.Event()
        self.logger = logging.getLogger(logger)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fired.is_set() and self.text in record.getMessage():
            self.fired.set()
            self.action()

    def __enter__(self) -> "LogTrigger":
        self.logger.addHandler(self)
        self._level = self.logger.level
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 120.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def run_aggregator(aggregator, limit_s: float = 240.0):
    """Run ``aggregator`` here; a watchdog ends it after ``limit_s`` (then ``.hung`` is True)."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(limit_s):
            aggregator.hung = True
            aggregator.finished = True

    aggregator.hung = False
    threading.Thread(target=watch, daemon=True).start()
    try:
        return aggregator.run()
    finally:
        done.set()


class ScriptedWorker:
    """Joins, heartbeats every ``interval_s`` and sends an update only when told to."""

    def __init__(self, hub: MemoryHub, worker_id: str = "scripted", *, join: bool = True,
                 interval_s: float = 0.3, max_frame_bytes: int = 256 * 1024, state: str = "ready",
                 beat_before_join: bool = True,
                 on_broadcast: Callable[["ScriptedWorker", m.ModelBroadcast], None] | None = None,
                 on_request: Callable[["ScriptedWorker", m.EvaluationRequest], None] | None = None,
                 user: str | None = None) -> None:
        self.worker_id, self.join, self.interval_s, self.on_broadcast = worker_id, join, interval_s, on_broadcast
        self.on_request = on_request
        self.requests: list[m.EvaluationRequest] = []
        self.state, self.beat_before_join = state, beat_before_join
        self.broker = hub.connect(user=user)  # user: the broker user its messages carry
        self.broker.declare(STATIC_TOPOLOGY)
        self.broker.declare(inbox_topology(worker_id))
        self.transport = Transport(self.broker, max_frame_bytes=max_frame_bytes)
        self.run_id = ""  # heartbeats carry it: "" until joined
        self.heartbeats_sent = 0
        self.joins: list[m.JoinAccepted] = []
        self.broadcasts: list[m.ModelBroadcast] = []
        self.invalid: list[InvalidMessage] = []
        self.broker.subscribe(inbox_queue(worker_id).name, self._on_inbox, prefetch=0)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=worker_id, daemon=True)

    def start(self) -> "ScriptedWorker":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)

    def _on_inbox(self, delivery):
        try:
            received = self.transport.receive(delivery)
        except InvalidMessage as exc:
            self.invalid.append(exc)
            for d in exc.deliveries:  # type: ignore[attr-defined]
                self.broker.ack(d)
            return
        if received is None:
            return
        for d in received.deliveries:
            self.broker.ack(d)
        message = received.message
        if isinstance(message, m.JoinAccepted):
            self.joins.append(message)
            self.run_id = message.run_id
        elif isinstance(message, m.ModelBroadcast):
            self.broadcasts.append(message)
            if self.on_broadcast is not None:
                self.on_broadcast(self, message)
        elif isinstance(message, m.EvaluationRequest):
            self.requests.append(message)
            if self.on_request is not None:
                self.on_request(self, message)

    def _loop(self) -> None:
        if self.join:
            self.transport.send("", CONTROL_QUEUE, m.WorkerHello(self.worker_id, -1, "cpu", time.time()))
        next_beat = 0.0
        while not self.stopping.is_set():
            if self.join and time.monotonic() >= next_beat and (self.joins or self.beat_before_join):
                self.transport.send("", CONTROL_QUEUE, m.Heartbeat(
                    self.worker_id, self.run_id, self.state, -1, -1, "cpu", time.time()))
                self.heartbeats_sent += 1
                next_beat = time.monotonic() + self.interval_s
            self.broker.run_for(0.05)

    def on_thread(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on this participant's connection thread."""
        self.broker.call_threadsafe(fn)

    def send_update(self, broadcast: m.ModelBroadcast, *, fill: float = 0.0, samples: int = 100) -> None:
        """Answer ``broadcast`` with a delta of ``fill`` everywhere (integer tensors: 0)."""
        delta = {k: torch.full_like(v, fill) if v.is_floating_point() else torch.zeros_like(v)
                 for k, v in broadcast.weights.items()}
        update = m.WeightUpdate(broadcast.run_id, broadcast.version, self.worker_id, -1, samples, 1.0, 0.1, 1, delta)
        if threading.current_thread() is self.thread:
            self.transport.send("", UPDATES_QUEUE, update)
        else:
            self.on_thread(lambda: self.transport.send("", UPDATES_QUEUE, update))

    def publish_update_queue(self, body: m.Message | bytes) -> None:
        """Put ``body`` (a message, or any bytes) on the update queue, in order with this
        participant's other messages."""
        if threading.current_thread() is self.thread:
            self.transport.send("", UPDATES_QUEUE, body)
        else:
            self.on_thread(lambda: self.transport.send("", UPDATES_QUEUE, body))

    def say(self, message: m.Message) -> None:
        """Send a control message (a goodbye, a hello ...)."""
        self.on_thread(lambda: self.transport.send("", CONTROL_QUEUE, message))
