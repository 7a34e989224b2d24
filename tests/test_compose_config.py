"""compose.yaml, the Dockerfile, .env.example and fedmq's settings agree (no Docker needed).

- every fedmq setting reaches the containers from `.env` or the shell, or compose sets it on
  purpose (and says so); .env.example documents every variable compose.yaml reads;
- the worker scales (no container_name, no host ports), the aggregator resumes (a fixed run id,
  restart on failure), both wait for a healthy broker; the gpu profile asks for a GPU;
- the image runs as a non-root user with an exec-form entrypoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from fedmq.settings import DEFAULT_RUN_ID, GROUPS, env_name

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
FEDMQ_SERVICES = ("aggregator", "worker", "worker-gpu")

#: Settings compose.yaml does not pass through, and why.
NOT_PASSED = {
    "FEDMQ_DATA_ROOT": "the image sets /data, the shared data volume",
    "FEDMQ_OUTPUT_DIR": "the image sets /results, the results volume",
    "FEDMQ_TRAINING_SLOTS_DIR": "the shared training-slots volume's mount point (the default path)",
    "FEDMQ_WORKER_ID": "scaled replicas must not share an id",
    "FEDMQ_PARTITION": "scaled replicas must not share a partition",
    "FEDMQ_WORKERS": "the embedded mode only",
}


def setting_names() -> set[str]:
    names = {env_name(f.name) for cls in GROUPS.values() for f in dataclasses.fields(cls)}
    return names | {env_name("log_level")}


def environment(service: str) -> dict:
    return SERVICES[service]["environment"]


def test_every_setting_reaches_the_containers_or_is_set_by_compose_on_purpose():
    for service in FEDMQ_SERVICES:
        env = environment(service)
        fedmq_names = {name for name in env if name.startswith("FEDMQ_")}
        assert fedmq_names <= setting_names(), f"{service}: not fedmq settings: {fedmq_names - setting_names()}"
        missing = setting_names() - fedmq_names - set(NOT_PASSED)
        assert not missing, f"{service}: add these settings to x-fedmq-settings in compose.yaml: {sorted(missing)}"
        assert not fedmq_names & set(NOT_PASSED), f"{service}: {fedmq_names & set(NOT_PASSED)}"


def test_env_example_documents_every_variable_compose_reads():
    text = (REPO / "compose.yaml").read_text()
    interpolated = set(re.findall(r"\$\{([A-Z_]+)", text))
    passed = {name for name, value in environment("worker").items() if value is None}
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", (REPO / ".env.example").read_text(), re.M))
    assert interpolated | passed <= documented, sorted((interpolated | passed) - documented)
    assert documented - {"COMPOSE_PROJECT_NAME"} <= interpolated | passed, sorted(documented - interpolated - passed)


def test_the_broker_runs_the_repository_configuration_and_is_healthchecked():
    broker = SERVICES["rabbitmq"]
    assert broker["image"].endswith(":-rabbitmq:4.2-management}")
    assert broker["hostname"] == "rabbitmq"
    mounts = {m.split(":")[1]: m.split(":")[0] for m in broker["volumes"]}
    assert mounts["/etc/fedmq/definitions.template.json"] == "./broker_config/definitions.json"
    assert mounts["/etc/fedmq/start-broker.sh"] == "./broker_config/start-broker.sh"
    assert mounts["/etc/rabbitmq/conf.d/90-fedmq.conf"] == "./broker_config/rabbitmq.conf"
    assert mounts["/var/lib/rabbitmq"] == "broker-data"
    assert "check_port_connectivity" in broker["healthcheck"]["test"]
    # start-broker.sh renders the definitions (the users from the environment) where the
    # configuration imports them from, then starts the broker.
    assert broker["entrypoint"] == ["sh", "/etc/fedmq/start-broker.sh"] and broker["command"] == ["rabbitmq-server"]
    script = (REPO / "broker_config" / "start-broker.sh").read_text()
    rendered = re.search(r'out="\$\{DEFINITIONS_OUT:-(.+)\}"', script).group(1)
    template = re.search(r'template="\$\{DEFINITIONS_TEMPLATE:-(.+)\}"', script).group(1)
    assert template == "/etc/fedmq/definitions.template.json"
    conf = (REPO / "broker_config" / "rabbitmq.conf").read_text()
    assert f"definitions.local.path = {rendered}" in conf
    json.loads((REPO / "broker_config" / "definitions.json").read_text())


def test_every_service_has_its_own_broker_user_and_nobody_is_guest():
    users = {}
    for service in FEDMQ_SERVICES:
        url = environment(service)["FEDMQ_BROKER_URL"]
        users[service] = re.match(r"amqps?://\$\{(BROKER_\w+_USER):-([\w-]+)\}:\$\{(BROKER_\w+_PASSWORD):-", url).group(1, 2, 3)
    assert users["aggregator"] == ("BROKER_AGGREGATOR_USER", "fedmq-aggregator", "BROKER_AGGREGATOR_PASSWORD")
    assert users["worker"] == users["worker-gpu"] == ("BROKER_WORKER_USER", "fedmq-worker", "BROKER_WORKER_PASSWORD")
    broker_env = SERVICES["rabbitmq"]["environment"]
    for name, default, password in users.values():
        assert broker_env[name] == f"${{{name}:-{default}}}"  # the broker creates the user the service logs in as
        assert broker_env[password].startswith(f"${{{password}:-")
    assert "guest:" not in (REPO / "compose.yaml").read_text()


@pytest.mark.parametrize("service", FEDMQ_SERVICES)
def test_services_wait_for_a_healthy_broker_and_restart_on_failure(service):
    spec = SERVICES[service]
    assert spec["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}
    assert spec["restart"] == "on-failure"
    assert spec["environment"]["FEDMQ_BROKER_URL"].startswith("amqp") and "@rabbitmq:" in spec["environment"]["FEDMQ_BROKER_URL"]


def test_the_aggregator_resumes_its_run_and_keeps_results_in_a_volume():
    aggregator = SERVICES["aggregator"]
    assert aggregator["command"] == ["aggregator"]
    # A restarted container resumes only if the run id is the same: fedmq's default is fixed.
    assert DEFAULT_RUN_ID and "FEDMQ_RUN_ID" in aggregator["environment"]
    assert "results:/results" in aggregator["volumes"] and "results" in COMPOSE["volumes"]
    assert "ENV FEDMQ_DATA_ROOT=/data" in (REPO / "Dockerfile").read_text().replace(" \\\n    ", " ENV ")


def test_workers_scale():
    for service in ("worker", "worker-gpu"):
        worker = SERVICES[service]
        assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker
        assert worker["command"] == ["worker"]
        assert "data:/data" in worker["volumes"]
        assert "training-slots:/tmp/fedmq-training-slots" in worker["volumes"]


def test_the_gpu_worker_is_a_profile_that_reserves_a_gpu():
    gpu = SERVICES["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["environment"]["FEDMQ_DEVICE"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH_INDEX_URL"] != SERVICES["worker"]["build"]["args"]["TORCH_INDEX_URL"]
    assert "profiles" not in SERVICES["worker"]


def test_the_image_runs_as_a_user_with_an_exec_form_entrypoint():
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    (entrypoint,) = [line for line in lines if line.startswith("ENTRYPOINT ")]
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT ")) == ["fedmq"]
    assert "ARG PYTHON_BASE_IMAGE=python:3.11-slim" in lines
    assert any(line.startswith("ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") for line in lines)


def test_the_build_context_leaves_out_local_environments():
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") + 1:]  # everything is excluded, then the sources are let in
    assert {"!fedmq/", "!aggregator/", "!worker/", "!fedmq_cli/", "!pyproject.toml", "!README.md"} <= set(ignored)
