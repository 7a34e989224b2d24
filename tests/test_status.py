"""`fedmq status` messages (bad input refused with a reason) and the answer of a real embedded run."""

from __future__ import annotations

import dataclasses
import threading

import msgpack
import pytest

from fedmq import messages as m
from fedmq import status_messages as sm
from fedmq.broker.memory import MemoryHub
from fedmq.errors import InvalidMessage
from fedmq.status import ask_status
from fedmq.topology import CONTROL_QUEUE, STATUS_REPLY_PREFIX
from fedmq_cli.embedded import run_embedded
from fedmq_cli.status import format_status
from test_embedded import embedded_settings


def reply(**changes) -> m.StatusReply:
    worker = sm.WorkerStatus("w1", "training", "cpu", 0, 2, 0.5, 1200.0, 0.4)
    fields = dict(request_id="q1", run_id="run-a", version=3, versions=5, open_version=3, expected=2, folded=1,
                  elapsed_s=2.5, estimate_s=1.0, test_accuracy=0.95, test_loss=0.2, federated_accuracy=None,
                  dead_letters=0, finished=False, workers=(worker,))
    fields.update(changes)
    return m.StatusReply(**fields)


def tampered(message, **fields) -> bytes:
    raw = msgpack.unpackb(m.encode(message), raw=False)
    raw.update(fields)
    return msgpack.packb(raw, use_bin_type=True)


def reason_of(data: bytes) -> str:
    with pytest.raises(InvalidMessage) as caught:
        m.decode(data)
    return caught.value.reason


def test_status_messages_round_trip():
    request = m.StatusRequest("q1", "fedmq.status.q1", 1.7e9)
    assert m.decode(m.encode(request)) == request
    assert m.decode(m.encode(reply())) == reply()
    assert m.decode(m.encode(reply(workers=(), open_version=-1, estimate_s=-1.0, test_accuracy=None))).workers == ()


@pytest.mark.parametrize("fields, reason", [
    ({"reply_to": "fedmq.updates"}, "schema"),          # it would make the aggregator publish into fedmq's queues
    ({"reply_to": "fedmq.status."}, "schema"),
    ({"reply_to": "fedmq.status.a b"}, "schema"),
    ({"request_id": ""}, "schema"),
    ({"sent_at": float("nan")}, "non-finite"),
    ({"sent_at": "now"}, "schema"),
    ({"extra": 1}, "schema"),
])
def test_bad_status_requests_are_refused_with_a_reason(fields, reason):
    assert reason_of(tampered(m.StatusRequest("q1", "fedmq.status.q1", 1.0), **fields)) == reason


def _worker(**changes):
    return dict(dataclasses.asdict(reply().workers[0]), **changes)


@pytest.mark.parametrize("fields, reason", [
    ({"test_accuracy": float("nan")}, "non-finite"),
    ({"test_accuracy": 1.5}, "schema"),
    ({"elapsed_s": float("inf")}, "non-finite"),
    ({"version": -1}, "schema"),
    ({"finished": 1}, "schema"),
    ({"workers": "w1"}, "schema"),
    ({"workers": [_worker(progress=2.0)]}, "schema"),
    ({"workers": [_worker(samples_per_second=float("nan"))]}, "non-finite"),
    ({"workers": [_worker(worker_id="../../x")]}, "schema"),
    ({"workers": [_worker(), _worker()]}, "schema"),                  # the same worker twice
    ({"workers": [{"worker_id": "w1"}]}, "schema"),                    # missing fields
    ({"workers": [_worker(name=f"w{i}") for i in range(2)]}, "schema"),  # unexpected field
    ({"workers": [_worker(worker_id=f"w{i}") for i in range(sm.MAX_STATUS_WORKERS + 1)]}, "bounds"),
])
def test_bad_status_replies_are_refused_with_a_reason(fields, reason):
    assert reason_of(tampered(reply(), **fields)) == reason


def test_malformed_bytes_are_refused():
    assert reason_of(b"\xc1\x00garbage") == "malformed"
    assert reason_of(m.encode(reply())[:-3]) == "malformed"


def test_the_aggregator_of_an_embedded_run_answers_with_its_live_workers(data_root, tmp_path):
    hub = MemoryHub()
    answers, stranger = [], hub.connect()
    asked = threading.Event()

    def ask():
        answers.append(ask_status(hub.connect(), timeout_s=60))

    def on_version(record):
        if record.version == 1 and not asked.is_set():
            asked.set()
            # Garbage addressed as a status request is dead-lettered, not answered.
            stranger.publish("", CONTROL_QUEUE, tampered(m.StatusRequest("q2", "fedmq.status.q2", 1.0),
                                                         reply_to="fedmq.updates"))
            threading.Thread(target=ask, daemon=True).start()

    settings = embedded_settings(data_root, tmp_path, versions=3)
    result = run_embedded(settings, on_version=on_version, hub=hub)
    assert result.final_version == 3
    (answer,) = answers
    assert answer is not None and answer.run_id == "embedded-test" and answer.versions == 3
    assert answer.version >= 1 and not answer.finished
    assert [w.worker_id for w in answer.workers] == ["worker-0", "worker-1", "worker-2"]
    assert {w.device for w in answer.workers} == {"cpu"} and sorted(w.partition for w in answer.workers) == [0, 1, 2]
    assert answer.test_accuracy is not None and answer.test_accuracy > 0.8
    assert answer.dead_letters >= 1
    text = format_status(answer)
    assert "run embedded-test: version" in text and "3 live workers" in text and "worker-2" in text
    # Nothing waits in the reply queue: it was deleted.
    assert not [q for q in hub.queue_names() if q.startswith(STATUS_REPLY_PREFIX)]


def test_no_aggregator_no_answer_within_the_timeout():
    hub = MemoryHub()
    assert ask_status(hub.connect(), timeout_s=0.3) is None
