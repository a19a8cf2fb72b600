"""The dashboard's analytics (`GET /analytics`): each figure checked against a count of its own
made with plain SQL on the same DuckDB file."""

from __future__ import annotations

import json

import duckdb
from mcloudtt_adapter.analysis import Analysis, DuckDBEngine
from mcloudtt_adapter.live import WINDOW_S, live_analytics
from mcloudtt_adapter.sinks.duckdb import DuckDBSink

from .helpers import fleet, make_batch


def test_live_analytics_match_independent_counts(tmp_path) -> None:
    path = tmp_path / "live.duckdb"
    sink = DuckDBSink(path)
    sink.open()
    sink.write(fleet(900))  # 900 s of five devices: longer than the window
    # A broker's $SYS counter: stored, a topic, never a measurement of the fleet.
    sink.write(make_batch([("$SYS/brokers/b1/clients/connected", b"5")] * 3, start=895))
    data = live_analytics(Analysis(DuckDBEngine(sink.reader())))
    json.dumps(data)  # what the route sends
    sink.close()

    con = duckdb.connect(str(path), read_only=True)

    def one(sql: str):  # type: ignore[no-untyped-def]
        return con.execute(sql).fetchone()[0]  # type: ignore[index]

    since = f"(select max(event_time) from messages) - interval ({WINDOW_S:.0f}) second"
    assert data["total_messages"] == one("select count(*) from messages")
    assert data["as_of_ingest_us"] == one("select epoch_us(max(ingest_time)) from messages")
    assert data["overview"]["messages"] == one(
        f"select count(*) from messages where event_time >= {since}"
    )
    assert data["overview"]["messages"] < data["total_messages"]
    assert data["overview"]["devices"] == 5
    assert one("select count(*) from messages where device_id is null and len(metrics) > 0") == 3
    # Rollups: per metric and minute, the number of values and their mean and extremes.
    expected = con.execute(
        "select m.name, epoch(date_trunc('minute', event_time)), count(*), avg(m.value),"
        " min(m.value), max(m.value)"
        " from (select event_time, unnest(metrics) as m from messages"
        f" where event_time >= {since} and device_id is not null)"
        " group by all order by all"
    ).fetchall()
    got = [
        (metric, t, n, avg, lo, hi)
        for metric, rows in data["rollups"].items()
        for t, avg, lo, hi, n in rows
    ]
    assert len(got) == len(expected)
    for g, e in zip(sorted(got), expected, strict=True):
        assert g[:3] == e[:3] and abs(g[3] - e[3]) < 1e-9 and g[4:] == e[4:], (g, e)
    assert set(data["rollups"]) == {"temp", "hum"}  # measurements; never `ts` nor $SYS
    # Per-device series of real measurements, with their units where known.
    assert set(data["series"]) == {"temp", "hum"}
    assert set(data["series"]["temp"]) == {"d0", "d1", "d2", "d3"}  # the four busiest
    assert data["units"]["temp"] == "°C"
    # The spike on d0 (i = 450) is an anomaly; d4 went quiet and is stale.
    assert any(a["device_id"] == "d0" and a["value"] > 40 for a in data["anomalies"])
    assert [s["device_id"] for s in data["stale"]] == ["d4"]
    assert data["topics"] == [
        list(r)
        for r in con.execute(
            "select topic, count(*) from messages group by 1 order by 1"
        ).fetchall()
    ]
    # Messages by kind (a device topic's last level): every device row of the window.
    assert data["kinds"] == [
        [
            "env",
            one(
                f"select count(*) from messages where device_id is not null and event_time >= {since}"
            ),
        ]
    ]
    # The message rate sums to the window's messages.
    assert sum(r[1] * 5 for r in data["rate"]) == data["overview"]["messages"]


def test_live_analytics_of_an_empty_table() -> None:
    sink = DuckDBSink(":memory:")
    sink.open()
    data = live_analytics(Analysis(DuckDBEngine(sink.reader())))
    assert data["overview"]["messages"] == 0 and data["rollups"] == {} and data["topics"] == []


def test_costly_parts_read_the_newest_rows_only(tmp_path) -> None:
    sink = DuckDBSink(tmp_path / "recent.duckdb")
    sink.open()
    sink.write(fleet(900))
    data = live_analytics(Analysis(DuckDBEngine(sink.reader())), recent_rows=100)
    con = sink.reader()
    cut = con.execute(
        "select epoch_us(event_time) / 1e6 from messages order by event_time desc limit 1 offset 100"
    ).fetchone()[0]
    assert data["recent_since"] == cut
    assert all(p[0] >= cut for per in data["series"].values() for pts in per.values() for p in pts)
    # The spike on d0 (i = 450) is older than the newest 100 rows: not judged again.
    assert all(a["t"] >= cut for a in data["anomalies"])
    assert not [a for a in data["anomalies"] if a["device_id"] == "d0" and a["value"] > 40]
    # The cheap parts still cover the whole window.
    assert data["overview"]["messages"] > 100
    sink.close()
