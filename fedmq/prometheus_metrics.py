"""Prometheus metrics of the aggregator and of a worker, fed by the event stream.

``--metrics-port PORT`` serves them over HTTP at ``/metrics`` (prometheus-client's own server,
a daemon thread); each service keeps its metrics in a registry of its own, so two services in
one process (the embedded mode, tests) never mix their numbers. Names follow Prometheus
conventions: a ``fedmq_`` prefix, base units (seconds, bytes), ``_total`` on counters.

The per-version numbers (bytes, seconds, accuracy) are counted from
:class:`~fedmq.events.VersionClosed`, the event ``metrics.jsonl`` is written from, so the two
agree; updates folded and refused are counted as they happen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedmq.events import (DROPPED_REASONS, Event, RunFinished, TrainingFinished, UpdateFolded, UpdateRefused,
                          UpdateSent, VersionClosed, VersionOpened, WorkerJoined, WorkerLeft, WorkerPresumedDead,
                          WorkerProgress)

log = logging.getLogger(__name__)

#: Seconds per version: from seconds (a small model, a few workers) to half an hour.
VERSION_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
#: Seconds of one local training.
TRAINING_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class AggregatorMetrics:
    """The aggregator's metrics (a sink of its events) in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.model_version = Gauge("fedmq_model_version", "The newest model version made", registry=r)
        self.versions = Counter("fedmq_versions", "Model versions made by this aggregator process", registry=r)
        self.open_version = Gauge("fedmq_open_version", "The version being trained (-1: none)", registry=r)
        self.expected = Gauge("fedmq_version_expected_updates", "Updates the open version waits for", registry=r)
        self.folded_now = Gauge("fedmq_version_folded_updates", "Updates folded into the open version", registry=r)
        self.folded = Counter("fedmq_updates_folded", "Updates folded into a version", registry=r)
        self.dropped = Counter("fedmq_updates_dropped", "Updates acknowledged without folding them, by reason "
                               "(stale, unselected, duplicate)", ["reason"], registry=r)
        self.dead_letters = Counter("fedmq_dead_letters", "Messages dead-lettered, by reason", ["reason"], registry=r)
        self.bytes = Counter("fedmq_bytes", "Wire bytes of the closed versions, by direction (up: updates, down: "
                             "broadcasts)", ["direction"], registry=r)
        self.live_workers = Gauge("fedmq_live_workers", "Workers live now", registry=r)
        self.test_accuracy = Gauge("fedmq_test_accuracy", "Test-set accuracy of the newest version (0-1)", registry=r)
        self.test_loss = Gauge("fedmq_test_loss", "Test-set mean cross-entropy of the newest version", registry=r)
        self.federated_accuracy = Gauge("fedmq_federated_accuracy", "Accuracy of the newest scored version on the "
                                        "workers' held-out rows (0-1)", registry=r)
        self.federated_loss = Gauge("fedmq_federated_loss", "Loss of the newest scored version on the workers' "
                                    "held-out rows", registry=r)
        self.version_seconds = Histogram("fedmq_version_seconds", "Seconds from a version's broadcast to its close",
                                         buckets=VERSION_SECONDS_BUCKETS, registry=r)
        self.stale = Counter("fedmq_version_stale_updates", "Stale or unselected updates counted in closed versions",
                             registry=r)
        self.rebroadcasts = Counter("fedmq_rebroadcasts", "Versions broadcast again after their deadline",
                                    registry=r)
        self.finished = Gauge("fedmq_run_finished", "1 once the run is complete", registry=r)
        self.bytes_ratio = Gauge("fedmq_bytes_ratio_to_fp32", "The newest version's bytes as a ratio to the same "
                                 "messages with raw float32 tensors, by direction", ["direction"], registry=r)
        self.dp_epsilon = Gauge("fedmq_dp_epsilon", "Privacy spent so far (DP-FedAvg's epsilon; absent without DP)",
                                registry=r)
        self._set_open(-1)
        for direction in ("up", "down"):
            self.bytes.labels(direction)  # present from the start, at 0
        for reason in DROPPED_REASONS:
            self.dropped.labels(reason)

    def __call__(self, event: Event) -> None:
        if isinstance(event, VersionOpened):
            self._set_open(event.version)
            self.expected.set(event.expected)
            self.folded_now.set(0)
            self.live_workers.set(event.live_workers)
        elif isinstance(event, UpdateFolded):
            self.folded.inc()
            self.folded_now.set(event.folded)
        elif isinstance(event, UpdateRefused):
            if event.dead_lettered:
                self.dead_letters.labels(event.reason).inc()
            else:
                self.dropped.labels(event.reason).inc()
        elif isinstance(event, (WorkerJoined, WorkerLeft, WorkerPresumedDead)):
            self.live_workers.set(event.live_workers)
        elif isinstance(event, VersionClosed):
            self._closed(event)
        elif isinstance(event, RunFinished):
            self.finished.set(1)
            self._set_open(-1)

    def _set_open(self, version: int) -> None:
        self._open = version
        self.open_version.set(version)

    def _closed(self, event: VersionClosed) -> None:
        if event.version > self._open:
            # The open round made this version and the next is not broadcast yet. (With
            # federated evaluation the line comes after the next version opened: nothing to reset.)
            self._set_open(-1)
            self.expected.set(0)
            self.folded_now.set(0)
        self.model_version.set(event.version)
        self.versions.inc()
        self.bytes.labels("up").inc(event.bytes_up)
        self.bytes.labels("down").inc(event.bytes_down)
        self.version_seconds.observe(event.seconds)
        self.stale.inc(event.stale)
        self.rebroadcasts.inc(event.rebroadcasts)
        self.live_workers.set(event.live_workers)
        if event.test_accuracy is not None:
            self.test_accuracy.set(event.test_accuracy)
        if event.test_loss is not None:
            self.test_loss.set(event.test_loss)
        if event.federated_accuracy is not None:
            self.federated_accuracy.set(event.federated_accuracy)
        if event.federated_loss is not None:
            self.federated_loss.set(event.federated_loss)
        for direction, ratio in (("up", event.bytes_up_ratio), ("down", event.bytes_down_ratio)):
            if ratio is not None:
                self.bytes_ratio.labels(direction).set(ratio)
        if event.dp_epsilon is not None:
            self.dp_epsilon.set(event.dp_epsilon)


class WorkerMetrics:
    """A worker's metrics (a sink of its events) in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.training_seconds = Histogram("fedmq_worker_training_seconds", "Seconds of one local training",
                                          buckets=TRAINING_SECONDS_BUCKETS, registry=r)
        self.samples_per_second = Gauge("fedmq_worker_samples_per_second", "Training samples per second of the last "
                                        "local training (epochs counted)", registry=r)
        self.progress = Gauge("fedmq_worker_training_progress", "How far the local training in hand is (0-1)",
                              registry=r)
        self.trained_version = Gauge("fedmq_worker_trained_version", "The last version this worker trained",
                                     registry=r)
        self.updates_sent = Counter("fedmq_worker_updates_sent", "Updates confirmed by the broker", registry=r)
        self.bytes_sent = Counter("fedmq_worker_update_bytes", "Wire bytes of the updates sent", registry=r)
        self.trained_version.set(-1)

    def __call__(self, event: Event) -> None:
        if isinstance(event, TrainingFinished):
            self.training_seconds.observe(event.seconds)
            self.trained_version.set(event.version)
            self.samples_per_second.set(event.samples_per_second)
        elif isinstance(event, UpdateSent):
            self.updates_sent.inc()
            self.bytes_sent.inc(event.size)
        elif isinstance(event, WorkerProgress):
            self.progress.set(event.progress)
            if event.samples_per_second > 0:
                self.samples_per_second.set(event.samples_per_second)


@dataclass
class MetricsServer:
    """The HTTP server of one registry; ``port`` is the one bound (useful with port 0)."""

    server: Any
    thread: Any

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve ``registry`` at ``http://addr:port/metrics`` (port 0: any free port) from a daemon
    thread."""
    server, thread = start_http_server(port, addr=addr, registry=registry)
    metrics = MetricsServer(server, thread)
    log.info("Prometheus metrics at http://%s:%d/metrics", addr, metrics.port)
    return metrics
