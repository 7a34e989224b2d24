"""Error feedback: what a lossy update codec drops is sent later, never lost."""

import pytest
import torch

from fedmq.codecs import parse_codec
from worker.error_feedback import ErrorFeedback


def deltas(versions: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(versions):
        yield {"w": torch.randn(40, 50, generator=g) * 0.01, "b": torch.randn(10, generator=g),
               "n": torch.tensor(3)}


@pytest.mark.parametrize("spec", ["int8", "fp16", "bf16", "topk:0.01", "topk:0.1:fp16"])
def test_sent_plus_residual_equals_the_sum_of_the_deltas(spec):
    feedback, codec = ErrorFeedback(), parse_codec(spec)
    true_sum = torch.zeros(40, 50, dtype=torch.float64)
    sent_sum = torch.zeros(40, 50, dtype=torch.float64)
    for delta in deltas(50):
        encoded = feedback.encode(("run", 0), codec, delta)
        true_sum += delta["w"].double()
        sent_sum += encoded["w"].double()
        assert torch.equal(encoded["b"], delta["b"]) and torch.equal(encoded["n"], delta["n"])  # raw: exact
    residual = feedback.residual["w"].double()
    assert torch.allclose(sent_sum + residual, true_sum, atol=1e-5)
    if not spec.startswith("topk"):  # a dense codec owes at most about one version's rounding
        assert residual.norm() < 0.05 * true_sum.norm()


def test_without_feedback_top_k_loses_the_small_elements_for_good():
    codec = parse_codec("topk:0.01")
    fed, plain = ErrorFeedback(), torch.zeros(40, 50)
    with_feedback = torch.zeros(40, 50)
    total = torch.zeros(40, 50)
    for delta in deltas(200):
        total += delta["w"]
        with_feedback += fed.encode(("run", 0), codec, delta)["w"]
        plain += ErrorFeedback().encode(("run", 0), codec, delta)["w"]
    assert (with_feedback - total).norm() < 0.5 * (plain - total).norm()


def test_the_residual_is_dropped_on_a_new_run_or_partition_and_with_fp32():
    feedback, codec = ErrorFeedback(), parse_codec("topk:0.01")
    delta = next(deltas(1))
    feedback.encode(("run-a", 0), codec, delta)
    assert feedback.residual_norm() > 0
    encoded = feedback.encode(("run-b", 0), codec, {k: torch.zeros_like(v) for k, v in delta.items()})
    assert encoded["w"].abs().sum() == 0  # nothing of run-a's mass leaked into run-b
    feedback.encode(("run-b", 0), codec, delta)
    encoded = feedback.encode(("run-b", 1), codec, {k: torch.zeros_like(v) for k, v in delta.items()})
    assert encoded["w"].abs().sum() == 0
    feedback.encode(("run-b", 1), codec, delta)
    exact = feedback.encode(("run-b", 1), parse_codec("fp32"), delta)
    assert feedback.residual == {} and torch.equal(exact["w"], delta["w"])
