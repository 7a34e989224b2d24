"""Liveness and the partition table."""

from aggregator.registry import WorkerRegistry


def test_new_workers_get_the_lowest_free_partition_and_returning_ones_their_own():
    registry = WorkerRegistry(num_partitions=3, timeout_s=10)
    assert [registry.join(w, -1, 0.0).partition for w in ("a", "b", "c")] == [0, 1, 2]
    registry.leave("b")
    assert registry.join("d", -1, 1.0).partition == 1  # b's partition is free again
    registry.leave("a")
    assert registry.join("a", -1, 2.0).partition == 0  # a comes back to its own


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
    registry.touch("chatty", 4.0, state="ready")
    assert registry.expire(6.0) == ["quiet"]
    assert registry.live_ids() == ["chatty"] and registry.ready_ids() == ["chatty"]
    assert registry.partition_table == {"quiet": 0, "chatty": 1}  # the table remembers
