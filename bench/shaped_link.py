"""One rate-limited link between this machine and a Linux network namespace.

``with ShapedLink(rate="20mbit") as link:`` creates a namespace and a veth pair (the host end
``link.host_ip``, the namespace end ``link.namespace_ip``), shapes both ends' egress with a token
bucket (``tc ... tbf``; ``netem`` is not in every kernel), and removes the namespace and the pair
afterwards, also after an error. Everything started with ``link.exec_prefix()`` runs inside the
namespace and reaches the host only through that one link, so all its processes share it: the
host end's egress is the downlink, the namespace end's egress the uplink. Needs root.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _tc(*args: str) -> None:
    done = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)}: {done.stderr.strip()}")


class ShapedLink:
    """A namespace behind a veth pair shaped to ``rate`` (tc syntax, e.g. ``20mbit``) each way.

    ``burst`` is the token bucket's depth (tc syntax, bytes): a few full-size frames, so the
    link never sends faster than ``rate`` for more than that many bytes. ``latency`` bounds the
    queue in front of the bucket (packets waiting longer are dropped and TCP backs off, as on a
    real bottleneck). Addresses come from a private /30 (``subnet`` is its first three octets).
    """

    def __init__(self, rate: str = "20mbit", *, burst: str = "32kb", latency: str = "200ms",
                 subnet: str = "10.213.47") -> None:
        tag = f"{os.getpid() % 100000}"
        self.namespace = f"fedmq-link-{tag}"
        self.host_dev, self.namespace_dev = f"fmqh{tag}", f"fmqn{tag}"
        self.host_ip, self.namespace_ip = f"{subnet}.1", f"{subnet}.2"
        self.rate, self.burst, self.latency = rate, burst, latency
        self.created: list[str] = []

    def __enter__(self) -> "ShapedLink":
        try:
            self.create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def create(self) -> None:
        ns = self.namespace
        _ip("netns", "add", ns)
        self.created.append("namespace")
        _ip("link", "add", self.host_dev, "type", "veth", "peer", "name", self.namespace_dev)
        self.created.append("veth")
        _ip("link", "set", self.namespace_dev, "netns", ns)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_dev)
        _ip("link", "set", self.host_dev, "up")
        _ip("-n", ns, "addr", "add", f"{self.namespace_ip}/30", "dev", self.namespace_dev)
        _ip("-n", ns, "link", "set", self.namespace_dev, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        shape = ["root", "tbf", "rate", self.rate, "burst", self.burst, "latency", self.latency]
        _tc("qdisc", "add", "dev", self.host_dev, *shape)
        _tc("-n", ns, "qdisc", "add", "dev", self.namespace_dev, *shape)

    def remove(self) -> None:
        """Delete what :meth:`create` made (deleting one end of a veth pair deletes both)."""
        if "veth" in self.created:
            _ip("link", "del", self.host_dev, check=False)
        if "namespace" in self.created:
            _ip("netns", "del", self.namespace, check=False)
        self.created.clear()

    def exec_prefix(self) -> list[str]:
        """Prepend to a command line to run it inside the namespace."""
        return ["ip", "netns", "exec", self.namespace]

    def bytes_moved(self) -> tuple[int, int]:
        """(bytes down, bytes up) through the link so far: the host end's transmit and receive
        counters, Ethernet headers included (what the link really carried)."""
        stats = Path("/sys/class/net") / self.host_dev / "statistics"
        return int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text())

    def describe(self) -> str:
        return (f"namespace {self.namespace} ({self.namespace_ip}) <-> host {self.host_ip} over veth "
                f"{self.host_dev}, tbf rate {self.rate} burst {self.burst} latency {self.latency} each way")
