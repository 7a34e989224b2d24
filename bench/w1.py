#!/usr/bin/env python
"""Benchmark W1: fedmq over a real RabbitMQ against the no-framework floor.

W1 is FedAvg on MNIST with the FedAvg paper's CNN (``fedavg-cnn``, 1,663,370 parameters):
10 workers, IID partitions of 6,000 samples, E=1, B=32, plain SGD (lr 0.05, momentum 0),
every worker in every version, 10 versions, the test set evaluated after each version.

One invocation runs, one after the other:

1. **The floor**: the same computation in plain PyTorch. As many persistent processes as
   there are cores, one torch thread each, each owning its share of the shards and training
   them one after the other from the global weights (fresh SGD per shard, randperm per epoch,
   the same seeds a fedmq worker uses, so the two runs should agree on accuracy); the deltas
   come back through multiprocessing pipes and the parent averages them weighted by samples and
   evaluates. Data loading and process start happen before its clock starts.
2. **fedmq**: ``fedmq aggregator`` and ``--workers`` ``fedmq worker`` processes (one torch
   thread each) over the broker at ``--broker-url``; the timings come from the aggregator's
   ``metrics.jsonl`` (per-version seconds: broadcast of a version to the close of the next).

While both run, a sampler reads ``/proc`` every 0.5 s: the summed PSS and RSS of each run's
processes, their CPU time, the RabbitMQ server's CPU time and the machine's, so that idle CPU
and CPU taken by anything else (another test run) in the timed windows show up in the report.

Prints per-version tables, a per-version breakdown of fedmq's time (from its logs) and the
headline ratio; ``--json PATH`` writes everything as JSON. Nothing here asserts on timings.
See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]

# -- the workload ----------------------------------------------------------------------------
DATASET = "mnist"
MODEL = "fedavg-cnn"
SCHEME = "iid"
SEED = 0
LOCAL_EPOCHS = 1
BATCH_SIZE = 32
LEARNING_RATE = 0.05
MOMENTUM = 0.0
EVAL_BATCH_SIZE = 1000  # fedmq's default --eval-batch-size

# glibc's malloc hands every allocation above M_MMAP_THRESHOLD (128 KiB at first, adapting
# upwards only up to 32 MiB) to mmap, and gives freed memory at the top of the heap back to the
# kernel above M_TRIM_THRESHOLD. A training step's large temporaries (conv activations and
# gradients of a batch, the 6.6 MB model and delta tensors, message buffers) are therefore
# mapped and unmapped again and again, and every fresh mapping is paid for in page faults and
# zeroing: about 70 s per W1 run on this VM. With these two variables glibc keeps such memory
# in the heap and reuses it. Both runs get the same environment (a fair comparison);
# --default-malloc runs both without them.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "268435456"}

FEDMQ_QUEUES = ("fedmq.updates", "fedmq.control", "fedmq.dead-letters")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[w1 {time.strftime('%H:%M:%S')}] {message}", flush=True)


def loadavg() -> list[float]:
    with open("/proc/loadavg") as handle:
        return [float(x) for x in handle.read().split()[:3]]


def fmt_load(load: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


# ============================================================================================
# /proc sampling: memory (PSS, RSS) and CPU time of process trees, of the broker, of the machine
# ============================================================================================

def _proc_table() -> dict[int, tuple[int, str, int, int]]:
    """pid -> (ppid, comm, cpu ticks (utime+stime), start time) for every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                raw = handle.read()
        except OSError:
            continue
        close = raw.rfind(")")
        comm = raw[raw.find("(") + 1:close]
        rest = raw[close + 2:].split()
        table[int(entry)] = (int(rest[1]), comm, int(rest[11]) + int(rest[12]), int(rest[19]))
    return table


def _descendants(roots: list[int], table: dict[int, tuple[int, str, int, int]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = [], [r for r in roots if r in table]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def _rollup(pid: int) -> tuple[int, int] | None:
    """(PSS, RSS) in kB from /proc/<pid>/smaps_rollup."""
    pss = rss = None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        return None
    if pss is None or rss is None:
        return None
    return pss, rss


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine, all cores."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is in user.
    total = sum(fields[:8])
    idle = fields[3] + fields[4]
    return total - idle, total


class Sampler(threading.Thread):
    """Every ``interval`` s: summed PSS/RSS of the trees under ``roots()``, CPU of those trees
    (exited processes keep their last value), of RabbitMQ (beam.smp), of this script and of the
    machine."""

    def __init__(self, roots: Callable[[], list[int]], interval: float = 0.5) -> None:
        super().__init__(daemon=True, name="sampler")
        self.roots = roots
        self.interval = interval
        self.samples: list[dict[str, float]] = []
        self.cpu_last: dict[tuple[int, int], int] = {}  # (pid, start time) -> ticks
        self.cpu_first: dict[tuple[int, int], int] = {}
        self.comm: dict[tuple[int, int], str] = {}
        self.proc_peak: dict[tuple[int, int], tuple[int, int]] = {}  # key -> (peak PSS kB, peak RSS kB)
        self.history: dict[tuple[int, int], list[tuple[float, int]]] = {}  # key -> [(t, cpu ticks)]
        self._halt = threading.Event()
        self.sample()  # a baseline before anything starts

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.sample()

    def sample(self) -> None:
        t = time.time()
        table = _proc_table()
        pids = _descendants(self.roots(), table)
        pss = rss = 0
        for pid in pids:
            key = (pid, table[pid][3])
            self.cpu_first.setdefault(key, table[pid][2])
            self.cpu_last[key] = table[pid][2]
            self.history.setdefault(key, []).append((t, table[pid][2]))
            self.comm[key] = table[pid][1]
            mem = _rollup(pid)
            if mem is not None:
                pss += mem[0]
                rss += mem[1]
                old = self.proc_peak.get(key, (0, 0))
                self.proc_peak[key] = (max(old[0], mem[0]), max(old[1], mem[1]))
        broker = sum(v[2] for v in table.values() if v[1] == "beam.smp")
        me = table.get(os.getpid(), (0, "", 0, 0))[2]
        busy, total = _machine_ticks()
        self.samples.append({"t": t, "pss_kb": pss, "rss_kb": rss, "procs": len(pids),
                             "ours": sum(self.cpu_last.values()), "broker": broker, "bench": me,
                             "busy": busy, "total": total})

    # -- summaries --------------------------------------------------------------------------
    def peak(self, t0: float | None = None, t1: float | None = None) -> dict[str, float]:
        chosen = [s for s in self.samples if (t0 is None or s["t"] >= t0) and (t1 is None or s["t"] <= t1)]
        if not chosen:
            return {"pss_mb": float("nan"), "rss_mb": float("nan")}
        return {"pss_mb": max(s["pss_kb"] for s in chosen) / 1024, "rss_mb": max(s["rss_kb"] for s in chosen) / 1024}

    def cpu(self, t0: float, t1: float) -> dict[str, float]:
        """Average cores busy in [t0, t1]: ours, broker, this script, anything else, idle."""
        before = [s for s in self.samples if s["t"] <= t0]
        after = [s for s in self.samples if s["t"] >= t1]
        a = before[-1] if before else self.samples[0]
        b = after[0] if after else self.samples[-1]
        dt = b["t"] - a["t"]
        if dt <= 0:
            return {}
        cores = (b["total"] - a["total"]) / CLK_TCK / dt
        busy = (b["busy"] - a["busy"]) / CLK_TCK / dt
        ours = (b["ours"] - a["ours"]) / CLK_TCK / dt
        broker = (b["broker"] - a["broker"]) / CLK_TCK / dt
        bench = (b["bench"] - a["bench"]) / CLK_TCK / dt
        return {"seconds": dt, "cores": cores, "busy": busy, "ours": ours, "broker": broker, "bench": bench,
                "other": max(0.0, busy - ours - broker - bench), "idle": max(0.0, cores - busy)}

    def role_cpu(self, t0: float, t1: float, role: Callable[[int], str]) -> dict[str, float]:
        """Average cores used in [t0, t1] per role (``role(pid)``), exited processes included."""
        def at(points: list[tuple[float, int]], t: float) -> int:
            value = 0
            for when, ticks in points:
                if when > t:
                    break
                value = ticks
            return value
        out: dict[str, float] = {}
        for key, points in self.history.items():
            name = role(key[0])
            out[name] = out.get(name, 0.0) + (at(points, t1) - at(points, t0)) / CLK_TCK / max(1e-9, t1 - t0)
        return out

    def per_process(self, names: dict[int, str]) -> list[dict[str, Any]]:
        """CPU seconds and peak PSS/RSS (MB) of every process seen, named by ``names`` or comm."""
        out = []
        for key in self.cpu_last:
            peak = self.proc_peak.get(key, (0, 0))
            out.append({"pid": key[0], "name": names.get(key[0], self.comm[key]),
                        "cpu_s": round((self.cpu_last[key] - self.cpu_first[key]) / CLK_TCK, 2),
                        "peak_pss_mb": round(peak[0] / 1024, 1), "peak_rss_mb": round(peak[1] / 1024, 1)})
        return sorted(out, key=lambda r: r["name"])


def cpu_seconds(c: dict[str, float]) -> dict[str, float]:
    """CPU seconds in a window (cores x seconds) per kind."""
    return {k: c[k] * c["seconds"] for k in ("ours", "broker", "bench", "other", "idle")} if c else {}


def fmt_cpu(c: dict[str, float]) -> str:
    if not c:
        return "n/a"
    return (f"busy {c['busy']:.2f} of {c['cores']:.2f} cores: run {c['ours']:.2f}, rabbitmq {c['broker']:.2f}, "
            f"bench {c['bench']:.2f}, other processes {c['other']:.2f}; idle {c['idle']:.2f} cores")


# ============================================================================================
# The floor: plain PyTorch, one persistent process per core
# ============================================================================================

def _floor_seed(version: int, partition: int) -> int:
    # The seed a fedmq worker uses for (version, partition) (worker/service.py), so the floor
    # trains on the same batch order and the two runs should reach the same accuracy.
    return (SEED * 1_000_003 + version * 1009 + partition) % (2**63)


def _floor_child(rank: int, shard_ids: list[int], workers: int, data_root: str, mirror: str, conn) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    from fedmq.task import build_model, forget_cached_splits, load_split, make_partitions

    split = load_split(DATASET, Path(data_root), train=True, mirror=Path(mirror) if mirror else None, download=False)
    parts = make_partitions(SCHEME, split.labels.numpy(), workers, seed=SEED)
    shards = [(i, split.subset(np.asarray(parts[i]))) for i in shard_ids]
    del split
    forget_cached_splits()
    model = build_model(MODEL)
    conn.send(("ready", rank, os.getpid()))
    while True:
        message = conn.recv()
        if message is None:
            break
        version, arrays = message
        weights = {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in arrays.items()}
        results = []
        started = time.perf_counter()
        for index, shard in shards:
            t0 = time.perf_counter()
            model.load_state_dict(weights)
            model.train()
            optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
            images, labels = shard.images, shard.labels
            n = len(labels)
            generator = torch.Generator().manual_seed(_floor_seed(version, index))
            loss_sum, steps = torch.zeros(()), 0
            for _epoch in range(LOCAL_EPOCHS):
                order = torch.randperm(n, generator=generator)
                loss_sum, steps = torch.zeros(()), 0
                for start in range(0, n, BATCH_SIZE):
                    batch = order[start:start + BATCH_SIZE]
                    optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(model(images[batch]), labels[batch])
                    loss.backward()
                    optimizer.step()
                    loss_sum += loss.detach()
                    steps += 1
            trained = model.state_dict()
            delta = {k: (trained[k].detach() - w).numpy() for k, w in weights.items()}
            results.append((index, n, float(loss_sum) / max(1, steps), time.perf_counter() - t0, delta))
        conn.send((results, time.perf_counter() - started))
    conn.close()


def floor_main(args: argparse.Namespace) -> int:
    """Runs in its own process (so that it gets the malloc environment from the start)."""
    import multiprocessing as mp

    import torch
    import torch.nn.functional as F

    from fedmq.task import build_model, load_split

    launched = time.time()
    test = load_split(DATASET, Path(args.data_root), train=False,
                      mirror=Path(args.data_mirror) if args.data_mirror else None, download=False)
    model = build_model(MODEL, seed=SEED)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    nproc = max(1, min(args.floor_procs or os.cpu_count() or 1, args.workers))
    ctx = mp.get_context("spawn")
    conns, procs = [], []
    for rank in range(nproc):
        shard_ids = list(range(rank, args.workers, nproc))
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_floor_child, name=f"floor-{rank}",
                           args=(rank, shard_ids, args.workers, args.data_root, args.data_mirror, child), daemon=True)
        proc.start()
        child.close()
        conns.append(parent)
        procs.append(proc)
    child_pids = {}
    for c in conns:
        tag, rank, pid = c.recv()
        assert tag == "ready"
        child_pids[pid] = f"floor child {rank}"
    print(f"floor: {nproc} processes x 1 thread, {args.workers} shards, parent evaluates with "
          f"{torch.get_num_threads()} threads; ready after {time.time() - launched:.1f} s", flush=True)

    records = []
    clock_start_wall, clock_start = time.time(), time.perf_counter()
    for version in range(args.versions):
        t0, t0_wall = time.perf_counter(), time.time()
        arrays = {k: v.numpy() for k, v in weights.items()}
        for c in conns:
            c.send((version, arrays))
        results, child_seconds = [], []
        for c in conns:
            shard_results, seconds = c.recv()
            results.extend(shard_results)
            child_seconds.append(seconds)
        t1 = time.perf_counter()
        # FedAvg: the sample-weighted mean of the deltas, accumulated in float64 like fedmq.
        sums = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in weights.items()}
        total = 0
        loss_weighted = 0.0
        for _index, n, train_loss, _seconds, delta in sorted(results, key=lambda r: r[0]):
            for k, acc in sums.items():
                acc.add_(torch.from_numpy(delta[k]).to(torch.float64), alpha=float(n))
            total += n
            loss_weighted += train_loss * n
        weights = {k: w + (sums[k] / total).to(w.dtype) for k, w in weights.items()}
        t2 = time.perf_counter()
        model.load_state_dict(weights)
        model.eval()
        correct, loss_sum = 0, 0.0
        with torch.no_grad():
            for start in range(0, len(test.labels), EVAL_BATCH_SIZE):
                logits = model(test.images[start:start + EVAL_BATCH_SIZE])
                y = test.labels[start:start + EVAL_BATCH_SIZE]
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(dim=1) == y).sum())
        t3 = time.perf_counter()
        record = {"version": version + 1, "seconds": t3 - t0, "train_s": t1 - t0, "average_s": t2 - t1,
                  "eval_s": t3 - t2, "test_accuracy": correct / len(test.labels),
                  "test_loss": loss_sum / len(test.labels), "train_loss": loss_weighted / total,
                  "child_busy_s": child_seconds, "shard_train_s": [r[3] for r in sorted(results, key=lambda r: r[0])],
                  "t_start": t0_wall, "t_end": time.time()}
        records.append(record)
        print(f"floor version {version + 1:3d}  accuracy {record['test_accuracy']:.4f}  {record['seconds']:6.1f} s "
              f"(train {record['train_s']:.1f}, average {record['average_s']:.2f}, evaluate {record['eval_s']:.2f})",
              flush=True)
    clock = time.perf_counter() - clock_start
    clock_end_wall = time.time()
    for c in conns:
        c.send(None)
    for p in procs:
        p.join(timeout=30)
    out = {"processes": nproc, "child_pids": child_pids, "clock_s": clock, "clock_start": clock_start_wall, "clock_end": clock_end_wall,
           "setup_s": clock_start_wall - launched, "records": records}
    Path(args.floor_out).write_text(json.dumps(out))
    return 0


def run_floor(args: argparse.Namespace, env: dict[str, str], work: Path) -> dict[str, Any]:
    out_path = work / "floor.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--floor-child", "--floor-out", str(out_path),
           "--versions", str(args.versions), "--workers", str(args.workers), "--floor-procs", str(args.floor_procs),
           "--data-root", args.data_root, "--data-mirror", args.data_mirror]
    load_start = loadavg()
    log(f"floor: starting (load average {fmt_load(load_start)})")
    holder: list[int] = []
    sampler = Sampler(lambda: holder, args.sample_interval)
    sampler.start()
    launched = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    holder.append(proc.pid)
    try:
        rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        log(f"floor: TIMED OUT after {args.timeout} s")
    ended = time.time()
    sampler.stop()
    load_end = loadavg()
    if rc != 0 or not out_path.exists():
        raise SystemExit(f"floor failed with exit status {rc}")
    result = json.loads(out_path.read_text())
    t0, t1 = result["clock_start"], result["clock_end"]
    result.update({
        "total_s": ended - launched, "startup_s": t0 - launched, "shutdown_s": ended - t1,
        "peak": sampler.peak(), "peak_timed": sampler.peak(t0, t1), "cpu_timed": sampler.cpu(t0, t1),
        "cpu_versions": [sampler.cpu(r["t_start"], r["t_end"]) for r in result["records"]],
        "role_cpu_timed": sampler.role_cpu(t0, t1, lambda pid: "parent" if pid == proc.pid else "children"),
        "load_start": load_start, "load_end": load_end,
        "cpu_s": cpu_seconds(sampler.cpu(t0, t1)),
        "processes_seen": sampler.per_process({proc.pid: "floor parent",
                                               **{int(k): v for k, v in result["child_pids"].items()}}),
    })
    return result


# ============================================================================================
# fedmq over the real broker
# ============================================================================================

def broker_queues(url: str, *, purge: bool) -> dict[str, dict[str, int] | None]:
    """Passive-declare fedmq's static queues: message and consumer counts (None: absent);
    with ``purge``, purge those that exist."""
    import pika
    import pika.exceptions

    params = pika.URLParameters(url)
    params.client_properties = {"connection_name": "fedmq-bench-w1"}
    found: dict[str, dict[str, int] | None] = {}
    connection = pika.BlockingConnection(params)
    try:
        for queue in FEDMQ_QUEUES:
            channel = connection.channel()
            try:
                ok = channel.queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise
                found[queue] = None
                continue
            info = {"messages": ok.method.message_count, "consumers": ok.method.consumer_count}
            if purge:
                purged = channel.queue_purge(queue)
                info["purged"] = purged.method.message_count
            found[queue] = info
            channel.close()
    finally:
        connection.close()
    return found


def list_inboxes() -> list[tuple[str, int, int]] | None:
    """fedmq.inbox.* queues as (name, messages, consumers), via rabbitmqctl if it is here."""
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "list_queues", "-q", "--no-table-headers", "name", "messages", "consumers"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    rows = []
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith("fedmq.inbox.") and parts[1].isdigit() and parts[2].isdigit():
            rows.append((parts[0], int(parts[1]), int(parts[2])))
    return rows


_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def read_log(path: Path) -> list[tuple[float, str, str, str]]:
    rows = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return rows
    for line in lines:
        m = _LINE.match(line)
        if m:
            rows.append((_stamp(m.group(1)), m.group(2), m.group(3), m.group(4)))
    return rows


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path} unreadable)"


def fedmq_breakdown(agg_log: Path, worker_logs: list[Path], versions: int, run_id: str,
                    our_workers: set[str]) -> dict[str, Any]:
    """Where each version's time went, from the aggregator's and the workers' log timestamps."""
    agg = read_log(agg_log)
    broadcast, close, folded = {}, {}, {}
    for t, _lvl, _name, msg in agg:
        if m := re.match(r"version (\d+): broadcast ([\d.]+) MB", msg):
            broadcast.setdefault(int(m.group(1)), t)
        elif m := re.match(r"version (\d+): update (\d+)/(\d+) from", msg):
            folded.setdefault(int(m.group(1)), []).append(t)
        elif m := re.match(r"version (\d+) of run \S+: (\d+) updates", msg):
            close[int(m.group(1))] = t
    # Workers from elsewhere that talked to our aggregator (another federation on the same broker).
    foreign = sorted({m.group(1) for _t, _l, _n, msg in agg
                      if (m := re.match(r"worker (\S+) joined on", msg)) and m.group(1) not in our_workers})
    received, trained, train_s, sent, loaded, hello = {}, {}, {}, {}, [], []
    for path in worker_logs:
        current = {}  # version -> run id of the model last received for that version
        for t, _lvl, _name, msg in read_log(path):
            if m := re.match(r"worker \S+: model version (\d+) of run (\S+) received", msg):
                current[int(m.group(1))] = m.group(2)
                if m.group(2) == run_id:
                    received.setdefault(int(m.group(1)), []).append(t)
            elif m := re.match(r"worker \S+: version (\d+) trained, \d+ steps, loss [\d.naif]+, ([\d.]+) s", msg):
                if current.get(int(m.group(1))) == run_id:
                    trained.setdefault(int(m.group(1)), []).append(t)
                    train_s.setdefault(int(m.group(1)), []).append(float(m.group(2)))
            elif m := re.match(r"worker \S+: update for version (\d+) sent", msg):
                if current.get(int(m.group(1))) == run_id:
                    sent.setdefault(int(m.group(1)), []).append(t)
            elif re.match(r"worker \S+: partition \d+ loaded", msg):
                loaded.append(t)
            elif re.match(r"worker \S+ on \S+: hello sent", msg):
                hello.append(t)
    rows = []
    for v in range(versions):
        b, c = broadcast.get(v), close.get(v + 1)
        if b is None or c is None:
            continue
        rec, tr, se, fo = received.get(v, []), trained.get(v, []), sent.get(v, []), folded.get(v, [])
        row: dict[str, Any] = {"version": v + 1, "broadcast_at": b, "closed_at": c,
                               "publish_s": (b - close[v]) if v in close else None}
        if rec:
            row["deliver_first_s"], row["deliver_last_s"] = min(rec) - b, max(rec) - b
        if tr:
            row["trained_first_s"], row["trained_last_s"] = min(tr) - b, max(tr) - b
            row["train_mean_s"], row["train_max_s"] = sum(train_s[v]) / len(train_s[v]), max(train_s[v])
        if se and tr:
            row["sent_last_s"] = max(se) - b
        if fo:
            row["folded_first_s"], row["folded_last_s"] = min(fo) - b, max(fo) - b
            row["close_s"] = c - max(fo)
        rows.append(row)
    return {"rows": rows, "first_broadcast": broadcast.get(0), "last_close": close.get(versions), "foreign_workers": foreign,
            "first_hello": min(hello) if hello else None, "last_loaded": max(loaded) if loaded else None}


def run_fedmq(args: argparse.Namespace, env: dict[str, str], work: Path) -> dict[str, Any]:
    run_id = f"bench-w1-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    output_dir = work / "runs"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"run_id": run_id, "output_dir": str(output_dir / run_id), "logs": str(logs)}

    # Leftovers of other runs must not interfere: a consumer on fedmq.updates or fedmq.control is
    # another aggregator (fedmq.updates is single-active-consumer: ours would be a standby and
    # never see an update), queued messages would be stale hellos or updates.
    waited = 0.0
    while True:
        before = broker_queues(args.broker_url, purge=False)
        busy = {q: i["consumers"] for q, i in before.items() if i and i["consumers"] and q != "fedmq.dead-letters"}
        if not busy:
            break
        if waited >= 60:
            raise SystemExit(f"fedmq: another consumer is attached to {busy} for over 60 s; is another "
                             "fedmq aggregator running on this broker? Not starting.")
        log(f"fedmq: consumers attached to {busy}, waiting for them to go")
        time.sleep(5)
        waited += 5
    purged = broker_queues(args.broker_url, purge=not args.no_purge)
    result["queues_before"] = purged
    log(("fedmq: NOT purged (--no-purge) " if args.no_purge else "fedmq: purged ") + ", ".join(f"{q} ({'absent' if i is None else str(i['messages']) + ' messages'})"
                                     for q, i in purged.items()))
    inboxes = list_inboxes()
    if inboxes is not None:
        orphans = [row for row in inboxes if row[2] == 0]
        result["orphan_inboxes_before"] = orphans
        if orphans:
            log(f"fedmq: WARNING: {len(orphans)} fedmq.inbox.* queues without a consumer are still bound to the "
                f"broadcast exchange (an inbox expires 60 s after its worker left; a cleanly exiting worker deletes it) and will receive copies of "
                f"every broadcast: {', '.join(f'{n} ({m} msgs)' for n, m, _ in orphans[:5])}"
                f"{' ...' if len(orphans) > 5 else ''}")

    common = ["--data-root", args.data_root, "--data-mirror", args.data_mirror, "--no-download",
              "--broker-url", args.broker_url]
    agg_cmd = [sys.executable, "-m", "fedmq_cli", "aggregator", *common,
               "--run-id", run_id, "--dataset", DATASET, "--model", MODEL, "--partition-scheme", SCHEME,
               "--num-partitions", str(args.workers), "--start-workers", str(args.workers),
               "--versions", str(args.versions), "--local-epochs", str(LOCAL_EPOCHS),
               "--batch-size", str(BATCH_SIZE), "--learning-rate", str(LEARNING_RATE), "--optimizer", "sgd",
               "--momentum", str(MOMENTUM), "--client-fraction", "1", "--seed", str(SEED),
               "--eval-batch-size", str(EVAL_BATCH_SIZE), "--output-dir", str(output_dir),
               *shlex.split(args.aggregator_args)]
    worker_env = dict(env, FEDMQ_THREADS="1")
    result["aggregator_command"] = agg_cmd
    result["worker_args"] = args.worker_args

    load_start = loadavg()
    log(f"fedmq: starting the aggregator and {args.workers} workers, run {run_id} (load average "
        f"{fmt_load(load_start)}); logs in {logs}")
    procs: dict[str, subprocess.Popen] = {}
    sampler = Sampler(lambda: [p.pid for p in procs.values()], args.sample_interval)
    sampler.start()
    handles = []
    launched = time.time()
    agg_out = open(logs / "aggregator.out", "w")
    agg_err = open(logs / "aggregator.log", "w")
    handles += [agg_out, agg_err]
    procs["aggregator"] = subprocess.Popen(agg_cmd, env=env, cwd=REPO, stdout=agg_out, stderr=agg_err,
                                           stdin=subprocess.DEVNULL)
    worker_logs = []
    worker_ids: set[str] = set()
    for i in range(args.workers):
        path = logs / f"worker-{i:02d}.log"
        worker_logs.append(path)
        handle = open(path, "w")
        handles.append(handle)
        worker_ids.add(f"w1-{i:02d}-{run_id[-6:]}")
        cmd = [sys.executable, "-m", "fedmq_cli", "worker", *common, "--worker-id", f"w1-{i:02d}-{run_id[-6:]}",
               *shlex.split(args.worker_args.replace("{work}", str(work)))]
        procs[f"worker-{i:02d}"] = subprocess.Popen(cmd, env=worker_env, cwd=REPO, stdout=handle,
                                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    metrics_path = output_dir / run_id / "metrics.jsonl"
    shown = 0
    failure = None
    deadline = launched + args.timeout
    agg = procs["aggregator"]
    early_exits: dict[str, int] = {}
    while agg.poll() is None:
        if time.time() > deadline:
            failure = f"the aggregator did not finish within {args.timeout} s"
            break
        time.sleep(0.5)
        if metrics_path.exists():
            lines = metrics_path.read_text().splitlines()
            for line in lines[shown:]:
                r = json.loads(line)
                log(f"fedmq version {r['version']:3d}  participants {r['participants']}/{r['expected']}  "
                    f"accuracy {r['test_accuracy']:.4f}  {r['seconds']:6.1f} s")
            shown = len(lines)
        for name, p in procs.items():
            if name != "aggregator" and name not in early_exits and p.poll() is not None:
                early_exits[name] = p.returncode
                # Workers exit once they have the RunComplete message, which can be before the
                # aggregator process itself has exited; only an exit before that is suspicious.
                if p.returncode != 0 or "complete at version" not in (logs / "aggregator.log").read_text(errors="replace"):
                    log(f"fedmq: WARNING: {name} exited (status {p.returncode}) before the run completed:\n"
                        + tail(logs / f"{name}.log", 15))
    agg_done = time.time()
    if failure is None and agg.returncode != 0:
        failure = f"the aggregator exited with status {agg.returncode}"
    # Every worker exits on its own once it has the RunComplete message.
    stragglers = []
    grace = time.time() + (args.worker_exit_timeout if failure is None else 0)
    for name, p in procs.items():
        if name == "aggregator" and p.poll() is None:
            p.terminate()
        try:
            p.wait(timeout=max(0.1, grace - time.time()))
        except subprocess.TimeoutExpired:
            stragglers.append(name)
    for name in stragglers:
        procs[name].terminate()
    for name in stragglers:
        try:
            procs[name].wait(timeout=15)
        except subprocess.TimeoutExpired:
            procs[name].kill()
            procs[name].wait()
    ended = time.time()
    sampler.stop()
    load_end = loadavg()
    for handle in handles:
        handle.close()
    exit_codes = {name: p.returncode for name, p in procs.items()}
    result["exit_codes"] = exit_codes
    if stragglers and failure is None:
        failure = (f"{len(stragglers)} worker(s) still running {args.worker_exit_timeout} s after the aggregator "
                   f"exited, killed: {', '.join(stragglers)}")
    bad = {n: c for n, c in exit_codes.items() if c != 0 and n not in stragglers}
    if bad and failure is None:
        failure = f"processes exited with a non-zero status: {bad}"
    result["failure"] = failure

    records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    result["records"] = records
    result["queues_after"] = broker_queues(args.broker_url, purge=False)
    breakdown = fedmq_breakdown(logs / "aggregator.log", worker_logs, args.versions, run_id, worker_ids)
    if breakdown["foreign_workers"]:
        log(f"fedmq: WARNING: workers of another federation talked to our aggregator: {breakdown['foreign_workers']} "
            "(fedmq's queues and broadcast exchange have fixed names: two federations on one broker vhost "
            "collide). This run's timings are not valid.")
        result["interference"] = breakdown["foreign_workers"]
    result["breakdown"] = breakdown
    t0 = breakdown.get("first_broadcast") or launched
    t1 = breakdown.get("last_close") or agg_done
    result.update({
        "federation_s": sum(r["seconds"] for r in records), "log_span_s": t1 - t0,
        "total_s": ended - launched, "startup_s": t0 - launched, "shutdown_s": ended - t1,
        "aggregator_exit_s": agg_done - t1,
        "peak": sampler.peak(), "peak_timed": sampler.peak(t0, t1), "cpu_timed": sampler.cpu(t0, t1),
        "cpu_versions": [sampler.cpu(row["broadcast_at"], row["closed_at"]) for row in breakdown["rows"]],
        "role_cpu_timed": sampler.role_cpu(t0, t1, lambda pid: "aggregator" if pid == agg.pid else "workers"),
        "load_start": load_start, "load_end": load_end,
        "cpu_s": cpu_seconds(sampler.cpu(t0, t1)),
        "processes_seen": sampler.per_process({p.pid: name for name, p in procs.items()}),
    })
    if failure:
        log(f"fedmq: FAILED: {failure}")
        log("aggregator log (last lines):\n" + tail(logs / "aggregator.log", 40))
        log("aggregator stdout:\n" + tail(logs / "aggregator.out", 20))
        for name in list(stragglers) + [n for n in bad if n != "aggregator"]:
            log(f"{name} log (last lines):\n" + tail(logs / f"{name}.log", 20))
    return result


# ============================================================================================
# Report
# ============================================================================================

def per_process_line(rows: list[dict[str, Any]]) -> str:
    """Peak PSS per process: named ones singly, numbered workers as median and range."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        if r["peak_pss_mb"] <= 0:
            continue
        label = re.sub(r"-\d+$", "", r["name"]) if r["name"].startswith("worker-") else r["name"]
        groups.setdefault(label, []).append(r["peak_pss_mb"])
    parts = []
    for label, values in sorted(groups.items()):
        values.sort()
        if len(values) == 1:
            parts.append(f"{label} {values[0]:.0f} MB")
        else:
            parts.append(f"{len(values)} x {label} median {values[len(values) // 2]:.0f} MB "
                         f"({values[0]:.0f}..{values[-1]:.0f})")
    return "PSS " + ", ".join(parts)


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _acc_at(records: list[dict[str, Any]], version: int) -> float | None:
    for r in records:
        if r["version"] == version:
            return r["test_accuracy"]
    return None


def _f(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def report(args: argparse.Namespace, floor: dict[str, Any] | None, fed: dict[str, Any] | None,
           load_start: list[float], load_end: list[float]) -> dict[str, Any]:
    print()
    print(f"=== W1: {MODEL} on {DATASET}, {args.workers} workers, IID, E={LOCAL_EPOCHS}, B={BATCH_SIZE}, "
          f"SGD lr {LEARNING_RATE}, {args.versions} versions; malloc env "
          f"{'default' if args.default_malloc else 'tuned'}; {os.cpu_count()} cores ===")
    if floor:
        print()
        print(f"--- floor: plain PyTorch, {floor['processes']} processes x 1 thread ---")
        print(f"{'version':>7} {'seconds':>8} {'accuracy':>9} {'train':>7} {'average':>8} {'eval':>6} {'idle cores':>10} "
              f"{'other cores':>11}")
        for r, c in zip(floor["records"], floor["cpu_versions"]):
            print(f"{r['version']:7d} {r['seconds']:8.1f} {r['test_accuracy']:9.4f} {r['train_s']:7.1f} "
                  f"{r['average_s']:8.2f} {r['eval_s']:6.2f} {_f(c.get('idle'), '.2f'):>10} {_f(c.get('other'), '.2f'):>11}")
        print(f"floor wall {floor['clock_s']:.1f} s; total with start-up {floor['total_s']:.1f} s "
              f"(start-up {floor['startup_s']:.1f} s, shutdown {floor['shutdown_s']:.1f} s)")
        print(f"floor CPU in the timed window: {fmt_cpu(floor['cpu_timed'])} "
              f"[{', '.join(f'{k} {v:.2f}' for k, v in sorted(floor['role_cpu_timed'].items()))} cores]")
    if fed:
        records = fed["records"]
        print()
        extra = "".join(f"; {who} args: {a}" for who, a in (("worker", args.worker_args), ("aggregator", args.aggregator_args)) if a)
        print(f"--- fedmq: aggregator + {args.workers} workers (1 thread each) over RabbitMQ, run {fed['run_id']}{extra} ---")
        print(f"{'version':>7} {'seconds':>8} {'accuracy':>9} {'up MB':>8} {'down MB':>8} {'participants':>12}")
        for r in records:
            print(f"{r['version']:7d} {r['seconds']:8.1f} {r['test_accuracy']:9.4f} {r['bytes_up'] / 1e6:8.1f} "
                  f"{r['bytes_down'] / 1e6:8.1f} {r['participants']:>8d}/{r['expected']:<3d}")
        rows = fed["breakdown"]["rows"]
        if rows:
            print()
            print("fedmq per-version breakdown from log timestamps (seconds after the aggregator logged the "
                  "broadcast; 'publish' = previous close -> broadcast logged, i.e. encode + publish + confirm; "
                  "'close' = last update folded -> version closed, i.e. average + evaluate + checkpoint):")
            print(f"{'version':>7} {'publish':>7} {'recv 1st':>8} {'recv last':>9} {'train mean':>10} "
                  f"{'train max':>9} {'trained last':>12} {'sent last':>9} {'folded last':>11} {'close':>6} "
                  f"{'idle cores':>10} {'other cores':>11}")
            for row, c in zip(rows, fed["cpu_versions"]):
                print(f"{row['version']:7d} {_f(row.get('publish_s'), '.2f'):>7} {_f(row.get('deliver_first_s'), '.2f'):>8} "
                      f"{_f(row.get('deliver_last_s'), '.2f'):>9} {_f(row.get('train_mean_s')):>10} "
                      f"{_f(row.get('train_max_s')):>9} {_f(row.get('trained_last_s')):>12} "
                      f"{_f(row.get('sent_last_s')):>9} {_f(row.get('folded_last_s')):>11} "
                      f"{_f(row.get('close_s'), '.2f'):>6} {_f(c.get('idle'), '.2f'):>10} {_f(c.get('other'), '.2f'):>11}")
        b = fed["breakdown"]
        print(f"fedmq federation wall (sum of per-version seconds) {fed['federation_s']:.1f} s; first broadcast -> "
              f"last close in the log {fed['log_span_s']:.1f} s; total with start-up {fed['total_s']:.1f} s "
              f"(launch -> first broadcast {fed['startup_s']:.1f} s"
              + (f", last worker loaded its data at +{b['last_loaded'] - (b['first_broadcast'] - fed['startup_s']):.1f} s"
                 if b.get("last_loaded") and b.get("first_broadcast") else "")
              + f"; last close -> all processes exited {fed['shutdown_s']:.1f} s)")
        print(f"fedmq CPU in the timed window: {fmt_cpu(fed['cpu_timed'])} "
              f"[{', '.join(f'{k} {v:.2f}' for k, v in sorted(fed['role_cpu_timed'].items()))} cores]")
        if fed.get("interference"):
            print(f"fedmq: INVALID RUN: workers of another federation joined ours: {fed['interference']}")
        odd = {k: sum(r.get(k, 0) for r in records) for k in ("stale", "duplicates", "dead_lettered", "rebroadcasts")}
        if any(odd.values()):
            print(f"fedmq: WARNING: the run counted {odd} (over all versions)")
        after = fed.get("queues_after") or {}
        leftovers = {q: i["messages"] for q, i in after.items() if i and i["messages"]}
        if leftovers:
            print(f"fedmq: messages left in queues after the run: {leftovers}")
        if fed.get("failure"):
            print(f"fedmq FAILED: {fed['failure']}")

    headline: dict[str, Any] = {"load_start": load_start, "load_end": load_end}
    print()
    print("=== headline ===")
    if floor and fed and fed["records"]:
        ratio = fed["federation_s"] / floor["clock_s"]
        total_ratio = fed["total_s"] / floor["total_s"]
        headline.update(ratio=ratio, total_ratio=total_ratio, fedmq_federation_s=fed["federation_s"],
                        floor_s=floor["clock_s"], fedmq_total_s=fed["total_s"], floor_total_s=floor["total_s"])
        complete = len(fed["records"]) == args.versions and not fed.get("interference")
        print(f"fedmq federation wall / floor wall = {ratio:.2f}   ({fed['federation_s']:.1f} s / "
              f"{floor['clock_s']:.1f} s; target at most 1.15{'' if complete else '; fedmq run INCOMPLETE OR INVALID'})")
        print(f"total with start-up: fedmq / floor = {total_ratio:.2f}   ({fed['total_s']:.1f} s / "
              f"{floor['total_s']:.1f} s)")
        # Less sensitive to a version or two slowed down by something else running.
        med_fed = _median([r["seconds"] for r in fed["records"]])
        med_floor = _median([r["seconds"] for r in floor["records"]])
        headline["median_version_ratio"] = med_fed / med_floor
        print(f"median seconds per version: fedmq / floor = {med_fed / med_floor:.2f}   ({med_fed:.1f} s / "
              f"{med_floor:.1f} s)")
    elif floor:
        print(f"floor wall {floor['clock_s']:.1f} s, total with start-up {floor['total_s']:.1f} s (fedmq skipped or failed)")
    elif fed:
        print(f"fedmq federation wall {fed['federation_s']:.1f} s, total with start-up {fed['total_s']:.1f} s "
              "(floor skipped)")
    for v in sorted({min(3, args.versions), args.versions}):
        parts = []
        if floor:
            parts.append(f"floor {_f(_acc_at(floor['records'], v), '.4f')}")
        if fed:
            parts.append(f"fedmq {_f(_acc_at(fed['records'], v), '.4f')}")
        print(f"test accuracy after version {v}: " + ", ".join(parts))
        headline[f"accuracy_v{v}"] = {"floor": _acc_at(floor["records"], v) if floor else None,
                                      "fedmq": _acc_at(fed["records"], v) if fed else None}
    for name, res in (("floor", floor), ("fedmq", fed)):
        if res:
            print(f"peak memory {name}: PSS {res['peak']['pss_mb']:.0f} MB, RSS {res['peak']['rss_mb']:.0f} MB "
                  f"(whole run); in the timed window PSS {res['peak_timed']['pss_mb']:.0f} MB, "
                  f"RSS {res['peak_timed']['rss_mb']:.0f} MB")
            headline[f"peak_{name}"] = {"whole": res["peak"], "timed": res["peak_timed"]}
    for name, res in (("floor", floor), ("fedmq", fed)):
        if res:
            print(f"peak memory per process, {name}: {per_process_line(res['processes_seen'])}")
    if floor and fed and floor.get("cpu_s") and fed.get("cpu_s"):
        a, b = fed["cpu_s"], floor["cpu_s"]
        headline["cpu_s"] = {"fedmq": a, "floor": b}
        print(f"CPU time in the timed window: fedmq {a['ours']:.0f} s + rabbitmq {a['broker']:.0f} s, floor "
              f"{b['ours']:.0f} s + rabbitmq {b['broker']:.0f} s: ratio {(a['ours'] + a['broker']) / b['ours']:.2f}; "
              f"idle {a['idle']:.0f} s vs {b['idle']:.0f} s; taken by other processes {a['other']:.0f} s vs "
              f"{b['other']:.0f} s" + ("  <- CONTAMINATED: timings not comparable"
                                        if max(a["other"] / max(1.0, fed["federation_s"]),
                                               b["other"] / max(1.0, floor["clock_s"])) > 0.05 else ""))
    for name, res in (("floor", floor), ("fedmq", fed)):
        if res:
            print(f"load average {name}: {fmt_load(res['load_start'])} at start, {fmt_load(res['load_end'])} at end")
    print(f"load average (1, 5, 15 min): {fmt_load(load_start)} at start, {fmt_load(load_end)} at end")
    return headline


# ============================================================================================
# main
# ============================================================================================

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="W1 benchmark: fedmq over RabbitMQ against a plain-PyTorch floor.")
    p.add_argument("--versions", type=int, default=10, help="model versions (rounds) [10]")
    p.add_argument("--workers", type=int, default=10, help="workers = IID partitions [10]")
    p.add_argument("--skip-floor", action="store_true", help="do not run the floor")
    p.add_argument("--floor-procs", type=int, default=0,
                   help="processes of the floor (0: os.cpu_count(), the W1 definition; = --workers: one per shard "
                        "like fedmq, to see what ten processes on few cores cost by themselves)")
    p.add_argument("--skip-fedmq", action="store_true", help="do not run fedmq")
    p.add_argument("--default-malloc", action="store_true",
                   help="run without MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ (glibc's defaults)")
    p.add_argument("--json", metavar="PATH", help="also write every number as JSON to PATH")
    p.add_argument("--data-root", default=str(REPO / ".cache" / "bench-data"), help="data cache [.cache/bench-data]")
    p.add_argument("--data-mirror", default=str((REPO.parent / "shared" / "data").resolve()),
                   help="read-only originals [../shared/data]")
    p.add_argument("--broker-url", default=os.environ.get("FEDMQ_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"))
    p.add_argument("--timeout", type=float, default=1200, help="seconds allowed for each run [1200]")
    p.add_argument("--worker-exit-timeout", type=float, default=60,
                   help="seconds the workers get to exit after the aggregator [60]")
    p.add_argument("--max-load", type=float, default=1.5,
                   help="before each run wait (up to --load-wait s) for the 1-min load average to drop below this [1.5]")
    p.add_argument("--load-wait", type=float, default=180, help="[180]")
    p.add_argument("--no-purge", action="store_true",
                   help="leave what other runs left in fedmq's queues (to see what leftovers do to a run)")
    p.add_argument("--worker-args", default="",
                   help="extra flags for every fedmq worker, e.g. \"--training-slots 2 --training-slots-dir "
                        "{work}/slots\" ({work}: the work dir); not part of W1's definition")
    p.add_argument("--aggregator-args", default="", help="extra flags for the fedmq aggregator")
    p.add_argument("--sample-interval", type=float, default=0.5,
                   help="seconds between /proc samples [0.5]; reading smaps_rollup costs the bench ~6 ms per GB "
                        "of RSS per process per sample (the 'bench' share in the CPU lines)")
    p.add_argument("--work-dir", help="where logs, metrics and checkpoints go [a new temporary directory, kept]")
    # Internal: the floor's own process.
    p.add_argument("--floor-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--floor-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.versions < 1 or args.workers < 1:
        p.error("--versions and --workers must be at least 1")
    if args.skip_floor and args.skip_fedmq:
        p.error("nothing to do: both --skip-floor and --skip-fedmq")
    return args


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_") and k not in MALLOC_ENV}
    if not args.default_malloc:
        env.update(MALLOC_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def foreign_fedmq_processes() -> list[str]:
    """Command lines of fedmq services on this machine that this script did not start."""
    mine = set(_descendants([os.getpid()], _proc_table()))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in argv if a)
        if re.search(r"(-m fedmq_cli|bin/fedmq) (aggregator|worker|run)\b", text):
            found.append(f"{entry}: {text[:100]}")
    return found


def wait_for_quiet(args: argparse.Namespace, what: str, *, fedmq: bool = False) -> None:
    """Wait (up to --load-wait s) for a low load average and, before the fedmq run, for fedmq
    services started by someone else to go: they would share fedmq's queues with ours."""
    waited = 0.0
    while True:
        load = loadavg()
        others = foreign_fedmq_processes() if fedmq else []
        busy = args.max_load > 0 and load[0] >= args.max_load
        if not busy and not others:
            return
        if waited >= args.load_wait:
            log(f"{what}: WARNING: after waiting {waited:.0f} s: load average {fmt_load(load)}"
                + (f", other fedmq processes running: {others}" if others else "") + "; going ahead "
                "(see 'other processes' in the CPU lines for how much CPU something else took)")
            return
        if waited == 0:
            log(f"{what}: waiting: load average {fmt_load(load)} (want < {args.max_load})"
                + (f"; other fedmq processes on this machine (they would share fedmq's queues): {others}"
                   if others else ""))
        time.sleep(10)
        waited += 10


def prepare_data(args: argparse.Namespace, env: dict[str, str]) -> None:
    """Fill the cache (copy from the mirror, unpack) once, before eleven processes race for it."""
    code = ("import sys; from pathlib import Path; from fedmq.task import load_split\n"
            "for train in (True, False):\n"
            f"    load_split({DATASET!r}, Path(sys.argv[1]), train=train, mirror=Path(sys.argv[2]) if sys.argv[2] else None, download=False)\n")
    subprocess.run([sys.executable, "-c", code, args.data_root, args.data_mirror], env=env, cwd=REPO, check=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.floor_child:
        return floor_main(args)
    load_start = loadavg()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="fedmq-w1-"))
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(args)
    log(f"W1: {args.workers} workers, {args.versions} versions; load average {fmt_load(load_start)}; "
        f"work dir {work}; malloc env {'default' if args.default_malloc else MALLOC_ENV}")
    prepare_data(args, env)
    floor = fed = None
    if not args.skip_floor:
        wait_for_quiet(args, "floor")
        floor = run_floor(args, env, work)
    if not args.skip_fedmq:
        wait_for_quiet(args, "fedmq", fedmq=True)
        fed = run_fedmq(args, env, work)
    load_end = loadavg()
    headline = report(args, floor, fed, load_start, load_end)
    if args.json:
        everything = {"workload": {"dataset": DATASET, "model": MODEL, "scheme": SCHEME, "workers": args.workers,
                                   "versions": args.versions, "local_epochs": LOCAL_EPOCHS, "batch_size": BATCH_SIZE,
                                   "learning_rate": LEARNING_RATE, "momentum": MOMENTUM, "seed": SEED},
                      "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                      "malloc_env": None if args.default_malloc else MALLOC_ENV, "work_dir": str(work),
                      "floor": floor, "fedmq": fed, "headline": headline}
        Path(args.json).write_text(json.dumps(everything, indent=1, default=str))
        log(f"JSON written to {args.json}")
    if fed and (fed.get("failure") or fed.get("interference")):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
