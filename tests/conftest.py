"""Fixtures shared by the test suite.

- ``rabbitmq_url``: a real broker. Without one the test is skipped on a laptop, but in CI
  (``CI=true``) a missing broker fails the run.
- ``data_root``: a cache holding a copy of the original MNIST / Fashion-MNIST files from
  ``../shared/data`` (never written in place), in torchvision's layout.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def shared_data_dir() -> Path:
    """Where the original data files live (``FEDMQ_TEST_DATA`` overrides)."""
    return Path(os.environ.get("FEDMQ_TEST_DATA", REPO.parent / "shared" / "data"))


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _rabbitmqctl(*args: str) -> bool:
    try:
        done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """A real broker; a vhost of its own when ``rabbitmqctl`` can make one.

    A vhost per test session keeps these tests apart from any other federation (or benchmark)
    on the same broker: fedmq's queue names are fixed, so two federations share a vhost only if
    they mean to.
    """
    url = os.environ.get("FEDMQ_TEST_RABBITMQ_URL", DEFAULT_RABBITMQ_URL)
    import pika  # tests may import pika directly; the package keeps it in one module

    params = pika.URLParameters(url)
    if not _port_open(params.host, params.port):
        message = f"no RabbitMQ at {params.host}:{params.port}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message}; CI needs a real broker", pytrace=False)
        pytest.skip(message)
    vhost = f"fedmq-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    user = params.credentials.username
    if params.host in ("127.0.0.1", "localhost") and _rabbitmqctl("add_vhost", vhost):
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield f"amqp://{user}:{params.credentials.password}@{params.host}:{params.port}/{vhost}"
        _rabbitmqctl("delete_vhost", vhost)
    else:
        yield url


@pytest.fixture
def unique_name() -> str:
    """A short unique suffix for queue names and run ids, so tests never share state."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory with copies of the original data sets (torchvision layout)."""
    source = shared_data_dir()
    if not (source / "MNIST" / "raw").is_dir():
        pytest.fail(f"the original data sets are missing: expected them under {source}")
    cache = Path(os.environ.get("FEDMQ_TEST_CACHE", REPO / ".cache" / "test-data"))
    for folder in ("MNIST", "FashionMNIST"):
        target = cache / folder / "raw"
        target.mkdir(parents=True, exist_ok=True)
        for gz in sorted((source / folder / "raw").glob("*.gz")):
            if not (target / gz.name).exists():
                shutil.copyfile(gz, target / gz.name)
    return cache
