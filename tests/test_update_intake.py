"""Update intake: decided from the header before tensors are decoded; bounds; held deliveries
keep no bodies; the update prefetch follows the live workers."""

import pytest
import torch

from aggregator.fedavg import RunningSum
from aggregator.intake import UpdateIntake
from aggregator.rounds import OpenRound
from aggregator.service import Aggregator
from fedmq import messages as m
from fedmq import wire_fields
from fedmq.broker.base import Delivery
from fedmq.broker.memory import MemoryHub
from fedmq.errors import InvalidMessage
from fedmq.settings import BrokerSettings
from fedmq.topology import DEAD_LETTER_QUEUE, REASON_HEADER, STATIC_TOPOLOGY, UPDATES_QUEUE
from fedmq.transport import ReceivedBytes, Transport
from federation_harness import ScriptedWorker, run_aggregator
from test_embedded import embedded_settings

TEMPLATE = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}


def body(*, run_id="run", base_version=2, worker_id="w", partition=0, num_samples=10, delta=None) -> bytes:
    delta = delta if delta is not None else {k: torch.ones_like(v) for k, v in TEMPLATE.items()}
    return m.encode(m.WeightUpdate(run_id, base_version, worker_id, partition, num_samples, 0.5, 1.0, 3, delta))


def raw(data: bytes, tag: int = 1, redelivered: bool = False) -> ReceivedBytes:
    return ReceivedBytes(data, (Delivery(UPDATES_QUEUE, data, {}, redelivered, tag),), len(data))


@pytest.fixture
def intake(monkeypatch):
    hub = MemoryHub()
    broker = hub.connect()
    broker.declare(STATIC_TOPOLOGY)
    decoded = []
    real = wire_fields.decode_tensors  # every message decodes its tensors through FieldReader
    monkeypatch.setattr(wire_fields, "decode_tensors", lambda entries, **kw: decoded.append(1) or real(entries, **kw))
    intake = UpdateIntake(broker, Transport(broker), "run", num_partitions=4, update_bytes=10_000,
                          max_frame_bytes=1 << 20)
    intake.hub, intake.decoded = hub, decoded
    return intake


def take(intake, round_, data, **kw):
    intake.take(raw(data, **kw), round_, version=round_.version, checkpointed=frozenset(), template=TEMPLATE)


def test_stale_duplicate_unselected_and_foreign_updates_are_settled_without_decoding_tensors(intake):
    round_ = OpenRound(2, RunningSum(TEMPLATE), selected=("w", "v"))
    take(intake, round_, body())
    assert intake.decoded == [1] and round_.folded == {"w"}
    take(intake, round_, body())  # a duplicate
    take(intake, round_, body(base_version=1))  # stale
    take(intake, round_, body(worker_id="stranger"))  # not selected
    take(intake, round_, body(run_id="other-run"))  # wrong run: dead-lettered
    intake.take(raw(body(worker_id="v")), round_, version=2, checkpointed=frozenset({("run", 2, "v")}),
                template=TEMPLATE)  # already in the checkpoint
    assert intake.decoded == [1]  # none of those five was decoded
    assert (round_.duplicates, round_.stale, round_.dead_lettered, round_.folded) == (1, 3, 1, {"w"})
    assert float(round_.combiner.mean()["w"][0, 0]) == 1.0


def test_update_bounds_are_dead_lettered_with_the_reason(intake):
    round_ = OpenRound(2, RunningSum(TEMPLATE))
    take(intake, round_, body(num_samples=m.MAX_NUM_SAMPLES + 1))
    take(intake, round_, body(partition=4))  # the run has 4 partitions: 0..3
    take(intake, round_, body(delta={"w": torch.zeros(4, 4)}))  # a tensor missing
    reasons = [h[REASON_HEADER].split(":")[0] for _, h in intake.hub.peek(DEAD_LETTER_QUEUE)]
    assert reasons == ["bounds", "bounds", "shape"] and not round_.folded
    with pytest.raises(InvalidMessage, match="below 1"):
        m.peek_update(body(num_samples=0))


def test_a_header_written_after_the_tensors_still_decodes_whole(intake):
    # Another encoder may put the fields in any order: the intake falls back to a full decode.
    import msgpack

    fields = msgpack.unpackb(body(), raw=False)
    reordered = {"delta": fields.pop("delta"), **fields}
    data = msgpack.packb(reordered, use_bin_type=True)
    assert m.peek_update(data) is None
    round_ = OpenRound(2, RunningSum(TEMPLATE))
    take(intake, round_, data)
    assert round_.folded == {"w"}


def test_held_deliveries_keep_no_body_and_only_the_newest_copy_of_an_update_is_held():
    round_ = OpenRound(0, RunningSum(TEMPLATE))
    first = (Delivery(UPDATES_QUEUE, b"x" * 1000, {}, False, 1), Delivery(UPDATES_QUEUE, b"y" * 1000, {}, False, 2))
    assert round_.hold("w", first) == ()
    assert [d.body for d in round_.held_deliveries()] == [b"", b""]
    # The connection closed and the update came back: the older copy is given back for acking
    # (a no-op on void tags), the new one held; holding never grows with reconnections.
    again = (Delivery(UPDATES_QUEUE, b"x" * 1000, {}, True, 3), Delivery(UPDATES_QUEUE, b"y" * 1000, {}, True, 4))
    assert [d.tag for d in round_.hold("w", again)] == [1, 2]
    round_.hold("v", (Delivery(UPDATES_QUEUE, b"z", {}, False, 5),))
    assert sorted(d.tag for d in round_.held_deliveries()) == [3, 4, 5]


def answer(participant, broadcast):
    if broadcast.attempt == 0:
        participant.send_update(broadcast)


def test_the_update_prefetch_holds_every_live_workers_update(data_root, tmp_path):
    # 24 workers on 2 partitions, updates of 13 frames each (64 KiB frames): a prefetch sized by
    # partitions would stop deliveries long before the 24 updates of the quorum are in.
    hub = MemoryHub()
    workers = [ScriptedWorker(hub, f"w{i:02d}", max_frame_bytes=64 * 1024, on_broadcast=answer).start()
               for i in range(24)]
    settings = embedded_settings(data_root, tmp_path, versions=1, start_workers=24, num_partitions=2)
    settings = settings.__class__(**{**settings.__dict__, "broker": BrokerSettings(max_frame_bytes=64 * 1024)})
    aggregator = Aggregator(settings, hub.connect())
    try:
        result = run_aggregator(aggregator, limit_s=120)
    finally:
        for worker in workers:
            worker.stop()
    assert not aggregator.hung
    assert result.records[0].participants == 24
    assert aggregator.update_prefetch >= 24 * 13
