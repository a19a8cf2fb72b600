"""The analytics the dashboard of `mcloudtt up` charts, as JSON (`GET /analytics`).

The same queries as the report (`analysis.Queries`), over the last `WINDOW_S` seconds of event
time so that a long run costs the same every few seconds (anomalies and per-device series over
the newest `RECENT_ROWS` rows of that at most): overview, message rate, minute rollups
per metric across devices, per-device series of the commonest metrics, anomalies, stale devices
and the topics seen. Times are Unix seconds; metadata never appears (the decoder keeps it out of
`metrics`), nor does a broker's `$SYS` counters (rows without a device).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .analysis import Analysis, Window

WINDOW_S = 600.0
RECENT_ROWS = 50_000
# Units of the simulator's scenario fields (simulator/.../scenarios/*.toml); others have none.
UNITS = {
    "temp": "°C",
    "setpoint": "°C",
    "ambient_c": "°C",
    "cargo_c": "°C",
    "coolant": "°C",
    "rh": "%",
    "co2": "ppm",
    "kwh": "kWh",
    "battery": "%",
    "valve": "%",
    "fuel": "%",
    "rpm": "rpm",
}


def _s(value: Any) -> float | None:
    return value.timestamp() if isinstance(value, datetime) else None


def live_analytics(
    analysis: Analysis,
    *,
    metrics: int = 3,
    devices: int = 4,
    limit: int = 50,
    recent_rows: int = RECENT_ROWS,
) -> dict[str, Any]:
    """Everything the dashboard's analytics panel draws, in one JSON-ready dict."""
    table, d = analysis.q.table, analysis.q.d
    # Plain aggregates, no de-duplication: cheap however many rows the table has.
    (whole,) = analysis.engine.query(
        f"SELECT COUNT(*) AS n, {d.micros('MAX(ingest_time)')} AS ingest_us,"
        f" {d.micros('MAX(event_time)')} AS event_us FROM {table}"
    )
    last_us = whole["event_us"]
    window = Window(since_us=int(last_us - WINDOW_S * 1e6)) if last_us else Window()
    # The costly parts (a window function per value, per-device series) read the newest
    # RECENT_ROWS rows at most: under --load ten minutes hold millions.
    recent = window
    if last_us:
        cut = analysis.engine.query(
            f"SELECT {d.micros('event_time')} AS us FROM {table}"
            f" ORDER BY event_time DESC LIMIT 1 OFFSET {int(recent_rows)}"
        )
        if cut and window.since_us is not None and cut[0]["us"] > window.since_us:
            recent = Window(since_us=int(cut[0]["us"]))
    overview = analysis.overview(window) if last_us else {}
    out: dict[str, Any] = {
        "window_s": WINDOW_S,
        # The newest row these figures include: a check recounts `ingest_time <= this`.
        "as_of_ingest_us": whole["ingest_us"],
        "total_messages": whole["n"],
        # Anomalies and per-device series: the events since this time (Unix seconds).
        "recent_since": recent.since_us / 1e6 if recent.since_us is not None else None,
        "overview": {
            "messages": overview.get("messages") or 0,
            "devices": overview.get("devices") or 0,
            "topics": overview.get("topics") or 0,
            "first_event": _s(overview.get("first_event")),
            "last_event": _s(overview.get("last_event")),
        },
        "units": UNITS,
        "rate": [],
        "rollups": {},
        "series": {},
        "anomalies": [],
        "anomaly_count": 0,
        "stale": [],
        "topics": [],
        "kinds": [],
    }
    if not out["overview"]["messages"]:
        return out
    out["rate"] = [[_s(r["bucket"]), r["messages"] / 5.0] for r in analysis.message_rate(5, window)]
    # Minute rollups per metric across devices: count-weighted mean, min and max per bucket.
    # Devices only: a broker's $SYS counters (no device) are not measurements of the fleet.
    merged: dict[str, dict[float, list[float]]] = {}
    counts: dict[str, int] = {}
    for r in analysis.rollups("minute", window):
        t = _s(r["bucket"])
        if t is None or r["device_id"] is None:
            continue
        counts[r["metric"]] = counts.get(r["metric"], 0) + int(r["n"])
        n, lo, hi = float(r["n"]), r["min_value"], r["max_value"]
        acc = merged.setdefault(r["metric"], {}).setdefault(t, [0.0, 0.0, lo, hi])
        acc[0] += n
        acc[1] += r["avg_value"] * n
        acc[2], acc[3] = min(acc[2], lo), max(acc[3], hi)
    out["rollups"] = {
        metric: [[t, a[1] / a[0], a[2], a[3], int(a[0])] for t, a in sorted(buckets.items())]
        for metric, buckets in sorted(merged.items())
    }
    top = [row["device_id"] for row in analysis.top_devices(recent, devices)]
    for metric in sorted(counts, key=lambda m: (-counts[m], m))[:metrics]:
        per: dict[str, list[list[float | None]]] = {}
        for r in analysis.device_series(top, metric, "second", recent):
            per.setdefault(r["device_id"], []).append([_s(r["bucket"]), r["avg_value"]])
        if per:
            out["series"][metric] = per
    anomalies = [a for a in analysis.anomalies(window=recent) if a["device_id"] is not None]
    out["anomaly_count"] = len(anomalies)
    out["anomalies"] = [
        {
            "t": _s(a["event_time"]),
            "device_id": a["device_id"],
            "topic": a["topic"],
            "metric": a["metric"],
            "value": a["value"],
            "kind": a["kind"],
            "score": a["score"],
        }
        for a in anomalies[-limit:]
    ]
    stale = analysis.stale_devices(None, min_silent_seconds=10.0, window=window)
    out["stale"] = [
        {
            "device_id": s["device_id"],
            "silent_s": s["silent_s"],
            "last_seen": _s(s["last_seen"]),
            "messages": s["messages"],
        }
        for s in stale[:limit]
    ]
    # Messages the fleet sent, by kind: a device topic's last level (env, meter, status, ...).
    out["kinds"] = [
        [r["kind"], r["n"]]
        for r in analysis.engine.query(
            "SELECT REGEXP_EXTRACT(topic, '[^/]+$') AS kind, COUNT(*) AS n FROM "
            f"{table} WHERE device_id IS NOT NULL AND event_time >= "
            f"{analysis.q.d.ts(window.since_us or 0)} GROUP BY kind ORDER BY n DESC, kind"
        )
    ]
    out["topics"] = [
        [r["topic"], r["n"]]
        for r in analysis.engine.query(
            f"SELECT topic, COUNT(*) AS n FROM {table} GROUP BY topic ORDER BY topic LIMIT 5000"
        )
    ]
    return out
