"""Answers out of the table: rollups, message rate, stale devices, anomalies.

The SQL is written once, in the dialect both engines share (DuckDB accepts BigQuery's
`CROSS JOIN UNNEST(...) AS m`, `MAX_BY`, `QUALIFY`, named windows); a `Dialect` fills in the few
places they differ: table references, timestamp literals, truncation, epoch microseconds and
integer division. Every query reads `msgs`, the rows in the time window de-duplicated on
`message_id` (at-least-once delivery may store a message twice; the first ingest counts).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UNITS = ("second", "minute", "hour", "day")


@dataclass(frozen=True)
class Dialect:
    name: str

    def table(self, ref: str) -> str:
        if self.name == "bigquery":
            return f"`{ref}`"
        return ".".join(f'"{part}"' for part in ref.split("."))

    def ts(self, us: int) -> str:
        text = (_EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%d %H:%M:%S.%f")
        return f"TIMESTAMP '{text}+00'" if self.name == "bigquery" else f"TIMESTAMP '{text}'"

    def trunc(self, expr: str, unit: str) -> str:
        if unit not in _UNITS:
            raise ValueError(f"unit must be one of {_UNITS}")
        if self.name == "bigquery":
            return f"TIMESTAMP_TRUNC({expr}, {unit.upper()})"
        return f"date_trunc('{unit}', {expr})"

    def micros(self, expr: str) -> str:
        return f"UNIX_MICROS({expr})" if self.name == "bigquery" else f"epoch_us({expr})"

    def from_micros(self, expr: str) -> str:
        return f"TIMESTAMP_MICROS({expr})" if self.name == "bigquery" else f"make_timestamp({expr})"

    def idiv(self, a: str, b: str) -> str:
        return f"DIV({a}, {b})" if self.name == "bigquery" else f"(({a}) // ({b}))"


DUCKDB = Dialect("duckdb")
BIGQUERY = Dialect("bigquery")


@dataclass(frozen=True)
class Threshold:
    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Threshold:
        match = re.fullmatch(r"\s*([^<>=!\s]+)\s*(<=|>=|<|>)\s*(-?[0-9.eE+-]+)\s*", text)
        if not match:
            raise ValueError(f"expected METRIC>VALUE (or <, >=, <=), got {text!r}")
        return cls(match.group(1), match.group(2), float(match.group(3)))

    def sql(self) -> str:
        name = self.metric.replace("'", "''")
        return f"(metric = '{name}' AND value {self.op} {self.value!r})"


@dataclass(frozen=True)
class Window:
    """Rows with since <= event_time < until (microseconds; None: open)."""

    since_us: int | None = None
    until_us: int | None = None


@dataclass(frozen=True)
class AnomalyRules:
    zscore: float = 3.0
    window: int = 30  # previous values of the same device, topic and metric
    min_points: int = 10
    thresholds: tuple[Threshold, ...] = field(default_factory=tuple)


class Queries:
    """The analysis SQL for one table in one dialect."""

    def __init__(self, dialect: Dialect, table: str, *, dedup: bool = True) -> None:
        self.d = dialect
        self.table = dialect.table(table)
        self.dedup = dedup

    def _msgs(self, window: Window) -> str:
        d = self.d
        where = ["TRUE"]
        if window.since_us is not None:
            where.append(f"event_time >= {d.ts(window.since_us)}")
        if window.until_us is not None:
            where.append(f"event_time < {d.ts(window.until_us)}")
        qualify = (
            "\n  QUALIFY ROW_NUMBER() OVER (PARTITION BY message_id ORDER BY ingest_time) = 1"
            if self.dedup
            else ""
        )
        return (
            "msgs AS (\n"
            "  SELECT message_id, event_time, ingest_time, receive_time, device_id, topic,\n"
            "         payload_size, payload_format, metrics\n"
            f"  FROM {self.table}\n  WHERE {' AND '.join(where)}{qualify}\n)"
        )

    @staticmethod
    def _vals() -> str:
        return (
            "vals AS (\n"
            "  SELECT m.message_id, m.event_time, m.device_id, m.topic,\n"
            "         v.name AS metric, v.value AS value\n"
            "  FROM msgs AS m CROSS JOIN UNNEST(m.metrics) AS v\n)"
        )

    def overview(self, window: Window = Window()) -> str:
        return (
            f"WITH {self._msgs(window)}\n"
            "SELECT COUNT(*) AS messages, COUNT(DISTINCT device_id) AS devices,\n"
            "       COUNT(DISTINCT topic) AS topics, SUM(payload_size) AS bytes,\n"
            "       MIN(event_time) AS first_event, MAX(event_time) AS last_event,\n"
            f"       {self.d.micros('MAX(event_time)')} AS last_event_us\n"
            "FROM msgs"
        )

    def formats(self, window: Window = Window()) -> str:
        return (
            f"WITH {self._msgs(window)}\n"
            "SELECT payload_format, COUNT(*) AS messages, SUM(payload_size) AS bytes\n"
            "FROM msgs GROUP BY payload_format ORDER BY messages DESC, payload_format"
        )

    def rollups(self, unit: str = "minute", window: Window = Window()) -> str:
        bucket = self.d.trunc("event_time", unit)
        return (
            f"WITH {self._msgs(window)},\n{self._vals()}\n"
            f"SELECT {bucket} AS bucket, device_id, topic, metric,\n"
            "       COUNT(*) AS n, MIN(value) AS min_value, MAX(value) AS max_value,\n"
            "       AVG(value) AS avg_value, MAX_BY(value, event_time) AS last_value\n"
            "FROM vals\nGROUP BY bucket, device_id, topic, metric\n"
            "ORDER BY bucket, device_id, topic, metric"
        )

    def message_rate(self, bucket_seconds: int = 60, window: Window = Window()) -> str:
        d = self.d
        size = str(int(bucket_seconds * 1_000_000))
        bucket = d.from_micros(f"{d.idiv(d.micros('event_time'), size)} * {size}")
        return (
            f"WITH {self._msgs(window)}\n"
            f"SELECT {bucket} AS bucket, COUNT(*) AS messages,\n"
            "       COUNT(DISTINCT device_id) AS devices, SUM(payload_size) AS bytes\n"
            "FROM msgs GROUP BY bucket ORDER BY bucket"
        )

    def device_series(
        self, devices: Sequence[str], metric: str, unit: str = "minute", window: Window = Window()
    ) -> str:
        names = ", ".join("'" + dev.replace("'", "''") + "'" for dev in devices) or "NULL"
        bucket = self.d.trunc("event_time", unit)
        metric_sql = metric.replace("'", "''")
        return (
            f"WITH {self._msgs(window)},\n{self._vals()}\n"
            f"SELECT device_id, {bucket} AS bucket, AVG(value) AS avg_value,\n"
            "       MIN(value) AS min_value, MAX(value) AS max_value\n"
            f"FROM vals WHERE metric = '{metric_sql}' AND device_id IN ({names})\n"
            "GROUP BY device_id, bucket ORDER BY device_id, bucket"
        )

    def top_metrics(self, window: Window = Window(), limit: int = 10) -> str:
        return (
            f"WITH {self._msgs(window)},\n{self._vals()}\n"
            "SELECT metric, COUNT(*) AS n, COUNT(DISTINCT device_id) AS devices\n"
            f"FROM vals GROUP BY metric ORDER BY n DESC, metric LIMIT {int(limit)}"
        )

    def top_devices(self, window: Window = Window(), limit: int = 10) -> str:
        return (
            f"WITH {self._msgs(window)}\n"
            "SELECT device_id, COUNT(*) AS messages, MAX(event_time) AS last_seen\n"
            "FROM msgs WHERE device_id IS NOT NULL\n"
            f"GROUP BY device_id ORDER BY messages DESC, device_id LIMIT {int(limit)}"
        )

    def stale_devices(
        self,
        now_us: int,
        *,
        intervals: float = 3.0,
        interval_seconds: float | None = None,
        min_silent_seconds: float = 0.0,
        window: Window = Window(),
    ) -> str:
        """Devices silent for more than `intervals` reporting intervals before `now_us`.

        The interval is `interval_seconds` when given, else the device's own average gap
        between messages (so a meter reporting every 15 minutes is not stale after 5); never
        less than `min_silent_seconds` (sub-second reporters are not stale after a second).
        """
        d = self.d
        last = d.micros("MAX(event_time)")
        first = d.micros("MIN(event_time)")
        gap_us = f"({last} - {first}) / NULLIF(COUNT(*) - 1, 0)"
        expected = f"{float(interval_seconds) * 1e6!r}" if interval_seconds else gap_us
        return (
            f"WITH {self._msgs(window)}\n"
            "SELECT device_id, COUNT(*) AS messages, MIN(event_time) AS first_seen,\n"
            f"       MAX(event_time) AS last_seen, {gap_us} / 1e6 AS avg_interval_s,\n"
            f"       ({now_us} - {last}) / 1e6 AS silent_s\n"
            "FROM msgs WHERE device_id IS NOT NULL\nGROUP BY device_id\n"
            f"HAVING ({now_us} - {last}) > {float(intervals)!r} * {expected}\n"
            f"   AND ({now_us} - {last}) > {float(min_silent_seconds) * 1e6!r}\n"
            "ORDER BY silent_s DESC, device_id"
        )

    def anomalies(self, rules: AnomalyRules = AnomalyRules(), window: Window = Window()) -> str:
        parts = [
            "SELECT event_time, device_id, topic, metric, value, 'zscore' AS kind,\n"
            "       (value - mean) / sd AS score, mean AS baseline\n"
            f"FROM scored WHERE n >= {int(rules.min_points)} AND sd > 0\n"
            f"  AND ABS(value - mean) >= {float(rules.zscore)!r} * sd"
        ]
        if rules.thresholds:
            cond = " OR ".join(t.sql() for t in rules.thresholds)
            parts.append(
                "SELECT event_time, device_id, topic, metric, value, 'threshold' AS kind,\n"
                "       value AS score, CAST(NULL AS FLOAT64) AS baseline\n"
                f"FROM vals WHERE {cond}"
            )
        body = "\nUNION ALL\n".join(parts)
        if self.d.name == "duckdb":
            body = body.replace("FLOAT64", "DOUBLE")
        return (
            f"WITH {self._msgs(window)},\n{self._vals()},\n"
            "scored AS (\n"
            "  SELECT event_time, device_id, topic, metric, value,\n"
            "         AVG(value) OVER w AS mean, STDDEV_SAMP(value) OVER w AS sd,\n"
            "         COUNT(value) OVER w AS n\n"
            "  FROM vals\n"
            "  WINDOW w AS (PARTITION BY device_id, topic, metric ORDER BY event_time, message_id\n"
            f"              ROWS BETWEEN {int(rules.window)} PRECEDING AND 1 PRECEDING)\n"
            ")\n"
            f"{body}\nORDER BY event_time, device_id, topic, metric, kind"
        )


# ---------------------------------------------------------------------------------- engines


class Engine(Protocol):
    dialect: Dialect
    table: str

    def query(self, sql: str) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def _utc(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class DuckDBEngine:
    dialect = DUCKDB

    def __init__(self, con: Any, table: str = "messages") -> None:
        self.con = con
        self.table = table

    @classmethod
    def open(cls, path: str, table: str = "messages") -> DuckDBEngine:
        import duckdb

        return cls(duckdb.connect(path, read_only=True), table)

    def query(self, sql: str) -> list[dict[str, Any]]:
        cursor = self.con.execute(sql)
        names = [c[0] for c in cursor.description]
        return [{n: _utc(v) for n, v in zip(names, row, strict=True)} for row in cursor.fetchall()]

    def close(self) -> None:
        self.con.close()


class BigQueryEngine:
    dialect = BIGQUERY

    def __init__(self, client: Any, table: str) -> None:
        self.client = client
        self.table = table

    def query(self, sql: str) -> list[dict[str, Any]]:
        return [
            {k: _utc(v) for k, v in dict(row).items()} for row in self.client.query(sql).result()
        ]

    def close(self) -> None:
        self.client.close()


class Analysis:
    """The queries run against one engine, results as lists of dicts."""

    def __init__(self, engine: Engine, *, dedup: bool = True) -> None:
        self.engine = engine
        self.q = Queries(engine.dialect, engine.table, dedup=dedup)

    def overview(self, window: Window = Window()) -> dict[str, Any]:
        rows = self.engine.query(self.q.overview(window))
        return rows[0] if rows else {}

    def formats(self, window: Window = Window()) -> list[dict[str, Any]]:
        return self.engine.query(self.q.formats(window))

    def rollups(self, unit: str = "minute", window: Window = Window()) -> list[dict[str, Any]]:
        return self.engine.query(self.q.rollups(unit, window))

    def message_rate(
        self, bucket_seconds: int = 60, window: Window = Window()
    ) -> list[dict[str, Any]]:
        return self.engine.query(self.q.message_rate(bucket_seconds, window))

    def device_series(
        self, devices: Sequence[str], metric: str, unit: str = "minute", window: Window = Window()
    ) -> list[dict[str, Any]]:
        return self.engine.query(self.q.device_series(devices, metric, unit, window))

    def top_metrics(self, window: Window = Window(), limit: int = 10) -> list[dict[str, Any]]:
        return self.engine.query(self.q.top_metrics(window, limit))

    def top_devices(self, window: Window = Window(), limit: int = 10) -> list[dict[str, Any]]:
        return self.engine.query(self.q.top_devices(window, limit))

    def stale_devices(
        self,
        now_us: int | None = None,
        *,
        intervals: float = 3.0,
        interval_seconds: float | None = None,
        min_silent_seconds: float = 0.0,
        window: Window = Window(),
    ) -> list[dict[str, Any]]:
        """Stale devices relative to `now_us` (default: the newest event in the window)."""
        if now_us is None:
            now_us = int(self.overview(window).get("last_event_us") or 0)
        return self.engine.query(
            self.q.stale_devices(
                now_us,
                intervals=intervals,
                interval_seconds=interval_seconds,
                min_silent_seconds=min_silent_seconds,
                window=window,
            )
        )

    def anomalies(
        self, rules: AnomalyRules = AnomalyRules(), window: Window = Window()
    ) -> list[dict[str, Any]]:
        return self.engine.query(self.q.anomalies(rules, window))
