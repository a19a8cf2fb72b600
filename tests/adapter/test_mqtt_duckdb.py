"""A real broker process feeding the adapter (its console script) into a real DuckDB file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import duckdb
import orjson
from mcloudtt_adapter.app import Adapter, AdapterConfig
from mcloudtt_adapter.records import Batch
from mcloudtt_adapter.sinks.base import MemorySink, SinkError, WriteResult
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .helpers import Publisher, wait_until


def rows(
    path: Path, sql: str = "SELECT * FROM messages ORDER BY receive_time, message_id"
) -> list[dict[str, Any]]:
    with duckdb.connect(str(path), read_only=True) as con:
        cursor = con.execute(sql)
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]


def test_broker_to_duckdb_every_payload_kind(
    tmp_path, mqtt_broker, adapter_process, publisher
) -> None:
    broker = mqtt_broker()
    db = tmp_path / "data.duckdb"
    adapter = adapter_process(
        "--mqtt",
        f"127.0.0.1:{broker.port}",
        "--duckdb",
        str(db),
        "--client-id",
        "adapter-e2e",
        "--broker-id",
        "b1",
    )
    pub = publisher(broker.port, "dev-pub")
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    props.UserProperty = [("site", "berlin")]
    one_mb = os.urandom(1_048_576)
    sent: list[tuple[str, bytes, int, bool]] = [
        (
            "devices/d1/env",
            b'{"ts": 1767225600.25, "temp": 21.5, "hum": 40, "status": "ok"}',
            1,
            False,
        ),
        ("devices/d2/env", b'{"temp": 19}', 0, False),  # no time field
        ("devices/d3/raw", bytes(range(256)) * 4, 1, False),  # binary
        ("devices/d4/blob", one_mb, 1, False),  # 1 MB, not UTF-8
        ("devices/d5/env", b'{"temp": 21.5, "broken"', 1, False),  # malformed JSON
        ("plant/line/7", b'{"pressure": 1.2}', 1, False),  # no device anywhere
        ("devices/d6/state", b'{"on": true}', 1, True),  # retained
        ("devices/d7/temperature", b"23.25", 1, False),  # bare number
        ("devices/d8/empty", b"", 1, False),
    ]
    for topic, payload, qos, retain in sent:
        pub.publish(topic, payload, qos=qos, retain=retain)
    pub.publish("devices/d9/env", b'{"temp": 1}', qos=1, properties=props)
    old = publisher(broker.port, "v311-pub", version=4)
    old.publish("devices/d10/env", b'{"temp": 2}', qos=1)
    total = len(sent) + 2
    wait_until(
        lambda: adapter.metric("mcloudtt_adapter_rows_out_total", sink="duckdb") >= total, 15
    )
    assert adapter.metric("mcloudtt_adapter_acked_total", source="mqtt") == total - 1  # one QoS 0
    status, metrics = adapter.get("/metrics")
    assert status == 200 and "mcloudtt_adapter_batch_seconds_bucket" in metrics
    assert adapter.get("/healthz")[0] == 200
    assert adapter.stop(signal.SIGTERM) == 0, adapter.log()

    got = {r["topic"]: r for r in rows(db)}
    assert len(got) == total
    for topic, payload, qos, retain in sent:
        row = got[topic]
        assert row["payload"] == payload, topic
        assert row["payload_size"] == len(payload)
        assert row["qos"] == qos and row["retain"] == retain, topic
        assert row["broker_id"] == "b1" and row["source"] == "mqtt"
    d1 = got["devices/d1/env"]
    assert d1["device_id"] == "d1"
    assert d1["event_time"].isoformat() == "2026-01-01T00:00:00.250000"
    assert d1["event_time"] != d1["receive_time"]
    assert {m["name"]: m["value"] for m in d1["metrics"]} == {"temp": 21.5, "hum": 40.0}
    assert json.loads(d1["attributes"]) == {"status": "ok"}
    assert got["devices/d2/env"]["event_time"] == got["devices/d2/env"]["receive_time"]
    assert got["devices/d3/raw"]["payload_format"] == "binary"
    assert got["devices/d4/blob"]["payload_format"] == "binary"
    assert got["devices/d5/env"]["payload_format"] == "text"
    assert got["plant/line/7"]["device_id"] is None
    assert got["devices/d7/temperature"]["metrics"] == [{"name": "temperature", "value": 23.25}]
    assert got["devices/d8/empty"]["payload_format"] == "empty"
    assert json.loads(got["devices/d9/env"]["properties"]) == {
        "content_type": "application/json",
        "user_properties": [["site", "berlin"]],
    }
    assert got["devices/d10/env"]["device_id"] == "d10"
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute(
            "SELECT schema_version FROM mcloudtt_meta WHERE name = 'messages'"
        ).fetchone() == (1,)


def test_nothing_lost_while_the_adapter_restarts(
    tmp_path, mqtt_broker, adapter_process, publisher
) -> None:
    broker = mqtt_broker()
    db = tmp_path / "data.duckdb"
    args = (
        "--mqtt",
        f"127.0.0.1:{broker.port}",
        "--duckdb",
        str(db),
        "--client-id",
        "adapter-restart",
    )
    adapter = adapter_process(*args)
    pub = publisher(broker.port, "restart-pub")
    for i in range(50):
        pub.publish(f"devices/d{i % 5}/env", orjson.dumps({"seq": i}))
    wait_until(lambda: adapter.metric("mcloudtt_adapter_rows_out_total", sink="duckdb") >= 50)
    assert adapter.stop(signal.SIGTERM) == 0, adapter.log()
    for i in range(50, 250):  # published while no adapter runs: the broker queues them
        pub.publish(f"devices/d{i % 5}/env", orjson.dumps({"seq": i}))
    adapter = adapter_process(*args)
    wait_until(lambda: adapter.metric("mcloudtt_adapter_rows_out_total", sink="duckdb") >= 200, 15)
    assert adapter.stop(signal.SIGTERM) == 0, adapter.log()
    seqs = sorted(
        int(json.loads(r["payload"])["seq"]) for r in rows(db, "SELECT payload FROM messages")
    )
    assert seqs == list(range(250))


class _Stuck(MemorySink):
    """A sink that never commits: nothing may be acknowledged."""

    def write(self, batch: Batch) -> WriteResult:
        raise SinkError("down")


def test_a_crash_before_commit_redelivers(mqtt_broker, publisher) -> None:
    broker = mqtt_broker()
    pub = publisher(broker.port, "crash-pub")

    async def main() -> None:
        config = AdapterConfig(
            mqtt=("127.0.0.1", broker.port), client_id="adapter-crash", batch_delay=0.02
        )
        first = Adapter(config, sink=_Stuck())
        await first.start()
        await _until(lambda: first.sources[0].connected)
        for i in range(20):
            await asyncio.to_thread(pub.publish, "devices/d1/env", orjson.dumps({"seq": i}))
        await _until(lambda: first.pipeline.pending == 20)
        # Crash: the connection drops without DISCONNECT and nothing was committed or acked.
        conn = first.sources[0]._conn  # type: ignore[attr-defined]
        first.pipeline.abandon.set()
        conn.transport.abort()
        await first.stop()
        sink = MemorySink()
        second = Adapter(config, sink=sink)
        await second.start()
        await _until(lambda: len(sink.rows) >= 20, 10)
        assert sorted(orjson.loads(r["payload"])["seq"] for r in sink.rows) == list(range(20))
        await second.stop()

    asyncio.run(main())


def test_shared_subscription_splits_the_load(mqtt_broker, publisher) -> None:
    broker = mqtt_broker()
    pub = publisher(broker.port, "split-pub")

    async def main() -> None:
        sinks = [MemorySink(), MemorySink()]
        adapters = [
            Adapter(
                AdapterConfig(
                    mqtt=("127.0.0.1", broker.port), client_id=f"replica-{i}", batch_delay=0.02
                ),
                sink=s,
            )
            for i, s in enumerate(sinks)
        ]
        for a in adapters:
            await a.start()
        await _until(lambda: all(a.sources[0].connected for a in adapters))
        for i in range(200):
            await asyncio.to_thread(pub.publish, f"devices/d{i % 7}/env", orjson.dumps({"seq": i}))
        await _until(lambda: sum(len(s.rows) for s in sinks) >= 200, 10)
        seqs = [orjson.loads(r["payload"])["seq"] for s in sinks for r in s.rows]
        assert sorted(seqs) == list(range(200))  # every message once, across the replicas
        assert all(len(s.rows) >= 50 for s in sinks)  # and both did a share
        for a in adapters:
            await a.stop()

    asyncio.run(main())


def test_bad_arguments_exit_2(tmp_path) -> None:
    import subprocess

    from .helpers import adapter_command

    result = subprocess.run(
        [*adapter_command(), "run", "--duckdb", str(tmp_path / "x.duckdb")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "give a source" in result.stderr
    result = subprocess.run(
        [*adapter_command(), "--mqtt", "nohost"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "HOST:PORT" in result.stderr


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


def test_reconnects_when_the_broker_comes_back(mqtt_broker, publisher) -> None:
    from brokerproc import BrokerProcess

    broker = mqtt_broker()
    port = broker.port

    async def main() -> None:
        sink = MemorySink()
        adapter = Adapter(
            AdapterConfig(
                mqtt=("127.0.0.1", port), client_id="adapter-reconnect", batch_delay=0.02
            ),
            sink=sink,
        )
        await adapter.start()
        source = adapter.sources[0]
        await _until(lambda: source.connected)
        pub = await asyncio.to_thread(Publisher, port, "before")
        for i in range(10):
            await asyncio.to_thread(pub.publish, "devices/d1/env", orjson.dumps({"seq": i}))
        await _until(lambda: len(sink.rows) == 10)
        await asyncio.to_thread(pub.close)
        await asyncio.to_thread(broker.stop)
        await _until(lambda: not source.connected)
        again = BrokerProcess("--log-level", "warning", "--sys-interval", "0")
        again.port = port  # the same address: the adapter's reconnect loop finds it
        await asyncio.to_thread(again.start)
        try:
            await _until(lambda: source.connected, 15)
            pub = await asyncio.to_thread(Publisher, port, "after")
            for i in range(10, 20):
                await asyncio.to_thread(pub.publish, "devices/d1/env", orjson.dumps({"seq": i}))
            await _until(lambda: len(sink.rows) == 20)
            await asyncio.to_thread(pub.close)
            assert source.connects == 2  # type: ignore[attr-defined]
            await adapter.stop()
        finally:
            again.stop()
            if again.proc is not None and again.proc.stdout is not None:
                again.proc.stdout.close()

    asyncio.run(main())


def test_a_locked_duckdb_file_is_a_clear_failure(tmp_path, mqtt_broker, adapter_process) -> None:
    broker = mqtt_broker()
    db = tmp_path / "data.duckdb"
    first = adapter_process(
        "--mqtt", f"127.0.0.1:{broker.port}", "--duckdb", str(db), "--client-id", "a1"
    )
    second = adapter_process(
        "--mqtt", f"127.0.0.1:{broker.port}", "--duckdb", str(db), "--client-id", "a2", ready=False
    )
    assert second.proc is not None
    assert second.proc.wait(20) == 1
    assert "cannot open" in second.log()
    assert first.get("/readyz")[0] == 200
    assert first.stop() == 0
