"""Clipping, the sample cap, DP noise and the privacy ledger against the accountant library."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from aggregator.clipping import capped_samples, clip_update, update_norm
from aggregator.privacy import PrivacyLedger, add_gaussian_noise, noise_std
from fedmq.errors import AggregationError


def test_clip_scales_to_the_norm_and_leaves_small_updates_and_counters_alone():
    delta = {"a": torch.tensor([3.0, 4.0]), "n": torch.tensor(7)}
    assert update_norm(delta) == 5.0
    clipped, norm = clip_update(delta, 1.0)
    assert norm == 5.0
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.8])) and int(clipped["n"]) == 7
    assert math.isclose(update_norm(clipped), 1.0, rel_tol=1e-6)
    same, _ = clip_update(delta, 10.0)
    assert same["a"] is delta["a"]
    with pytest.raises(AggregationError):
        clip_update(delta, 0.0)


def test_sample_cap_takes_the_smallest_bound():
    assert capped_samples(1_000_000) == 1_000_000
    assert capped_samples(1_000_000, max_samples=600) == 600
    assert capped_samples(1_000_000, max_samples=600, partition_size=500) == 500
    assert capped_samples(300, max_samples=600, partition_size=500) == 300
    with pytest.raises(AggregationError):
        capped_samples(0)


def test_noise_standard_deviation_is_z_c_over_m():
    z, c, m = 1.1, 0.5, 10
    std = noise_std(z, c, m)
    assert std == pytest.approx(0.055)
    mean = {"w": torch.zeros(200_000), "n": torch.tensor(3)}
    noisy = add_gaussian_noise(mean, std, torch.Generator().manual_seed(1))
    sample = noisy["w"].to(torch.float64)
    # 200k samples: the sample std is within 1 % of sigma with overwhelming probability.
    assert float(sample.std()) == pytest.approx(std, rel=0.01)
    assert abs(float(sample.mean())) < 5 * std / math.sqrt(sample.numel())
    assert int(noisy["n"]) == 3
    again = add_gaussian_noise(mean, std, torch.Generator().manual_seed(1))
    assert torch.equal(again["w"], noisy["w"])  # seeded


@pytest.mark.parametrize("q,z,steps,delta", [(0.1, 1.0, 100, 1e-5), (1.0, 2.0, 10, 1e-6), (0.3, 0.8, 37, 1e-5)])
def test_epsilon_equals_the_accountant_librarys_own_value(q, z, steps, delta):
    ledger = PrivacyLedger(delta)
    for _ in range(steps):
        ledger.record_step(z, q)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders)
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert ledger.epsilon() == pytest.approx(float(expected), rel=1e-9)
    resumed = PrivacyLedger.from_state(ledger.to_state())
    assert resumed.epsilon() == ledger.epsilon()
    assert resumed.epsilon_after_step(z, q) > ledger.epsilon()


def test_epsilon_grows_with_steps_and_falls_with_noise():
    low, high = PrivacyLedger(1e-5), PrivacyLedger(1e-5)
    assert low.epsilon() == 0.0
    low.record_step(2.0, 0.1)
    high.record_step(0.7, 0.1)
    assert high.epsilon() > low.epsilon() > 0
    before = low.epsilon()
    low.record_step(2.0, 0.1)
    assert low.epsilon() > before
