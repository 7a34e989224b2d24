"""`fedmq report`: a PNG of the expected size and a markdown summary; two runs overlay."""

from __future__ import annotations

import dataclasses
import logging
import struct
from pathlib import Path

import pytest

from fedmq_cli.__main__ import main
from fedmq_cli.embedded import run_embedded
from fedmq_cli.report import FIGURE_DPI, FIGURE_INCHES, build_figure, load_runs
from test_embedded import embedded_settings


@pytest.fixture(autouse=True)
def restore_logging():
    """``main`` configures the root logger for a process; put back pytest's afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


EXPECTED = (int(FIGURE_INCHES[0] * FIGURE_DPI), int(FIGURE_INCHES[1] * FIGURE_DPI))


@pytest.fixture(scope="module")
def two_runs(data_root, tmp_path_factory) -> tuple[Path, Path]:
    """Two real embedded runs (2 workers, 2NN, 2 versions): batch 32 and batch 64."""
    out = tmp_path_factory.mktemp("runs")
    dirs = []
    for run_id, batch in (("small-batches", 32), ("large-batches", 64)):
        settings = embedded_settings(data_root, out, versions=2, run_id=run_id, batch_size=batch)
        settings = dataclasses.replace(settings, embedded=dataclasses.replace(settings.embedded, workers=2))
        dirs.append(run_embedded(settings).output_dir)
    return dirs[0], dirs[1]


def test_a_finished_run_gives_a_png_of_the_expected_size_and_a_summary(two_runs, capsys):
    first, _ = two_runs
    assert main(["report", str(first)]) == 0
    assert png_size(first / "report.png") == EXPECTED
    summary = (first / "report.md").read_text()
    (run,) = load_runs([first])
    last = run.lines[-1]
    assert "![curves](report.png)" in summary
    row = next(line for line in summary.splitlines() if line.startswith("| small-batches |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[2] == f"{last['test_accuracy']:.4f}"
    assert cells[5] == f"{sum(r['bytes_up'] for r in run.lines) / 1e6:.2f}"
    assert float(cells[2]) >= 0.9
    assert "1 run(s), 2 versions" in capsys.readouterr().out


def test_two_runs_overlay_in_one_figure(two_runs, tmp_path):
    first, second = two_runs
    png, md = tmp_path / "both.png", tmp_path / "both.md"
    assert main(["report", str(first), str(second), "--output", str(png), "--summary", str(md)]) == 0
    assert png_size(png) == EXPECTED
    summary = md.read_text()
    assert "| small-batches |" in summary and "| large-batches |" in summary
    assert "Bytes relative to small-batches" in summary and "- large-batches: up 1.000x, down 1.000x" in summary
    # Every panel has each run's lines.
    figure = build_figure(load_runs([first, second]))
    for axis in figure.axes:
        labels = [line.get_label() for line in axis.lines]
        assert any(label.startswith("small-batches") for label in labels), (axis.get_title(), labels)
        assert any(label.startswith("large-batches") for label in labels), (axis.get_title(), labels)


def test_a_directory_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
