"""The Redis tap sources against a real redis-server: the stream (consumer group) and Pub/Sub."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import duckdb
import orjson
import redis
from mcloudtt_adapter.app import Adapter, AdapterConfig
from mcloudtt_adapter.records import Batch
from mcloudtt_adapter.sinks.base import MemorySink, SinkError, WriteResult
from mcloudtt_adapter.sources.redis import RedisPubSubSource, RedisStreamSource
from mcloudtt_broker.cluster.envelope import Envelope, encode_envelope
from mcloudtt_broker.mqtt.properties import Properties

from .helpers import wait_until

STREAM = "mcloudtt:tap"
T0 = 1_767_225_600_000_000


def envelope(
    seq: int,
    *,
    origin: str = "broker-a",
    topic: str | None = None,
    payload: bytes | None = None,
    qos: int = 1,
    retain: bool = False,
    properties: Properties | None = None,
) -> bytes:
    return encode_envelope(
        Envelope(
            origin=origin,
            sequence=seq,
            received_at_us=T0 + seq * 1000,
            client_id=f"dev-{seq % 4}",
            topic=topic or f"devices/d{seq % 4}/env",
            payload=payload
            if payload is not None
            else orjson.dumps({"temp": 20 + seq % 10, "seq": seq}),
            qos=qos,
            retain=retain,
            **({"properties": properties} if properties is not None else {}),
        )
    )


def xadd(r: redis.Redis, start: int, count: int, **kw: Any) -> None:
    pipe = r.pipeline()
    for seq in range(start, start + count):
        pipe.xadd(STREAM, {"e": envelope(seq, **kw)})
    pipe.execute()


def pending(r: redis.Redis, group: str = "mcloudtt-adapter") -> int:
    return int(r.xpending(STREAM, group)["pending"])


def test_stream_into_duckdb_via_the_command(tmp_path: Path, redis_server, adapter_process) -> None:
    r = redis.Redis.from_url(redis_server.url)
    xadd(r, 0, 100)
    props = Properties(content_type="text/plain", user_properties=(("k", "v"),))
    r.xadd(STREAM, {"e": envelope(100, payload=b"\x00\xffbinary", retain=True, properties=props)})
    r.xadd(STREAM, {"e": b"\x07not an envelope"})  # counted, acknowledged, not stored
    r.xadd(STREAM, {"other": b"field"})  # not a tap entry
    db = tmp_path / "tap.duckdb"
    adapter = adapter_process("--redis", redis_server.url, "--duckdb", str(db), "--consumer", "c1")
    wait_until(lambda: adapter.metric("mcloudtt_adapter_rows_out_total", sink="duckdb") >= 101, 15)
    wait_until(lambda: pending(r) == 0, 5)  # XACKed after the commit, bad entries included
    assert adapter.metric("mcloudtt_adapter_bad_messages_total", source="stream") == 1
    xadd(r, 101, 50)  # live entries after the backlog
    wait_until(lambda: adapter.metric("mcloudtt_adapter_rows_out_total", sink="duckdb") >= 151, 15)
    assert adapter.stop(signal.SIGTERM) == 0, adapter.log()
    r.close()
    with duckdb.connect(str(db), read_only=True) as con:
        got = con.execute(
            "SELECT message_id, broker_id, client_id, source, device_id, qos, retain, payload, "
            "properties, event_time, receive_time FROM messages ORDER BY receive_time"
        ).fetchall()
    assert len(got) == 151
    assert [g[0] for g in got] == [f"broker-a:{i}" for i in range(151)]
    first = got[0]
    assert first[1:7] == ("broker-a", "dev-0", "stream", "d0", 1, False)
    assert first[9] == first[10]  # no time in the payload: the broker's receive time
    assert first[9].isoformat() == "2026-01-01T00:00:00"
    odd = got[100]
    assert odd[6] is True and odd[7] == b"\x00\xffbinary"
    assert json.loads(odd[8]) == {"content_type": "text/plain", "user_properties": [["k", "v"]]}


class _Stuck(MemorySink):
    def write(self, batch: Batch) -> WriteResult:
        raise SinkError("store down")


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


def _stream_adapter(url: str, sink: Any, consumer: str, claim_idle: float = 60.0) -> Adapter:
    source = RedisStreamSource(url, consumer=consumer, claim_idle=claim_idle, block_ms=100)
    return Adapter(AdapterConfig(batch_delay=0.02), sink=sink, sources=[source])


def test_unacknowledged_entries_survive_a_crash(redis_server) -> None:
    r = redis.Redis.from_url(redis_server.url)
    xadd(r, 0, 30)

    async def main() -> None:
        crashed = _stream_adapter(redis_server.url, _Stuck(), "c1")
        await crashed.start()
        await _until(lambda: crashed.pipeline.pending == 30)
        assert pending(r) == 30  # delivered, never acknowledged: the store did not commit
        crashed.pipeline.abandon.set()
        await crashed.stop()
        assert pending(r) == 30
        # The same consumer comes back: it re-reads its own pending entries first.
        sink = MemorySink()
        again = _stream_adapter(redis_server.url, sink, "c1")
        await again.start()
        await _until(lambda: len(sink.rows) == 30 and pending(r) == 0)
        await again.stop()
        assert sorted(row["message_id"] for row in sink.rows) == sorted(
            f"broker-a:{i}" for i in range(30)
        )

    asyncio.run(main())
    r.close()


def test_entries_of_a_dead_consumer_are_claimed(redis_server) -> None:
    r = redis.Redis.from_url(redis_server.url)
    xadd(r, 0, 25)

    async def main() -> None:
        dead = _stream_adapter(redis_server.url, _Stuck(), "dead-replica")
        await dead.start()
        await _until(lambda: dead.pipeline.pending == 25)
        dead.pipeline.abandon.set()
        await dead.stop()
        sink = MemorySink()
        other = _stream_adapter(redis_server.url, sink, "live-replica", claim_idle=0.3)
        await other.start()
        await _until(lambda: len(sink.rows) == 25 and pending(r) == 0)
        await other.stop()

    asyncio.run(main())
    r.close()


def test_stream_source_rides_out_a_redis_restart(redis_server) -> None:
    async def main() -> None:
        r = redis.Redis.from_url(redis_server.url)
        xadd(r, 0, 40)
        sink = MemorySink()
        adapter = _stream_adapter(redis_server.url, sink, "c1")
        await adapter.start()
        await _until(lambda: len(sink.rows) == 40)
        r.close()
        redis_server.kill()
        await asyncio.sleep(0.3)
        assert not adapter.sources[0].connected
        redis_server.restart()  # no persistence: the stream and its group are gone
        r = redis.Redis.from_url(redis_server.url)
        await _until(lambda: adapter.sources[0].connected, 15)
        xadd(r, 40, 40)
        await _until(lambda: len(sink.rows) == 80, 15)
        assert await adapter.stop()
        r.close()
        assert sorted(row["message_id"] for row in sink.rows) == sorted(
            f"broker-a:{i}" for i in range(80)
        )

    asyncio.run(main())


def test_pubsub_channel(redis_server) -> None:
    async def main() -> None:
        sink = MemorySink()
        source = RedisPubSubSource(redis_server.url, channel="sync")
        adapter = Adapter(AdapterConfig(batch_delay=0.02), sink=sink, sources=[source])
        await adapter.start()
        await asyncio.wait_for(source.subscribed.wait(), 10)
        r = redis.Redis.from_url(redis_server.url)
        for seq in range(60):
            r.publish("sync", envelope(seq, origin="broker-b"))
        r.publish("sync", b"garbage")
        await _until(lambda: len(sink.rows) == 60)
        assert source.bad == 1
        assert await adapter.stop()
        r.close()
        assert {row["source"] for row in sink.rows} == {"pubsub"}
        assert {row["broker_id"] for row in sink.rows} == {"broker-b"}

    asyncio.run(main())
