"""The broker's Redis Cluster link (`cluster/topology.py`) against a real Redis Cluster: a
single Redis is told apart in one round trip, commands go to their slot's primary, ASK is
followed in order, so is MOVED to a known primary; CLUSTER SHARDS read; the seed-list URLs."""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
import pytest
import redis
from mcloudtt_broker.cluster.redis_url import RedisUrlError, parse_redis_url, redact_url
from mcloudtt_broker.cluster.resp import Commands
from mcloudtt_broker.cluster.topology import ShardedConnection, SlotMap, probe
from rediscluster import RedisClusterProcess, slot_of
from redisproc import RedisProcess


def test_seed_list_urls() -> None:
    options = parse_redis_url("rediss://u:p%40ss@n1:7000,n2,n3:7002/0?ssl_cert_reqs=none")
    assert options.nodes == (("n1", 7000), ("n2", 6379), ("n3", 7002))
    node = options.for_node("n9", 7009)
    # The user, password and TLS options hold for every node.
    assert (node.host, node.port, node.seeds) == ("n9", 7009, ())
    assert (node.username, node.password, node.ssl_cert_reqs) == ("u", "p@ss", "none")
    assert parse_redis_url("redis://a:1,b:2?db=0").seeds == (("b", 2),)
    assert redact_url("redis://u:secret@a:1,b:2/0") == "redis://u:***@a:1,b:2/0"
    with pytest.raises(RedisUrlError, match="empty seed"):
        parse_redis_url("redis://a:1,,b:2/0")
    with pytest.raises(RedisUrlError, match="seed"):
        parse_redis_url("redis://a:1,b:x/0")


def test_a_single_redis_is_not_a_cluster(redis_server: RedisProcess) -> None:
    assert asyncio.run(probe(parse_redis_url(redis_server.url))) is None


def test_probe_finds_every_shard_from_any_node_or_seed(redis_cluster: RedisClusterProcess) -> None:
    replica = next(n for n in redis_cluster.nodes if n.role() == "slave")
    dead = "127.0.0.1:1"  # nothing listens: the next seed is asked
    for url in (redis_cluster.seed_url, f"redis://{dead},{replica.address}/0"):
        slots = asyncio.run(probe(parse_redis_url(url)))
        assert slots is not None
        assert sorted(slots.primaries) == sorted(
            ("127.0.0.1", n.port) for n, _ in redis_cluster.shards()
        )
        # Replicas too, once they synced (what a reconnect may ask when a seed is gone).
        assert set(slots.primaries) <= set(slots.nodes)
        assert slots.node_for_key(b"mcloudtt:inbox:{b1}") == (
            "127.0.0.1",
            redis_cluster.primary_for("b1").port,
        )


def test_commands_go_to_their_shard_and_asks_are_followed(
    fresh_redis_cluster: RedisClusterProcess,
) -> None:
    cluster = fresh_redis_cluster
    (source, _), (target, _), _ = cluster.shards()
    key = next(f"k{i}" for i in range(100_000) if cluster.primary_for(f"k{i}") is source)
    slot = slot_of(key)
    options = parse_redis_url(cluster.seed_url)

    async def scenario() -> None:
        slots = await probe(options)
        assert slots is not None
        lost: list[BaseException] = []
        link = await ShardedConnection.open(options, slots, lost.append)
        assert len(link.links) == 3  # one connection per primary
        batch = Commands()
        for n in range(30):
            batch.add("SET", f"spread{n}", n)
        assert await link.call(batch) == [b"OK"] * 30
        assert {node for node, c in link.links.items() if c.sent} == set(slots.primaries)
        # The slot is being migrated and the key is not on the source: ASK to the target.
        with source.client() as s, target.client() as t:
            t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id())
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id())
        writes = Commands()
        for n in range(5):
            writes.add("XADD", key, "*", "n", n)
        link.write(writes)
        assert await link.settled(5.0)
        assert link.errors == 0 and link.replies == link.sent == 35 and not lost
        with target.client() as t:
            pipe = t.pipeline(transaction=False)
            pipe.execute_command("ASKING")
            pipe.execute_command("XLEN", key)
            assert pipe.execute()[1] == 5  # every entry on the target, in one stream
        # The migration ends: the source answers MOVED, the link follows it to the target
        # (a primary it is connected to) in order, and once nothing is in flight sends that
        # slot's commands to the target directly.
        for node in (source, target):
            with node.client() as r:
                r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id())
        source_sent = link.links[slots.node_for_key(key.encode())].sent
        after = Commands()
        after.add("XADD", key, "*", "n", 5)
        link.write(after)
        assert await link.settled(5.0)
        assert not lost and not link.closed and link.replies == link.sent == 36
        later = Commands()
        later.add("XADD", key, "*", "n", 6)
        assert not isinstance((await link.call(later))[0], hiredis.ReplyError)
        assert link.slots.node_for_key(key.encode()) == ("127.0.0.1", target.port)
        # The source saw the MOVED command only, not the later one.
        assert link.links[slots.node_for_key(key.encode())].sent == source_sent + 1
        link.close()

    asyncio.run(scenario())
    r = cluster.client()
    assert r.xlen(key) == 7
    with pytest.raises(redis.RedisClusterException):
        r.eval("return 1", 2, "a", "b")  # why per-broker keys share a hash tag


def test_cluster_shards_reply_gives_each_range_its_primary() -> None:
    """CLUSTER SHARDS (RESP2: flat key/value arrays), as Redis 7 answers: two shards, a replica
    each, one primary TLS-only; an empty endpoint is the node that was asked."""

    def member(port: int, role: bytes, endpoint: bytes, tls_port: int | None = None) -> list[Any]:
        fields: list[Any] = [b"id", b"x" * 40, b"port", port]
        if tls_port is not None:
            fields += [b"tls-port", tls_port]
        more = [b"ip", endpoint, b"endpoint", endpoint, b"role", role, b"health", b"online"]
        return [*fields, *more]

    reply = [
        [
            b"slots",
            [0, 5460, 10923, 16383],
            b"nodes",
            [
                member(7000, b"master", b"10.0.0.1", 7100),
                member(7001, b"replica", b"10.0.0.2", 7101),
            ],
        ],
        [
            b"slots",
            [5461, 10922],
            b"nodes",
            [member(7002, b"replica", b"10.0.0.3", 7102), member(7003, b"master", b"", 7103)],
        ],
    ]
    plain = SlotMap.from_cluster_shards(reply, ("seed.example", 6379), tls=False)
    assert plain.complete()
    assert plain.node_for_slot(0) == ("10.0.0.1", 7000)
    assert plain.node_for_slot(16383) == ("10.0.0.1", 7000)
    assert plain.node_for_slot(5461) == ("seed.example", 7003)
    tls = SlotMap.from_cluster_shards(reply, ("seed.example", 6379), tls=True)
    assert tls.node_for_slot(12000) == ("10.0.0.1", 7100)
    assert ("10.0.0.2", 7101) in tls.nodes
    # A shard whose primary is missing leaves its slots unserved (the probe refuses the map).
    partial = SlotMap.from_cluster_shards(reply[:1], ("seed.example", 6379), tls=False)
    assert not partial.complete()
