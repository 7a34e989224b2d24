"""Codec speed and size: encode and decode throughput as a ratio of this machine's memory-copy
bandwidth, and encoded size as a ratio of float32, on two payloads:

- a delta of the FedAvg CNN (``fedavg-cnn``, 1,663,370 parameters, its real tensor shapes);
- one 11.7M-element float32 vector (a ResNet-18's size).

Throughput counts float32 input bytes per second (decode: float32 output bytes per second); the
baseline is ``torch.Tensor.clone`` of the same bytes measured in the same run. Also prints what
a small tensor saves compressed (the raw threshold) and what zlib (level 1) takes off an int8
payload (whether a lossless stage would pay). Nothing is asserted.

    python bench/codec_speed.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
import zlib

import msgpack
import torch

from fedmq.codecs import decode_values, parse_codec
from fedmq.task import build_model
from fedmq.tensor_codec import encode_tensor, encode_with

SPECS = ("fp16", "bf16", "int8", "topk:0.1", "topk:0.01", "topk:0.01:fp16")


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def payloads() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    cnn = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in build_model("fedavg-cnn").state_dict().items()
           if v.is_floating_point()}
    return {"fedavg-cnn delta (1.66M)": cnn, "vector (11.7M)": {"v": torch.randn(11_700_000, generator=g) * 0.01}}


def copy_bandwidth(repeats: int) -> float:
    """Bytes per second of copying a 256 MB float32 buffer into another (main memory, no
    allocation): the machine's memory-copy bandwidth every ratio below is taken against."""
    src, dst = torch.randn(64 << 20), torch.empty(64 << 20)
    dst.copy_(src)
    seconds = best_of(repeats, lambda: dst.copy_(src))
    return src.numel() * 4 / seconds


def measure(tensors: dict[str, torch.Tensor], repeats: int, bandwidth: float) -> list[tuple[str, float, float, float]]:
    nbytes = sum(t.numel() * 4 for t in tensors.values())
    rows = []
    for spec in SPECS:
        codec = parse_codec(spec)
        encoded: dict[str, tuple[str, bytes]] = {}

        def encode() -> None:
            for name, t in tensors.items():
                encoded[name] = codec.encode(t)

        def decode() -> None:
            for name, t in tensors.items():
                decode_values(encoded[name][0], t.numel(), encoded[name][1], what=name)

        encode_s = best_of(repeats, encode)
        decode_s = best_of(repeats, decode)
        size = sum(len(data) for _, data in encoded.values())
        rows.append((spec, nbytes / encode_s / bandwidth, nbytes / decode_s / bandwidth, size / nbytes))
    return rows


def raw_threshold() -> None:
    print("\nsmall float32 tensors: bytes of one wire entry (msgpack), raw vs int8")
    for n in (8, 32, 64, 128, 256, 512, 1024):
        t = torch.randn(n)
        raw = len(msgpack.packb(encode_tensor("layer.bias", t), use_bin_type=True))
        int8 = len(msgpack.packb(encode_with(parse_codec("int8"), {"layer.bias": t}).entries[0], use_bin_type=True)) \
            if n >= 256 else len(msgpack.packb({"name": "layer.bias", "dtype": "float32", "shape": [n],
                                                "encoding": "int8", "data": parse_codec("int8").encode(t)[1]},
                                               use_bin_type=True))
        print(f"  {n:5d} elements: raw {raw:6d} B, int8 {int8:6d} B, saved {raw - int8:6d} B")


def lossless_stage(tensors: dict[str, torch.Tensor]) -> None:
    print("\nzlib level 1 on the encoded bytes (would a lossless stage pay?)")
    for spec in ("int8", "topk:0.01"):
        codec = parse_codec(spec)
        data = b"".join(codec.encode(t)[1] for t in tensors.values())
        started = time.perf_counter()
        packed = zlib.compress(data, 1)
        seconds = time.perf_counter() - started
        print(f"  {spec:10s}: {len(data) / 1e6:.3f} MB -> {len(packed) / 1e6:.3f} MB "
              f"({len(packed) / len(data):.3f}), {len(data) / seconds / 1e6:.0f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker runs with 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = payloads()
    bandwidth = copy_bandwidth(args.repeats)
    print(f"memory copy (256 MB, torch copy_, {args.threads} thread(s)): {bandwidth / 1e9:.2f} GB/s")
    for name, tensors in data.items():
        print(f"\n{name}, best of {args.repeats}; throughput in float32 bytes per second / memory copy")
        rows = measure(tensors, args.repeats, bandwidth)
        print(f"  {'codec':16s} {'encode/copy':>12s} {'decode/copy':>12s} {'size/fp32':>10s}")
        for spec, enc, dec, size in rows:
            print(f"  {spec:16s} {enc:12.3f} {dec:12.3f} {size:10.4f}")
    raw_threshold()
    lossless_stage(data["fedavg-cnn delta (1.66M)"])


if __name__ == "__main__":
    main()
