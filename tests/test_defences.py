"""The defences wired into the aggregator: robust rules, clipping, the sample cap, DP-FedAvg with its
ledger and budget, on the in-memory broker (real codec) with scripted workers whose updates the
test chooses. Every expected number is computed by hand or by the accountant library itself."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from aggregator.checkpoint import CheckpointStore
from aggregator.defences import ClipStage, Defences, NoiseStage, SampleCap
from aggregator.fedavg import RunningSum
from aggregator.pipeline import AggregationPipeline, UpdateContext
from aggregator.robust_rules import RobustCombiner
from aggregator.service import Aggregator
from fedmq import messages as m
from fedmq.broker.memory import MemoryHub
from fedmq.settings import RunSettings, SettingsError, validate
from federation_harness import ScriptedWorker, run_aggregator
from test_embedded import embedded_settings

TEMPLATE = {"w": torch.zeros(4), "n": torch.tensor(0)}


def fill(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), float(value)), "n": torch.tensor(0)}


def combined(cfg: RunSettings, updates, **kw) -> torch.Tensor:
    defences = Defences(cfg, **kw)
    pipeline = AggregationPipeline(**defences.pipeline_parts())
    combiner = pipeline.new_combiner(TEMPLATE)
    for i, (value, samples) in enumerate(updates):
        pipeline.fold(combiner, fill(value), UpdateContext(f"w{i}", samples))
    return pipeline.propose(TEMPLATE, combiner).weights["w"]


# -- the pieces built from settings ----------------------------------------------------------------
def test_each_aggregation_setting_builds_its_rule():
    updates = [(1, 10), (2, 10), (3, 10), (5, 10), (100, 1000)]
    assert torch.allclose(combined(RunSettings(), updates), torch.full((4,), (11 * 10 + 100_000) / 1040))
    assert torch.allclose(combined(RunSettings(aggregation="median"), updates), torch.full((4,), 3.0))
    # floor(5 * 0.2) = 1 value cut at each end: mean(2, 3, 5).
    assert torch.allclose(combined(RunSettings(aggregation="trimmed-mean", trim_fraction=0.2), updates),
                          torch.full((4,), 10 / 3))
    # f = 1: each column's 2 nearest others; 2 (1 and 3, 1 + 1 per coordinate) scores lowest.
    assert torch.allclose(combined(RunSettings(aggregation="krum", krum_attackers=1, min_updates=4), updates),
                          torch.full((4,), 2.0))
    assert isinstance(Defences(RunSettings()).new_combiner(TEMPLATE), RunningSum)
    assert isinstance(Defences(RunSettings(aggregation="median")).new_combiner(TEMPLATE), RobustCombiner)


def test_clipping_runs_before_the_combiner_and_counts_the_clipped():
    cfg = RunSettings(clip_norm=1.0)
    defences = Defences(cfg)
    pipeline = AggregationPipeline(**defences.pipeline_parts())
    combiner = pipeline.new_combiner(TEMPLATE)
    pipeline.fold(combiner, fill(3.0), UpdateContext("big", 1))  # norm 6 -> scaled to 1: 0.5 each
    pipeline.fold(combiner, fill(0.25), UpdateContext("small", 1))  # norm 0.5: unchanged
    mean = pipeline.propose(TEMPLATE, combiner).weights["w"]
    assert torch.allclose(mean, torch.full((4,), (0.5 + 0.25) / 2))
    assert defences.version_notes({"big", "small"})["clipped_updates"] == 1
    defences.new_combiner(TEMPLATE)  # the next version counts afresh
    assert defences.version_notes({"big"})["clipped_updates"] == 0


def test_the_sample_cap_uses_the_operator_cap_and_the_assigned_partition():
    cap = SampleCap(600, partition_sizes=[500, 300], assigned={"a": 1}.get)
    assert cap(UpdateContext("a", 10_000, partition=0)) == 300  # the partition the aggregator assigned: 1
    assert cap(UpdateContext("b", 10_000, partition=0)) == 500  # not known to it: the one the update names
    assert cap(UpdateContext("c", 10_000, partition=-1)) == 600  # its own data: the operator's cap only
    assert cap(UpdateContext("c", 200, partition=-1)) == 200
    assert SampleCap(0)(UpdateContext("c", 10_000)) == 10_000
    assert SampleCap(600, uniform=True)(UpdateContext("c", 10_000)) == 1.0  # DP: every update weighs 1


def test_dp_noise_on_the_mean_has_std_z_c_over_m_and_updates_weigh_the_same():
    cfg = RunSettings(clip_norm=0.5, dp_noise_multiplier=1.2)
    defences = Defences(cfg, noise_seed=7)
    pipeline = AggregationPipeline(**defences.pipeline_parts())
    template = {"w": torch.zeros(200_000)}
    combiner = pipeline.new_combiner(template)
    for i in range(8):
        assert pipeline.fold(combiner, {"w": torch.zeros(200_000)}, UpdateContext(f"w{i}", 10 ** i)) == 1.0
    noise = pipeline.propose(template, combiner).weights["w"].to(torch.float64)
    assert float(noise.std()) == pytest.approx(1.2 * 0.5 / 8, rel=0.01)
    assert defences.noise.last_std == pytest.approx(0.075)
    again = Defences(cfg, noise_seed=7).noise({"w": torch.zeros(3)}, combiner)
    assert torch.equal(again["w"], NoiseStage(1.2, 0.5, seed=7)({"w": torch.zeros(3)}, combiner)["w"])


@pytest.mark.parametrize("run,names", [
    (dict(dp_noise_multiplier=1.0), "--clip-norm"),
    (dict(dp_noise_multiplier=1.0, clip_norm=1.0, aggregation="median"), "--aggregation fedavg"),
    (dict(aggregation="krum", krum_attackers=2, min_updates=4), "5 updates"),
    (dict(aggregation="krum", krum_attackers=2, mode="async", buffer_size=4, min_updates=9), "--buffer-size"),
    (dict(dp_noise_multiplier=1.0, clip_norm=1.0, mode="async"), "--mode sync"),
    (dict(trim_fraction=0.5), "--trim-fraction"),
    (dict(dp_epsilon_budget=3.0), "--dp-noise-multiplier"),
    (dict(dp_noise_multiplier=1.0, clip_norm=1.0, dp_delta=0.0), "--dp-delta"),
])
def test_combinations_that_cannot_work_are_clear_errors(run, names):
    from fedmq.settings import Settings

    with pytest.raises(SettingsError, match=names):
        validate(Settings(run=RunSettings(**run)))


def test_a_clip_stage_alone_leaves_small_updates_as_they_are():
    stage = ClipStage(10.0)
    delta = fill(1.0)
    assert stage(delta, UpdateContext("a", 1))["w"] is delta["w"] and not stage.clipped


# -- wired into the aggregator ---------------------------------------------------------------------
def answer_with(values: dict[str, float], samples: dict[str, int] | None = None):
    def answer(participant, broadcast):
        if broadcast.attempt == 0 or broadcast.asks_again(participant.worker_id):
            participant.send_update(broadcast, fill=values[participant.worker_id],
                                    samples=(samples or {}).get(participant.worker_id, 100))
    return answer


def run_scripted(data_root, tmp_path, values, *, samples=None, aggregator_kw=None, **run):
    hub = MemoryHub()
    answer = answer_with(values, samples)
    workers = [ScriptedWorker(hub, name, on_broadcast=answer).start() for name in values]
    settings = embedded_settings(data_root, tmp_path, start_workers=len(values), num_partitions=len(values), **run)
    aggregator = Aggregator(settings, hub.connect(), **(aggregator_kw or {}))
    initial = {k: v.clone() for k, v in aggregator.weights.items()}
    try:
        result = run_aggregator(aggregator, limit_s=120)
    finally:
        for worker in workers:
            worker.stop()
    assert not aggregator.hung
    return aggregator, result, initial


def moved(aggregator, initial) -> torch.Tensor:
    return torch.cat([(aggregator.weights[k] - initial[k]).flatten() for k in initial])


@pytest.mark.parametrize("rule,expected", [("median", 3.0), ("trimmed-mean", 10 / 3), ("fedavg", 22.2)])
def test_the_aggregator_combines_a_version_by_the_rule_and_records_it(data_root, tmp_path, rule, expected):
    values = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 5.0, "e": 100.0}
    aggregator, result, initial = run_scripted(data_root, tmp_path, values, versions=1, aggregation=rule,
                                               trim_fraction=0.2)
    step = moved(aggregator, initial)
    assert torch.allclose(step, torch.full_like(step, expected), atol=1e-4)
    line = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert line["defences"]["aggregation"] == rule and line["dp_epsilon"] is None
    saved = CheckpointStore(result.output_dir).load("embedded-test")
    assert saved.defences["choices"]["aggregation"] == rule and "privacy_ledger" not in saved.defences


def test_claimed_sample_counts_are_capped(data_root, tmp_path):
    values, samples = {"honest": 1.0, "boaster": 0.0}, {"honest": 100, "boaster": 1_000_000}
    aggregator, _, initial = run_scripted(data_root, tmp_path, values, samples=samples, versions=1,
                                          max_samples_per_update=100)
    step = moved(aggregator, initial)
    assert torch.allclose(step, torch.full_like(step, 0.5), atol=1e-5)  # 100 and 100, not 100 and 1e6


def test_the_aggregator_caps_a_built_in_partition_update_at_its_partition_size(data_root, tmp_path):
    hub = MemoryHub()

    def claim(participant, broadcast):
        if broadcast.attempt == 0:
            delta = {k: torch.full_like(v, 1.0 if participant.worker_id == "a" else 0.0)
                     for k, v in broadcast.weights.items()}
            # Both trained partition 0 or 1 of 60000 / 2 rows; "a" claims far more.
            claimed = 10_000_000 if participant.worker_id == "a" else 30_000
            participant.publish_update_queue(m.WeightUpdate(broadcast.run_id, broadcast.version,
                                                            participant.worker_id, 0, claimed, 1.0, 0.1, 1, delta))

    workers = [ScriptedWorker(hub, name, on_broadcast=claim).start() for name in ("a", "b")]
    settings = embedded_settings(data_root, tmp_path, versions=1, start_workers=2, num_partitions=2)
    aggregator = Aggregator(settings, hub.connect())
    initial = {k: v.clone() for k, v in aggregator.weights.items()}
    try:
        run_aggregator(aggregator, limit_s=120)
    finally:
        for worker in workers:
            worker.stop()
    assert aggregator.defences.describe()["partition_cap"] is True
    step = moved(aggregator, initial)
    assert torch.allclose(step, torch.full_like(step, 0.5), atol=1e-5)


def expected_epsilon(q: float, z: float, steps: int, delta: float) -> float:
    """Opacus's own computation (its RDPAccountant's default orders)."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    eps, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders),
                               delta=delta)
    return float(eps)


DP = dict(clip_norm=0.5, dp_noise_multiplier=1.5, dp_delta=1e-5)


def test_dp_fedavg_in_the_aggregator_noise_epsilon_metrics_and_checkpoint(data_root, tmp_path):
    values = {f"w{i}": 0.0 for i in range(4)}
    aggregator, result, initial = run_scripted(data_root, tmp_path, values, versions=2, **DP)
    # Version 1 = initial model + the noise alone (every update is 0): std z*C/m over 199,210 weights.
    records = result.records
    assert records[0].dp_noise_std == pytest.approx(1.5 * 0.5 / 4)
    assert [r.dp_epsilon for r in records] == pytest.approx([expected_epsilon(1.0, 1.5, s, 1e-5) for s in (1, 2)],
                                                            rel=1e-9)
    lines = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["dp_epsilon"] for line in lines] == [r.dp_epsilon for r in records]
    assert lines[0]["defences"]["dp_noise_multiplier"] == 1.5 and lines[0]["defences"]["dp_sampling_rate"] == 1.0
    assert "epsilon" in records[-1].console_line()
    saved = CheckpointStore(result.output_dir).load("embedded-test")
    assert saved.defences["privacy_ledger"] == {"delta": 1e-5, "steps": [[1.5, 1.0, 2]]}


def test_dp_noise_on_the_model_has_the_calibrated_std(data_root, tmp_path):
    values = {f"w{i}": 0.0 for i in range(4)}
    aggregator, result, initial = run_scripted(data_root, tmp_path, values, versions=1, **DP)
    noise = moved(aggregator, initial).to(torch.float64)
    assert noise.numel() == 199_210
    # Relative standard error of a sample std over 199k draws: 0.16 %; 1 % is six of them.
    assert float(noise.std()) == pytest.approx(1.5 * 0.5 / 4, rel=0.01)
    assert abs(float(noise.mean())) < 6 * 0.1875 / math.sqrt(noise.numel())


def test_a_resumed_run_keeps_accounting_and_the_budget_stops_it(data_root, tmp_path):
    values = {f"w{i}": 0.0 for i in range(3)}
    _, first, _ = run_scripted(data_root, tmp_path, values, versions=2, **DP)
    assert first.final_version == 2
    eps = {s: expected_epsilon(1.0, 1.5, s, 1e-5) for s in range(1, 6)}
    # Resumed with room for 5 versions but a budget between 4 and 5 versions' epsilon.
    budget = (eps[4] + eps[5]) / 2
    aggregator, resumed, _ = run_scripted(data_root, tmp_path, values, versions=5, dp_epsilon_budget=budget, **DP)
    assert [r.version for r in resumed.records] == [3, 4]
    assert [r.dp_epsilon for r in resumed.records] == pytest.approx([eps[3], eps[4]], rel=1e-9)
    assert resumed.final_version == 4 and aggregator.finished
    store = CheckpointStore(resumed.output_dir)
    assert store.load("embedded-test").defences["privacy_ledger"]["steps"] == [[1.5, 1.0, 4]]
    assert store.final_path.exists()


def test_a_budget_below_one_version_ends_the_run_before_it_starts(data_root, tmp_path):
    settings = embedded_settings(data_root, tmp_path, versions=3, dp_epsilon_budget=0.01, **DP)
    aggregator = Aggregator(settings, MemoryHub().connect())
    result = run_aggregator(aggregator, limit_s=60)
    assert result.final_version == 0 and not result.records
    assert CheckpointStore(result.output_dir).final_path.exists()


def test_async_mode_combines_each_buffer_by_the_robust_rule_and_clips(data_root, tmp_path):
    from fedmq_cli.embedded import run_embedded

    # 3 embedded workers, a version every 3 updates: the median of each buffer, updates clipped to 2
    # (measured: every one of the 6 is longer; accuracy 0.92 then 0.95).
    settings = embedded_settings(data_root, tmp_path, versions=2, mode="async", buffer_size=3, aggregation="median",
                                 clip_norm=2.0)
    result = run_embedded(settings)
    assert [r.version for r in result.records] == [1, 2]
    assert all(r.defences["aggregation"] == "median" and r.participants == 3 for r in result.records)
    assert sum(r.clipped_updates for r in result.records) >= 1
    assert result.records[-1].test_accuracy >= 0.9, [r.test_accuracy for r in result.records]
