"""A worker's live view in a terminal (rich): its run, state and the local training in hand.

Fed by the worker's own events (:mod:`fedmq.events`: its heartbeats, trainings and sent
updates) and, for the bar, by its :class:`~worker.training_progress.TrainingProgress`, read at
each redraw. Shown by ``fedmq worker`` under the same ``--live-view`` rule as the aggregator's.
"""

from __future__ import annotations

import threading

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fedmq.events import Event, TrainingFinished, UpdateSent, WorkerProgress
from worker.training_progress import ProgressSnapshot


class WorkerViewState:
    """The sink keeping what the worker's view shows."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._lock = threading.Lock()
        self.beat: WorkerProgress | None = None
        self.last_training: TrainingFinished | None = None
        self.updates_sent = 0
        self.bytes_sent = 0

    def __call__(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, WorkerProgress) and event.worker_id == self.worker_id:
                self.beat = event
            elif isinstance(event, TrainingFinished):
                self.last_training = event
            elif isinstance(event, UpdateSent):
                self.updates_sent += 1
                self.bytes_sent += event.size

    def render(self, progress: ProgressSnapshot) -> RenderableType:
        with self._lock:
            beat, last, sent, sent_bytes = self.beat, self.last_training, self.updates_sent, self.bytes_sent
        head = Text.assemble(("fedmq worker ", "bold"), self.worker_id)
        if beat is None or not beat.run_id:
            status = Text("waiting for an aggregator")
        else:
            status = Text(f"run {beat.run_id}  partition {beat.partition}  on {beat.device}  {beat.state}  "
                          f"last version trained {beat.version}")
        parts: list[RenderableType] = [head, status]
        if progress.version >= 0:
            bar = Table.grid(padding=(0, 1))
            bar.add_row(Text(f"training version {progress.version}"),
                        ProgressBar(total=max(1, progress.total_steps), completed=progress.steps, width=30),
                        Text(f"{progress.steps}/{progress.total_steps} steps  {progress.samples_per_second:.0f} "
                             "samples/s"))
            parts.append(bar)
        if last is not None:
            parts.append(Text(f"version {last.version}: {last.steps} steps in {last.seconds:.1f} s, "
                              f"{last.samples_per_second:.0f} samples/s, loss {last.train_loss:.4f}"))
        parts.append(Text(f"{sent} updates sent, {sent_bytes / 1e6:.2f} MB"))
        return Group(*parts)
