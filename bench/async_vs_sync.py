"""Async (FedBuff) against sync with stragglers, and server optimizers on a pathological split.

Part 1, wall time to a target accuracy: per configuration, ``fedmq aggregator`` and
``--workers`` ``fedmq worker`` processes over the real RabbitMQ (a vhost of its own, made and
deleted with ``rabbitmqctl``),
MNIST, IID, the FedAvg paper's 2NN, E=1, B=32, SGD lr 0.05; ``--stragglers`` of the workers run
with ``--slowdown`` (they wait (factor-1) times their training time after training). Each
configuration runs until the test accuracy reaches ``--target`` (or ``--max-versions``):

- sync, full quorum (every worker in every version);
- sync, ``--quorum-fraction 0.7``;
- async, each of ``--buffer-sizes`` (FedBuff's K, staleness 1/sqrt(1+tau)) with each of
  ``--async-server-lrs`` (or the ``--async-runs`` K:LR pairs); an async version folds K updates where a sync one folds up to
  ``--workers``, so async runs may take ``--max-versions * workers / K`` versions.

Time is measured from the first broadcast: the sum of the versions' ``seconds`` in the
aggregator's metrics.jsonl (versions follow one another without a gap), so process start and
data loading are not counted. It prints each configuration's accuracy-over-time curve and the
ratios of the async times to the two sync times, measured in the same invocation.

Part 2, versions to the target on the ``shards`` split (2 label shards per worker): FedAvg,
FedAvgM and FedAdam, sync with every worker, in the embedded mode (``fedmq run``: one process,
the in-memory broker, the same aggregator and workers), up to ``--shards-versions`` versions.

    nice -n 10 .venv/bin/python bench/async_vs_sync.py            # both parts
    .venv/bin/python bench/async_vs_sync.py --skip-shards --buffer-sizes 3
    .venv/bin/python bench/async_vs_sync.py --skip-shards --async-runs 5:0.5 7:1.0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from federation_processes import Federation, purge_fedmq_queues  # noqa: E402


def make_vhost(url: str) -> tuple[str, str | None]:
    """A vhost of its own on a local broker (fedmq's queue names are fixed); else ``url`` as is."""
    import pika

    params = pika.URLParameters(url)
    vhost = f"fedmq-bench-{uuid.uuid4().hex[:6]}"
    user = params.credentials.username
    try:
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, user, ".*", ".*", ".*"], check=True,
                       capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return url, None
    return f"amqp://{user}:{params.credentials.password}@{params.host}:{params.port}/{vhost}", vhost


def curve(records: list[dict]) -> list[tuple[int, float, float]]:
    """(version, seconds since the first broadcast, test accuracy) of each version."""
    out, elapsed = [], 0.0
    for r in records:
        elapsed += r["seconds"]
        out.append((r["version"], elapsed, r["test_accuracy"]))
    return out


def time_to(points: list[tuple[int, float, float]], target: float) -> tuple[float, int] | None:
    for version, seconds, accuracy in points:
        if accuracy >= target:
            return seconds, version
    return None


def async_run(text: str) -> tuple[int, float]:
    """``K:LR`` (a buffer size and its server learning rate) as a pair."""
    try:
        k, lr = text.split(":")
        return int(k), float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K:LR such as 7:1.0, got {text!r}") from None


def part_wall_time(args, url: str, data_root: Path, work: Path) -> dict:
    """Per configuration: an aggregator and ``--workers`` worker processes, started afresh."""
    configs = [("sync-full", {}), ("sync-q0.7", {"FEDMQ_QUORUM_FRACTION": 0.7})]
    runs = args.async_runs or [(k, lr) for k in args.buffer_sizes for lr in args.async_server_lrs]
    several_lrs = len({lr for _, lr in runs}) > 1
    configs += [(f"async-K{k}" + (f"-lr{lr:g}" if several_lrs else ""),
                 {"FEDMQ_MODE": "async", "FEDMQ_BUFFER_SIZE": k, "FEDMQ_SERVER_LEARNING_RATE": lr,
                  "FEDMQ_VERSIONS": args.max_versions * args.workers // k})
                for k, lr in runs]
    results = {}
    for name, env in configs:
        purge_fedmq_queues(url)
        directory = work / name
        directory.mkdir()
        fed = Federation(directory, data_root, url, f"bench-{name}-{uuid.uuid4().hex[:6]}",
                         FEDMQ_START_WORKERS=args.workers, FEDMQ_NUM_PARTITIONS=args.workers,
                         FEDMQ_TARGET_ACCURACY=args.target, FEDMQ_ROUND_TIMEOUT_S=600, FEDMQ_WORKER_TIMEOUT_S=60,
                         FEDMQ_HEARTBEAT_INTERVAL_S=5, FEDMQ_LOG_LEVEL="WARNING",
                         **{"FEDMQ_VERSIONS": args.max_versions, **env})
        started = time.perf_counter()
        try:
            fed.aggregator()
            for i in range(args.workers):
                slow = i < args.stragglers
                fed.worker(f"{'slow' if slow else 'fast'}-{i}", *(["--slowdown", str(args.slowdown)] if slow else []))
            code = fed.wait_aggregator(args.timeout)
            if code != 0:
                raise SystemExit(f"{name}: aggregator exited {code}:\n{fed.log('aggregator')[-2000:]}")
            records = fed.records()
        finally:
            fed.close()
        points = curve(records)
        results[name] = {"curve": points, "reached": time_to(points, args.target)}
        print(f"\n{name}: {len(records)} versions, {time.perf_counter() - started:.0f} s in all (with start-up)",
              flush=True)
        print("  version  seconds  accuracy  updates" + ("  staleness mean/max" if env.get("FEDMQ_MODE") else ""))
        for (version, seconds, accuracy), r in zip(points, records):
            stale = (f"  {r['staleness_mean']:.2f}/{r['staleness_max']}"
                     if env.get("FEDMQ_MODE") and r.get("staleness_mean") is not None else "")
            print(f"  {version:7d}  {seconds:7.1f}  {accuracy:8.4f}  {r['participants']:7d}{stale}", flush=True)
    print(f"\nWall time from the first broadcast to {args.target:.0%} test accuracy (2NN, {args.workers} workers, "
          f"{args.stragglers} with --slowdown {args.slowdown:g}):")
    base = {k: results[k]["reached"] for k in ("sync-full", "sync-q0.7")}
    for name, result in results.items():
        reached = result["reached"]
        if reached is None:
            print(f"  {name:10s}  not reached in {len(result['curve'])} versions "
                  f"(best {max(a for _, _, a in result['curve']):.4f})")
            continue
        ratios = "  ".join(f"{reached[0] / b[0]:.2f} of {k}" for k, b in base.items() if b is not None and k != name)
        print(f"  {name:10s}  {reached[0]:7.1f} s at version {reached[1]:3d}   {ratios}")
    return results


def part_shards(args, data_root: Path, work: Path) -> dict:
    results = {}
    print(f"\nVersions to {args.target:.0%} on the shards split (2 shards per worker, {args.workers} workers, sync, "
          f"embedded mode), at most {args.shards_versions}:")
    for optimizer, lr in (("fedavg", 0), ("fedavgm", args.fedavgm_lr), ("fedadam", args.fedadam_lr)):
        out = work / f"shards-{optimizer}"
        command = [sys.executable, "-m", "fedmq_cli", "run", "--model", "fedavg-2nn", "--partition-scheme", "shards",
                   "--workers", str(args.workers), "--versions", str(args.shards_versions),
                   "--target-accuracy", str(args.target), "--server-optimizer", optimizer,
                   "--server-learning-rate", str(lr), "--output-dir", str(out), "--data-root", str(data_root),
                   "--no-download", "--threads", "1", "--run-id", f"shards-{optimizer}"]
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=args.timeout)
        records = [json.loads(line) for line in (out / f"shards-{optimizer}" / "metrics.jsonl").read_text().splitlines()]
        accuracies = [r["test_accuracy"] for r in records]
        reached = next((r["version"] for r in records if r["test_accuracy"] >= args.target), None)
        results[optimizer] = {"accuracies": accuracies, "reached": reached}
        print(f"  {optimizer:8s} (server lr {lr or 1.0:g}): "
              + (f"version {reached}" if reached else f"not reached (best {max(accuracies):.4f})")
              + f"   [{time.perf_counter() - started:.0f} s]   curve: "
              + " ".join(f"{a:.3f}" for a in accuracies))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--broker-url", default=os.environ.get("FEDMQ_BROKER_URL",
                                                               "amqp://guest:guest@127.0.0.1:5672/%2F"))
    parser.add_argument("--data-root", default=os.environ.get("FEDMQ_TEST_DATA", "../shared/data"))
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--stragglers", type=int, default=3)
    parser.add_argument("--slowdown", type=float, default=4.0)
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--max-versions", type=int, default=60,
                        help="versions a sync run may take; an async run may take this times workers / K")
    parser.add_argument("--buffer-sizes", type=int, nargs="+", default=[5, 7])
    parser.add_argument("--async-server-lrs", type=float, nargs="+", default=[1.0],
                        help="server learning rates of the async runs (each with each buffer size)")
    parser.add_argument("--async-runs", type=async_run, nargs="+", metavar="K:LR",
                        help="async runs as buffer size:server learning rate pairs, instead of every "
                             "--buffer-sizes with every --async-server-lrs")
    parser.add_argument("--shards-versions", type=int, default=30)
    parser.add_argument("--fedavgm-lr", type=float, default=1.0)
    parser.add_argument("--fedadam-lr", type=float, default=0.01)
    parser.add_argument("--skip-shards", action="store_true")
    parser.add_argument("--skip-wall-time", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_wall_time:
            url, vhost = make_vhost(args.broker_url)
            try:
                results["wall_time"] = part_wall_time(args, url, Path(args.data_root), work)
            finally:
                if vhost:
                    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, timeout=60)
        if not args.skip_shards:
            results["shards"] = part_shards(args, Path(args.data_root), work)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
