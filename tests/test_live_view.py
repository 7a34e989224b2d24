"""The live view: rendered with the right numbers for a real embedded run (rich's recording
console), redrawn on a terminal during the run, plain lines when stdout is not a terminal."""

from __future__ import annotations

import dataclasses
import io
import logging

import pytest
from rich.console import Console

from fedmq.events import EventBus, TrainingFinished, UpdateSent, VersionClosed, VersionOpened, WorkerProgress
from fedmq.federation_state import FederationState
from fedmq.live_view import LiveView, console_view, live_view_wanted, render_federation
from fedmq_cli.__main__ import main
from fedmq_cli.embedded import run_embedded
from test_embedded import embedded_settings
from worker.training_progress import ProgressSnapshot
from worker.worker_view import WorkerViewState


@pytest.fixture(autouse=True)
def restore_logging():
    """``main`` configures the root logger for a process; put back pytest's afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def text_of(renderable, width: int = 160) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True)
    console.print(renderable)
    return console.export_text()


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_live_view_of_an_embedded_run_shows_its_numbers(data_root, tmp_path):
    state = FederationState("", 2)
    frames: dict[str, str] = {}

    def frame_when_version_1_opens(event):
        # The aggregator's thread, right after the broadcast of version 1: nothing folded yet.
        if isinstance(event, VersionOpened) and event.version == 1:
            frames["open"] = text_of(render_federation(state.snapshot()))

    screen = TtyBuffer()
    settings = embedded_settings(data_root, tmp_path, versions=2)
    settings = dataclasses.replace(settings, embedded=dataclasses.replace(settings.embedded, workers=2))
    with console_view("auto", lambda: render_federation(state.snapshot()), screen) as view:
        assert isinstance(view, LiveView)
        result = run_embedded(settings, on_version=lambda r: view.print_line(r.console_line()),
                              events=EventBus(state, frame_when_version_1_opens))

    (first, last) = result.records
    opened = frames["open"]
    assert "run embedded-test  version 1 of 2" in opened
    assert "training version 1" in opened and "0/2 updates" in opened and "left" in opened  # an estimate
    assert f"version 1: test accuracy {first.test_accuracy:.4f}  loss {first.test_loss:.4f}" in opened
    assert f"up {first.bytes_up / 1e6:.2f} MB  down {first.bytes_down / 1e6:.2f} MB" in opened
    assert "2 live workers" in opened and "worker-0" in opened and "worker-1" in opened

    final = text_of(render_federation(state.snapshot()))
    assert "version 2 of 2  complete" in final
    assert f"version 2: test accuracy {last.test_accuracy:.4f}  loss {last.test_loss:.4f}" in final
    rows = [line.split() for line in final.splitlines() if line.startswith("worker-")]
    assert [row[0] for row in rows] == ["worker-0", "worker-1"]
    assert all(row[2] == "cpu" and row[3] in ("0", "1") for row in rows), rows
    assert all(float(row[6]) > 0 for row in rows), rows  # samples per second, from the heartbeats

    drawn = screen.getvalue()
    assert "\x1b[" in drawn  # redrawn in place on the terminal
    assert first.console_line() in drawn and last.console_line() in drawn  # the lines stay above it


def test_without_a_terminal_fedmq_run_prints_plain_lines(data_root, tmp_path, capsys):
    assert not live_view_wanted("auto", io.StringIO()) and live_view_wanted("auto", TtyBuffer())
    assert live_view_wanted("on", io.StringIO()) and not live_view_wanted("off", TtyBuffer())
    code = main(["run", "--data-root", str(data_root), "--no-download", "--model", "fedavg-2nn", "--versions", "1",
                 "--workers", "2", "--output-dir", str(tmp_path), "--run-id", "plain", "--live-view", "auto"])
    out = capsys.readouterr().out
    assert code == 0
    assert "\x1b[" not in out
    lines = out.splitlines()
    assert lines[0].startswith("fedmq embedded: 2 workers") and lines[1].startswith("version   1  participants   2/2")
    assert lines[-1].startswith("run plain: version 1, test accuracy")


def test_the_worker_view_shows_its_training():
    view = WorkerViewState("w1")
    view(WorkerProgress("run-a", "w1", "training", 2, 1, "cpu", 0.5, 1000.0, 0.0))
    view(TrainingFinished("run-a", "w1", 2, 600, 19, 0.6, 0.3125, 1000.0))
    view(UpdateSent("run-a", "w1", 2, 800_000))
    text = text_of(view.render(ProgressSnapshot(3, 0.5, 950.0, 10, 20)))
    assert "run run-a  partition 1  on cpu  training  last version trained 2" in text
    assert "training version 3" in text and "10/20 steps  950 samples/s" in text
    assert "version 2: 19 steps in 0.6 s, 1000 samples/s, loss 0.3125" in text
    assert "1 updates sent, 0.80 MB" in text
    idle = text_of(WorkerViewState("w2").render(ProgressSnapshot(-1, 0.0, 0.0, 0, 0)))
    assert "waiting for an aggregator" in idle and "training version" not in idle


def test_a_version_line_closes_the_open_round_in_the_view():
    state = FederationState("r", 3, clock=lambda: 10.0)
    state(VersionOpened("r", 0, 2, 2, 100, 10.0, 300.0))
    assert state.snapshot().open_version == 0
    record = dict(run_id="r", version=1, participants=2, expected=2, test_accuracy=0.9, test_loss=0.3,
                  train_loss=0.4, bytes_up=10, bytes_down=20, seconds=4.0, live_workers=2, stale=0, duplicates=0,
                  dead_lettered=0, rebroadcasts=0)
    state(VersionClosed.from_line(record))
    snap = state.snapshot()
    assert snap.open_version == -1 and snap.version == 1 and snap.bytes_up == 10
    state(VersionOpened("r", 1, 2, 2, 100, 10.0, 300.0))
    assert state.snapshot().estimate_s == 4.0  # the mean of the versions so far, less 0 s elapsed
