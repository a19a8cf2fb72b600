"""The Redis Cluster fixture itself (its kill_primary and reshard are used, and so checked, by
test_redis_cluster.py's tests under load)."""

from __future__ import annotations

from rediscluster import RedisClusterProcess


def test_cluster_formed_and_emptied(redis_cluster: RedisClusterProcess) -> None:
    shards = redis_cluster.shards()
    assert len(shards) == 3
    assert sum(end - start + 1 for _, ranges in shards for start, end in ranges) == 16_384
    assert sorted(node.role() for node in redis_cluster.nodes) == ["master"] * 3 + ["slave"] * 3
    r = redis_cluster.client()
    assert r.dbsize() == 0  # emptied for this test
    r.set("{a}x", "1")
    assert redis_cluster.primary_for("{a}y") is redis_cluster.primary_for("a")
