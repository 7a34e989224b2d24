"""A federation of real processes (``python -m fedmq_cli``) over a real RabbitMQ, for tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pika

REPO = Path(__file__).resolve().parent.parent
FEDMQ_QUEUES = ("fedmq.updates", "fedmq.control", "fedmq.dead-letters")


def purge_fedmq_queues(url: str) -> None:
    """Empty fedmq's shared queues so that nothing from an earlier run interferes."""
    from fedmq.broker.rabbitmq import RabbitBroker
    from fedmq.topology import STATIC_TOPOLOGY

    with RabbitBroker(url, connection_name="fedmq-test-setup") as broker:
        broker.declare(STATIC_TOPOLOGY)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for queue in FEDMQ_QUEUES:
            channel.queue_purge(queue)
    finally:
        connection.close()


def dead_letters(url: str) -> list[tuple[bytes, dict]]:
    """Take every message out of the dead-letter queue: (body, headers)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    out = []
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get("fedmq.dead-letters", auto_ack=True)
            if method is None:
                return out
            out.append((body, dict(properties.headers or {})))
    finally:
        connection.close()


class Federation:
    """Starts an aggregator and workers as processes; collects their logs; kills them all at the end."""

    def __init__(self, tmp_path: Path, data_root: Path, url: str, run_id: str, **env: object) -> None:
        self.tmp_path, self.run_id = tmp_path, run_id
        self.env = dict(os.environ)
        self.env.update({
            "FEDMQ_BROKER_URL": url, "FEDMQ_DATA_ROOT": str(data_root), "FEDMQ_DOWNLOAD": "false",
            "FEDMQ_RUN_ID": run_id, "FEDMQ_OUTPUT_DIR": str(tmp_path / "runs"), "FEDMQ_THREADS": "1",
            "FEDMQ_EVAL_THREADS": "1",
            "FEDMQ_MODEL": "fedavg-2nn", "FEDMQ_HEARTBEAT_INTERVAL_S": "1", "FEDMQ_WORKER_TIMEOUT_S": "5",
            "FEDMQ_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1",
        })
        self.env.update({k: str(v) for k, v in env.items()})
        self.processes: dict[str, subprocess.Popen] = {}
        self.aggregator_log = "aggregator"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}.log", "ab")  # a restarted process appends
        process = subprocess.Popen([sys.executable, "-m", "fedmq_cli", *args], cwd=REPO, env=self.env,
                                   stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def aggregator(self, *flags: str, name: str = "aggregator") -> subprocess.Popen:
        """Start the aggregator; a restarted one under another ``name`` logs to its own file and
        becomes the one :meth:`wait_aggregator` and :meth:`wait_for_version` watch."""
        process = self._start(name, ["aggregator", *flags])
        self.processes["aggregator"] = process
        self.processes[name] = process
        self.aggregator_log = name
        return process

    def worker(self, name: str, *flags: str) -> subprocess.Popen:
        return self._start(name, ["worker", "--worker-id", name, *flags])

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    @property
    def metrics_path(self) -> Path:
        return self.tmp_path / "runs" / self.run_id / "metrics.jsonl"

    def records(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def wait_for_log(self, name: str, text: str, timeout_s: float) -> None:
        """Wait until ``text`` appears in the log of process ``name`` (polled every 20 ms)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log(name):
                return
            if self.processes[name].poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"{text!r} never logged by {name}; log:\n{self.log(name)[-3000:]}")

    def wait_for_version(self, version: int, timeout_s: float) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            records = self.records()
            if any(r["version"] >= version for r in records):
                return records
            if self.processes["aggregator"].poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"version {version} not reached; aggregator log:\n{self.log(self.aggregator_log)[-3000:]}")

    def wait_aggregator(self, timeout_s: float) -> int:
        try:
            return self.processes["aggregator"].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"aggregator still running; log:\n{self.log(self.aggregator_log)[-3000:]}") from None

    def wait_workers(self, timeout_s: float) -> dict[str, int | None]:
        deadline = time.monotonic() + timeout_s
        codes = {}
        for name, process in self.processes.items():
            if name.startswith("aggregator"):
                continue
            try:
                codes[name] = process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = None
        return codes

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait()

    def terminate(self, name: str, timeout_s: float = 60) -> int:
        """SIGTERM (what `docker stop` sends); returns the exit code."""
        self.processes[name].send_signal(signal.SIGTERM)
        try:
            return self.processes[name].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running {timeout_s} s after SIGTERM; log:\n"
                                 f"{self.log(name)[-3000:]}") from None

    def close(self) -> None:
        for process in set(self.processes.values()):
            if process.poll() is None:
                process.kill()
                process.wait()


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60,
                          check=True).stdout


def find_connections(url: str, connection_name: str) -> list[str]:
    """The pids (as ``rabbitmqctl close_connection`` takes them) of the connections of the vhost
    of ``url`` whose client-given name is ``connection_name``."""
    vhost = pika.URLParameters(url).virtual_host
    # The JSON listing has the client properties but not a pid close_connection accepts; the
    # table has that pid. Both name the connection by its addresses.
    pids = dict(reversed(line.split("\t", 1)) for line in
                _rabbitmqctl("list_connections", "--no-table-headers", "pid", "name").splitlines() if "\t" in line)
    found = []
    for connection in json.loads(_rabbitmqctl("list_connections", "name", "vhost", "client_properties",
                                              "--formatter", "json") or "[]"):
        properties = {entry[0]: entry[2] for entry in connection["client_properties"]}
        if connection["vhost"] == vhost and properties.get("connection_name") == connection_name:
            found.append(pids[connection["name"]])
    return found


def close_connection(pid: str) -> None:
    """Force-close one connection, as an operator would."""
    _rabbitmqctl("close_connection", pid, "forced closed by a test")
