#!/usr/bin/env python
"""W1 with each codec: what compression saves in bytes and costs in accuracy and time.

Runs ``bench/w1.py --skip-floor`` (fedmq over the real broker, workload W1: ``fedavg-cnn`` on
MNIST, 10 workers, IID, E=1, B=32, SGD lr 0.05, 10 versions) once per configuration, one after
the other, and prints, against the fp32 run of the same invocation:

- bytes up and down per version as a ratio to fp32's, and per message as a ratio to raw float32
  (``bytes_*_ratio`` of metrics.jsonl: immune to a re-broadcast that doubles a version's traffic);
- test accuracy after versions 3 and 10 (and the difference to fp32 in points);
- wall time per version (the median of the per-version seconds) as a ratio to fp32's.

Configurations: fp32; fp16 both ways; int8 both ways; topk:0.1 and topk:0.01 uplink (error
feedback) with int8 downlink. ``--versions``/``--workers`` shrink the workload (say so when
quoting the numbers). Nothing is asserted.

    python bench/codec_w1.py [--versions 10] [--workers 10] [--only fp32,int8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: name -> (update codec, broadcast codec)
CONFIGS = {
    "fp32": ("fp32", "fp32"),
    "fp16": ("fp16", "fp16"),
    "int8": ("int8", "int8"),
    "topk:0.1": ("topk:0.1", "int8"),
    "topk:0.01": ("topk:0.01", "int8"),
}


def run_w1(name: str, args: argparse.Namespace, work: Path) -> list[dict]:
    up, down = CONFIGS[name]
    out = work / f"{name.replace(':', '-')}.json"
    command = [sys.executable, str(REPO / "bench" / "w1.py"), "--skip-floor", "--versions", str(args.versions),
               "--workers", str(args.workers), "--json", str(out), "--work-dir", str(work / name.replace(":", "-")),
               "--aggregator-args", f"--update-codec {up} --broadcast-codec {down}", *args.w1_args]
    print(f"== {name}: update codec {up}, broadcast codec {down}", flush=True)
    subprocess.run(command, cwd=REPO, check=False)
    fed = json.loads(out.read_text())["fedmq"] if out.exists() else None
    if not fed or fed.get("failure"):
        print(f"   {name}: run failed: {fed and fed.get('failure')}")
        return []
    return fed["records"]


def accuracy_at(records: list[dict], version: int) -> float | None:
    found = [r["test_accuracy"] for r in records if r["version"] == version]
    return found[0] if found else None


def per_version(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def report(results: dict[str, list[dict]], versions: int) -> list[dict]:
    base = results.get("fp32")
    rows = []
    print(f"\n{'codec':10s} {'up/fp32':>8s} {'down/fp32':>9s} {'up/msg':>7s} {'down/msg':>8s} {'acc v3':>7s} {'acc v' + str(versions):>7s} "
          f"{'d acc (pts)':>11s} {'s/version':>9s} {'time/fp32':>9s}")
    for name, records in results.items():
        if not records:
            continue
        last = accuracy_at(records, versions)
        seconds = statistics.median(r["seconds"] for r in records)
        row = {"codec": name, "bytes_up_per_version": per_version(records, "bytes_up"),
               "bytes_down_per_version": per_version(records, "bytes_down"),
               "up_per_message": statistics.median(r.get("bytes_up_ratio") or 0.0 for r in records),
               "down_per_message": statistics.median(r.get("bytes_down_ratio") or 0.0 for r in records),
               "accuracy_v3": accuracy_at(records, 3), f"accuracy_v{versions}": last, "median_seconds": seconds}
        if base:
            row["up_ratio"] = row["bytes_up_per_version"] / per_version(base, "bytes_up")
            row["down_ratio"] = row["bytes_down_per_version"] / per_version(base, "bytes_down")
            row["time_ratio"] = seconds / statistics.median(r["seconds"] for r in base)
            base_last = accuracy_at(base, versions)
            row["accuracy_points_vs_fp32"] = None if last is None or base_last is None else 100 * (last - base_last)
        rows.append(row)

        def f(value, spec):
            return "-" if value is None else format(value, spec)

        print(f"{name:10s} {f(row.get('up_ratio'), '8.4f')} {f(row.get('down_ratio'), '9.4f')} "
              f"{row['up_per_message']:7.4f} {row['down_per_message']:8.4f} "
              f"{f(row['accuracy_v3'], '7.4f')} {f(last, '7.4f')} {f(row.get('accuracy_points_vs_fp32'), '+11.2f')} "
              f"{seconds:9.1f} {f(row.get('time_ratio'), '9.3f')}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--versions", type=int, default=10)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations to run")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("w1_args", nargs="*", help="after --: more flags for bench/w1.py")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}")
    work = Path(tempfile.mkdtemp(prefix="fedmq-codec-w1-"))
    results = {name: run_w1(name, args, work) for name in names}
    rows = report(results, args.versions)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
