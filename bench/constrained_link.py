#!/usr/bin/env python
"""fp32 against int8 (both ways) with the workers behind one shared 20 Mbit/s link.

The workers run in a Linux network namespace whose only way out is a veth pair shaped to
``--rate`` each way (``bench/shaped_link.py``); the aggregator runs on the host. The broker is a
private RabbitMQ node of this script's own (``tests/private_rabbitmq.py``: other ports, its own
data, stopped and removed afterwards; the machine's shared broker is not touched), listening on
loopback for the aggregator and on the host end of the link for the workers, with a user of
this run's own that may log in from there. Each configuration gets a fresh vhost and fresh
processes; both run in the same invocation and the ratio int8/fp32 is printed. Per
configuration: wall time per version (median of ``metrics.jsonl``'s per-version seconds:
broadcast of a version to the close of the next), test accuracy, bytes up and down per version
as fedmq counts them, and the bytes the link carried per version (veth counters, TCP/IP and AMQP
framing included, startup too). Needs root (namespace, veth, tc). Nothing is asserted.

    python bench/constrained_link.py [--workers 4] [--versions 3] [--rate 20mbit] [--local-steps 0]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from private_rabbitmq import PrivateRabbit  # noqa: E402
from shaped_link import ShapedLink  # noqa: E402
from w1 import BATCH_SIZE, DATASET, LEARNING_RATE, MALLOC_ENV, MODEL, SEED, prepare_data  # noqa: E402

#: name -> (update codec, broadcast codec)
CONFIGS = {"fp32": ("fp32", "fp32"), "int8": ("int8", "int8")}
USER = "fedmq-bench"


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
    return {**env, **MALLOC_ENV, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def stop(process: subprocess.Popen, grace_s: float) -> None:
    """Terminate ``process``'s whole session (``ip netns exec`` included) if it is still running."""
    if process.poll() is None:
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            pass
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def interrupt(signum, frame) -> None:
    """A SIGTERM unwinds like Ctrl-C, so the with-blocks remove the processes, node and link."""
    raise KeyboardInterrupt(f"signal {signum}")


def run_config(name: str, args: argparse.Namespace, node: PrivateRabbit, password: str, link: ShapedLink,
               work: Path) -> dict:
    """One federation (aggregator on the host, workers in the namespace) on a vhost of its own."""
    update, broadcast = CONFIGS[name]
    vhost = f"link-{name}"
    node.ctl("add_vhost", vhost)
    node.ctl("set_permissions", "-p", vhost, USER, ".*", ".*", ".*")
    run_id = f"link-{name}-{time.strftime('%H%M%S')}"
    out, logs = work / name, work / name / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    url = f"amqp://{USER}:{password}@{{host}}:{node.amqp_port}/{vhost}"
    common = ["--data-root", args.data_root, "--data-mirror", args.data_mirror, "--no-download"]
    training = ["--local-steps", str(args.local_steps)] if args.local_steps else ["--local-epochs", "1"]
    aggregator = [sys.executable, "-m", "fedmq_cli", "aggregator", *common, "--broker-url", url.format(host="127.0.0.1"),
                  "--run-id", run_id, "--dataset", DATASET, "--model", MODEL, "--partition-scheme", "iid",
                  "--num-partitions", str(args.workers), "--start-workers", str(args.workers),
                  "--versions", str(args.versions), *training, "--batch-size", str(BATCH_SIZE),
                  "--learning-rate", str(LEARNING_RATE), "--optimizer", "sgd", "--client-fraction", "1",
                  "--seed", str(SEED), "--update-codec", update, "--broadcast-codec", broadcast,
                  "--output-dir", str(out), "--live-view", "off"]
    env = child_env()
    print(f"== {name}: update codec {update}, broadcast codec {broadcast}; run {run_id}, logs in {logs}", flush=True)
    down0, up0, load0 = *link.bytes_moved(), os.getloadavg()[0]
    processes = [subprocess.Popen(aggregator, env=env, cwd=REPO, stdin=subprocess.DEVNULL, start_new_session=True,
                                  stdout=open(logs / "aggregator.log", "w"), stderr=subprocess.STDOUT)]
    for i in range(args.workers):
        worker = [*link.exec_prefix(), sys.executable, "-m", "fedmq_cli", "worker", *common,
                  "--broker-url", url.format(host=link.host_ip), "--worker-id", f"{name}-w{i}", "--threads", "1"]
        processes.append(subprocess.Popen(worker, env=env, cwd=REPO, stdin=subprocess.DEVNULL, start_new_session=True,
                                          stdout=open(logs / f"worker-{i}.log", "w"), stderr=subprocess.STDOUT))
    grace_s = 0.0  # on an error or Ctrl-C: stop everything at once
    try:
        processes[0].wait(timeout=args.timeout)
        grace_s = 60  # workers exit by themselves once they have the RunComplete message
    except subprocess.TimeoutExpired:
        print(f"   {name}: the aggregator did not finish in {args.timeout} s", flush=True)
    finally:
        for process in processes:
            stop(process, grace_s=grace_s if process is not processes[0] else 0)
    down1, up1, load1 = *link.bytes_moved(), os.getloadavg()[0]
    metrics = out / run_id / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    for r in records:
        print(f"   version {r['version']}: {r['seconds']:6.1f} s  accuracy {r['test_accuracy']:.4f}  "
              f"up {r['bytes_up'] / 1e6:6.2f} MB  down {r['bytes_down'] / 1e6:6.2f} MB", flush=True)
    if len(records) < args.versions or processes[0].returncode != 0:
        print(f"   {name}: FAILED (aggregator status {processes[0].returncode}, {len(records)} versions); "
              f"see {logs}", flush=True)
    # Each worker logs "version V trained, N steps, loss L, S s": the compute inside each version.
    trained = [float(m) for i in range(args.workers) for m in
               re.findall(r"version \d+ trained, .* ([\d.]+) s$", (logs / f"worker-{i}.log").read_text(), re.M)]
    return {"codec": name, "records": records, "link_down_bytes": down1 - down0, "link_up_bytes": up1 - up0,
            "aggregator_status": processes[0].returncode, "load_average": (load0, load1),
            "train_seconds_mean": statistics.mean(trained) if trained else None}


def summarise(result: dict, versions: int) -> dict:
    records = result["records"]
    n = max(len(records), 1)
    return {"codec": result["codec"], "versions": len(records),
            "seconds_per_version": statistics.median(r["seconds"] for r in records) if records else None,
            "accuracy_last": records[-1]["test_accuracy"] if records else None,
            "bytes_up_per_version": sum(r["bytes_up"] for r in records) / n,
            "bytes_down_per_version": sum(r["bytes_down"] for r in records) / n,
            "train_seconds_mean": result["train_seconds_mean"], "load_average": result["load_average"],
            "link_up_per_version": result["link_up_bytes"] / versions,
            "link_down_per_version": result["link_down_bytes"] / versions}


def report(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\n{args.workers} workers behind one {args.rate} link each way, {MODEL}, {args.versions} versions, "
          + (f"{args.local_steps} local steps" if args.local_steps else "E=1") + f", B={BATCH_SIZE}")
    print(f"{'codec':6s} {'s/version':>9s} {'train s':>7s} {'acc last':>8s} {'up MB/v':>8s} {'down MB/v':>9s} "
          f"{'link up MB/v':>12s} {'link down MB/v':>14s} {'load before/after':>17s}")
    for row in rows:
        seconds = "-" if row["seconds_per_version"] is None else f"{row['seconds_per_version']:9.1f}"
        accuracy = "-" if row["accuracy_last"] is None else f"{row['accuracy_last']:8.4f}"
        train = "-" if row["train_seconds_mean"] is None else f"{row['train_seconds_mean']:7.1f}"
        print(f"{row['codec']:6s} {seconds:>9s} {train:>7s} {accuracy:>8s} {row['bytes_up_per_version'] / 1e6:8.2f} "
              f"{row['bytes_down_per_version'] / 1e6:9.2f} {row['link_up_per_version'] / 1e6:12.2f} "
              f"{row['link_down_per_version'] / 1e6:14.2f} {'%.1f / %.1f' % row['load_average']:>17s}")
    by_codec = {row["codec"]: row for row in rows}
    base, int8 = by_codec.get("fp32"), by_codec.get("int8")
    if base and int8 and base["seconds_per_version"] and int8["seconds_per_version"]:
        print(f"int8/fp32: wall time per version {int8['seconds_per_version'] / base['seconds_per_version']:.3f} "
              f"(target <= 0.6); fedmq bytes up {int8['bytes_up_per_version'] / base['bytes_up_per_version']:.3f}, "
              f"down {int8['bytes_down_per_version'] / base['bytes_down_per_version']:.3f}; link bytes up "
              f"{int8['link_up_per_version'] / base['link_up_per_version']:.3f}, down "
              f"{int8['link_down_per_version'] / base['link_down_per_version']:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--rate", default="20mbit", help="the link's rate each way, tc syntax [20mbit]")
    parser.add_argument("--local-steps", type=int, default=0,
                        help="local optimizer steps per version (0: one epoch over the partition, as W1) [0]")
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations [fp32,int8]")
    parser.add_argument("--data-root", default=str(REPO / ".cache" / "bench-data"), help="data cache")
    parser.add_argument("--data-mirror", default=str(REPO.parent / "shared" / "data"), help="read-only originals")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per configuration [1200]")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    if any(n not in CONFIGS for n in names):
        parser.error(f"--only: choose from {', '.join(CONFIGS)}")
    signal.signal(signal.SIGTERM, interrupt)
    prepare_data(argparse.Namespace(data_root=args.data_root, data_mirror=args.data_mirror), child_env())
    work = Path(tempfile.mkdtemp(prefix="fedmq-link-"))
    password = secrets.token_hex(12)
    with ShapedLink(rate=args.rate) as link:
        print(link.describe(), flush=True)
        node = PrivateRabbit(work / "rabbit", [f"listeners.tcp.link = {link.host_ip}:{{amqp_port}}"])
        try:  # not ``with node``: an interrupt while it boots must stop it too
            node.start()
            node.ctl("add_user", USER, password)
            print(f"private RabbitMQ {node.name} on 127.0.0.1 and {link.host_ip}, port {node.amqp_port}", flush=True)
            rows = [summarise(run_config(name, args, node, password, link, work), args.versions) for name in names]
        finally:
            node.stop()
            shutil.rmtree(work / "rabbit", ignore_errors=True)
    print(f"logs and metrics kept in {work}")
    report(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(row["versions"] == args.versions for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
