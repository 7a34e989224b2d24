"""Liveness (timed by the sender) and the partition table."""

from aggregator.registry import WorkerRegistry


def test_new_workers_get_the_lowest_free_partition_and_returning_ones_their_own():
    registry = WorkerRegistry(num_partitions=3, timeout_s=10)
    assert [registry.join(w, -1, 0.0).partition for w in ("a", "b", "c")] == [0, 1, 2]
    registry.leave("b", 0.5)
    assert registry.join("d", -1, 1.0).partition == 1  # b's partition is free again
    registry.leave("a", 1.5)
    assert registry.join("a", -1, 2.0).partition == 0  # a comes back to its own


def test_a_returning_worker_does_not_take_its_old_partition_from_a_live_newcomer():
    registry = WorkerRegistry(num_partitions=3, timeout_s=10)
    for worker_id in ("a", "b", "c"):
        registry.join(worker_id, -1, 0.0)
    registry.leave("a", 1.0)
    assert registry.join("newcomer", -1, 2.0).partition == 0
    registry.leave("c", 3.0)
    # a's old index 0 is held by the newcomer now: a gets the free one, nobody shares.
    assert registry.join("a", -1, 4.0).partition == 2
    assert sorted(registry.get(w).partition for w in registry.live_ids()) == [0, 1, 2]


def test_a_requested_partition_is_honoured_and_an_impossible_one_replaced():
    registry = WorkerRegistry(num_partitions=4, timeout_s=10)
    assert registry.join("x", 2, 0.0).partition == 2
    assert registry.join("y", 9, 0.0).partition == 0


def test_more_workers_than_partitions_share_the_least_shared(caplog):
    registry = WorkerRegistry(num_partitions=2, timeout_s=10)
    partitions = [registry.join(f"w{i}", -1, 0.0).partition for i in range(5)]
    assert partitions == [0, 1, 0, 1, 0]
    assert "more live workers" in caplog.text


def test_silent_workers_expire_and_heartbeats_keep_them_alive():
    registry = WorkerRegistry(num_partitions=2, timeout_s=5)
    registry.join("quiet", -1, 0.0)
    registry.join("chatty", -1, 0.0)
    registry.heard("chatty", 1000.0, 0.0)  # its clock reads 1000 when ours reads 0
    registry.heard("chatty", 1004.0, 4.0)
    registry.update_state("chatty", state="ready")
    assert registry.expire(6.0) == ["quiet"]
    assert registry.live_ids() == ["chatty"] and registry.ready_ids() == ["chatty"]
    assert registry.partition_table == {"quiet": 0, "chatty": 1}  # the table remembers


def test_a_backlog_of_old_heartbeats_does_not_keep_a_dead_worker_alive():
    registry = WorkerRegistry(num_partitions=2, timeout_s=5)
    registry.join("dead", -1, 0.0)
    registry.heard("dead", 500.0, 0.0)  # read at once: its clock is 500 ahead of ours
    for sent in (501.0, 502.0):  # sent at our 1 and 2, read only at our 30 (a backlog)
        assert registry.heard("dead", sent, 30.0) == sent - 500.0
    assert registry.expire(30.0) == ["dead"]  # silent since our 2: dead by 30


def test_a_backlog_does_not_make_a_live_worker_look_dead():
    # Heartbeats sent every second up to our 30 are read late, after a busy stretch: the
    # horizon (what we have read up to) decides, not the reading time.
    registry = WorkerRegistry(num_partitions=2, timeout_s=5)
    registry.join("live", -1, 0.0)
    registry.heard("live", 100.0, 0.0)
    assert registry.expire(0.5) == []
    horizon = registry.heard("live", 128.0, 40.0)  # sent at our 28, read at 40
    assert horizon == 28.0 and registry.expire(horizon) == []


def test_a_restored_table_counts_the_checkpoints_live_workers_as_alive_until_the_timeout():
    registry = WorkerRegistry(num_partitions=3, timeout_s=5)
    registry.restore({"a": 0, "b": 1, "gone": 2}, ("a", "b"), now=100.0)
    assert registry.live_ids() == ["a", "b"] and registry.ready_ids() == ["a", "b"]
    assert registry.join("new", -1, 102.0).partition == 2
    registry.heard("a", 7.0, 103.0)
    assert registry.expire(106.0) == ["b"]


def test_a_dead_workers_partition_goes_to_a_worker_sharing_one_after_the_grace_period():
    registry = WorkerRegistry(num_partitions=2, timeout_s=5, reassign_after_s=10)
    registry.join("a", -1, 0.0)  # partition 0
    registry.join("b", -1, 0.0)  # partition 1
    # b is restarted under a new id before its timeout: the newcomer has to share a partition.
    assert registry.join("b-restarted", -1, 1.0).partition == 0
    for worker_id in ("a", "b-restarted"):
        registry.heard(worker_id, 6.0, 6.0)
    assert registry.expire(6.0) == ["b"]  # b's partition 1 is idle now, two workers train 0
    assert registry.rebalance(15.0) == []  # within the grace period (b may come back)
    assert registry.rebalance(16.0) == [("b-restarted", 1)]  # the newest sharer moves
    assert registry.get("b-restarted").partition == 1 and registry.partition_table["b-restarted"] == 1
    assert registry.rebalance(30.0) == []


def test_a_returning_worker_in_the_grace_period_takes_its_idle_partition_back():
    registry = WorkerRegistry(num_partitions=2, timeout_s=5, reassign_after_s=10)
    registry.join("a", -1, 0.0)
    registry.join("b", -1, 0.0)
    registry.join("c", -1, 0.0)  # shares partition 0
    registry.leave("b", 1.0)
    assert registry.join("b", -1, 2.0).partition == 1
    assert registry.rebalance(20.0) == []


def test_a_worker_that_asked_for_its_partition_is_never_moved():
    registry = WorkerRegistry(num_partitions=2, timeout_s=5, reassign_after_s=0)
    registry.join("a", -1, 0.0)
    registry.join("pinned", 0, 0.0)
    registry.join("b", -1, 0.0)  # partition 1
    registry.leave("b", 1.0)
    assert registry.rebalance(2.0) == [("a", 1)]
    registry.join("c", 0, 3.0)
    registry.leave("a", 3.0)
    assert registry.rebalance(5.0) == []  # both on 0 asked for it
