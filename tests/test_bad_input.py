"""Bad input on every queue is dead-lettered with a reason, counted, and the run goes on.

The federation is the real embedded one (3 workers, 2NN, real MNIST); after version 1 closes, a
stranger publishes every kind of bad message on the update, control and inbox queues.
"""

import msgpack
import torch

from fedmq import messages as m
from fedmq.broker.memory import MemoryHub
from fedmq.chunking import split_frames
from fedmq.task import build_model
from fedmq.topology import CONTROL_QUEUE, DEAD_LETTER_QUEUE, REASON_HEADER, UPDATES_QUEUE, inbox_queue
from fedmq_cli.embedded import run_embedded
from test_embedded import embedded_settings


def zero_delta(**changes) -> dict:
    delta = {k: torch.zeros_like(v) for k, v in build_model("fedavg-2nn").state_dict().items()}
    delta.update(changes)
    return delta


def update(base_version: int, *, run_id="embedded-test", worker_id="stranger", delta=None) -> bytes:
    return m.encode(m.WeightUpdate(run_id, base_version, worker_id, -1, 1, 0.5, 0.1, 1,
                                   delta if delta is not None else zero_delta()))


def test_bad_updates_control_and_inbox_messages_are_dead_lettered_and_the_run_finishes(data_root, tmp_path):
    hub = MemoryHub()
    stranger = hub.connect()
    records = []

    def send(queue, body):
        # As a real sender does: large payloads in chunks below the run's 256 KiB frame limit.
        for frame in split_frames(body, max_frame_bytes=256 * 1024):
            stranger.publish("", queue, frame)

    def inject(record):
        records.append(record)
        if record.version != 1:
            return
        valid = msgpack.unpackb(update(1), raw=False)
        wrong_schema = dict(valid, schema=7)
        nan_delta = zero_delta()
        first = next(iter(nan_delta))
        nan_delta[first] = nan_delta[first].clone()
        nan_delta[first].view(-1)[0] = float("nan")
        bad_updates = [
            b"\x00\xffnot msgpack at all",                                 # malformed
            msgpack.packb(wrong_schema, use_bin_type=True),                  # schema
            update(1, delta={"fc1.weight": torch.zeros(3, 3)}),              # shape (names)
            update(1, delta=zero_delta(**{first: torch.zeros(7)})),          # shape
            m.encode(m.WeightUpdate("embedded-test", 1, "stranger", -1, 1, 0.5, 0.1, 1, nan_delta)),  # non-finite
            update(1, run_id="someone-elses-run"),                           # wrong-run
            update(9),                                                       # future-version
            m.encode(m.WorkerHello("w", -1, "cpu", 0.0)),                       # wrong kind on this queue
        ]
        oversize = b"\x00" * (300 * 1024)  # one frame above the 256 KiB limit, sent unchunked
        for body in bad_updates:
            send(UPDATES_QUEUE, body)
        stranger.publish("", UPDATES_QUEUE, oversize)
        send(UPDATES_QUEUE, update(0))                       # stale: version 0 is closed
        send(UPDATES_QUEUE, update(1, worker_id="twin"))     # valid, folded once ...
        send(UPDATES_QUEUE, update(1, worker_id="twin"))     # ... and its duplicate ignored
        send(CONTROL_QUEUE, b"garbage on the control queue")
        send(CONTROL_QUEUE, update(1))                      # an update on the control queue
        send(inbox_queue("worker-0").name, b"garbage in a worker's inbox")

    result = run_embedded(embedded_settings(data_root, tmp_path), on_version=inject, hub=hub)

    assert result.final_version == 3 and records[-1].test_accuracy >= 0.95
    dead = hub.peek(DEAD_LETTER_QUEUE)
    # Every chunk of a chunked bad message is dead-lettered; compare (queue, reason) pairs.
    pairs = {(headers["x-fedmq-source-queue"], headers[REASON_HEADER].split(":")[0]) for _, headers in dead}
    inbox = inbox_queue("worker-0").name
    assert pairs == {
        (UPDATES_QUEUE, "malformed"), (UPDATES_QUEUE, "schema"), (UPDATES_QUEUE, "shape"),
        (UPDATES_QUEUE, "non-finite"), (UPDATES_QUEUE, "wrong-run"), (UPDATES_QUEUE, "future-version"),
        (UPDATES_QUEUE, "oversize"), (CONTROL_QUEUE, "malformed"), (CONTROL_QUEUE, "schema"), (inbox, "malformed"),
    }, pairs
    # The stale update and the duplicate were counted, not dead-lettered; the twin was folded once.
    version_2 = records[1]
    assert version_2.stale == 1 and version_2.duplicates == 1 and version_2.dead_lettered == 9 + 2
    assert version_2.participants == 4  # three workers and the twin
    assert hub.depth(UPDATES_QUEUE) == 0  # nothing is left behind unacknowledged
