"""``fedmq report RUN_DIR [RUN_DIR...]``: curves of one or several runs in one PNG, and a summary.

Reads each run's ``metrics.jsonl`` (a run directory is ``<output dir>/<run id>``) and draws, one
colour per run: test accuracy and loss against version and against wall time, bytes per
version by direction, participants, stale updates and dead letters. Wall time is the sum of
the versions' seconds (broadcast to close), so it leaves out the wait for the first workers.
The markdown summary has one row per run and, with several runs, each one's bytes as a ratio
to the first's (say int8 against fp32).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from fedmq.metrics_file import read_metrics

#: The figure: inches and dots per inch, so the PNG is 1500 x 900 pixels.
FIGURE_INCHES = (15.0, 9.0)
FIGURE_DPI = 100


@dataclass(frozen=True)
class RunCurves:
    """One run's lines, as lists by version."""

    label: str
    lines: list[dict]

    def column(self, name: str) -> list:
        return [line.get(name) for line in self.lines]

    @property
    def versions(self) -> list[int]:
        return self.column("version")

    @property
    def wall_seconds(self) -> list[float]:
        total, out = 0.0, []
        for seconds in self.column("seconds"):
            total += seconds or 0.0
            out.append(total)
        return out


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="a run's directory (holding metrics.jsonl); several overlay in one figure")
    parser.add_argument("--output", type=Path, default=None,
                        help="the PNG to write (default: report.png in the first RUN_DIR)")
    parser.add_argument("--summary", type=Path, default=None,
                        help="the markdown summary to write (default: the PNG's path with .md)")


def load_runs(run_dirs: list[Path]) -> list[RunCurves]:
    """Each directory's lines; ValueError naming a directory without any."""
    runs = []
    for directory in run_dirs:
        path = directory / "metrics.jsonl"
        if not path.is_file():
            raise ValueError(f"{directory}: no metrics.jsonl (is it a run directory, <output dir>/<run id>?)")
        lines = read_metrics(path)
        if not lines:
            raise ValueError(f"{path}: no version closed yet")
        label = str(lines[-1].get("run_id") or directory.name)
        if any(run.label == label for run in runs):
            label = f"{label} ({directory})"
        runs.append(RunCurves(label, lines))
    return runs


def _plot(axis, xs: list, ys: list, label: str, colour, style: str = "-", marker: str = "o") -> None:
    points = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if points:
        axis.plot([p[0] for p in points], [p[1] for p in points], style, color=colour, marker=marker,
                  markersize=3, label=label)


def build_figure(runs: list[RunCurves]):  # noqa: ANN201 - a matplotlib Figure, imported late
    """The figure of ``runs``: six panels, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(2, 3, figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    (acc, loss, wall), (traffic, people, trouble) = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(runs):
        c = colours[index % len(colours)]
        v = run.versions
        _plot(acc, v, run.column("test_accuracy"), f"{run.label} test", c)
        _plot(acc, v, run.column("federated_accuracy"), f"{run.label} federated", c, "--", "s")
        _plot(loss, v, run.column("test_loss"), f"{run.label} test", c)
        _plot(loss, v, run.column("train_loss"), f"{run.label} train", c, ":", "x")
        _plot(wall, run.wall_seconds, run.column("test_accuracy"), f"{run.label} test", c)
        _plot(wall, run.wall_seconds, run.column("federated_accuracy"), f"{run.label} federated", c, "--", "s")
        _plot(traffic, v, [b / 1e6 for b in run.column("bytes_up")], f"{run.label} up", c)
        _plot(traffic, v, [b / 1e6 for b in run.column("bytes_down")], f"{run.label} down", c, "--", "s")
        _plot(people, v, run.column("participants"), f"{run.label} folded", c)
        _plot(people, v, run.column("expected"), f"{run.label} expected", c, ":", "x")
        _plot(trouble, v, run.column("stale"), f"{run.label} stale", c)
        _plot(trouble, v, run.column("dead_lettered"), f"{run.label} dead letters", c, "--", "s")
    titles = (("test accuracy by version", "version", "accuracy"), ("loss by version", "version", "loss"),
              ("test accuracy by wall time", "seconds (sum of versions)", "accuracy"),
              ("bytes per version", "version", "MB"), ("participants", "version", "updates"),
              ("stale updates and dead letters", "version", "messages"))
    for axis, (title, xlabel, ylabel) in zip(axes.flat, titles):
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        if axis.lines:
            axis.legend(fontsize="small")
        if xlabel == "version":
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (traffic, people, trouble):  # counts: from zero, so a flat line reads as what it is
        axis.set_ylim(bottom=0, top=max(1.0, axis.get_ylim()[1] * 1.1))
    figure.tight_layout()
    return figure


def draw(runs: list[RunCurves], output: Path) -> None:
    """Write the figure of ``runs`` to ``output`` (PNG)."""
    import matplotlib.pyplot as plt

    figure = build_figure(runs)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png")
    plt.close(figure)


def _fmt(value, pattern: str = "{:.4f}") -> str:
    return "-" if value is None else pattern.format(value)


def summary(runs: list[RunCurves], image: Path) -> str:
    """The markdown summary: one row per run; bytes relative to the first run's."""
    out = ["# fedmq report", "", f"![curves]({image.name})", "",
           "| run | versions | final test accuracy | best test accuracy | final federated accuracy | MB up | MB down "
           "| seconds | stale | dead letters |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    totals = []
    for run in runs:
        last = run.lines[-1]
        tests = [a for a in run.column("test_accuracy") if a is not None]
        up, down = sum(run.column("bytes_up")), sum(run.column("bytes_down"))
        totals.append((up, down))
        out.append(f"| {run.label} | {last['version']} | {_fmt(last.get('test_accuracy'))} | "
                   f"{_fmt(max(tests) if tests else None)} | {_fmt(last.get('federated_accuracy'))} | "
                   f"{up / 1e6:.2f} | {down / 1e6:.2f} | {run.wall_seconds[-1]:.1f} | {sum(run.column('stale'))} | "
                   f"{sum(run.column('dead_lettered'))} |")
    if len(runs) > 1 and totals[0][0] > 0 and totals[0][1] > 0:
        out += ["", f"Bytes relative to {runs[0].label}:", ""]
        for run, (up, down) in zip(runs[1:], totals[1:]):
            out.append(f"- {run.label}: up {up / totals[0][0]:.3f}x, down {down / totals[0][1]:.3f}x")
    return "\n".join(out) + "\n"


def run_report(args: argparse.Namespace) -> int:
    try:
        runs = load_runs(args.run_dirs)
    except ValueError as exc:
        print(f"fedmq report: {exc}", file=sys.stderr)
        return 2
    output = args.output or args.run_dirs[0] / "report.png"
    summary_path = args.summary or output.with_suffix(".md")
    draw(runs, output)
    summary_path.write_text(summary(runs, output), encoding="utf-8")
    print(f"fedmq report: {len(runs)} run(s), {sum(len(r.lines) for r in runs)} versions: {output} and "
          f"{summary_path}", flush=True)
    return 0
