"""The worker service: join, take the newest model, train it, send the delta, repeat.

Two threads. The connection thread (the one that calls :meth:`Worker.run`) owns the broker: it
handles inbox messages and sends heartbeats, so the connection stays alive however long training
takes (pika only answers heartbeats inside its own calls). The training thread loads the data and
trains; it hands finished updates back with ``broker.call_threadsafe``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedmq.broker.base import Broker, Delivery
from fedmq.device import resolve_device
from fedmq.errors import BrokerError, InvalidMessage
from fedmq.messages import (Heartbeat, JoinAccepted, ModelBroadcast, RunComplete, TaskSpec, WeightUpdate,
                            WorkerGoodbye, WorkerHello, encode)
from fedmq.settings import Settings
from fedmq.task import BUILTIN_MODELS, build_model, forget_cached_splits, load_split, make_partitions
from fedmq.tensor_codec import encoded_size_bound
from fedmq.topology import CONTROL_QUEUE, DEFAULT_EXCHANGE, STATIC_TOPOLOGY, UPDATES_QUEUE, inbox_queue, inbox_topology
from fedmq.transport import Transport
from worker.trainer import train_locally, training_seed, weights_mismatch
from worker.training_slots import TrainingSlots
from worker.update_outbox import UpdateOutbox

log = logging.getLogger(__name__)


def default_worker_id() -> str:
    """Host name, process id and a random suffix: unique across ``--scale``d containers."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


@dataclass
class _LocalData:
    key: tuple[TaskSpec, int]
    images: torch.Tensor  # on the training device
    labels: torch.Tensor
    model: torch.nn.Module


class Worker:
    """One federation participant; :meth:`run` returns when the run completes or on :meth:`stop`."""

    def __init__(self, settings: Settings, broker: Broker, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.cfg = settings.worker
        self.worker_id = self.cfg.worker_id or default_worker_id()
        self.broker = broker
        self.transport = Transport(broker, max_frame_bytes=settings.broker.max_frame_bytes)
        self.device = resolve_device(self.cfg.device)
        self.clock = clock
        self.slots = TrainingSlots(self.cfg.training_slots_dir, self.cfg.training_slots)
        # Hellos, heartbeats and goodbyes expire in the control queue: an aggregator started
        # later must not take the last words of a dead worker for a live one. A live worker's
        # next heartbeat announces it again.
        self._control_ttl_s = max(5.0, 4 * self.cfg.heartbeat_interval_s)
        self.updates_sent = 0
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._done = False
        # Shared with the training thread; guarded by _cond.
        self._run_id = ""
        self._task: TaskSpec | None = None
        self._partition = -1
        self._latest: ModelBroadcast | None = None
        self._trained: tuple[str, int, int] = ("", -1, 0)  # (run id, version, attempt) last trained
        self._data: _LocalData | None = None
        self._state = "joining"
        self._sending: tuple[str, int, int] | None = None  # trained, handed to the outbox, unconfirmed
        #: Why the worker stopped if it did not finish or leave on request; run() then returns
        #: and ``fedmq worker`` exits non-zero so that a restart policy restarts it.
        self.failure: str | None = None
        self._goodbye = ("leaving", "", "")  # (reason, detail, run id) said when run() returns
        self._outbox = UpdateOutbox(lambda body: self.transport.send(DEFAULT_EXCHANGE, UPDATES_QUEUE, body))

    # -- connection thread ----------------------------------------------------------------------
    def run(self) -> int:
        """Serve until the run completes (with ``exit_when_done``) or :meth:`stop`; returns the
        number of updates sent."""
        self.broker.declare(STATIC_TOPOLOGY)
        self.broker.declare(inbox_topology(self.worker_id))
        # Each inbox message is acknowledged as soon as it is read (before any training), so an
        # unlimited prefetch cannot deadlock chunk reassembly or trip the consumer timeout.
        self.broker.subscribe(inbox_queue(self.worker_id).name, self._on_inbox, prefetch=0)
        self.transport.send(DEFAULT_EXCHANGE, CONTROL_QUEUE,
                            WorkerHello(self.worker_id, self.cfg.partition, self.device.type, time.time()),
                            ttl_s=self._control_ttl_s)
        log.info("worker %s on %s: hello sent, waiting for the aggregator", self.worker_id, self.device)
        trainer = threading.Thread(target=self._training_loop, name=f"train-{self.worker_id}", daemon=True)
        trainer.start()
        next_beat = self.clock()
        try:
            while not self._stopping.is_set():
                self.broker.run_for(0.5)
                if self._outbox.pending is not None:
                    self._flush_outbox()
                if self.clock() >= next_beat:
                    self._send_heartbeat()
                    next_beat = self.clock() + self.cfg.heartbeat_interval_s
        finally:
            self._stopping.set()
            with self._cond:
                self._cond.notify_all()
            trainer.join(timeout=60)
            self._outbox.drop("the worker is stopping")
            if not self._done:
                reason, detail, run_id = self._goodbye
                try:
                    self.transport.send(DEFAULT_EXCHANGE, CONTROL_QUEUE,
                                        WorkerGoodbye(self.worker_id, run_id or self._run_id, reason, detail),
                                        persistent=False, ttl_s=self._control_ttl_s)
                except BrokerError as exc:
                    log.warning("worker %s: goodbye not sent: %s", self.worker_id, exc)
            try:
                # Leaving for good: stop the broadcast fanout from copying models into our inbox.
                self.broker.delete_queue(inbox_queue(self.worker_id).name)
            except BrokerError as exc:
                log.warning("worker %s: inbox not deleted (it expires on its own): %s", self.worker_id, exc)
        log.info("worker %s stopped after %d updates", self.worker_id, self.updates_sent)
        return self.updates_sent

    def stop(self) -> None:
        """Ask :meth:`run` to return (from any thread or a signal handler)."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    def _fail(self, reason: str, detail: str, run_id: str = "") -> None:
        """Stop for good: say why in the goodbye (``failed`` or ``refused``) and exit non-zero."""
        self.failure = f"{reason}: {detail}"
        self._goodbye = (reason, detail, run_id)
        self.stop()

    def _send_heartbeat(self) -> None:
        with self._cond:
            beat = Heartbeat(self.worker_id, self._run_id, self._state, self._trained[1], self._partition,
                             self.device.type, time.time())
        self.transport.send(DEFAULT_EXCHANGE, CONTROL_QUEUE, beat, persistent=False, ttl_s=self._control_ttl_s)

    def _on_inbox(self, delivery: Delivery) -> None:
        try:
            received = self.transport.receive(delivery)
        except InvalidMessage as exc:
            self.transport.dead_letter(exc.deliveries, exc.reason, exc.detail)  # type: ignore[attr-defined]
            return
        if received is None:
            return  # more chunks to come; they are acknowledged together
        for d in received.deliveries:
            self.broker.ack(d)
        message = received.message
        if isinstance(message, JoinAccepted):
            self._on_join(message)
        elif isinstance(message, ModelBroadcast):
            self._on_model(message)
        elif isinstance(message, RunComplete):
            self._on_complete(message)
        else:
            log.warning("worker %s: unexpected %s message in the inbox ignored", self.worker_id, message.KIND)

    def _model_allowed(self, spec: str) -> bool:
        # A model spec from the wire names code to import and call: a worker builds only the
        # built-ins and the user models its own operator listed.
        trusted = {s.strip() for s in self.cfg.trusted_models.split(",") if s.strip()}
        return spec in BUILTIN_MODELS or spec in trusted

    def _on_join(self, join: JoinAccepted) -> None:
        if not self._model_allowed(join.task.model):
            detail = (f"run {join.run_id} asks for model {join.task.model!r}, which this worker does not trust; "
                      "add it to --trusted-models (FEDMQ_TRUSTED_MODELS) to allow it")
            log.error("worker %s: %s", self.worker_id, detail)
            self._fail("refused", detail, join.run_id)
            return
        with self._cond:
            if (join.run_id, join.task, join.partition_index) == (self._run_id, self._task, self._partition):
                return
            self._run_id, self._task, self._partition = join.run_id, join.task, join.partition_index
            if self._latest is not None and self._latest.run_id != join.run_id:
                self._latest = None
            self._state = "joining"
            self._cond.notify_all()
        log.info("worker %s joined run %s: partition %d of %d (%s, %s)", self.worker_id, join.run_id,
                 join.partition_index, join.task.num_partitions, join.task.dataset, join.task.partition_scheme)

    def _on_model(self, model: ModelBroadcast) -> None:
        with self._cond:
            if self._run_id and model.run_id != self._run_id:
                log.info("worker %s: model of run %s ignored (joined %s)", self.worker_id, model.run_id, self._run_id)
                return
            latest = self._latest
            if latest is not None and latest.run_id == model.run_id and latest.version > model.version:
                return  # an older version arrived late: keep the newest
            self._latest = model
            self._cond.notify_all()
        log.info("worker %s: model version %d of run %s received", self.worker_id, model.version, model.run_id)

    def _on_complete(self, done: RunComplete) -> None:
        with self._cond:
            if done.run_id != self._run_id:
                return
            log.info("worker %s: run %s complete at version %d (accuracy %.4f)", self.worker_id, done.run_id,
                     done.final_version, done.test_accuracy)
            if self.cfg.exit_when_done:
                self._done = True
                self._stopping.set()
            else:
                self._run_id, self._latest, self._state = "", None, "joining"
            self._cond.notify_all()

    def _queue_update(self, key: tuple[str, int, int], body: bytes) -> None:
        self._outbox.put(key, body)
        self._flush_outbox()

    def _flush_outbox(self) -> None:
        """Send the pending update if its time has come; it counts as trained once confirmed."""
        pending = self._outbox.pending
        if pending is not None and pending.key[0] != self._run_id:
            self._outbox.drop(f"run {pending.key[0]} is over")
            with self._cond:
                self._sending = None
                self._cond.notify_all()
            return
        sent = self._outbox.flush(self.clock())
        if sent is None:
            return
        key, size = sent
        with self._cond:
            self._trained, self._sending = key, None
            self._cond.notify_all()
        self.updates_sent += 1
        log.info("worker %s: update for version %d sent (%.2f MB)", self.worker_id, key[1], size / 1e6)
        self._send_heartbeat()

    # -- training thread ------------------------------------------------------------------------
    def _runnable(self) -> ModelBroadcast | None:
        model = self._latest
        if model is None or self._data is None or model.run_id != self._run_id:
            return None
        if self._data.key != (self._task, self._partition):
            return None
        if self._sending is not None:
            return None  # the last update is not confirmed yet: send it before training more
        run_id, version, attempt = self._trained
        if run_id == model.run_id and (version > model.version or (
                version == model.version and (attempt == model.attempt or not model.asks_again(self.worker_id)))):
            return None  # trained already, and not asked again (see ModelBroadcast.attempt)
        if model.selected and self.worker_id not in model.selected:
            return None
        return model

    def _training_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                with self._cond:
                    while not self._stopping.is_set():
                        need_data = self._task is not None and (
                            self._data is None or self._data.key != (self._task, self._partition))
                        model = None if need_data else self._runnable()
                        if need_data or model is not None:
                            break
                        self._cond.wait(1.0)
                    else:
                        return
                    key = (self._task, self._partition)
                if need_data:
                    self._load(*key)
                    continue
                self._train(model)
        except Exception as exc:
            log.exception("worker %s: training thread failed; stopping", self.worker_id)
            self._fail("failed", f"training thread: {type(exc).__name__}: {exc}"[:1000])

    def _load(self, task: TaskSpec, partition: int) -> None:
        data = self.settings.data
        started = time.perf_counter()
        split = load_split(task.dataset, Path(data.data_root), train=True,
                           mirror=Path(data.data_mirror) if data.data_mirror else None, download=data.download)
        parts = make_partitions(task.partition_scheme, split.labels.numpy(), task.num_partitions, seed=task.seed,
                                alpha=task.dirichlet_alpha, shards_per_partition=task.shards_per_partition)
        local = split.subset(np.asarray(parts[partition]))
        del split
        forget_cached_splits()  # keep only this worker's partition in memory
        model = build_model(task.model).to(self.device)
        # Broadcasts are reassembled in memory: bound them by what this model can encode to.
        limit = encoded_size_bound(model.state_dict())
        self.broker.call_threadsafe(lambda: self.transport.bound_messages(limit, 2 * limit))
        loaded = _LocalData((task, partition), local.images.to(self.device), local.labels.to(self.device), model)
        with self._cond:
            self._data = loaded
            self._state = "ready"
            self._cond.notify_all()
        log.info("worker %s: partition %d loaded, %d samples in %.1f s", self.worker_id, partition,
                 len(local.labels), time.perf_counter() - started)
        self.broker.call_threadsafe(self._send_heartbeat)

    def _newer_model_waiting(self, version: int, run_id: str) -> bool:
        latest = self._latest
        return self._stopping.is_set() or latest is None or latest.run_id != run_id or latest.version > version

    def _train(self, model: ModelBroadcast) -> None:
        data = self._data
        assert data is not None
        with self._cond:
            self._state = "training"
        mismatch = weights_mismatch(data.model.state_dict(), model.weights)
        if mismatch:
            log.error("worker %s: version %d of run %s refused: its tensors do not match the run's model %s (%s); "
                      "not training on it", self.worker_id, model.version, model.run_id, data.key[0].model, mismatch)
            with self._cond:
                self._state = "idle"
                if self._latest is model:
                    self._latest = None  # wait for the next broadcast
            return
        seed = training_seed(data.key[0].seed, model.version, data.key[1], self.worker_id)
        superseded = lambda: self._newer_model_waiting(model.version, model.run_id)  # noqa: E731
        with self.slots.hold(give_up=superseded) as granted:
            if not granted:
                with self._cond:
                    self._state = "idle"
                return
            result = train_locally(data.model, model.weights, data.images, data.labels, model.training,
                                   seed=seed, should_stop=superseded)
        with self._cond:
            self._state = "idle"
            if not result.completed:
                log.info("worker %s: training of version %d abandoned after %d steps: a newer model arrived",
                         self.worker_id, model.version, result.steps)
                return
            key = (model.run_id, model.version, model.attempt)
            self._sending = key
        update = WeightUpdate(model.run_id, model.version, self.worker_id, data.key[1], result.num_samples,
                              result.train_loss, result.seconds, result.steps, result.delta)
        body = encode(update)  # encoded here, off the connection thread
        log.info("worker %s: version %d trained, %d steps, loss %.4f, %.1f s", self.worker_id, model.version,
                 result.steps, result.train_loss, result.seconds)
        self.broker.call_threadsafe(lambda: self._queue_update(key, body))
