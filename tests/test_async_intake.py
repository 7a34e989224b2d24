"""Async mode on the in-memory broker: staleness, too-stale and duplicate updates, the K-update
close policy and the keys a checkpoint keeps."""

import logging
import re

import torch

from aggregator.close_policy import AsyncClosePolicy, Decision
from aggregator.fedavg import RunningSum
from aggregator.intake import Action, UpdateIntake, classify_update
from aggregator.pipeline_config import build_pipeline
from aggregator.rounds import OpenRound, VersionRecord, staleness_notes
from fedmq import messages as m
from fedmq.broker.memory import MemoryHub
from fedmq.settings import RunSettings
from fedmq.topology import STATIC_TOPOLOGY
from fedmq.transport import Transport
from test_update_intake import TEMPLATE, body, raw


def header(base_version, worker_id="w", run_id="run"):
    return m.UpdateHeader(run_id, base_version, worker_id, 0, 10)


def verdict(h, round_, checkpointed=frozenset(), max_staleness=3):
    return classify_update(h, run_id="run", version=round_.version, round_=round_, checkpointed=checkpointed,
                           num_partitions=4, max_staleness=max_staleness)


def test_async_verdicts_by_staleness_duplicate_checkpoint_and_future():
    round_ = OpenRound(5, RunningSum(TEMPLATE))
    assert (verdict(header(5), round_).action, verdict(header(5), round_).staleness) == (Action.FOLD, 0)
    assert (verdict(header(2), round_).action, verdict(header(2), round_).staleness) == (Action.FOLD, 3)
    assert verdict(header(1), round_).action is Action.TOO_STALE
    assert verdict(header(6), round_).action is Action.DEAD_LETTER
    round_.folded_keys.add(("run", 4, "w"))
    assert verdict(header(4), round_).action is Action.DUPLICATE
    assert verdict(header(4, "v"), round_).action is Action.FOLD  # another worker, same base
    assert verdict(header(3), round_, checkpointed={("run", 3, "w")}).action is Action.STALE
    # The same header in sync mode: only the open version counts.
    assert verdict(header(2), round_, max_staleness=None).action is Action.STALE


def make_intake(max_staleness=2, staleness="polynomial"):
    hub = MemoryHub()
    broker = hub.connect()
    broker.declare(STATIC_TOPOLOGY)
    pipeline = build_pipeline(RunSettings(mode="async", staleness=staleness))
    return UpdateIntake(broker, Transport(broker), "run", num_partitions=4, update_bytes=10_000,
                        max_frame_bytes=1 << 20, pipeline=pipeline, max_staleness=max_staleness), hub


def test_stale_updates_are_weighted_too_stale_ones_counted_and_duplicates_folded_once():
    intake, _ = make_intake(max_staleness=2)
    round_ = OpenRound(4, RunningSum(TEMPLATE))
    ones = {k: torch.ones_like(v) for k, v in TEMPLATE.items()}
    fours = {k: torch.full_like(v, 4.0) for k, v in TEMPLATE.items()}

    def take(data, tag, checkpointed=frozenset()):
        intake.take(raw(data, tag=tag), round_, version=4, checkpointed=checkpointed, template=TEMPLATE)

    take(body(base_version=4, worker_id="fast", num_samples=10, delta=ones), 1)
    take(body(base_version=1, worker_id="slow", num_samples=10, delta=fours), 2)  # 3 versions old
    take(body(base_version=3, worker_id="slow", num_samples=10, delta=fours), 3)  # staleness 1
    take(body(base_version=3, worker_id="slow", num_samples=10, delta=fours), 4)  # its duplicate
    take(body(base_version=2, worker_id="fast", num_samples=10, delta=fours), 5,
         checkpointed={("run", 2, "fast")})  # folded into an earlier checkpoint
    assert round_.combiner.count == 2 and round_.folded_keys == {("run", 4, "fast"), ("run", 3, "slow")}
    assert (round_.too_stale, round_.duplicates, round_.stale) == (1, 1, 1)
    assert round_.staleness == [0, 1]
    # FedBuff's weights: 10 * 1 and 10 / sqrt(2): mean = (1 + 4/sqrt(2)) / (1 + 1/sqrt(2)).
    s = 2 ** -0.5
    assert torch.allclose(round_.combiner.mean()["w"], torch.full((4, 4), (1 + 4 * s) / (1 + s)))
    # Acknowledged at once: the too-stale, the older copy of the duplicate and the checkpointed
    # one; held until the checkpoint: the two folded (the duplicate's newest copy).
    assert sorted(d.tag for d in round_.held_deliveries()) == [1, 4]


def test_the_async_policy_closes_after_k_updates_and_never_waits_for_a_straggler():
    policy = AsyncClosePolicy(buffer_size=2, min_updates=1, max_staleness=3)
    round_ = OpenRound(7, RunningSum(TEMPLATE), expected={"a", "b", "slow"})
    live = {"a", "b", "slow"}
    round_.folded_keys.add(("run", 7, "a"))
    round_.folded.add("a")
    assert policy.decide(round_, live, now=0.0) is Decision.WAIT
    round_.folded_keys.add(("run", 5, "a"))  # the same worker's older update counts too
    assert policy.decide(round_, live, now=0.0) is Decision.CLOSE
    # With fewer live workers than K, each of them once is enough.
    lone = OpenRound(7, RunningSum(TEMPLATE), expected={"a"}, folded={"a"}, folded_keys={("run", 7, "a")})
    assert AsyncClosePolicy(5, 1, 3).decide(lone, {"a"}, now=0.0) is Decision.CLOSE
    # The deadline: close with at least min_updates, else broadcast again.
    empty = OpenRound(7, RunningSum(TEMPLATE), expected={"a", "b"}, deadline=10.0)
    assert policy.decide(empty, live, now=11.0) is Decision.REBROADCAST


def test_the_async_checkpoint_keeps_the_keys_still_young_enough_to_come_back():
    policy = AsyncClosePolicy(buffer_size=2, min_updates=1, max_staleness=2)
    round_ = OpenRound(7, RunningSum(TEMPLATE), folded_keys={("run", 7, "a"), ("run", 6, "b")})
    before = {("run", 6, "a"), ("run", 5, "c"), ("run", 4, "d")}
    # The next version is 8: updates of versions 6 and 7 may still be folded into it.
    assert policy.checkpoint_keys(round_, before, 8) == {("run", 7, "a"), ("run", 6, "b"), ("run", 6, "a")}


def test_the_version_line_reports_staleness_in_async_mode():
    notes = staleness_notes([0, 2, 1], too_stale=4)
    assert notes == {"staleness_min": 0, "staleness_mean": 1.0, "staleness_max": 2, "too_stale": 4}
    record = VersionRecord("run", 3, 3, 3, 0.9, 0.3, 0.2, 1, 1, 1.0, 3, 0, 0, 0, 0, mode="async",
                           server_optimizer="fedadam", **notes)
    assert "staleness 0/1.0/2  4 too stale" in record.console_line()
    assert record.to_json()["server_optimizer"] == "fedadam"
    assert "staleness" not in VersionRecord("run", 3, 3, 3, 0.9, 0.3, 0.2, 1, 1, 1.0, 3, 0, 0, 0, 0).console_line()


class _Folded(logging.Handler):
    """(worker, base version) of every update the aggregator folds, from its log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.folded: list[tuple[str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"update \d+/\d+ from (\S+) .*trained on version (\d+)", record.getMessage())
        if found:
            self.folded.append((found.group(1), int(found.group(2))))


def test_an_async_aggregator_folds_each_update_once_and_never_one_too_stale(data_root, tmp_path):
    from aggregator.service import Aggregator
    from federation_harness import ScriptedWorker, run_aggregator
    from test_embedded import embedded_settings

    hub = MemoryHub()

    def train_each_version(participant, broadcast):
        participant.send_update(broadcast, fill=0.001)
        if broadcast.version >= 1:  # and send the update of the version before again (a resend)
            older = next(b for b in participant.broadcasts if b.version == broadcast.version - 1)
            participant.send_update(older, fill=0.001)

    def straggle(participant, broadcast):
        # Version 2: answer version 1 (1 or 2 versions old when it arrives); version 4: answer
        # version 0 (4 or more versions old: beyond --max-staleness 2).
        if broadcast.version in (2, 4):
            participant.send_update(participant.broadcasts[0 if broadcast.version == 4 else 1], fill=0.001)

    workers = [ScriptedWorker(hub, "a", on_broadcast=train_each_version).start(),
               ScriptedWorker(hub, "b", on_broadcast=train_each_version).start(),
               ScriptedWorker(hub, "late", on_broadcast=straggle).start()]
    settings = embedded_settings(data_root, tmp_path, versions=6, mode="async", buffer_size=2, max_staleness=2,
                                 start_workers=3, num_partitions=3, eval_data="none")
    log = _Folded()
    logging.getLogger("aggregator.intake").addHandler(log)
    logging.getLogger("aggregator.intake").setLevel(logging.INFO)
    try:
        aggregator = Aggregator(settings, hub.connect())
        result = run_aggregator(aggregator, limit_s=120)
    finally:
        logging.getLogger("aggregator.intake").removeHandler(log)
        for worker in workers:
            worker.stop()
    assert not aggregator.hung and result.final_version == 6
    # Every update (worker, base version) is folded at most once, though a and b sent each twice.
    assert len(log.folded) == len(set(log.folded)) and ("a", 0) in log.folded and ("b", 1) in log.folded
    assert ("late", 1) in log.folded and ("late", 0) not in log.folded
    records = result.records
    assert sum(r.participants for r in records) == len(log.folded)
    assert sum(r.too_stale for r in records) == 1  # late's answer to version 0
    assert max(r.staleness_max for r in records if r.staleness_max is not None) >= 1
    assert sum(r.duplicates + r.stale for r in records) >= 4  # the resends, acknowledged, not folded
    assert all(r.mode == "async" and r.server_optimizer == "fedavg" for r in records)
