"""Operating a federation of processes on the real RabbitMQ: Prometheus metrics and `fedmq status`.

The aggregator and a worker serve ``/metrics`` (``--metrics-port``); prometheus-client's own
parser reads what a real HTTP client fetched during the run, and the numbers agree with the
``metrics.jsonl`` lines written by then. ``fedmq status`` (a process of its own) lists the live
workers of the running aggregator, and with no aggregator says so and exits non-zero.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from federation_processes import REPO, Federation, purge_fedmq_queues

pytestmark = pytest.mark.rabbitmq


def publish_raw(url: str, queue: str, body: bytes) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
    finally:
        connection.close()


def fedmq_status(url: str, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FEDMQ_BROKER_URL=url)
    return subprocess.run([sys.executable, "-m", "fedmq_cli", "status", *flags], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)


def status_command(url: str, out: io.StringIO, *flags: str) -> int:
    """``fedmq status [flags]`` as its command line parses it, run in this process."""
    from fedmq.settings import settings_from_args
    from fedmq_cli.__main__ import build_parser
    from fedmq_cli.status import run_status

    args = build_parser().parse_args(["status", "--status-timeout-s", "30", *flags])
    settings = settings_from_args(args, {"FEDMQ_BROKER_URL": url})
    return run_status(settings, as_json=args.json, out=out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float] | None:
    """Every sample at ``http://127.0.0.1:port/metrics`` as {(name, sorted labels): value};
    None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
    except OSError:
        return None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def consistent_snapshot(fed: Federation, port: int, *, min_version: int, timeout_s: float):
    """A scrape and the metrics file read between two identical scrapes (no version closed and
    no update folded in between), once ``min_version`` is made."""
    watched = ("fedmq_versions_total", "fedmq_updates_folded_total", "fedmq_version_folded_updates")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        first = scrape(port)
        records = fed.records()
        second = scrape(port)
        if first and second and records and records[-1]["version"] >= min_version and all(
                first.get((n, ())) == second.get((n, ())) for n in watched):
            return second, records
        assert fed.processes["aggregator"].poll() is None, fed.log("aggregator")[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no consistent scrape at version {min_version}; log:\n{fed.log('aggregator')[-3000:]}")


def test_scraped_metrics_parse_and_agree_with_the_metrics_file(tmp_path, data_root, rabbitmq_url, unique_name):
    purge_fedmq_queues(rabbitmq_url)
    aggregator_port, worker_port = free_port(), free_port()
    fed = Federation(tmp_path, data_root, rabbitmq_url, f"prom-{unique_name}", FEDMQ_VERSIONS=3,
                     FEDMQ_START_WORKERS=2, FEDMQ_NUM_PARTITIONS=2)
    try:
        publish_raw(rabbitmq_url, "fedmq.updates", b"\x93garbage\xc1")  # one dead letter, reason malformed
        fed.aggregator("--metrics-port", str(aggregator_port))
        fed.worker("w0", "--metrics-port", str(worker_port))
        fed.worker("w1")
        samples, records = consistent_snapshot(fed, aggregator_port, min_version=2, timeout_s=240)
        worker = scrape(worker_port)
        # In this process: a `fedmq status` process would spend seconds importing torch on the
        # busy cores, and the run could be over before it asks.
        status, table = io.StringIO(), io.StringIO()
        assert status_command(rabbitmq_url, status, "--json") == 0
        assert status_command(rabbitmq_url, table) == 0

        assert value(samples, "fedmq_model_version") == records[-1]["version"]
        assert value(samples, "fedmq_versions_total") == len(records)
        assert value(samples, "fedmq_bytes_total", direction="up") == sum(r["bytes_up"] for r in records) > 0
        assert value(samples, "fedmq_bytes_total", direction="down") == sum(r["bytes_down"] for r in records) > 0
        assert value(samples, "fedmq_version_seconds_count") == len(records)
        assert value(samples, "fedmq_version_seconds_sum") == pytest.approx(sum(r["seconds"] for r in records))
        assert value(samples, "fedmq_test_accuracy") == pytest.approx(records[-1]["test_accuracy"])
        assert value(samples, "fedmq_test_loss") == pytest.approx(records[-1]["test_loss"])
        assert value(samples, "fedmq_test_accuracy") >= 0.9
        # Updates folded so far: those of the closed versions plus those of the open one.
        assert (value(samples, "fedmq_updates_folded_total") - value(samples, "fedmq_version_folded_updates")
                == sum(r["participants"] for r in records))
        assert value(samples, "fedmq_dead_letters_total", reason="malformed") == 1
        assert sum(v for (n, _), v in samples.items() if n == "fedmq_dead_letters_total") == sum(
            r["dead_lettered"] for r in records)
        assert value(samples, "fedmq_live_workers") == records[-1]["live_workers"] == 2
        assert value(samples, "fedmq_updates_dropped_total", reason="stale") == sum(r["stale"] for r in records)

        assert worker is not None
        assert value(worker, "fedmq_worker_updates_sent_total") >= 2
        assert value(worker, "fedmq_worker_training_seconds_count") >= 2
        assert value(worker, "fedmq_worker_samples_per_second") > 0
        assert value(worker, "fedmq_worker_update_bytes_total") > 0

        answer = json.loads(status.getvalue())
        assert answer["run_id"] == fed.run_id and answer["versions"] == 3 and answer["version"] >= 2
        assert sorted(w["worker_id"] for w in answer["workers"]) == ["w0", "w1"]
        assert all(w["device"] == "cpu" and w["partition"] in (0, 1) for w in answer["workers"])
        assert answer["test_accuracy"] >= 0.9
        assert "2 live workers" in table.getvalue() and "w0" in table.getvalue(), table.getvalue()

        assert fed.wait_aggregator(240) == 0, fed.log("aggregator")[-3000:]
        assert [r["version"] for r in fed.records()] == [1, 2, 3]
    finally:
        fed.close()


def test_status_without_an_aggregator_exits_non_zero_with_a_clear_message(rabbitmq_url):
    purge_fedmq_queues(rabbitmq_url)
    done = fedmq_status(rabbitmq_url, "--status-timeout-s", "2")
    assert done.returncode == 1 and done.stdout == ""
    assert "no aggregator answered within 2 s" in done.stderr and "guest:***@" in done.stderr, done.stderr
