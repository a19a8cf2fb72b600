"""Real brokers in a Redis cluster write the tap; the adapter reads it into DuckDB."""

from __future__ import annotations

import signal

import duckdb
import orjson

from .helpers import wait_until


def test_two_brokers_tap_stream_into_duckdb(
    tmp_path, redis_server, mqtt_broker, adapter_process, publisher
) -> None:
    brokers = [
        mqtt_broker("--redis", redis_server.url, "--id", name, "--tap-stream", "mcloudtt:tap")
        for name in ("broker-a", "broker-b")
    ]
    db = tmp_path / "tap.duckdb"
    adapter = adapter_process(
        "--redis", redis_server.url, "--duckdb", str(db), "--consumer", "tap-1"
    )
    for b in brokers:
        wait_until(lambda b=b: b.http_get("/readyz")[0] == 200, 15)
    pubs = [publisher(b.port, f"dev-{i}") for i, b in enumerate(brokers)]
    for i in range(60):
        pubs[i % 2].publish(
            f"devices/d{i % 6}/env", orjson.dumps({"seq": i, "temp": 20 + i % 5}), qos=i % 2
        )
    wait_until(lambda: adapter.metric("mcloudtt_adapter_rows_out_total", sink="duckdb") >= 60, 20)
    assert adapter.stop(signal.SIGTERM) == 0, adapter.log()
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute(
            "SELECT message_id, broker_id, client_id, source, device_id, qos, payload FROM messages"
        ).fetchall()
    assert len(rows) == 60  # each publish once: the tap is written by the accepting broker only
    assert len({r[0] for r in rows}) == 60
    assert {r[1] for r in rows} == {"broker-a", "broker-b"}
    assert {r[2] for r in rows} == {"dev-0", "dev-1"}
    assert {r[3] for r in rows} == {"stream"}
    assert sorted(orjson.loads(r[6])["seq"] for r in rows) == list(range(60))
    by_seq = {orjson.loads(r[6])["seq"]: r for r in rows}
    assert by_seq[1][5] == 1 and by_seq[2][5] == 0
    assert by_seq[7][4] == "d1"


def test_broadcast_channel_into_duckdb(
    tmp_path, redis_server, mqtt_broker, adapter_process, publisher
) -> None:
    broker = mqtt_broker(
        "--redis", redis_server.url, "--id", "broker-c", "--cluster-mode", "broadcast"
    )
    wait_until(lambda: broker.http_get("/readyz")[0] == 200, 15)
    db = tmp_path / "sync.duckdb"
    adapter = adapter_process(
        "--redis", redis_server.url, "--redis-mode", "pubsub", "--duckdb", str(db)
    )
    pub = publisher(broker.port, "dev-sync")
    for i in range(30):
        pub.publish(f"devices/d{i % 3}/env", orjson.dumps({"seq": i}))
    wait_until(lambda: adapter.metric("mcloudtt_adapter_rows_out_total", sink="duckdb") >= 30, 20)
    assert adapter.stop(signal.SIGTERM) == 0, adapter.log()
    with duckdb.connect(str(db), read_only=True) as con:
        got = con.execute("SELECT DISTINCT broker_id, source FROM messages").fetchall()
        count = con.execute("SELECT COUNT(*) FROM messages").fetchone()
    assert got == [("broker-c", "pubsub")] and count == (30,)


def test_signed_tap_forged_entries_dropped(
    tmp_path, redis_server, mqtt_broker, adapter_process, publisher
) -> None:
    """With --cluster-key-file on both sides the broker tags tap entries and the adapter
    takes only those: an entry written to the stream without the key is counted and dropped."""
    import redis
    from mcloudtt_broker.cluster.envelope import Envelope, encode_envelope

    key = tmp_path / "cluster.key"
    key.write_text("s" * 40 + "\n")
    broker = mqtt_broker(
        "--redis", redis_server.url, "--id", "broker-k", "--tap-stream", "mcloudtt:tap",
        "--cluster-key-file", str(key),
    )  # fmt: skip
    wait_until(lambda: broker.http_get("/readyz")[0] == 200, 15)
    forged = encode_envelope(
        Envelope(origin="intruder", sequence=1, received_at_us=0, client_id="x",
                 topic="devices/evil/env", payload=b'{"seq": -1}')
    )  # fmt: skip
    r = redis.Redis(port=redis_server.port)
    r.xadd("mcloudtt:tap", {"e": forged})
    r.xadd("mcloudtt:tap", {"e": forged, "t": b"\x00" * 32})
    db = tmp_path / "signed.duckdb"
    adapter = adapter_process(
        "--redis", redis_server.url, "--duckdb", str(db), "--consumer", "tap-k",
        "--cluster-key-file", str(key),
    )  # fmt: skip
    pub = publisher(broker.port, "dev-k")
    for i in range(10):
        pub.publish("devices/d1/env", orjson.dumps({"seq": i}), qos=1)
    wait_until(lambda: adapter.metric("mcloudtt_adapter_rows_out_total", sink="duckdb") >= 10, 20)
    assert adapter.metric("mcloudtt_adapter_bad_messages_total", source="stream") == 2
    assert adapter.stop(signal.SIGTERM) == 0, adapter.log()
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT broker_id, payload FROM messages").fetchall()
    assert len(rows) == 10
    assert {r[0] for r in rows} == {"broker-k"}
