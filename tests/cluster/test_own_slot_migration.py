"""A migration of a broker's own slot (every `...:{id}` key of it) is a non-event for it.

The slot is moved by hand, as `redis-cli --cluster reshard` does but slowly: IMPORTING on the
target, MIGRATING on the source, MIGRATE key by key with a pause between, then the slot given
to the target. Meanwhile the broker's heartbeat (presence and adoption lock: two keys of one
hash tag), its inbox read (XREADGROUP BLOCK on its stream) and QoS 1 from another broker go on:
nothing acknowledged is lost and the broker's Redis link never drops.
"""

from __future__ import annotations

import time

from rediscluster import ClusterNode, RedisClusterProcess, slot_of

from .noloss import check
from .test_redis_cluster import run_under_load

KEY_PAUSE = 0.6  # seconds between two keys: the slot stays mid-migration for several beats


def migrate_slot_slowly(cluster: RedisClusterProcess, slot: int, target: ClusterNode) -> int:
    """Move `slot` to `target` one key at a time; the number of keys moved."""
    source = cluster.primary_for(slot)
    assert source is not target
    with source.client() as src, target.client() as dst:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id())
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id())
        moved = 0
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
            time.sleep(KEY_PAUSE)
            src.execute_command("MIGRATE", "127.0.0.1", target.port, keys[0], 0, 5000)
            moved += 1
        time.sleep(KEY_PAUSE)
        for node in (target, source):
            with node.client() as r:
                r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id())
    for node, _ in cluster.shards():
        if node is not source and node is not target:
            with node.client() as r:
                r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id())
    return moved


def test_migrating_the_receivers_own_slot_drops_no_link_and_loses_nothing(
    fresh_redis_cluster: RedisClusterProcess,
) -> None:
    cluster = fresh_redis_cluster
    _, (target, _), _ = cluster.shards()
    moved: list[tuple[str, int]] = []

    def migrate(b_id: str) -> None:
        time.sleep(0.5)
        moved.append((b_id, migrate_slot_slowly(cluster, slot_of(b_id), target)))

    pub, sub, brokers = run_under_load(cluster, migrate)
    _, b = brokers
    try:
        ((b_id, keys),) = moved
        assert keys >= 3  # presence, table, inbox at least
        assert cluster.primary_for(f"mcloudtt:inbox:{{{b_id}}}") is target
        check(pub, sub, 1)
        assert len(pub.acked) > 300
        # The receiver followed its slot without losing its link (heartbeat, inbox read).
        assert b.metric("mcloudtt_cluster_link_losses_total") == 0
    finally:
        for broker in brokers:
            broker.stop()
        print(b.output()[-4000:])
