"""The aggregator's live view in a terminal (rich): the open version, its progress, the workers.

:func:`render_federation` draws one :class:`~fedmq.federation_state.FederationSnapshot`: the
open version with a bar of updates in against expected, elapsed time and an estimate, the last
version's accuracy, loss and bytes, and a table of the live workers (state, device, partition,
last version trained, training progress, samples per second). :class:`LiveView` redraws it a
few times a second while a service runs, prints each version's line above it, and routes log
records through the same console so they do not tear the display.

``--live-view auto`` shows it only when stdout is a terminal: in compose logs or CI the plain
version lines are printed instead, as before.
"""

from __future__ import annotations

import logging
from typing import Callable, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fedmq.federation_state import FederationSnapshot, FederationState


def live_view_wanted(mode: str, stream: TextIO) -> bool:
    """``--live-view``: ``on``, ``off``, or ``auto`` (only when ``stream`` is a terminal)."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def render_federation(snapshot: FederationSnapshot) -> RenderableType:
    """One frame of the live view."""
    s = snapshot
    title = Text.assemble(("fedmq ", "bold"), f"run {s.run_id or '?'}  ",
                          (f"version {s.version} of {s.versions}", "bold"),
                          ("  complete" if s.finished else ""))
    parts: list[RenderableType] = [title]
    if s.open_version >= 0:
        estimate = f"  about {s.estimate_s:.0f} s left" if s.estimate_s >= 0 else ""
        bar = Table.grid(padding=(0, 1))
        bar.add_row(Text(f"training version {s.open_version}"),
                    ProgressBar(total=max(1, s.expected), completed=s.folded, width=30),
                    Text(f"{s.folded}/{s.expected} updates  {s.elapsed_s:.1f} s elapsed{estimate}"))
        parts.append(bar)
    elif not s.finished:
        parts.append(Text("waiting for workers" if s.last is None else "closing the version"))
    last = s.last
    if last is not None:
        federated = ("" if last.federated_accuracy is None
                     else f"  federated accuracy {last.federated_accuracy:.4f}")
        parts.append(Text(f"version {last.version}: test accuracy {_score(last.test_accuracy)}  loss "
                          f"{_score(last.test_loss)}{federated}  up {last.bytes_up / 1e6:.2f} MB  down "
                          f"{last.bytes_down / 1e6:.2f} MB  {last.seconds:.1f} s"))
    parts.append(Text(f"{len(s.workers)} live workers  {s.dead_letters} dead letters  {s.dropped} stale or "
                      f"duplicate updates"))
    if s.workers:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for name, justify in (("worker", "left"), ("state", "left"), ("device", "left"), ("partition", "right"),
                              ("version", "right"), ("progress", "right"), ("samples/s", "right"),
                              ("silent", "right")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for w in s.workers:
            table.add_row(w.worker_id, w.state, w.device or "?", str(w.partition), str(w.version),
                          f"{w.progress:.0%}", f"{w.samples_per_second:.0f}", f"{w.silent_s:.1f} s")
        parts.append(table)
    return Group(*parts)


class ConsoleLogHandler(logging.Handler):
    """Log records printed through the live view's console (above the display)."""

    def __init__(self, console: Console, formatter: logging.Formatter | None) -> None:
        super().__init__()
        self.console = console
        if formatter is not None:
            self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(Text(self.format(record)), soft_wrap=True)
        except Exception:  # a log line must never stop the service
            self.handleError(record)


class LiveView:
    """Redraws ``render()`` on ``console`` while open (a context manager); :meth:`print_line`
    prints above it. Log records go through the console meanwhile."""

    def __init__(self, render: Callable[[], RenderableType], console: Console, *,
                 refresh_per_second: float = 4.0) -> None:
        self.console = console
        self._live = Live(get_renderable=render, console=console, refresh_per_second=refresh_per_second,
                          transient=False, redirect_stdout=False, redirect_stderr=False)
        self._swapped: list[tuple[logging.Handler, logging.Handler]] = []

    @classmethod
    def of_federation(cls, state: FederationState, console: Console) -> "LiveView":
        return cls(lambda: render_federation(state.snapshot()), console)

    def print_line(self, text: str) -> None:
        self.console.print(Text(text), soft_wrap=True)

    def __enter__(self) -> "LiveView":
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, logging.StreamHandler):
                replacement = ConsoleLogHandler(self.console, handler.formatter)
                replacement.setLevel(handler.level)
                root.removeHandler(handler)
                root.addHandler(replacement)
                self._swapped.append((handler, replacement))
        self._live.start(refresh=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.stop()
        root = logging.getLogger()
        for original, replacement in self._swapped:
            root.removeHandler(replacement)
            root.addHandler(original)
        self._swapped.clear()


class PlainLines:
    """What a service prints when the live view is off: each version's line, as it comes."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def print_line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def __enter__(self) -> "PlainLines":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def console_view(mode: str, render: Callable[[], RenderableType], stream: TextIO) -> LiveView | PlainLines:
    """The live view on ``stream`` if ``--live-view`` (``mode``) wants one there, else plain lines."""
    if live_view_wanted(mode, stream):
        return LiveView(render, Console(file=stream))
    return PlainLines(stream)
