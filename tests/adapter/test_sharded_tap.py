"""The sharded tap (issue 15): N tap streams by topic hash, every adapter replica reading its
share through one consumer group per stream; nothing lost when a replica dies mid-stream. And
broadcast mode on sharded Pub/Sub.

Real brokers, against a single Redis and against a real Redis Cluster (tests/rediscluster.py:
three primaries, three replicas on loopback) where each stream sits on its own shard.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import duckdb
import orjson
import pytest
import redis
from mcloudtt_broker.cluster.tap import tap_index, tap_streams

from .helpers import wait_until

STREAMS = 3
BASE = "mcloudtt:tap"


def _stored(dbs: list[Path]) -> list[str]:
    ids: list[str] = []
    for db in dbs:
        if db.exists():
            with duckdb.connect(str(db), read_only=True) as con:
                ids += [r[0] for r in con.execute("SELECT message_id FROM messages").fetchall()]
    return ids


def _replicas(adapter_process, urls: list[str], tmp_path: Path) -> tuple[list, list[Path]]:
    dbs = [tmp_path / f"replica-{i}.duckdb" for i in range(2)]
    adapters = [
        adapter_process(
            "--redis",
            urls[i],
            "--tap-streams",
            str(STREAMS),
            "--duckdb",
            str(db),
            "--consumer",
            f"replica-{i}",
            "--claim-idle",
            "1",
            "--batch-rows",
            "20",
            "--batch-delay",
            "0.05",
        )
        for i, db in enumerate(dbs)
    ]
    return adapters, dbs


def _receive_on(port: int, send, count: int) -> list[bytes]:
    """Payloads a subscriber to devices/# on the broker at `port` gets while `send()` runs."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[bytes] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda _c, _u, message: got.append(message.payload)
    sub.on_subscribe = lambda *_: subscribed.append(True)
    subscribed: list[bool] = []
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    try:
        sub.subscribe("devices/#", qos=0)
        wait_until(lambda: subscribed, 5)
        time.sleep(0.3)  # broadcast mode: nothing to announce, but let the SUBSCRIBE settle
        send()
        wait_until(lambda: len(got) >= count, 10)
    finally:
        sub.loop_stop()
        sub.disconnect()
    return got


def _rows(adapter) -> float:
    return adapter.metric("mcloudtt_adapter_rows_out_total", sink="duckdb")


def _drained(client, keys) -> bool:
    """Every entry of every stream delivered to the group and acknowledged (after commit)."""
    for key in keys:
        (group,) = client.xinfo_groups(key)
        if group["pending"] or group["lag"]:
            return False
    return True


def _kill_one_mid_stream(adapters, publish, total: int, client, keys) -> None:
    """Publish half, SIGKILL replica 0 once both stored some, publish the rest; the survivor
    claims what the dead one left pending (XAUTOCLAIM) and acknowledges everything."""
    for i in range(total // 2):
        publish(i)
    wait_until(lambda: _rows(adapters[0]) > 0 and _rows(adapters[1]) > 0, 20)
    adapters[0].kill()
    for i in range(total // 2, total):
        publish(i)
    wait_until(lambda: _drained(client, keys), 30, interval=0.2)
    assert adapters[1].stop(signal.SIGTERM) == 0, adapters[1].log()


def test_tap_stream_names() -> None:
    """N = 1 is today's key; N > 1 keys hash to slots in N different equal slot ranges."""
    from redis.crc import key_slot

    assert tap_streams(BASE) == (BASE,)
    keys = tap_streams(BASE, STREAMS)
    assert len(set(keys)) == STREAMS
    assert [key_slot(k.encode()) * STREAMS // 16384 for k in keys] == [0, 1, 2]
    with pytest.raises(ValueError, match="hash tag"):
        tap_streams("{mcloudtt}:tap", 2)
    # Every topic has one stream; the topics of a fleet spread over all of them.
    assert {tap_index(f"devices/d{i}/env".encode(), STREAMS) for i in range(30)} == {0, 1, 2}


def test_two_replicas_sharded_tap_single_redis(
    tmp_path, redis_server, mqtt_broker, adapter_process, publisher
) -> None:
    """Real brokers write three tap streams on one Redis; two adapter replicas share them; one
    is SIGKILLed mid-stream and every message is still stored (at least once)."""
    brokers = [
        mqtt_broker(
            "--redis",
            redis_server.url,
            "--id",
            name,
            "--tap-stream",
            BASE,
            "--tap-streams",
            str(STREAMS),
        )
        for name in ("shard-a", "shard-b")
    ]
    for b in brokers:
        wait_until(lambda b=b: b.http_get("/readyz")[0] == 200, 15)
    adapters, dbs = _replicas(adapter_process, [redis_server.url] * 2, tmp_path)
    pubs = [publisher(b.port, f"dev-{i}") for i, b in enumerate(brokers)]
    total = 400

    def publish(i: int) -> None:
        pubs[i % 2].publish(f"devices/d{i % 12}/env", orjson.dumps({"seq": i}), qos=i % 2)

    r = redis.Redis(port=redis_server.port)
    _kill_one_mid_stream(adapters, publish, total, r, tap_streams(BASE, STREAMS))
    stored = set(_stored(dbs))
    lengths = [r.xlen(key) for key in tap_streams(BASE, STREAMS)]
    assert not r.exists(BASE)  # nothing on the unsharded key
    assert all(lengths) and sum(lengths) == total, lengths
    seqs = set()
    for db in dbs:
        with duckdb.connect(str(db), read_only=True) as con:
            rows = con.execute("SELECT payload FROM messages").fetchall()
        seqs |= {orjson.loads(p)["seq"] for (p,) in rows}
    assert seqs == set(range(total))
    assert len(stored) == total  # message ids: origin:sequence, one per publish
    assert all(_stored([db]) for db in dbs)  # both replicas had a share


def test_two_replicas_sharded_tap_redis_cluster(
    tmp_path, redis_cluster, mqtt_broker, adapter_process, publisher
) -> None:
    """On a real Redis Cluster: the three streams sit on three different primaries; real
    brokers write them; two replicas (one given a seed list) read them with redis-py's
    RedisCluster client, and one is SIGKILLed mid-stream."""
    client = redis_cluster.client()
    keys = tap_streams(BASE, STREAMS)
    assert len({client.get_node_from_key(key).port for key in keys}) == STREAMS
    brokers = [
        mqtt_broker(
            "--redis",
            redis_cluster.seed_url,
            "--id",
            name,
            "--tap-stream",
            BASE,
            "--tap-streams",
            str(STREAMS),
        )
        for name in ("cshard-a", "cshard-b")
    ]
    for b in brokers:
        wait_until(lambda b=b: b.http_get("/readyz")[0] == 200, 20)
    adapters, dbs = _replicas(
        adapter_process, [redis_cluster.seed_url, redis_cluster.seeds_url], tmp_path
    )
    pubs = [publisher(b.port, f"cdev-{i}") for i, b in enumerate(brokers)]
    total = 300

    def publish(i: int) -> None:
        pubs[i % 2].publish(f"devices/d{i % 12}/env", orjson.dumps({"seq": i}), qos=1)

    _kill_one_mid_stream(adapters, publish, total, client, keys)
    stored = set(_stored(dbs))
    assert len(stored) == total and {i.split(":")[0] for i in stored} == {"cshard-a", "cshard-b"}
    assert all(client.xlen(key) for key in keys)
    assert all(_stored([db]) for db in dbs)  # both replicas had a share
    client.close()


def test_broadcast_on_sharded_pubsub(
    tmp_path, redis_server, mqtt_broker, adapter_process, publisher
) -> None:
    """--sharded-pubsub: broadcast mode's channel on SPUBLISH/SSUBSCRIBE; brokers deliver QoS 0
    from it and the adapter's Pub/Sub tap reads it; nothing on the classic channel."""
    args = ("--redis", redis_server.url, "--cluster-mode", "broadcast", "--sharded-pubsub", "true")
    a = mqtt_broker(*args, "--id", "spub-a")
    b = mqtt_broker(*args, "--id", "spub-b")
    for broker in (a, b):
        wait_until(lambda broker=broker: broker.http_get("/readyz")[0] == 200, 15)
    db = tmp_path / "sharded.duckdb"
    adapter = adapter_process(
        "--redis",
        redis_server.url,
        "--redis-mode",
        "pubsub",
        "--sharded-pubsub",
        "true",
        "--duckdb",
        str(db),
    )
    r = redis.Redis(port=redis_server.port)
    wait_until(lambda: r.pubsub_shardnumsub("sync")[0][1] == 3, 10)  # two brokers, the adapter
    assert r.pubsub_numsub("sync")[0][1] == 0
    pub = publisher(a.port, "dev-spub")
    got = _receive_on(
        b.port,
        lambda: [
            pub.publish(f"devices/d{i % 3}/env", orjson.dumps({"seq": i}), qos=0) for i in range(20)
        ],
        20,
    )
    wait_until(lambda: _rows(adapter) >= 20, 10)
    assert adapter.stop(signal.SIGTERM) == 0, adapter.log()
    assert sorted(orjson.loads(p)["seq"] for p in got) == list(range(20))


def test_broadcast_on_a_redis_cluster_is_sharded(
    tmp_path, redis_cluster, mqtt_broker, adapter_process, publisher
) -> None:
    """Broadcast mode on a Redis Cluster takes sharded Pub/Sub by itself (brokers and the
    adapter's Pub/Sub tap): QoS 0 crosses brokers through SSUBSCRIBE on the channel's shard,
    the adapter stores it, and no node carries the classic channel."""
    args = ("--redis", redis_cluster.seed_url, "--cluster-mode", "broadcast")
    a = mqtt_broker(*args, "--id", "cspub-a")
    b = mqtt_broker(*args, "--id", "cspub-b")
    for broker in (a, b):
        wait_until(lambda broker=broker: broker.http_get("/readyz")[0] == 200, 20)
    db = tmp_path / "cluster-sync.duckdb"
    adapter = adapter_process(
        "--redis", redis_cluster.seed_url, "--redis-mode", "pubsub", "--duckdb", str(db)
    )
    owner = redis_cluster.primary_for("sync")
    with owner.client() as shard:
        wait_until(lambda: shard.pubsub_shardnumsub("sync")[0][1] == 3, 10)
    for node in redis_cluster.live_nodes():
        with node.client() as r:
            assert r.pubsub_numsub("sync")[0][1] == 0
    pub = publisher(a.port, "cdev-spub")
    got = _receive_on(
        b.port,
        lambda: [
            pub.publish(f"devices/d{i % 3}/env", orjson.dumps({"seq": i}), qos=0) for i in range(20)
        ],
        20,
    )
    assert sorted(orjson.loads(p)["seq"] for p in got) == list(range(20))
    wait_until(lambda: _rows(adapter) >= 20, 10)
    assert adapter.stop(signal.SIGTERM) == 0, adapter.log()
    assert len(set(_stored([db]))) == 20
