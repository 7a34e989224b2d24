#!/usr/bin/env python
"""Start-up of co-located workers: whole-split loading (before) against partition-only (after).

N worker-like processes (default 10, as ``docker compose --scale worker=10`` on one host) start
at once, each with one torch thread, and load partition i of N of the MNIST training set
(no broker, no model: just the start of a worker process and its data step):

- **before**: what ``worker/service.py`` did up to issue 11: ``load_split`` converts the whole
  training set to float32 (60,000 x 784 = 188 MB), partitions its labels, copies the rows of
  partition i and drops the rest.
- **after**: ``worker.data_sources.BuiltinPartition``: read the labels, partition them,
  memory-map the images file and convert only partition i's rows.

Both modes run in the same invocation, interleaved (before, after, before, after, ...), after
one untimed process per mode that fills the page cache. Per mode it prints: the wall time from
spawning the N processes until the last has its partition in memory; the CPU time of the N
processes (all of it, and the data step's alone: CPU time does not depend on what else runs on
the machine, wall time does); the mean wall time of the data step (after ``import torch``); the
per-process peak RSS and its growth over the RSS after imports; and the
machine-wide peak of the N processes' summed PSS (sampled from /proc). Then after/before ratios
of the medians. It asserts nothing about speed. The "after" RSS growth includes the pages of the
memory-mapped images file a process touched: page cache shared by all workers, which the summed
PSS counts once.

    .venv/bin/python bench/worker_startup.py                       # 10 workers, 2 repeats: ~5 min on 2 cores
    .venv/bin/python bench/worker_startup.py --workers 4 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("before", "after")


def rss_kb() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(args: argparse.Namespace) -> int:
    """One worker's data step; prints one JSON line."""
    import numpy as np
    import torch

    from fedmq.messages import TaskSpec
    from fedmq.task import forget_cached_splits, load_split, make_partitions
    from worker.data_sources import BuiltinPartition

    torch.set_num_threads(1)
    root = Path(args.data_root)
    task = TaskSpec(args.dataset, "fedavg-cnn", args.scheme, args.workers, 0.5, 2, 0)
    imported_rss, started, cpu_started = rss_kb(), time.perf_counter(), cpu_s()
    if args.child == "before":
        split = load_split(task.dataset, root, train=True, download=False)
        parts = make_partitions(task.partition_scheme, split.labels.numpy(), task.num_partitions,
                                seed=task.seed, alpha=task.dirichlet_alpha, shards_per_partition=2)
        local = split.subset(np.asarray(parts[args.partition]))
        del split
        forget_cached_splits()
        rows, checksum = len(local), float(local.images.double().sum())
    else:
        local = BuiltinPartition(root, download=False).load(task, args.partition)
        rows, checksum = len(local), float(local.inputs.double().sum())
    seconds, cpu = time.perf_counter() - started, cpu_s() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    print(json.dumps({"load_s": seconds, "load_cpu_s": cpu, "cpu_s": cpu_s(), "peak_kb": peak, "imported_kb": imported_rss, "rows": rows,
                      "checksum": checksum, "done_at": time.time()}), flush=True)
    return 0


def summed_pss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                total += next(int(line.split()[1]) for line in handle if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """Spawn the N processes of ``mode`` at once; their reports and the sampled peak PSS."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    spawned_at = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--child", mode, "--partition", str(i),
                               "--workers", str(args.workers), "--dataset", args.dataset, "--scheme", args.scheme,
                               "--data-root", args.data_root], stdout=subprocess.PIPE, env=env, cwd=REPO)
             for i in range(args.workers)]
    peak_pss, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak_pss[0] = max(peak_pss[0], summed_pss_kb([p.pid for p in procs if p.poll() is None]))
            stop.wait(args.sample_interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    reports = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a {mode} process failed with status {proc.returncode}")
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    stop.set()
    sampler.join()
    return {
        "wall_s": max(r["done_at"] for r in reports) - spawned_at,
        "load_s": statistics.mean(r["load_s"] for r in reports),
        "load_cpu_s": sum(r["load_cpu_s"] for r in reports),
        "cpu_s": sum(r["cpu_s"] for r in reports),
        "peak_mb": statistics.mean(r["peak_kb"] for r in reports) / 1024,
        "growth_mb": statistics.mean(r["peak_kb"] - r["imported_kb"] for r in reports) / 1024,
        "summed_pss_mb": peak_pss[0] / 1024,
        "rows": sum(r["rows"] for r in reports),
        "checksum": sum(r["checksum"] for r in reports),
    }


COLUMNS = (("wall_s", "wall s (all N ready)"), ("cpu_s", "CPU s (sum of N)"),
           ("load_cpu_s", "data step CPU s (sum)"), ("load_s", "data step wall s (mean)"),
           ("peak_mb", "peak RSS MB (mean)"), ("growth_mb", "RSS growth MB (mean)"),
           ("summed_pss_mb", "peak summed PSS MB"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=10, help="processes started at once, one partition each [10]")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each mode, interleaved [2]")
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist"))
    parser.add_argument("--scheme", default="iid", choices=("iid", "dirichlet", "shards"))
    parser.add_argument("--data-root", default=str(REPO / ".cache" / "bench-data"))
    parser.add_argument("--data-mirror", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--sample-interval", type=float, default=0.05, help="seconds between PSS samples [0.05]")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--partition", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    sys.path.insert(0, str(REPO))
    from fedmq.task import load_labels

    mirror = Path(args.data_mirror) if Path(args.data_mirror).is_dir() else None
    load_labels(args.dataset, Path(args.data_root), train=True, mirror=mirror, download=mirror is None)
    print(f"worker start-up: {args.workers} processes at once, {args.dataset} training set, {args.scheme} "
          f"partitions, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}", flush=True)
    warm_up = argparse.Namespace(**{**vars(args), "workers": 1})
    for mode in MODES:  # untimed, one process each: fills the page cache so neither mode pays for the disk
        run_mode(mode, warm_up)
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES:
            result = run_mode(mode, args)
            results[mode].append(result)
            print(f"  run {repeat + 1} {mode:6s} load avg {os.getloadavg()[0]:5.2f}  " + "  ".join(f"{label} {result[key]:.2f}" for key, label in COLUMNS),
                  flush=True)
    before, after = results["before"], results["after"]
    if {r["rows"] for r in before + after} != {before[0]["rows"]} or \
            abs(before[0]["checksum"] - after[0]["checksum"]) > 1e-6 * abs(before[0]["checksum"]):
        print("MISMATCH: the two modes loaded different data", flush=True)
        return 1
    print(f"\nmedians over {args.repeats} runs (both modes loaded the same {before[0]['rows']} rows):")
    print(f"  {'':24s} {'before':>10s} {'after':>10s} {'after/before':>13s}")
    for key, label in COLUMNS:
        b, a = statistics.median(r[key] for r in before), statistics.median(r[key] for r in after)
        print(f"  {label:24s} {b:10.2f} {a:10.2f} {a / b:13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
