"""A RabbitMQ node of a test's own, on other ports, and a certificate authority made for it.

For tests that must configure a broker (a TLS listener) and so cannot use the machine's shared
broker, which nobody may reconfigure. The node runs from the installed RabbitMQ (Debian's
``/usr/lib/rabbitmq/bin``) under a unique node name, with its own configuration, data, logs,
Erlang cookie and free ports; it is stopped and its files removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

RABBITMQ_BIN = Path(os.environ.get("FEDMQ_TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rabbitmq_installed() -> bool:
    return (RABBITMQ_BIN / "rabbitmq-server").exists() and shutil.which("openssl") is not None


# -- a certificate authority ------------------------------------------------------------------
@dataclass(frozen=True)
class TestPki:
    """PEM files: a CA, a server certificate for localhost/127.0.0.1 and a client certificate
    signed by it, and an unrelated CA (for "wrong CA" tests)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {done.stderr.strip()}")


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", key.name, "-out", cert.name, "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return cert, key


def _issue(directory: Path, ca: tuple[Path, Path], name: str, extensions: str) -> tuple[Path, Path]:
    cert, key, csr, ext = (directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.csr",
                           directory / f"{name}.ext")
    ext.write_text(extensions)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", key.name, "-out", csr.name,
             cwd=directory)
    _openssl("x509", "-req", "-in", csr.name, "-CA", ca[0].name, "-CAkey", ca[1].name, "-CAcreateserial",
             "-days", "2", "-extfile", ext.name, "-out", cert.name, cwd=directory)
    return cert, key


def make_test_pki(directory: Path) -> TestPki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(directory, "fedmq-test-ca")
    server = _issue(directory, ca, "localhost", "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                                                "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    client = _issue(directory, ca, "fedmq-test-client", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    other_ca, _ = _make_ca(directory, "unrelated-ca")
    for path in directory.glob("*.key"):
        path.chmod(0o644)  # the node reads them as the same user; keep the test simple
    return TestPki(ca[0], server[0], server[1], client[0], client[1], other_ca)


# -- a private node ---------------------------------------------------------------------------
class PrivateRabbit:
    """``with PrivateRabbit(tmp, config_lines) as node:`` a running node; ``node.amqp_port``,
    ``node.tls_port`` (if the configuration used ``{tls_port}``), ``node.ctl(...)``. Configuration
    lines may also name ``{amqp_port}`` (e.g. another listener on the same port)."""

    def __init__(self, directory: Path, config_lines: list[str] | None = None, *, boot_timeout_s: float = 90) -> None:
        self.directory = directory
        self.name = f"fedmq-test-{uuid.uuid4().hex[:8]}@localhost"
        self.amqp_port, self.tls_port, self.dist_port = free_port(), free_port(), free_port()
        self.config_lines = [line.format(tls_port=self.tls_port, amqp_port=self.amqp_port) for line in (config_lines or [])]
        self.boot_timeout_s = boot_timeout_s
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}

    def __enter__(self) -> "PrivateRabbit":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        d = self.directory
        for sub in ("home", "mnesia", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq.conf").write_text("\n".join([
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
            "loopback_users = none",
            "log.console = true", "log.file = false",
            *self.config_lines]) + "\n")
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ, "HOME": str(d / "home"), "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port), "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"), "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"), "RABBITMQ_LOGS": "-",
        }
        log = open(d / "node.log", "wb")
        self.process = subprocess.Popen([str(RABBITMQ_BIN / "rabbitmq-server")], env=self.env, cwd=d, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.boot_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the private RabbitMQ node exited {self.process.returncode}:\n{self.log()[-3000:]}")
            if self._port_open(self.amqp_port) and self.ctl("-q", "await_startup", check=False).returncode == 0:
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the private RabbitMQ node did not start in {self.boot_timeout_s} s:\n{self.log()[-3000:]}")

    @staticmethod
    def _port_open(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``rabbitmqctl`` against this node (its own cookie)."""
        done = subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args], env=self.env,
                              capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")
        return done

    def log(self) -> str:
        path = self.directory / "node.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.ctl("stop", check=False)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
