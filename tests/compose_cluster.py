"""The compose cluster (compose.yaml) on a real Docker engine, driven the way a user drives it.

Only what a user never sets differs: the base images are the local stand-ins that
``tests/cluster/standin_images.sh`` builds (no registry is reachable here), the image tag and
the project name are the test's own, and the host ports are free ones.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STANDIN_SCRIPT = REPO / "tests" / "cluster" / "standin_images.sh"
PYTHON_STANDIN = "fedmq-standin/python:3.11-slim"
BROKER_STANDIN = "fedmq-standin/rabbitmq:3.10-management"

# `docker compose logs` prefixes each line with the container; the aggregator prints one
# console line per version: "version   3  participants   4/4   accuracy 0.9012 ...".
VERSION_LINE = re.compile(r"version +(\d+) +participants +(\d+)/(\d+) +accuracy +([0-9.]+)")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def engine_problem() -> str | None:
    """Why the cluster cannot run here (no compose command, no engine), or None."""
    if compose_command() is None:
        return "neither docker-compose nor the docker compose plugin is installed"
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info failed: {exc}"
    if info.returncode != 0:
        return f"no Docker engine answers: {info.stderr.strip()[:200]}"
    return None


def compose_command() -> list[str] | None:
    """Debian's docker-compose 1.29 when installed, else the v2 plugin."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def build_standin_images() -> float:
    """Build (or find) the stand-in base images; returns the seconds it took."""
    started = time.monotonic()
    subprocess.run(["bash", str(STANDIN_SCRIPT)], check=True, timeout=1800)
    return time.monotonic() - started


class ComposeProject:
    """One compose project (its own containers, network and volumes) of compose.yaml."""

    def __init__(self, name: str, image: str, **env: object) -> None:
        self.name, self.image = name, image
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
        self.env.update({
            "PYTHON_BASE_IMAGE": PYTHON_STANDIN, "BROKER_IMAGE": BROKER_STANDIN, "FEDMQ_IMAGE": image,
            "BROKER_AMQP_PORT": "", "BROKER_MANAGEMENT_PORT": "",  # free host ports
            "COMPOSE_PROJECT_NAME": name,
        })
        self.env.update({k: str(v) for k, v in env.items()})

    def compose(self, *args: str, check: bool = True, timeout: float = 600, text: bool = True,
                ) -> subprocess.CompletedProcess:
        """Run ``docker compose -p NAME -f compose.yaml ARGS`` in the repository; output captured."""
        command = [*compose_command(), "-p", self.name, "-f", str(REPO / "compose.yaml"), *args]
        done = subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=text, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]!s}\n"
                                 f"{done.stderr[-3000:]!s}")
        return done

    def as_user_typed(self, command_line: str) -> str:
        """A shell line a user types (``docker compose ...``) aimed at this project."""
        ours = " ".join([*compose_command(), "-p", self.name, "-f", str(REPO / "compose.yaml")])
        return command_line.replace("docker compose ", ours + " ")

    def container_ids(self, service: str, *, all_states: bool = False) -> list[str]:
        """Full ids of the service's containers (running ones unless ``all_states``)."""
        done = subprocess.run(["docker", "ps", "-q", "--no-trunc", *(["-a"] if all_states else []),
                               "--filter", f"label=com.docker.compose.project={self.name}",
                               "--filter", f"label=com.docker.compose.service={service}"],
                              capture_output=True, text=True, check=True)
        return sorted(done.stdout.split())

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, check=False).stdout

    def versions(self) -> list[tuple[int, int]]:
        """(version, participants) of every version the aggregator has closed so far."""
        return [(int(v), int(p)) for v, p, _, _ in VERSION_LINE.findall(self.logs("aggregator"))]

    def wait_until(self, what: str, condition, timeout_s: float, poll_s: float = 2.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(poll_s)
        raise AssertionError(f"{what}: not within {timeout_s} s; aggregator log:\n{self.logs('aggregator')[-4000:]}")


def inspect(container: str, template: str) -> str:
    return subprocess.run(["docker", "inspect", "--format", template, container], capture_output=True, text=True,
                          check=True).stdout.strip()


def wait_exit(container: str, timeout_s: float) -> int:
    """The exit code of a container once it has stopped."""
    done = subprocess.run(["docker", "wait", container], capture_output=True, text=True, timeout=timeout_s, check=True)
    return int(done.stdout.strip())
