"""The wire format: tensors, messages and chunks round-trip; every defect is InvalidMessage."""

import math

import msgpack
import pytest
import torch

from fedmq import messages as m
from fedmq.chunking import ChunkAssembler, split_frames
from fedmq.errors import InvalidMessage
from fedmq.tensor_codec import WIRE_DTYPES, decode_tensors, encode_tensors

TRAINING = m.TrainingConfig(1, 0, 32, 0.05, "sgd", 0.0, 0.0)
TASK = m.TaskSpec("mnist", "fedavg-2nn", "iid", 4, 0.5, 2, 0)


def sample_tensor(dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.tensor([[True, False, True], [False, False, True]])
    if dtype.is_floating_point:
        return (torch.arange(6, dtype=torch.float64).reshape(2, 3) / 7 - 0.3).to(dtype)
    return torch.tensor([[-3, 0, 5], [7, -1, 2]]).to(dtype) if dtype != torch.uint8 else torch.arange(6, dtype=dtype).reshape(2, 3) * 40


@pytest.mark.parametrize("name", sorted(WIRE_DTYPES))
def test_every_dtype_round_trips_bit_exactly(name):
    dtype = WIRE_DTYPES[name][0]
    tensors = {"t": sample_tensor(dtype), "scalar": sample_tensor(dtype)[0, 0], "empty": torch.zeros(0, 4, dtype=dtype)}
    wire = msgpack.unpackb(msgpack.packb(encode_tensors(tensors), use_bin_type=True), raw=False)
    back = decode_tensors(wire)
    assert list(back) == ["t", "scalar", "empty"]
    for key, original in tensors.items():
        assert back[key].dtype == dtype and back[key].shape == original.shape
        assert torch.equal(back[key], original)


def update(**overrides) -> m.WeightUpdate:
    fields = dict(run_id="run-a", base_version=3, worker_id="w1", partition=0, num_samples=600, train_loss=0.25,
                  train_seconds=1.5, steps=19, delta={"w": torch.ones(2, 2), "n": torch.tensor(19)})
    fields.update(overrides)
    return m.WeightUpdate(**fields)


ALL_MESSAGES = [
    m.WorkerHello("w1", -1, "cpu", 1.7e9),
    m.Heartbeat("w1", "run-a", "training", 2, 1, "cuda", 1.7e9),
    m.WorkerGoodbye("w1", "run-a", "refused", "model x is not trusted"),
    m.JoinAccepted("run-a", "w1", 3, TASK),
    m.ModelBroadcast("run-a", 4, TRAINING, ("w1", "w2"), {"w": torch.randn(3, 3), "n": torch.tensor(5)}, 7, ("w2",)),
    m.RunComplete("run-a", 10, 0.98),
    update(),
]


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda x: x.KIND)
def test_every_message_round_trips(message):
    back = m.decode(m.encode(message))
    assert type(back) is type(message)
    for field in message.__dataclass_fields__:
        ours, theirs = getattr(message, field), getattr(back, field)
        if isinstance(ours, dict):
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        else:
            assert ours == theirs


def raw_update(**changes) -> bytes:
    body = msgpack.unpackb(m.encode(update()), raw=False)
    body.update(changes)
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize("data,reason", [
    (b"\xc1\x00garbage", "malformed"),
    (b"", "malformed"),
    (msgpack.packb([1, 2, 3]), "malformed"),
    (msgpack.packb({"schema": 99, "kind": "update"}), "schema"),
    (msgpack.packb({"schema": 1, "kind": "no-such-kind"}), "schema"),
    (msgpack.packb({"schema": 1, "kind": "hello", "worker_id": "w"}), "schema"),
])
def test_malformed_and_wrong_schema_are_rejected(data, reason):
    with pytest.raises(InvalidMessage) as info:
        m.decode(data)
    assert info.value.reason == reason


def test_wrong_field_types_and_extra_fields_are_rejected():
    for bad in (raw_update(num_samples="600"), raw_update(num_samples=0), raw_update(base_version=-1),
                raw_update(worker_id=""), raw_update(unexpected=1), raw_update(train_loss=True)):
        with pytest.raises(InvalidMessage) as info:
            m.decode(bad)
        assert info.value.reason == "schema"


def test_byte_count_that_disagrees_with_the_shape_is_rejected():
    body = msgpack.unpackb(m.encode(update()), raw=False)
    body["delta"][0]["shape"] = [3, 2, 1]
    with pytest.raises(InvalidMessage) as info:
        m.decode(msgpack.packb(body, use_bin_type=True))
    assert info.value.reason == "shape"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_tensors_and_numbers_are_rejected(value):
    with pytest.raises(InvalidMessage) as info:
        m.decode(m.encode(update(delta={"w": torch.tensor([1.0, value])})))
    assert info.value.reason == "non-finite"
    with pytest.raises(InvalidMessage) as info:
        m.decode(raw_update(train_loss=value))
    assert info.value.reason == "non-finite"


def test_unknown_dtype_and_duplicate_tensor_names_are_rejected():
    body = msgpack.unpackb(m.encode(update()), raw=False)
    body["delta"][0]["dtype"] = "complex64"
    with pytest.raises(InvalidMessage):
        m.decode(msgpack.packb(body, use_bin_type=True))
    body = msgpack.unpackb(m.encode(update()), raw=False)
    body["delta"][1] = dict(body["delta"][0])
    with pytest.raises(InvalidMessage, match="twice"):
        m.decode(msgpack.packb(body, use_bin_type=True))


def chunked_model(frame: int) -> tuple[bytes, list[bytes]]:
    payload = m.encode(m.ModelBroadcast("run-a", 1, TRAINING, (), {"w": torch.randn(300, 300)}))
    return payload, split_frames(payload, max_frame_bytes=frame)


def test_chunked_payload_reassembles_in_any_order():
    payload, frames = chunked_model(64 * 1024)
    assert len(frames) > 5 and all(len(f) <= 64 * 1024 for f in frames)
    assembler = ChunkAssembler()
    results = [assembler.add(m.decode(f), i) for i, f in reversed(list(enumerate(frames)))]
    done = [r for r in results if r is not None]
    assert len(done) == 1 and done[0][0] == payload and sorted(done[0][1]) == list(range(len(frames)))
    assert isinstance(m.decode(done[0][0]), m.ModelBroadcast)
    assert assembler.pending == 0


def test_a_small_payload_is_not_chunked():
    payload = m.encode(m.WorkerHello("w", -1, "cpu", 0.0))
    assert split_frames(payload, max_frame_bytes=64 * 1024) == [payload]


def test_corrupted_chunk_fails_the_digest_and_returns_every_handle():
    _, frames = chunked_model(64 * 1024)
    chunks = [m.decode(f) for f in frames]
    broken = chunks[2]
    flipped = bytes([broken.data[0] ^ 0xFF]) + broken.data[1:]
    chunks[2] = m.Chunk(broken.message_id, broken.index, broken.count, broken.total_bytes, broken.sha256, flipped)
    assembler = ChunkAssembler()
    with pytest.raises(InvalidMessage) as info:
        for i, chunk in enumerate(chunks):
            assembler.add(chunk, i)
    assert info.value.reason == "digest"
    assert sorted(info.value.handles) == list(range(len(chunks)))
    assert assembler.pending == 0


def test_duplicate_chunks_are_ignored_and_oversize_sets_refused():
    payload, frames = chunked_model(64 * 1024)
    assembler = ChunkAssembler()
    first = m.decode(frames[0])
    assert assembler.add(first, "a") is None and assembler.add(first, "b") is None
    for i, f in enumerate(frames[1:]):
        out = assembler.add(m.decode(f), i)
    assert out[0] == payload
    small = ChunkAssembler(max_message_bytes=1000)
    with pytest.raises(InvalidMessage) as info:
        small.add(first, "x")
    assert info.value.reason == "oversize"


def test_incomplete_sets_expire():
    _, frames = chunked_model(64 * 1024)
    assembler = ChunkAssembler()
    assembler.add(m.decode(frames[0]), "h0")
    assert assembler.expire(older_than_s=3600) == []
    expired = assembler.expire(older_than_s=-1)
    assert [handles for _, handles in expired] == [["h0"]] and assembler.pending == 0
