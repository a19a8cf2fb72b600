"""The Redis Cluster fixture itself: formed, found from any node, fails over, reshards."""

from __future__ import annotations

from rediscluster import RedisClusterProcess, slot_of


def test_cluster_formed_and_emptied(redis_cluster: RedisClusterProcess) -> None:
    shards = redis_cluster.shards()
    assert len(shards) == 3
    assert sum(end - start + 1 for _, ranges in shards for start, end in ranges) == 16_384
    assert sorted(node.role() for node in redis_cluster.nodes) == ["master"] * 3 + ["slave"] * 3
    r = redis_cluster.client()
    assert r.dbsize() == 0  # emptied for this test
    r.set("{a}x", "1")
    assert redis_cluster.primary_for("{a}y") is redis_cluster.primary_for("a")


def test_reshard_then_kill_primary(fresh_redis_cluster: RedisClusterProcess) -> None:
    cluster = fresh_redis_cluster
    (source, _), (target, _), _ = cluster.shards()
    # The source's first slots move; it keeps the rest (a primary left without slots would
    # become a replica, and two primaries alone cannot elect a replica when one dies).
    first = cluster.shards()[0][1][0][0]
    key = next(f"k{i}" for i in range(100_000) if first <= slot_of(f"k{i}") < first + 500)
    assert cluster.primary_for(key) is source
    cluster.client().set(key, "v")
    cluster.reshard(1000, source, target)
    assert cluster.primary_for(key) is target
    assert cluster.client().get(key) == "v"

    target.client().wait(1, 2000)  # the replica has it before the kill
    victim = cluster.kill_primary(key)
    survivor = cluster.primary_for(key)
    assert victim is target and survivor.role() == "master"
    assert cluster.client().get(key) == "v"
    cluster.restart(victim)
    assert victim.role() == "slave"
