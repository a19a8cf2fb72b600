"""The BigQuery sink and the analysis through the real google-cloud-bigquery client, against a
local bqemulator (REST API on a free port; installed once into a cache, see helpers.py)."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
from typing import Any

import orjson
import pytest
import redis
from mcloudtt_adapter.analysis import (
    Analysis,
    AnomalyRules,
    BigQueryEngine,
    DuckDBEngine,
    Threshold,
    Window,
)
from mcloudtt_adapter.sinks.bigquery import BigQuerySink
from mcloudtt_adapter.sinks.deadletter import FileDeadLetter, MemoryDeadLetter
from mcloudtt_adapter.sinks.duckdb import DuckDBSink

from .helpers import T0, FaultProxy, fleet, make_batch, wait_until

_tables = itertools.count()


def table_id(emulator: Any, name: str) -> str:
    return f"{emulator.project}.adapter_tests.{name}_{os.getpid()}_{next(_tables)}"


def query(client: Any, sql: str) -> list[dict[str, Any]]:
    return [dict(r) for r in client.query(sql).result()]


def test_table_is_created_partitioned_and_clustered(bigquery_emulator) -> None:
    tid = table_id(bigquery_emulator, "created")
    sink = BigQuerySink(tid, endpoint=bigquery_emulator.endpoint)
    sink.open()
    table = sink.client.get_table(tid)
    assert table.time_partitioning.field == "event_time"
    assert table.time_partitioning.type_ == "DAY"
    assert table.clustering_fields == ["device_id", "topic"]
    assert table.labels == {"mcloudtt_schema": "1"}
    assert [f.name for f in table.schema][:3] == ["message_id", "event_time", "ingest_time"]
    metrics = next(f for f in table.schema if f.name == "metrics")
    assert metrics.mode == "REPEATED" and [f.name for f in metrics.fields] == ["name", "value"]
    sink.open()  # a second open finds the table and accepts its version
    sink.close()


def test_payload_edge_cases_round_trip(bigquery_emulator) -> None:
    tid = table_id(bigquery_emulator, "edge")
    sink = BigQuerySink(tid, endpoint=bigquery_emulator.endpoint)
    sink.open()
    payloads = [
        ("devices/d1/env", b'{"ts": "2026-01-01T00:00:00.5Z", "temp": 1.5, "nested": {"x": 2}}'),
        ("devices/d2/raw", bytes(range(256))),
        ("devices/d3/big", os.urandom(1_048_576)),
        ("devices/d4/env", b'{"temp": '),  # malformed
        ("x/y", b'{"note": "no device, no numbers"}'),
        ("devices/d5/empty", b""),
    ]
    result = sink.write(make_batch(payloads))
    assert result.written == len(payloads) and result.dead_lettered == 0
    got = {r["topic"]: r for r in query(sink.client, f"SELECT * FROM `{tid}`")}
    for topic, payload in payloads:
        assert got[topic]["payload"] == payload
        assert got[topic]["payload_size"] == len(payload)
    d1 = got["devices/d1/env"]
    assert d1["event_time"].isoformat() == "2026-01-01T00:00:00.500000+00:00"
    assert sorted((m["name"], m["value"]) for m in d1["metrics"]) == [
        ("nested.x", 2.0),
        ("temp", 1.5),
    ]
    assert got["devices/d4/env"]["payload_format"] == "text"
    assert got["devices/d3/big"]["payload_format"] == "binary"
    assert got["x/y"]["device_id"] is None
    assert got["devices/d2/raw"]["receive_time"].timestamp() * 1e6 == pytest.approx(T0 + 1_000_000)
    sink.close()


def test_retry_after_injected_failures_reuses_insert_ids(bigquery_emulator) -> None:
    tid = table_id(bigquery_emulator, "retry")
    proxy = FaultProxy(bigquery_emulator.rest_port)
    try:
        sink = BigQuerySink(
            tid, endpoint=proxy.endpoint, retry_base=0.01, retry_cap=0.05, chunk_rows=1000
        )
        sink.open()
        batch = fleet(100)
        # One request refused outright (503), one stored and then answered 503 ("lost" reply).
        proxy.plan = ["503", "lost"]
        result = sink.write(batch)
        assert result.written == len(batch)
        assert proxy.injected == 2 and sink.retries == 2
        assert len(proxy.insert_bodies) == 3
        ids = [[row["insertId"] for row in body["rows"]] for body in proxy.insert_bodies]
        assert ids[0] == ids[1] == ids[2] == batch.message_id  # the same insertIds each time
        assert all(body.get("skipInvalidRows") for body in proxy.insert_bodies)
    finally:
        proxy.close()
    client = bigquery_emulator.client()
    # BigQuery drops a retried insertId (best effort); this emulator does not, and stores the
    # "lost" request's rows twice. The analysis de-duplicates on message_id either way.
    raw = query(client, f"SELECT COUNT(*) AS n, COUNT(DISTINCT message_id) AS d FROM `{tid}`")[0]
    assert raw["d"] == len(batch) and raw["n"] in (len(batch), 2 * len(batch))
    assert Analysis(BigQueryEngine(client, tid)).overview()["messages"] == len(batch)
    per_minute = Analysis(BigQueryEngine(client, tid)).message_rate(60)
    assert sum(r["messages"] for r in per_minute) == len(batch)


def test_rejected_rows_go_to_the_dead_letter(bigquery_emulator) -> None:
    from google.cloud import bigquery
    from mcloudtt_adapter.schema import bigquery_schema

    tid = table_id(bigquery_emulator, "strict")
    client = bigquery_emulator.client()
    client.create_dataset(tid.rsplit(".", 1)[0], exists_ok=True)
    # A table someone made with device_id as INT64: devices named "d1" cannot go in.
    schema = [
        bigquery.SchemaField("device_id", "INT64") if f.name == "device_id" else f
        for f in bigquery_schema()
    ]
    client.create_table(bigquery.Table(tid, schema=schema))
    sink = BigQuerySink(tid, endpoint=bigquery_emulator.endpoint)
    sink.open()
    batch = make_batch(
        [
            ("devices/d1/env", b'{"temp": 1}'),
            ("devices/42/env", b'{"temp": 2}'),
            ("plain/topic", b'{"temp": 3}'),
            ("devices/d2/env", b'{"temp": 4}'),
        ]
    )
    result = sink.write(batch)
    assert (result.written, result.dead_lettered) == (2, 2)
    stored = query(client, f"SELECT message_id FROM `{tid}` ORDER BY message_id")
    assert [r["message_id"] for r in stored] == ["b1:1", "b1:2"]
    dead = query(client, f"SELECT * FROM `{sink.dead_letter_table}` ORDER BY message_id")
    assert [d["message_id"] for d in dead] == ["b1:0", "b1:3"]
    assert all("invalid" in d["reason"] for d in dead)
    row = json.loads(dead[0]["row_json"])
    assert row["topic"] == "devices/d1/env" and row["device_id"] == "d1"
    sink.close()


def test_dead_letter_falls_back_to_a_file(bigquery_emulator, tmp_path) -> None:
    from google.cloud import bigquery
    from mcloudtt_adapter.schema import bigquery_schema

    tid = table_id(bigquery_emulator, "strict2")
    client = bigquery_emulator.client()
    client.create_dataset(tid.rsplit(".", 1)[0], exists_ok=True)
    schema = [
        bigquery.SchemaField("device_id", "INT64") if f.name == "device_id" else f
        for f in bigquery_schema()
    ]
    client.create_table(bigquery.Table(tid, schema=schema))
    path = tmp_path / "dead.jsonl"
    sink = BigQuerySink(
        tid,
        endpoint=bigquery_emulator.endpoint,
        dead_letter_file=str(path),
        dead_letter_table=f"{bigquery_emulator.project}.no_such_dataset.dead",
    )
    sink.open()
    # The dead-letter dataset does not exist, so its table cannot be made: the file takes the rows.
    client.delete_dataset(f"{bigquery_emulator.project}.no_such_dataset", not_found_ok=True)
    sink.ensure_dead_letter_table = _raise  # type: ignore[method-assign]
    result = sink.write(make_batch([("devices/d1/env", b'{"temp": 1}'), ("devices/7/env", b"{}")]))
    assert result.dead_lettered == 1
    entries = FileDeadLetter(path).read()
    assert [e["message_id"] for e in entries] == ["b1:0"]
    assert entries[0]["row"]["topic"] == "devices/d1/env" and "invalid" in entries[0]["reason"]


def _raise() -> None:
    raise RuntimeError("dead-letter table unavailable")


def test_memory_dead_letter_is_a_drop_in(bigquery_emulator) -> None:
    from google.cloud import bigquery
    from mcloudtt_adapter.schema import bigquery_schema

    tid = table_id(bigquery_emulator, "strict3")
    client = bigquery_emulator.client()
    client.create_dataset(tid.rsplit(".", 1)[0], exists_ok=True)
    schema = [
        bigquery.SchemaField("device_id", "INT64") if f.name == "device_id" else f
        for f in bigquery_schema()
    ]
    client.create_table(bigquery.Table(tid, schema=schema))
    dead = MemoryDeadLetter()
    sink = BigQuerySink(tid, endpoint=bigquery_emulator.endpoint, dead_letter=dead)
    sink.open()
    result = sink.write(make_batch([("devices/d1/env", b"{}")]))
    assert result.dead_lettered == 1 and dead.entries[0]["sink"] == "bigquery"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return bool(a == b)


def assert_same_rows(left: list[dict[str, Any]], right: list[dict[str, Any]]) -> None:
    assert len(left) == len(right)
    for x, y in zip(left, right, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert _same(x[key], y[key]), (key, x, y)


def test_the_same_analysis_on_duckdb_and_bigquery(bigquery_emulator) -> None:
    batch = fleet(600)
    again = batch.subset(list(range(20)))  # redelivered duplicates
    tid = table_id(bigquery_emulator, "analysis")
    bq = BigQuerySink(tid, endpoint=bigquery_emulator.endpoint)
    bq.open()
    bq.write(batch)
    bq.write(again)
    duck = DuckDBSink(":memory:")
    duck.open()
    duck.write(batch)
    duck.write(again)
    engines = [DuckDBEngine(duck.con), BigQueryEngine(bq.client, tid)]
    rules = AnomalyRules(
        zscore=3.0,
        window=20,
        min_points=10,
        thresholds=(Threshold.parse("temp>40"), Threshold.parse("hum<=40")),
    )
    window = Window(T0 + 60_000_000, T0 + 540_000_000)
    checks: list[tuple[str, Any]] = [
        ("overview", lambda a: [a.overview()]),
        ("formats", lambda a: a.formats()),
        ("rollups per minute", lambda a: a.rollups("minute")),
        ("rollups per hour", lambda a: a.rollups("hour")),
        ("rollups in a window", lambda a: a.rollups("minute", window)),
        ("message rate", lambda a: a.message_rate(30)),
        ("stale devices", lambda a: a.stale_devices()),
        (
            "stale, fixed interval",
            lambda a: a.stale_devices(T0 + 600_000_000, intervals=3, interval_seconds=2),
        ),
        ("anomalies", lambda a: a.anomalies(rules)),
        ("top metrics", lambda a: a.top_metrics()),
        ("device series", lambda a: a.device_series(["d0", "d4"], "temp")),
    ]
    for name, run in checks:
        duck_rows, bq_rows = (run(Analysis(engine)) for engine in engines)
        assert duck_rows, name
        assert_same_rows(duck_rows, bq_rows)
    a = Analysis(engines[0])
    assert a.overview()["messages"] == len(batch)  # duplicates counted once
    assert [r["device_id"] for r in a.stale_devices()] == ["d4"]
    kinds = {(r["device_id"], r["kind"]) for r in a.anomalies(rules) if r["metric"] == "temp"}
    assert ("d0", "zscore") in kinds and ("d0", "threshold") in kinds
    minute = a.rollups("minute")
    d0 = next(r for r in minute if r["device_id"] == "d0" and r["metric"] == "hum")
    assert d0["n"] == 12 and d0["min_value"] == 40 and d0["max_value"] == 42
    bq.close()
    duck.close()


def test_adapter_command_from_redis_into_bigquery(
    bigquery_emulator, redis_server, adapter_process
) -> None:
    from mcloudtt_broker.cluster.envelope import Envelope, encode_envelope

    tid = table_id(bigquery_emulator, "cli")
    r = redis.Redis.from_url(redis_server.url)
    for seq in range(40):
        env = Envelope(
            origin="b9",
            sequence=seq,
            received_at_us=T0 + seq,
            client_id="c",
            topic=f"devices/d{seq % 2}/t",
            payload=orjson.dumps({"v": seq}),
            qos=1,
        )
        r.xadd("mcloudtt:tap", {"e": encode_envelope(env)})
    adapter = adapter_process(
        "--redis",
        redis_server.url,
        "--bigquery",
        tid,
        "--bigquery-endpoint",
        bigquery_emulator.endpoint,
        "--batch-delay",
        "0.05",
    )
    wait_until(lambda: adapter.metric("mcloudtt_adapter_rows_out_total", sink="bigquery") >= 40, 20)
    assert adapter.stop(signal.SIGTERM) == 0, adapter.log()
    assert int(r.xpending("mcloudtt:tap", "mcloudtt-adapter")["pending"]) == 0
    r.close()
    client = bigquery_emulator.client()
    got = query(
        client,
        f"SELECT COUNT(DISTINCT message_id) AS n, SUM(m.value) AS total FROM `{tid}` CROSS JOIN UNNEST(metrics) AS m",
    )
    assert got == [{"n": 40, "total": float(sum(range(40)))}]


def test_report_from_bigquery(bigquery_emulator, tmp_path) -> None:
    import subprocess

    from .helpers import adapter_command

    tid = table_id(bigquery_emulator, "report")
    sink = BigQuerySink(tid, endpoint=bigquery_emulator.endpoint)
    sink.open()
    batch = fleet(300)
    sink.write(batch)
    out = tmp_path / "bq.html"
    result = subprocess.run(
        [
            *adapter_command(),
            "report",
            "--bigquery",
            tid,
            "--bigquery-endpoint",
            bigquery_emulator.endpoint,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "<svg" in out.read_text() and f"{len(batch)}" in result.stdout
