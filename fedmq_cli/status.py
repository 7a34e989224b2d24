"""``fedmq status``: ask the running aggregator over the broker and print its answer.

Exit status 0 with an answer, 1 when no aggregator answered within ``--status-timeout-s``
(none running, or none consuming the control queue of this broker's vhost).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

from fedmq.status_messages import StatusReply
from fedmq.settings import Settings


def format_status(reply: StatusReply) -> str:
    """The answer as a few lines and a table of the live workers."""
    lines = [f"run {reply.run_id}: version {reply.version} of {reply.versions}"
             + (" (complete)" if reply.finished else "")]
    if reply.open_version >= 0:
        estimate = f", about {reply.estimate_s:.0f} s left" if reply.estimate_s >= 0 else ""
        lines.append(f"open version {reply.open_version}: {reply.folded}/{reply.expected} updates in, "
                     f"{reply.elapsed_s:.1f} s elapsed{estimate}")
    scores = [f"{name} {value:.4f}" for name, value in (("test accuracy", reply.test_accuracy),
                                                        ("test loss", reply.test_loss),
                                                        ("federated accuracy", reply.federated_accuracy))
              if value is not None]
    if scores:
        lines.append(f"version {reply.version}: " + ", ".join(scores))
    lines.append(f"{len(reply.workers)} live workers, {reply.dead_letters} dead letters")
    if reply.workers:
        lines.append(f"{'worker':<24} {'state':<9} {'device':<6} {'part':>4} {'version':>7} {'progress':>8} "
                     f"{'samples/s':>10} {'silent':>7}")
        for w in reply.workers:
            lines.append(f"{w.worker_id[:24]:<24} {w.state:<9} {w.device[:6]:<6} {w.partition:>4} {w.version:>7} "
                         f"{w.progress:>8.0%} {w.samples_per_second:>10.0f} {w.silent_s:>6.1f}s")
    return "\n".join(lines)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def run_status(settings: Settings, *, as_json: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    from fedmq.broker.rabbitmq import RabbitBroker
    from fedmq.broker.rabbitmq_tls import TlsFiles
    from fedmq.status import ask_status

    b = settings.broker
    timeout = settings.status.status_timeout_s
    with RabbitBroker(b.broker_url, connection_name="fedmq-status", heartbeat_s=b.broker_heartbeat_s,
                      max_message_bytes=b.max_frame_bytes,
                      tls=TlsFiles(b.broker_ca_file, b.broker_cert_file, b.broker_key_file)) as broker:
        reply = ask_status(broker, timeout)
    if reply is None:
        print(f"fedmq status: no aggregator answered within {timeout:g} s on {_without_password(b.broker_url)} "
              "(is `fedmq aggregator` running on this broker and vhost?)", file=err, flush=True)
        return 1
    if as_json:
        print(json.dumps(dataclasses.asdict(reply)), file=out, flush=True)
    else:
        print(format_status(reply), file=out, flush=True)
    return 0
