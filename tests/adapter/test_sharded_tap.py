"""The sharded tap (issue 15): N tap streams by topic hash, every adapter replica reading its
share through one consumer group per stream; nothing lost when a replica dies mid-stream.

Against a single Redis with real brokers, and against a real Redis Cluster (three primaries,
three replicas on loopback) where each stream sits on its own shard.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import orjson
import pytest
import redis
from mcloudtt_broker.cluster.envelope import Envelope, encode_envelope
from mcloudtt_broker.cluster.tap import tap_index, tap_streams
from mcloudtt_chaos.procs import RedisServer, free_port, wait_for

from .helpers import wait_until

STREAMS = 3
BASE = "mcloudtt:tap"


class MiniRedisCluster:
    """Three primaries and three replicas (`redis-cli --cluster create --cluster-replicas 1`).

    A stand-in until tests/rediscluster.py (the broker's cluster slice) lands on main."""

    def __init__(self) -> None:
        self.nodes = [
            RedisServer(
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    str(free_port()),  # the bus port: not port + 10000
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
                name=f"redis-cluster-{i}",
            )
            for i in range(6)
        ]

    def start(self) -> MiniRedisCluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for node in self.nodes:
            client = redis.Redis(port=node.port)
            wait_for(
                lambda c=client: (
                    c.info("cluster")["cluster_enabled"]
                    and c.cluster("info")["cluster_state"] == "ok"
                ),
                timeout=30,
                what="cluster_state:ok",
            )
            client.close()
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port)

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[MiniRedisCluster]:
    cluster = MiniRedisCluster()
    try:
        yield cluster.start()
    finally:
        cluster.close()


def _stored(dbs: list[Path]) -> list[str]:
    ids: list[str] = []
    for db in dbs:
        if db.exists():
            with duckdb.connect(str(db), read_only=True) as con:
                ids += [r[0] for r in con.execute("SELECT message_id FROM messages").fetchall()]
    return ids


def _replicas(adapter_process, url: str, tmp_path: Path) -> tuple[list, list[Path]]:
    dbs = [tmp_path / f"replica-{i}.duckdb" for i in range(2)]
    adapters = [
        adapter_process(
            "--redis",
            url,
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
    adapters, dbs = _replicas(adapter_process, redis_server.url, tmp_path)
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


def test_two_replicas_sharded_tap_redis_cluster(tmp_path, redis_cluster, adapter_process) -> None:
    """On a real Redis Cluster: the three streams sit on three different primaries; the tap
    is written as a broker writes it (envelopes, stream by topic hash); two replicas read it
    with redis-py's RedisCluster client and one is SIGKILLed mid-stream."""
    client = redis_cluster.client()
    keys = tap_streams(BASE, STREAMS)
    owners = {client.get_node_from_key(key).port for key in keys}
    assert len(owners) == STREAMS  # each stream on its own shard
    adapters, dbs = _replicas(adapter_process, redis_cluster.url, tmp_path)
    total = 300

    def publish(i: int) -> None:
        topic = f"devices/d{i % 12}/env"
        raw = topic.encode()
        envelope = encode_envelope(
            Envelope(
                origin="cluster-broker",
                sequence=i + 1,
                received_at_us=time.time_ns() // 1000,
                client_id="dev",
                topic=topic,
                payload=orjson.dumps({"seq": i}),
                qos=1,
            )
        )
        key = keys[tap_index(len(raw).to_bytes(2, "big") + raw, STREAMS)]
        client.xadd(key, {"e": envelope})

    _kill_one_mid_stream(adapters, publish, total, client, keys)
    assert set(_stored(dbs)) == {f"cluster-broker:{i + 1}" for i in range(total)}
    assert all(client.xlen(key) for key in keys)
    assert all(_stored([db]) for db in dbs)  # both replicas had a share
    client.close()


def test_broadcast_on_sharded_pubsub(
    tmp_path, redis_server, mqtt_broker, adapter_process, publisher
) -> None:
    """--sharded-pubsub: broadcast mode's channel on SPUBLISH/SSUBSCRIBE; brokers deliver QoS 0
    from it and the adapter's Pub/Sub tap reads it; nothing on the classic channel."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

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
    got: list[bytes] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda _c, _u, message: got.append(message.payload)
    sub.connect("127.0.0.1", b.port)
    sub.loop_start()
    try:
        sub.subscribe("devices/#", qos=0)
        time.sleep(0.3)
        pub = publisher(a.port, "dev-spub")
        for i in range(20):
            pub.publish(f"devices/d{i % 3}/env", orjson.dumps({"seq": i}), qos=0)
        wait_until(lambda: len(got) >= 20, 10)
    finally:
        sub.loop_stop()
        sub.disconnect()
    wait_until(lambda: _rows(adapter) >= 20, 10)
    assert adapter.stop(signal.SIGTERM) == 0, adapter.log()
    assert sorted(orjson.loads(p)["seq"] for p in got) == list(range(20))


def test_sharded_pubsub_tap_on_redis_cluster(tmp_path, redis_cluster, adapter_process) -> None:
    """The adapter's Pub/Sub tap on a Redis Cluster: SSUBSCRIBE on the channel's shard (redis-py
    follows the slot) receives what a broker SPUBLISHes through any node."""
    client = redis_cluster.client()
    db = tmp_path / "cluster-sync.duckdb"
    adapter = adapter_process(
        "--redis",
        redis_cluster.url,
        "--redis-mode",
        "pubsub",
        "--sharded-pubsub",
        "true",
        "--duckdb",
        str(db),
    )
    owner = client.get_node_from_key("sync")
    shard = redis.Redis(port=owner.port)
    wait_until(lambda: shard.pubsub_shardnumsub("sync")[0][1] == 1, 10)
    for i in range(25):
        envelope = encode_envelope(
            Envelope(origin="cluster-broker", sequence=i + 1, received_at_us=time.time_ns() // 1000,
                     client_id="dev", topic="devices/d1/env", payload=orjson.dumps({"seq": i}))
        )  # fmt: skip
        client.spublish("sync", envelope)
    wait_until(lambda: _rows(adapter) >= 25, 10)
    assert adapter.stop(signal.SIGTERM) == 0, adapter.log()
    assert len(set(_stored([db]))) == 25
    shard.close()
    client.close()
