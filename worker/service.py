"""The worker service: join, take the newest model, score it, train it, send the delta, repeat.

Two threads. The connection thread (the one that calls :meth:`Worker.run`) owns the broker: it
handles inbox messages and sends heartbeats, so the connection stays alive however long training
takes (pika only answers heartbeats inside its own calls). The training thread loads the data
(from the data source ``--data`` names, :mod:`worker.data_sources`), scores each version it is
selected for on its held-out rows (``--eval-fraction``) and trains; it hands evaluation reports
and finished updates back with ``broker.call_threadsafe``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fedmq.broker.base import Broker, Delivery
from fedmq.device import resolve_device
from fedmq.errors import BrokerError, InvalidMessage
from fedmq.event_log import log_event
from fedmq.events import EventBus, TrainingFinished, UpdateSent, WorkerProgress
from fedmq.messages import (EvaluationReport, EvaluationRequest, Heartbeat, JoinAccepted, KeyframeRequest,
                            ModelBroadcast, RunComplete, TaskSpec, WeightUpdate, WorkerGoodbye, WorkerHello, encode)
from fedmq.settings import Settings
from fedmq.task import BUILTIN_MODELS, build_model
from fedmq.task.evaluation import evaluate
from fedmq.tensor_codec import element_count, encoded_size_bound
from fedmq.broker_users import declare_inbox, declare_shared_topology
from fedmq.topology import CONTROL_QUEUE, SUBMIT_EXCHANGE, UPDATES_QUEUE, inbox_queue
from fedmq.transport import Transport
from fedmq.codecs import parse_codec
from fedmq.downlink import KEYFRAME, Frame, Reconstruction
from worker.data_sources import open_data_source, prepare_local_data
from worker.error_feedback import ErrorFeedback
from worker.local_data import LocalData, LocalDataError
from worker.trainer import train_locally, training_seed, weights_mismatch
from worker.training_progress import TrainingProgress
from worker.training_slots import TrainingSlots
from worker.update_outbox import UpdateOutbox

log = logging.getLogger(__name__)


def default_worker_id(user: str | None = None) -> str:
    """Host name, process id and a random suffix: unique across ``--scale``d containers;
    after ``<user>.`` when the broker user is known (its permissions cover inboxes named so,
    and an aggregator that requires identity checks it)."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:40]
    return f"{user + '.' if user else ''}{host}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


#: Batch size when a worker scores a model on its held-out rows.
EVAL_BATCH_SIZE = 1000


@dataclass
class _LocalData:
    key: tuple  # (task, the data source's key): what the data was loaded for
    partition: int  # the partition index it holds, -1 for the worker's own data
    train: LocalData  # on the training device; its size is the update's FedAvg weight
    held_out: LocalData | None  # on the training device; None without --eval-fraction
    model: torch.nn.Module


class Worker:
    """One federation participant; :meth:`run` returns when the run completes or on :meth:`stop`.
    Its heartbeats, trainings and sent updates go out as events (:mod:`fedmq.events`) to ``events``."""

    def __init__(self, settings: Settings, broker: Broker, *, clock: Callable[[], float] = time.monotonic,
                 events: EventBus | None = None) -> None:
        self.settings = settings
        self.cfg = settings.worker
        self.worker_id = self.cfg.worker_id or default_worker_id(broker.user)
        self.broker = broker
        self.transport = Transport(broker, max_frame_bytes=settings.broker.max_frame_bytes)
        self.device = resolve_device(self.cfg.device)
        self.clock = clock
        self.slots = TrainingSlots(self.cfg.training_slots_dir, self.cfg.training_slots)
        data = settings.data
        # Checked now (an untrusted factory, a missing folder): a worker that cannot have its
        # data should not join anything. Nothing is read or imported until a run is joined.
        self.source = open_data_source(self.cfg.data, trusted_factories=self.cfg.trusted_data_factories,
                                       root=Path(data.data_root), download=data.download,
                                       mirror=Path(data.data_mirror) if data.data_mirror else None)
        # Hellos, heartbeats and goodbyes expire in the control queue: an aggregator started
        # later must not take the last words of a dead worker for a live one. A live worker's
        # next heartbeat announces it again.
        self._control_ttl_s = max(5.0, 4 * self.cfg.heartbeat_interval_s)
        self.updates_sent = 0
        self.events = EventBus(log_event)
        if events is not None:
            self.events.add(events.emit)
        self.progress = TrainingProgress()
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
        self._evaluated: tuple[str, int] = ("", -1)  # (run id, version) last scored on the held-out rows
        self._evaluation_request: EvaluationRequest | None = None
        self._state = "joining"
        self._sending: tuple[str, int, int] | None = None  # trained, handed to the outbox, unconfirmed
        #: Why the worker stopped if it did not finish or leave on request; run() then returns
        #: and ``fedmq worker`` exits non-zero so that a restart policy restarts it.
        self.failure: str | None = None
        self._goodbye = ("leaving", "", "")  # (reason, detail, run id) said when run() returns
        self._feedback = ErrorFeedback()  # used by the training thread only
        self._reconstruction = Reconstruction()  # the model broadcasts rebuild (connection thread)
        self._outbox = UpdateOutbox(lambda body: self.transport.send(SUBMIT_EXCHANGE, UPDATES_QUEUE, body))

    # -- connection thread ----------------------------------------------------------------------
    def run(self) -> int:
        """Serve until the run completes (with ``exit_when_done``) or :meth:`stop`; returns the
        number of updates sent."""
        declare_shared_topology(self.broker, f"worker {self.worker_id}")
        declare_inbox(self.broker, self.worker_id)
        # Each inbox message is acknowledged as soon as it is read (before any training), so an
        # unlimited prefetch cannot deadlock chunk reassembly or trip the consumer timeout.
        self.broker.subscribe(inbox_queue(self.worker_id).name, self._on_inbox, prefetch=0)
        self.transport.send(SUBMIT_EXCHANGE, CONTROL_QUEUE,
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
                    self.transport.send(SUBMIT_EXCHANGE, CONTROL_QUEUE,
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
        progress = self.progress.snapshot()
        with self._cond:
            beat = Heartbeat(self.worker_id, self._run_id, self._state, self._trained[1], self._partition,
                             self.device.type, time.time(), progress.fraction, progress.samples_per_second)
        self.transport.send(SUBMIT_EXCHANGE, CONTROL_QUEUE, beat, persistent=False, ttl_s=self._control_ttl_s)
        self.events.emit(WorkerProgress(beat.run_id, self.worker_id, beat.state, beat.version, beat.partition,
                                        beat.device, beat.progress, beat.samples_per_second, self.clock()))

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
            self._on_frame(message)
        elif isinstance(message, EvaluationRequest):
            self._on_evaluation_request(message)
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

    def _on_frame(self, model: ModelBroadcast) -> None:
        """Rebuild the model a (possibly compressed) broadcast stands for (:mod:`fedmq.downlink`);
        ask for the whole model instead of training on one that cannot be rebuilt exactly."""
        if self._run_id and model.run_id != self._run_id:
            self._on_model(model)  # not this worker's run: logged and ignored there
            return
        frame = Frame(model.version, model.base_version, model.weights, model.digest)
        weights, why = self._reconstruction.apply(model.run_id, frame)
        if weights is None:
            log.warning("worker %s: version %d of run %s cannot be rebuilt (%s); not training on it, asking the "
                        "aggregator for the whole model", self.worker_id, model.version, model.run_id, why)
            self.transport.send(SUBMIT_EXCHANGE, CONTROL_QUEUE,
                                KeyframeRequest(self.worker_id, model.run_id, model.version, why[:1000]),
                                persistent=False, ttl_s=self._control_ttl_s)
            return
        self._on_model(dataclasses.replace(model, weights=weights, base_version=KEYFRAME))

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

    def _on_evaluation_request(self, request: EvaluationRequest) -> None:
        with self._cond:
            if request.run_id != self._run_id or (request.selected and self.worker_id not in request.selected):
                return
            self._evaluation_request = request
            self._cond.notify_all()
        log.info("worker %s: asked to score version %d of run %s", self.worker_id, request.version, request.run_id)

    def _send_evaluation(self, body: bytes, version: int) -> None:
        # On the update queue, before this version's update: the aggregator reads it first.
        # A score is worth less than an update: one that cannot be sent is not retried.
        try:
            self.transport.send(SUBMIT_EXCHANGE, UPDATES_QUEUE, body)
        except BrokerError as exc:
            log.warning("worker %s: evaluation of version %d not sent: %s", self.worker_id, version, exc)

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
        self.events.emit(UpdateSent(key[0], self.worker_id, key[1], size))
        self._send_heartbeat()

    # -- training thread ------------------------------------------------------------------------
    def _wanted_key(self) -> tuple | None:
        """The key of the data the joined run needs (None before joining one)."""
        if self._task is None:
            return None
        return (self._task, self.source.key(self._task, self._partition))

    def _requested_evaluation(self) -> EvaluationRequest | None:
        request, data = self._evaluation_request, self._data
        if request is None or data is None or data.held_out is None or request.run_id != self._run_id:
            return None
        if self._evaluated == (request.run_id, request.version):
            return None
        return request

    def _runnable(self) -> ModelBroadcast | None:
        model = self._latest
        if model is None or self._data is None or model.run_id != self._run_id:
            return None
        if self._data.key != self._wanted_key():
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
                            self._data is None or self._data.key != self._wanted_key())
                        request = None if need_data else self._requested_evaluation()
                        model = None if need_data or request else self._runnable()
                        if need_data or request is not None or model is not None:
                            break
                        self._cond.wait(1.0)
                    else:
                        return
                    task, partition, run_id = self._task, self._partition, self._run_id
                if need_data:
                    self._load(task, partition, run_id)
                elif request is not None:
                    self._evaluate(request.run_id, request.version, request.weights)
                else:
                    self._train(model)
        except Exception as exc:
            log.exception("worker %s: training thread failed; stopping", self.worker_id)
            self._fail("failed", f"training thread: {type(exc).__name__}: {exc}"[:1000])

    def _load(self, task: TaskSpec, partition: int, run_id: str) -> None:
        started = time.perf_counter()
        model = build_model(task.model).to(self.device)
        try:
            prepared = prepare_local_data(self.source, task, partition, model=model,
                                          eval_fraction=self.cfg.eval_fraction)
        except LocalDataError as exc:
            # The data will not fit this run however often the worker restarts: refuse the run.
            detail = f"{self.source.describe()} cannot be used for run {run_id} ({task.model} on {task.dataset}): {exc}"
            log.error("worker %s: %s", self.worker_id, detail)
            self._fail("refused", detail[:1000], run_id)
            return
        # Broadcasts are reassembled in memory: bound them by what this model can encode to.
        limit, elements = encoded_size_bound(model.state_dict()), element_count(model.state_dict())
        self.broker.call_threadsafe(lambda: self._bound_messages(limit, elements))
        held_out = prepared.held_out.to(self.device) if prepared.held_out is not None else None
        loaded = _LocalData((task, self.source.key(task, partition)), partition if self.source.partitioned else -1,
                            prepared.train.to(self.device), held_out, model)
        with self._cond:
            self._data = loaded
            self._state = "ready"
            self._cond.notify_all()
        log.info("worker %s: %s loaded in %.1f s: %d samples to train on, %d held out for evaluation, %d classes",
                 self.worker_id, self.source.describe(), time.perf_counter() - started, len(prepared.train),
                 len(held_out) if held_out is not None else 0, prepared.num_classes)
        self.broker.call_threadsafe(self._send_heartbeat)

    def _bound_messages(self, limit: int, elements: int) -> None:
        self.transport.bound_messages(limit, 2 * limit)
        self.transport.max_decoded_elements = elements  # a compressed model declares no more

    def _evaluate(self, run_id: str, version: int, weights) -> None:
        """Score ``version`` on the held-out rows and send the report (once per version)."""
        data = self._data
        assert data is not None and data.held_out is not None
        with self._cond:
            self._evaluated = (run_id, version)
        mismatch = weights_mismatch(data.model.state_dict(), weights)
        if mismatch:
            log.error("worker %s: version %d of run %s not scored: its tensors do not match the run's model (%s)",
                      self.worker_id, version, run_id, mismatch)
            return
        data.model.load_state_dict(weights)
        scored = evaluate(data.model, data.held_out.inputs, data.held_out.labels, batch_size=EVAL_BATCH_SIZE,
                          device=self.device)
        body = encode(EvaluationReport(run_id, version, self.worker_id, scored.num_samples, scored.loss,
                                       scored.accuracy))
        log.info("worker %s: version %d scored on %d held-out samples: accuracy %.4f, loss %.4f",
                 self.worker_id, version, scored.num_samples, scored.accuracy, scored.loss)
        self.broker.call_threadsafe(lambda: self._send_evaluation(body, version))

    def _newer_model_waiting(self, version: int, run_id: str, *, asynchronous: bool = False) -> bool:
        """True when training ``version`` is pointless: the worker stops, the run changed or, in
        sync mode only, a newer version arrived (its version is closed). In async mode the
        aggregator folds a stale update too: the worker finishes, then takes the newest."""
        latest = self._latest
        return (self._stopping.is_set() or latest is None or latest.run_id != run_id
                or (not asynchronous and latest.version > version))

    def _slow_down(self, trained_s: float, give_up: Callable[[], bool]) -> bool:
        """``--slowdown``: wait (factor - 1) times the training time, so that training took factor
        times as long; False if ``give_up`` said so meanwhile."""
        until = time.perf_counter() + (self.cfg.slowdown - 1.0) * trained_s
        while time.perf_counter() < until:
            if give_up():
                return False
            time.sleep(min(0.05, max(until - time.perf_counter(), 0.0)))
        return True

    def _train(self, model: ModelBroadcast) -> None:
        data = self._data
        assert data is not None
        if data.held_out is not None and self._evaluated != (model.run_id, model.version):
            self._evaluate(model.run_id, model.version, model.weights)
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
        seed = training_seed(data.key[0].seed, model.version, data.partition, self.worker_id)
        superseded = lambda: self._newer_model_waiting(  # noqa: E731
            model.version, model.run_id, asynchronous=model.training.mode == "async")
        with self.slots.hold(give_up=superseded) as granted:
            if not granted:
                with self._cond:
                    self._state = "idle"
                return
            self.progress.begin(model.version)
            started = time.perf_counter()
            try:
                result = train_locally(data.model, model.weights, data.train.inputs, data.train.labels,
                                       model.training, seed=seed, should_stop=superseded, on_step=self.progress.step)
            finally:
                speed = self.progress.end()
        completed = result.completed and (self.cfg.slowdown == 1.0 or self._slow_down(result.seconds, superseded))
        seconds = time.perf_counter() - started
        with self._cond:
            self._state = "idle"
            if not completed:
                log.info("worker %s: training of version %d abandoned after %d steps: a newer model arrived",
                         self.worker_id, model.version, result.steps)
                return
            key = (model.run_id, model.version, model.attempt)
            self._sending = key
        # Encoded here, off the connection thread, with the run's codec; what a lossy one drops
        # goes into the next update (error feedback), never into a different run or partition.
        delta = self._feedback.encode((model.run_id, data.key), parse_codec(model.training.update_codec), result.delta)
        update = WeightUpdate(model.run_id, model.version, self.worker_id, data.partition, result.num_samples,
                              result.train_loss, seconds, result.steps, delta)
        body = encode(update)
        self.events.emit(TrainingFinished(model.run_id, self.worker_id, model.version, result.num_samples,
                                          result.steps, seconds, result.train_loss, speed))
        log.info("worker %s: version %d trained, %d steps, loss %.4f, %.1f s", self.worker_id, model.version,
                 result.steps, result.train_loss, seconds)
        self.broker.call_threadsafe(lambda: self._queue_update(key, body))
