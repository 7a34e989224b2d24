"""Compressed updates and broadcasts end to end: worker processes over a real RabbitMQ, real MNIST.

Model: the FedAvg paper's 2NN (199,210 parameters), 3 IID partitions, E=1, B=32, SGD lr 0.05,
3 versions; fp32 both ways against int8 both ways (error feedback on the uplink, the closed loop
on the downlink). Bad compressed tensors on the update queue and in an inbox are dead-lettered
with their reason while the run goes on.
"""

import struct

import msgpack
import pytest
import torch

from fedmq import messages as m
from fedmq.codecs import parse_codec
from fedmq.codecs.topk import HEADER
from fedmq.task import build_model
from fedmq.tensor_codec import encode_with
from fedmq.topology import REASON_HEADER

from federation_processes import Federation, dead_letters, purge_fedmq_queues
from test_federation_rabbitmq import publish_raw

pytestmark = pytest.mark.rabbitmq

TRAINING = m.TrainingConfig(1, 0, 32, 0.05, "sgd", 0.0, 0.0, update_codec="int8")


def int8_body(message: m.Message) -> dict:
    return msgpack.unpackb(m.encode(message), raw=False)


def bad_compressed_updates(run_id: str) -> dict[str, bytes]:
    """One update per defect, each otherwise valid (int8 / top-k tensors of the 2NN's shapes)."""
    zeros = {k: torch.zeros_like(v) for k, v in build_model("fedavg-2nn").state_dict().items()}
    made = {}

    def variant(reason: str, spec: str, change) -> None:
        delta = encode_with(parse_codec(spec), {k: v + 0.01 for k, v in zeros.items()})
        body = int8_body(m.WeightUpdate(run_id, 0, f"stranger-{len(made)}", -1, 10, 0.1, 0.1, 1, delta))
        change(body["delta"][0])  # fc1.weight, compressed
        made[reason] = msgpack.packb(body, use_bin_type=True)

    variant("encoding", "int8", lambda e: e.update(data=e["data"][:-1]))  # truncated
    variant("non-finite", "int8", lambda e: e.update(data=struct.pack("<f", float("nan")) + e["data"][4:]))
    variant("bounds", "topk:0.01", lambda e: e.update(data=HEADER.pack(*(HEADER.unpack_from(e["data"])[:2]),
                                                                      10**9, 0) + e["data"][HEADER.size:]))
    variant("oversize", "int8", lambda e: e.update(shape=[10**9]))  # more elements than the model
    return made


def bad_compressed_broadcast(run_id: str) -> bytes:
    weights = encode_with(parse_codec("int8"), build_model("fedavg-2nn").state_dict())
    body = int8_body(m.ModelBroadcast(run_id, 0, TRAINING, (), weights))
    body["weights"][0]["data"] = body["weights"][0]["data"][:-7]
    return msgpack.packb(body, use_bin_type=True)


def run(tmp_path, data_root, url, run_id, codec: str, *, bad_input: bool) -> list[dict]:
    purge_fedmq_queues(url)
    work = tmp_path / codec
    work.mkdir()
    fed = Federation(work, data_root, url, run_id, FEDMQ_VERSIONS=3, FEDMQ_START_WORKERS=3,
                     FEDMQ_NUM_PARTITIONS=3, FEDMQ_UPDATE_CODEC=codec, FEDMQ_BROADCAST_CODEC=codec)
    try:
        if bad_input:
            for body in bad_compressed_updates(run_id).values():
                publish_raw(url, "fedmq.updates", body)
        for i in range(3):
            fed.worker(f"w{i}")
        if bad_input:
            fed.wait_for_log("w0", "hello sent", 60)  # its inbox exists
            publish_raw(url, "fedmq.inbox.w0", bad_compressed_broadcast(run_id))
        fed.aggregator()
        assert fed.wait_aggregator(300) == 0, fed.log("aggregator")[-3000:]
        assert fed.wait_workers(60) == {"w0": 0, "w1": 0, "w2": 0}
        return fed.records()
    finally:
        fed.close()


def test_int8_both_ways_learns_like_fp32_with_a_quarter_of_the_bytes(tmp_path, data_root, rabbitmq_url,
                                                                     unique_name):
    exact = run(tmp_path, data_root, rabbitmq_url, f"fp32-{unique_name}", "fp32", bad_input=False)
    compressed = run(tmp_path, data_root, rabbitmq_url, f"int8-{unique_name}", "int8", bad_input=True)
    reasons = {(headers["x-fedmq-source-queue"], headers[REASON_HEADER].split(":")[0])
               for _, headers in dead_letters(rabbitmq_url) if REASON_HEADER in headers}
    assert reasons == {("fedmq.updates", r) for r in ("encoding", "non-finite", "bounds", "oversize")} | {
        ("fedmq.inbox.w0", "encoding")}, reasons
    assert [r["version"] for r in compressed] == [1, 2, 3] and all(r["participants"] == 3 for r in compressed)
    accuracy = {"fp32": exact[-1]["test_accuracy"], "int8": compressed[-1]["test_accuracy"]}
    assert accuracy["fp32"] >= 0.95 and abs(accuracy["int8"] - accuracy["fp32"]) <= 0.005, accuracy
    sent = {name: sum(r["bytes_up"] + r["bytes_down"] for r in records)
            for name, records in (("fp32", exact), ("int8", compressed))}
    # the bad updates arrived too (bytes up of version 1): they are not the federation's traffic
    sent["int8"] -= sum(map(len, bad_compressed_updates("x" * len(f"int8-{unique_name}")).values()))
    assert sent["int8"] <= 0.27 * sent["fp32"], sent
    assert all(r["bytes_up_ratio"] < 0.26 for r in compressed[1:]) and all(
        r["bytes_down_ratio"] < 0.26 for r in compressed), compressed
