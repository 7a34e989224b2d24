"""Tensor codecs: each round trip within its stated bound, and every malformed encoding refused
with a reason before anything model-sized is allocated."""

import math
import struct

import msgpack
import numpy as np
import pytest
import torch

from fedmq import messages as m
from fedmq.codecs import RAW_BELOW_ELEMENTS, decode_values, parse_codec
from fedmq.codecs import index_coding
from fedmq.codecs.int8 import BLOCK_ELEMENTS, LEVELS, encode_int8, quantize
from fedmq.codecs.topk import HEADER, encode_topk
from fedmq.errors import InvalidMessage
from fedmq.tensor_codec import decode_tensors, encode_tensors, encode_with

TRAINING = m.TrainingConfig(1, 0, 32, 0.05, "sgd", 0.0, 0.0)


def sample(n: int = 10_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[::997] *= 50  # a few outliers, as deltas have
    return x


def test_fp16_and_bf16_round_to_nearest():
    x = sample()
    for spec, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        encoding, data = parse_codec(spec).encode(x)
        back = decode_values(encoding, x.numel(), data, what="t")
        assert len(data) == 2 * x.numel()
        assert torch.equal(back, x.to(dtype).to(torch.float32))
        # half a unit in the last place of the half format, relative
        ulp = 2.0 ** -10 if spec == "fp16" else 2.0 ** -7
        assert bool(((back - x).abs() <= x.abs() * ulp / 2 + 1e-7).all())


def test_fp16_clamps_instead_of_overflowing():
    x = torch.tensor([1e6, -1e6] + [0.0] * 300)
    encoding, data = parse_codec("fp16").encode(x)
    back = decode_values(encoding, x.numel(), data, what="t")
    assert torch.isfinite(back).all() and back[0] == 65504.0 and back[1] == -65504.0


def test_int8_deterministic_error_is_at_most_half_a_step():
    x = sample(10_000 + 17)  # a partial last block
    encoding, data = parse_codec("int8").encode(x)
    back = decode_values(encoding, x.numel(), data, what="t")
    blocks = math.ceil(x.numel() / BLOCK_ELEMENTS)
    assert len(data) == x.numel() + 4 * blocks
    padded = torch.nn.functional.pad(x, (0, blocks * BLOCK_ELEMENTS - x.numel())).view(blocks, -1)
    step = (padded.abs().amax(dim=1) / LEVELS).repeat_interleave(BLOCK_ELEMENTS)[: x.numel()]
    assert bool(((back - x).abs() <= step / 2 * (1 + 1e-5)).all())
    assert (back - x).abs().max() > 0  # it is lossy: the bound is what it claims


def test_int8_stochastic_rounding_is_unbiased():
    x = torch.full((BLOCK_ELEMENTS,), 0.3)
    x[0] = 1.27  # scale 0.01: 0.3 is 30 steps exactly, so use an off-grid value
    x[1:] = 0.3049  # 30.49 steps
    g = torch.Generator().manual_seed(7)
    total = torch.zeros_like(x)
    trials = 400
    for _ in range(trials):
        codes, scales = quantize(x, stochastic=True, generator=g)
        total += codes.float() * scales[0]
    mean = total[1:] / trials
    # deterministic rounding would give 0.30 every time (bias -0.0049); the mean must be within a
    # few standard errors of the truth (per element sd <= 0.005, averaged over 255*400 draws)
    assert abs(mean.mean().item() - 0.3049) < 2e-4
    det, scale = quantize(x)
    assert abs(det[1].item() * scale[0].item() - 0.3049) > 4e-3


def test_int8_zero_block_and_tiny_values():
    x = torch.zeros(1000)
    x[600] = 1e-30
    encoding, data = parse_codec("int8").encode(x)
    back = decode_values(encoding, x.numel(), data, what="t")
    assert torch.isfinite(back).all() and back[:512].abs().max() == 0


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("values", ["int8", "fp16"])
def test_topk_keeps_exactly_the_k_largest(fraction, values):
    x = sample(20_000, seed=3)
    codec = parse_codec(f"topk:{fraction}:{values}")
    encoding, data = codec.encode(x)
    back = decode_values(encoding, x.numel(), data, what="t")
    k = max(1, math.ceil(fraction * x.numel()))
    form, _, count, index_len = HEADER.unpack_from(data)
    kept = torch.from_numpy(index_coding.decode_indices(form, data[HEADER.size:HEADER.size + index_len], count,
                                                        x.numel()))
    assert bool((back[torch.ones_like(back, dtype=torch.bool).index_fill_(0, kept, False)] == 0).all())
    expected = torch.topk(x.abs(), k).indices.sort().values
    assert torch.equal(kept, expected)
    # the kept values within their value codec's bound
    err = (back[kept] - x[kept]).abs().max().item()
    assert err <= (x[kept].abs().max().item() / LEVELS / 2 * 1.0001 if values == "int8" else
                   x[kept].abs().max().item() * 2 ** -11 * 1.0001)


def test_topk_index_form_is_the_smaller_one():
    x = sample(50_000)
    for fraction, form in ((0.01, index_coding.GAPS), (0.5, index_coding.BITMAP)):
        data = encode_topk(x, fraction)
        got_form, _, k, index_len = HEADER.unpack_from(data)
        assert got_form == form
        indices = np.sort(torch.topk(x.abs(), k).indices.numpy())
        assert index_len == min(index_coding.gaps_size(indices), (x.numel() + 7) // 8)


def test_varint_gaps_round_trip_large_positions():
    indices = np.array([0, 1, 127, 128, 16_383, 16_384, 2_097_152, 300_000_000], dtype=np.int64)
    data = index_coding.encode_gaps(indices)
    assert np.array_equal(index_coding.decode_gaps(data, indices.size, 300_000_001), indices)


def test_parse_codec_specs():
    assert parse_codec("fp32").lossy is False
    assert parse_codec("topk:0.01").fraction == 0.01 and parse_codec("topk:0.01").value_form == "int8"
    for bad in ("int4", "topk", "topk:0", "topk:1.5", "topk:x", "topk:0.1:int4"):
        with pytest.raises(ValueError, match="unknown codec"):
            parse_codec(bad)


def test_small_float_and_integer_tensors_travel_raw():
    tensors = {"w": sample(4096), "b": torch.randn(RAW_BELOW_ELEMENTS - 1), "n": torch.tensor(7)}
    encoded = encode_with(parse_codec("int8"), tensors)
    assert [e["encoding"] for e in encoded.entries] == ["int8", "raw", "raw"]
    assert torch.equal(encoded["b"], tensors["b"]) and torch.equal(encoded["n"], tensors["n"])


@pytest.mark.parametrize("spec", ["fp16", "bf16", "int8", "topk:0.05", "topk:0.05:fp16"])
def test_a_message_carries_what_the_sender_decoded(spec):
    delta = {"w": sample(3000).reshape(30, 100), "b": torch.randn(10), "n": torch.tensor(5)}
    encoded = encode_with(parse_codec(spec), delta)
    update = m.WeightUpdate("run-a", 3, "w1", 0, 600, 0.25, 1.5, 19, encoded)
    back = m.decode(m.encode(update))
    assert back.delta.keys() == delta.keys()
    for name in delta:
        assert torch.equal(back.delta[name], encoded[name]), name
    assert len(m.encode(update)) < len(m.encode(update.__class__(**{**update.__dict__, "delta": delta})))


# -- defensive decoding ------------------------------------------------------------------------------


def wire_entry(spec: str, x: torch.Tensor) -> dict:
    return encode_with(parse_codec(spec), {"w": x}).entries[0]


def decode_entry(entry: dict, **kwargs):
    return decode_tensors(msgpack.unpackb(msgpack.packb([entry], use_bin_type=True), raw=False), **kwargs)


def bad_int8_scale(value: float) -> dict:
    entry = wire_entry("int8", sample(1000))
    entry["data"] = struct.pack("<f", value) + entry["data"][4:]
    return entry


def topk_entry(**changes) -> dict:
    """A top-k entry of 1000 elements, 10 kept, with header fields or bytes changed."""
    x = sample(1000)
    entry = wire_entry("topk:0.01", x)
    form, value_form, k, index_len = HEADER.unpack_from(entry["data"])
    rest = entry["data"][HEADER.size:]
    header = dict(form=form, value_form=value_form, k=k, index_len=index_len)
    header.update({key: v for key, v in changes.items() if key in header})
    rest = changes.get("rest", rest)
    entry["data"] = HEADER.pack(header["form"], header["value_form"], header["k"], header["index_len"]) + rest
    return entry


def gaps_entry(indices: list[int], size: int = 1000) -> dict:
    index_bytes = index_coding.encode_gaps(np.array(indices, dtype=np.int64))
    values = encode_int8(torch.ones(len(indices)))
    data = HEADER.pack(index_coding.GAPS, 0, len(indices), len(index_bytes)) + index_bytes + values
    return {"name": "w", "dtype": "float32", "shape": [size], "encoding": "topk", "data": data}


def bitmap_entry(bits: bytes, count: int, size: int = 1000) -> dict:
    data = HEADER.pack(index_coding.BITMAP, 0, count, len(bits)) + bits + encode_int8(torch.ones(count))
    return {"name": "w", "dtype": "float32", "shape": [size], "encoding": "topk", "data": data}


BAD_ENTRIES = {
    "unknown encoding": (lambda: {**wire_entry("int8", sample(1000)), "encoding": "int4"}, "encoding"),
    "encoding on an int tensor": (lambda: {**wire_entry("int8", sample(1000)), "dtype": "int64"}, "schema"),
    "int8 truncated": (lambda: {**wire_entry("int8", sample(1000)), "data": wire_entry("int8", sample(1000))["data"][:-1]},
                       "encoding"),
    "int8 shape disagrees with count": (lambda: {**wire_entry("int8", sample(1000)), "shape": [1001]}, "encoding"),
    "int8 NaN scale": (lambda: bad_int8_scale(float("nan")), "non-finite"),
    "int8 Inf scale": (lambda: bad_int8_scale(float("inf")), "non-finite"),
    "int8 negative scale": (lambda: bad_int8_scale(-1.0), "non-finite"),
    "fp16 truncated": (lambda: {**wire_entry("fp16", sample(1000)), "data": b"\x00" * 1999}, "encoding"),
    "fp16 NaN value": (lambda: {**wire_entry("fp16", sample(1000)), "data": b"\x00\x7e" * 1000}, "non-finite"),
    "topk header truncated": (lambda: {**wire_entry("topk:0.01", sample(1000)), "data": b"\x00\x00\x01"}, "encoding"),
    "topk k above the tensor size": (lambda: topk_entry(k=1001), "bounds"),
    "topk k disagrees with the indices": (lambda: topk_entry(k=9), "encoding"),
    "topk index bytes past the end": (lambda: topk_entry(index_len=10_000), "encoding"),
    "topk values truncated": (lambda: topk_entry(rest=topk_entry()["data"][HEADER.size:-1]), "encoding"),
    "topk unknown index form": (lambda: topk_entry(form=7), "encoding"),
    "topk unknown value form": (lambda: topk_entry(value_form=9), "encoding"),
    "topk index out of range": (lambda: gaps_entry([5, 999, 1000]), "bounds"),
    "topk gap overflows the tensor": (lambda: gaps_entry([2**34]), "bounds"),
    "topk unterminated varint": (lambda: {**gaps_entry([5]), "data": HEADER.pack(0, 0, 1, 1) + b"\x85"
                                          + encode_int8(torch.ones(1))}, "encoding"),
    "topk varint too long": (lambda: {**gaps_entry([5]), "data": HEADER.pack(0, 0, 1, 6) + b"\x80" * 5 + b"\x01"
                                      + encode_int8(torch.ones(1))}, "encoding"),
    "topk bitmap count disagrees": (lambda: bitmap_entry(b"\x01" + b"\x00" * 124, 2), "encoding"),
    "topk bitmap marks past the end": (lambda: bitmap_entry(b"\x00" * 124 + b"\x80", 1, size=993), "bounds"),
    "topk bitmap wrong length": (lambda: bitmap_entry(b"\x01" * 3, 3), "encoding"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_malformed_encodings_are_refused_with_a_reason(case):
    make, reason = BAD_ENTRIES[case]
    with pytest.raises(InvalidMessage) as info:
        tensors = decode_entry(make())
        from fedmq.tensor_codec import check_finite
        check_finite(tensors)
    assert info.value.reason == reason, info.value.detail


def test_declared_size_above_the_bound_is_refused_before_allocating():
    # 12 bytes declaring a 10^12-element tensor: refused on the declaration, not after trying
    entry = gaps_entry([0], size=10**12)
    with pytest.raises(InvalidMessage) as info:
        decode_entry(entry, max_elements=1_000_000)
    assert info.value.reason == "oversize"
    # the bound counts the whole message, not one tensor at a time
    entries = [wire_entry("int8", sample(600)), {**wire_entry("int8", sample(600)), "name": "v"}]
    with pytest.raises(InvalidMessage, match="oversize"):
        decode_tensors(entries, max_elements=1000)
    assert len(decode_tensors(entries, max_elements=1200)) == 2


def test_a_bad_tensor_makes_the_whole_message_invalid():
    body = msgpack.unpackb(m.encode(m.WeightUpdate("run-a", 3, "w1", 0, 600, 0.25, 1.5, 19,
                                                   encode_with(parse_codec("int8"), {"w": sample(1000)}))), raw=False)
    body["delta"][0]["data"] = body["delta"][0]["data"][:-3]
    with pytest.raises(InvalidMessage) as info:
        m.decode(msgpack.packb(body, use_bin_type=True))
    assert info.value.reason == "encoding" and "'w'" in info.value.detail
    assert encode_tensors({"w": torch.ones(2)})[0]["encoding"] == "raw"


def test_codec_settings_are_checked_and_name_the_flag():
    from fedmq.settings import RunSettings, Settings, SettingsError, validate
    validate(Settings(run=RunSettings(update_codec="topk:0.01", broadcast_codec="int8")))
    for run, flag in ((RunSettings(update_codec="int4"), "--update-codec"),
                      (RunSettings(broadcast_codec="topk:0.1"), "--broadcast-codec")):
        with pytest.raises(SettingsError, match=flag):
            validate(Settings(run=run))


def test_a_broadcast_asking_for_an_unknown_update_codec_says_what_to_do():
    body = msgpack.unpackb(m.encode(m.ModelBroadcast("run-a", 0, TRAINING, (), {"w": torch.ones(3)})), raw=False)
    body["training"]["update_codec"] = "int4"
    with pytest.raises(InvalidMessage) as info:
        m.decode(msgpack.packb(body, use_bin_type=True))
    assert info.value.reason == "codec" and "int4" in info.value.detail and "--update-codec fp32" in info.value.detail
