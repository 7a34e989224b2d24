"""The docker compose cluster on a real Docker engine: build, scale, stop, kill, results after `down`.

A user's path through compose.yaml, with the stand-in base images (no registry here): build the
image, `up -d --scale worker=3`, a small federation (2NN on real MNIST); `--scale worker=4`
mid-run and the fourth worker contributes; `docker stop` one worker (SIGTERM: goodbye, exit 0)
and `docker kill` another (no goodbye): versions go on without them; `docker stop` the
aggregator and start it again: it resumes from its checkpoint and finishes the run; `down`,
then the README's copy command finds the metrics and the final model in the results volume.

Skipped without a Docker engine, except in CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

from aggregator.checkpoint import CheckpointStore
from compose_cluster import (VERSION_LINE, ComposeProject, build_standin_images, engine_problem, in_ci, inspect,
                             wait_exit)
from conftest import shared_data_dir

pytestmark = pytest.mark.cluster

README = Path(__file__).resolve().parent.parent / "README.md"
RUN_ID = "cluster-test"
# compose.yaml's default worker user: worker ids start with it (its permissions cover their inboxes).
WORKER_USER = "fedmq-worker"


@pytest.fixture(scope="module")
def cluster():
    problem = engine_problem()
    if problem:
        if in_ci():
            pytest.fail(f"{problem}; CI needs a Docker engine (.ci/run starts one)", pytrace=False)
        pytest.skip(problem)
    standin_s = build_standin_images()
    project = ComposeProject(
        f"fedmqtest{uuid.uuid4().hex[:8]}", "fedmq-cluster-test:latest",
        FEDMQ_RUN_ID=RUN_ID, FEDMQ_MODEL="fedavg-2nn", FEDMQ_DOWNLOAD="false",
        FEDMQ_START_WORKERS=3, FEDMQ_NUM_PARTITIONS=4, FEDMQ_LOCAL_EPOCHS=1, FEDMQ_THREADS=1,
        FEDMQ_EVAL_THREADS=1, FEDMQ_HEARTBEAT_INTERVAL_S=1, FEDMQ_WORKER_TIMEOUT_S=10, FEDMQ_ROUND_TIMEOUT_S=120)
    started = time.monotonic()
    project.compose("build", timeout=1800)
    print(f"\ncluster: stand-in images {standin_s:.0f} s, `compose build` {time.monotonic() - started:.0f} s")
    try:
        yield project
    finally:
        project.compose("down", "-v", "--remove-orphans", check=False)


def copy_data_into_volume(project: ComposeProject) -> None:
    """Put the original MNIST files in the shared `data` volume (the cluster has no internet)."""
    mnist = shared_data_dir() / "MNIST" / "raw"
    project.compose("run", "--rm", "--no-deps", "-T", "-v", f"{mnist}:/mirror:ro", "--entrypoint", "sh",
                    "aggregator", "-c", "mkdir -p /data/MNIST/raw && cp /mirror/*.gz /data/MNIST/raw/")


def host_name(container: str) -> str:
    return inspect(container, "{{.Config.Hostname}}")


def test_compose_cluster_scales_survives_stop_and_kill_and_keeps_results_after_down(cluster, tmp_path):
    started = time.monotonic()

    def phase(what: str) -> None:  # shown with -s: where the time goes
        print(f"cluster: {time.monotonic() - started:5.1f} s  {what}", flush=True)

    copy_data_into_volume(cluster)
    # A run far longer than the test needs: nothing below races its end. The test ends it by
    # giving the resumed aggregator a nearer last version.
    cluster.env["FEDMQ_VERSIONS"] = "200"
    cluster.compose("up", "-d", "--scale", "worker=3")
    first_three = cluster.container_ids("worker")
    assert len(first_three) == 3
    cluster.wait_until("version 1 with 3 workers", lambda: any(v == 1 for v, _ in cluster.versions()), 300)
    assert cluster.versions()[0][1] == 3
    phase("version 1 closed by 3 workers")

    cluster.compose("up", "-d", "--no-recreate", "--scale", "worker=4")
    (fourth,) = set(cluster.container_ids("worker")) - set(first_three)
    fourth_host = host_name(fourth)
    # Its updates are logged as "version N: update k/m from <broker user>.<host name>-<pid>-<suffix>".
    cluster.wait_until("the fourth worker's update", lambda: f"from {WORKER_USER}.{fourth_host}-" in cluster.logs("aggregator"),
                       240)
    phase(f"the fourth worker's update arrived (versions so far: {len(cluster.versions())})")

    stopped, killed = first_three[0], first_three[1]
    stopped_host, killed_host = host_name(stopped), host_name(killed)
    subprocess.run(["docker", "stop", "-t", "120", stopped], check=True, capture_output=True)
    assert inspect(stopped, "{{.State.ExitCode}}") == "0"  # SIGTERM to PID 1: goodbye, exit 0
    cluster.wait_until("the goodbye", lambda: re.search(rf"worker {WORKER_USER}\.{stopped_host}-\S+ left", cluster.logs("aggregator")), 60)
    subprocess.run(["docker", "kill", killed], check=True, capture_output=True)
    cluster.wait_until("the killed worker dropped", lambda: re.search(
        rf"worker {WORKER_USER}\.{killed_host}-\S+ silent for over \d+ s: considered dead", cluster.logs("aggregator")), 120)
    after_kill = len(cluster.versions())
    cluster.wait_until("a version without the two", lambda: len(cluster.versions()) > after_kill, 120)
    phase(f"one worker stopped, one killed; versions go on ({len(cluster.versions())} so far)")

    # `docker stop` the aggregator (SIGTERM to PID 1: exit 0, not the SIGKILL after the grace
    # period, which is long because a loaded 2-core machine exits slowly), then start it again
    # with a nearer last version: it resumes from its checkpoint.
    aggregator = cluster.container_ids("aggregator")[0]
    subprocess.run(["docker", "stop", "-t", "120", aggregator], check=True, capture_output=True)
    assert inspect(aggregator, "{{.State.ExitCode}}") == "0"
    first_log = cluster.logs("aggregator")
    stopped_at = len(cluster.versions())
    final_version = stopped_at + 2
    cluster.env["FEDMQ_VERSIONS"] = str(final_version)
    cluster.compose("up", "-d", "--no-deps", "aggregator")
    (aggregator,) = cluster.container_ids("aggregator")
    assert wait_exit(aggregator, 300) == 0, cluster.logs("aggregator")[-4000:]
    log = cluster.logs("aggregator")
    assert f"resuming from the checkpoint of version {stopped_at}" in log
    assert f"run {RUN_ID}: version {final_version}, test accuracy" in log
    versions = VERSION_LINE.findall(first_log + log)
    assert [int(v) for v, *_ in versions] == list(range(1, final_version + 1)), versions
    assert max(int(p) for _, p, *_ in versions) == 4  # the fourth worker was counted in a version
    # Workers leave when the run completes: the fourth and the one never touched exit 0; the
    # killed one stays down (`docker kill` is not a failure the restart policy restarts).
    for container in (fourth, first_three[2]):
        assert wait_exit(container, 60) == 0, container
    assert inspect(killed, "{{.State.ExitCode}}") == "137"
    phase(f"aggregator stopped at version {stopped_at}, resumed, run complete at version {final_version}")

    cluster.compose("down")  # keeps the volumes, as a user's `docker compose down` does
    # The README's command that copies the results volume into ./runs, run as it is written.
    (copy,) = [line for line in README.read_text().splitlines() if "--entrypoint tar aggregator" in line]
    subprocess.run(["bash", "-c", "set -o pipefail; " + cluster.as_user_typed(copy)], cwd=tmp_path, env=cluster.env,
                   check=True, timeout=300)
    run_dir = tmp_path / "runs" / RUN_ID
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in records] == list(range(1, final_version + 1))
    assert records[-1]["test_accuracy"] >= 0.9, [r["test_accuracy"] for r in records]
    final = load_file(str(run_dir / "final_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in final.items()}["fc1.weight"] == (200, 784)
    assert CheckpointStore(run_dir).load(RUN_ID).version == final_version
    phase(f"results copied out after `down`: {len(records)} versions, final accuracy "
          f"{records[-1]['test_accuracy']:.4f}")
