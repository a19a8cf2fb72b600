"""`mcloudtt-adapter report`: one self-contained HTML page (inline SVG charts, no scripts, no
CDN) and a summary in the terminal.

Sections: overview, message rate over time, per-device series of the most common metric with
anomalies marked, anomalies, stale devices, hourly rollups.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .analysis import Analysis, AnomalyRules, Window
from .live import UNITS

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f")
ALL_TIME = Window()
DEFAULT_RULES = AnomalyRules()
NICE_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)


@dataclass
class ReportData:
    generated_at: datetime
    overview: dict[str, Any]
    formats: list[dict[str, Any]]
    rate_bucket_s: int
    rate: list[dict[str, Any]]
    metric: str | None
    series: dict[str, list[dict[str, Any]]]
    series_unit: str
    anomalies: list[dict[str, Any]]
    stale: list[dict[str, Any]]
    rollups_hour: list[dict[str, Any]]
    top_devices: list[dict[str, Any]]
    rules: AnomalyRules
    stale_intervals: float
    stale_min_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _pick_bucket(span_s: float, points: int = 120) -> int:
    target = max(1.0, span_s / points)
    for size in NICE_BUCKETS:
        if size >= target:
            return size
    return NICE_BUCKETS[-1]


def build_report(
    analysis: Analysis,
    *,
    window: Window = ALL_TIME,
    rules: AnomalyRules = DEFAULT_RULES,
    stale_intervals: float = 3.0,
    stale_interval_seconds: float | None = None,
    stale_min_seconds: float = 10.0,
    devices: int = 8,
) -> ReportData:
    overview = analysis.overview(window)
    first, last = overview.get("first_event"), overview.get("last_event")
    span = (last - first).total_seconds() if first and last else 0.0
    bucket = _pick_bucket(span)
    unit = "second" if span <= 600 else "minute" if span <= 3 * 86400 else "hour"
    messages = overview.get("messages") or 0
    anomalies = analysis.anomalies(rules, window) if messages else []
    # Chart the metric with the most anomalies (the story of the data), else the commonest.
    counts: dict[str, int] = {}
    for row in anomalies:
        counts[row["metric"]] = counts.get(row["metric"], 0) + 1
    top_metrics = analysis.top_metrics(window, 1) if messages else []
    metric = (
        max(counts, key=lambda m: (counts[m], m))
        if counts
        else (top_metrics[0]["metric"] if top_metrics else None)
    )
    top_devices = analysis.top_devices(window, devices) if messages else []
    series: dict[str, list[dict[str, Any]]] = {}
    if metric and top_devices:
        names = [d["device_id"] for d in top_devices]
        for row in analysis.device_series(names, metric, unit, window):
            series.setdefault(row["device_id"], []).append(row)
    return ReportData(
        generated_at=datetime.now(UTC),
        overview=overview,
        formats=analysis.formats(window) if messages else [],
        rate_bucket_s=bucket,
        rate=analysis.message_rate(bucket, window) if messages else [],
        metric=metric,
        series=series,
        series_unit=unit,
        anomalies=anomalies,
        stale=analysis.stale_devices(
            None,
            intervals=stale_intervals,
            interval_seconds=stale_interval_seconds,
            min_silent_seconds=stale_min_seconds,
            window=window,
        )
        if messages
        else [],
        rollups_hour=analysis.rollups("hour", window)[:500] if messages else [],
        top_devices=top_devices,
        rules=rules,
        stale_intervals=stale_intervals,
        stale_min_seconds=stale_min_seconds,
    )


# ------------------------------------------------------------------------------------ SVG


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values from at or below `lo` to at or above `hi`."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step + 1e-9)
    last = math.ceil(hi / step - 1e-9)
    return [round(i * step, 10) for i in range(first, last + 1)]


def _fmt_num(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:.1f}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.0f}k"
    if v == int(v):
        return str(int(v))
    return f"{v:.3g}"


def svg_chart(
    series: list[tuple[str, list[tuple[datetime, float]]]],
    *,
    width: int = 860,
    height: int = 260,
    y_label: str = "",
    markers: list[tuple[datetime, float, str]] | None = None,
    area: bool = False,
) -> str:
    """A line chart as an inline <svg>: time on x, value on y, optional red markers."""
    left, right, top, bottom = 62, 16, 14, 40
    points = [p for _, pts in series for p in pts]
    marks = markers or []
    if not points:
        return f'<svg class="chart" width="{width}" height="60"><text x="10" y="35">no data</text></svg>'
    xs = [p[0].timestamp() for p in points] + [m[0].timestamp() for m in marks]
    ys = [p[1] for p in points] + [m[1] for m in marks]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    y_ticks = _nice_ticks(min(0.0, min(ys)) if area else min(ys), max(ys))
    y0, y1 = y_ticks[0], y_ticks[-1]
    if y1 == y0:
        y1 = y0 + 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(t: float) -> float:
        return left + (t - x0) / (x1 - x0) * plot_w

    def py(v: float) -> float:
        return top + plot_h - (v - y0) / (y1 - y0) * plot_h

    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">'
    ]
    for tick in y_ticks:
        y = py(tick)
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee" class="grid"/>'
        )
        out.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt_num(tick)}</text>'
        )
    span = x1 - x0
    fmt = "%H:%M:%S" if span < 3600 else "%H:%M" if span < 2 * 86400 else "%m-%d %H:%M"
    n_ticks = 5 if width >= 600 else 3
    for i in range(n_ticks + 1):
        t = x0 + span * i / n_ticks
        x = px(t)
        label = datetime.fromtimestamp(t, UTC).strftime(fmt)
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#eee" class="grid"/>'
        )
        anchor = "start" if i == 0 else "end" if i == n_ticks else "middle"
        out.append(
            f'<text x="{x:.1f}" y="{height - bottom + 16}" text-anchor="{anchor}">{label}</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle" class="axis">'
        f"time (UTC, {datetime.fromtimestamp(x0, UTC):%Y-%m-%d})</text>"
    )
    if y_label:
        out.append(
            f'<text transform="translate(14,{top + plot_h / 2:.0f}) rotate(-90)" '
            f'text-anchor="middle" class="axis">{html.escape(y_label)}</text>'
        )
    for index, (label, pts) in enumerate(series):
        color = PALETTE[index % len(PALETTE)]
        pts = sorted(pts)
        path = " ".join(f"{px(t.timestamp()):.1f},{py(v):.1f}" for t, v in pts)
        if area and pts:
            base = py(max(y0, 0.0))
            first_x, last_x = px(pts[0][0].timestamp()), px(pts[-1][0].timestamp())
            out.append(
                f'<polygon points="{first_x:.1f},{base:.1f} {path} {last_x:.1f},{base:.1f}" '
                f'fill="{color}" fill-opacity="0.15" stroke="none"/>'
            )
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        if len(pts) == 1:
            only, v = pts[0]
            out.append(
                f'<circle cx="{px(only.timestamp()):.1f}" cy="{py(v):.1f}" r="2.5" fill="{color}"/>'
            )
        if len(series) > 1:
            out.append(
                f'<text x="{left + 8 + 120 * index}" y="{top + 12}" fill="{color}">{html.escape(label)}</text>'
            )
    for when, v, title in marks:
        out.append(
            f'<circle cx="{px(when.timestamp()):.1f}" cy="{py(v):.1f}" r="4" fill="#dc2626" '
            'stroke="#fff" class="anomaly">'
            f"<title>{html.escape(title)}</title></circle>"
        )
    out.append("</svg>")
    return "".join(out)


# ----------------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:920px;color:#111}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#555}table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px}
.card b{display:block;font-size:20px}svg.chart text{font-size:11px;fill:#444}svg.chart .axis{fill:#666}
svg.chart .grid{stroke:#eee}svg.chart .anomaly{fill:#dc2626;stroke:#fff;stroke-width:1}
.small{display:grid;grid-template-columns:1fr 1fr;gap:8px}.small h3{font-size:13px;margin:6px 0 0}
.empty{color:#777;font-style:italic}
"""


def _cell(value: Any) -> str:
    if value is None:
        return '<td class="empty">-</td>'
    if isinstance(value, datetime):
        return f"<td>{value.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]}</td>"
    if isinstance(value, bool):
        return f"<td>{value}</td>"
    if isinstance(value, float):
        return f'<td class="n">{value:,.3f}</td>'
    if isinstance(value, int):
        return f'<td class="n">{value:,}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None, limit: int = 100) -> str:
    if not rows:
        return '<p class="empty">none</p>'
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows[:limit]
    )
    more = f'<p class="meta">… {len(rows) - limit:,} more rows</p>' if len(rows) > limit else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def render_html(data: ReportData) -> str:
    ov = data.overview
    cards = [
        ("messages", f"{ov.get('messages') or 0:,}"),
        ("devices", f"{ov.get('devices') or 0:,}"),
        ("topics", f"{ov.get('topics') or 0:,}"),
        ("payload bytes", f"{ov.get('bytes') or 0:,}"),
        ("anomalies", f"{len(data.anomalies):,}"),
        ("stale devices", f"{len(data.stale):,}"),
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>MCloudTT report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>MCloudTT data report</h1>",
        f"<p class='meta'>Generated {data.generated_at:%Y-%m-%d %H:%M:%S} UTC · events "
        f"{_when(ov.get('first_event'))} to {_when(ov.get('last_event'))}</p>",
        "<div class='cards'>"
        + "".join(f"<div class='card'>{html.escape(k)}<b>{v}</b></div>" for k, v in cards)
        + "</div>",
        "<h2>Payload formats</h2>",
        _table(data.formats),
        f"<h2>Message rate (per {data.rate_bucket_s} s)</h2>",
    ]
    rate_points = [(r["bucket"], r["messages"] / data.rate_bucket_s) for r in data.rate]
    parts.append(svg_chart([("messages/s", rate_points)], y_label="messages / s", area=True))
    unit = UNITS.get(data.metric or "", "")
    parts.append(
        f"<h2>Per-device series: <code>{html.escape(data.metric or 'no numeric metric')}</code>"
        f"{f' in {html.escape(unit)}' if unit else ''} (average per {data.series_unit})</h2>"
    )
    if data.series:
        anomalies_by_device: dict[str, list[tuple[datetime, float, str]]] = {}
        for a in data.anomalies:
            if a["metric"] == data.metric and a["device_id"] in data.series:
                anomalies_by_device.setdefault(a["device_id"], []).append(
                    (
                        a["event_time"],
                        a["value"],
                        f"{a['kind']} {a['value']:.3g} at {a['event_time']:%H:%M:%S}",
                    )
                )
        parts.append("<div class='small'>")
        for device, rows in data.series.items():
            pts = [(r["bucket"], r["avg_value"]) for r in rows]
            parts.append(f"<div><h3>{html.escape(device)}</h3>")
            parts.append(
                svg_chart(
                    [(device, pts)],
                    width=440,
                    height=180,
                    y_label=unit,
                    markers=anomalies_by_device.get(device),
                )
            )
            parts.append("</div>")
        parts.append("</div>")
    else:
        parts.append('<p class="empty">no device reported a numeric metric</p>')
    rules = data.rules
    thresholds = ", ".join(f"{t.metric} {t.op} {t.value:g}" for t in rules.thresholds) or "none"
    parts.append(f"<h2>Anomalies ({len(data.anomalies):,})</h2>")
    parts.append(
        f"<p class='meta'>z-score ≥ {rules.zscore:g} against the previous {rules.window} values "
        f"(at least {rules.min_points}); thresholds: {html.escape(thresholds)}</p>"
    )
    parts.append(
        _table(
            list(reversed(data.anomalies)),
            ["event_time", "device_id", "metric", "value", "kind", "score", "baseline"],
        )
    )
    parts.append(f"<h2>Stale devices ({len(data.stale):,})</h2>")
    parts.append(
        f"<p class='meta'>no data for more than {data.stale_intervals:g} of the device's own "
        f"reporting intervals (and at least {data.stale_min_seconds:g} s) before the newest "
        "event</p>"
    )
    parts.append(
        _table(data.stale, ["device_id", "messages", "last_seen", "avg_interval_s", "silent_s"])
    )
    parts.append("<h2>Hourly rollups</h2>")
    parts.append(
        _table(
            data.rollups_hour,
            [
                "bucket",
                "device_id",
                "topic",
                "metric",
                "n",
                "min_value",
                "max_value",
                "avg_value",
                "last_value",
            ],
        )
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if isinstance(value, datetime) else "-"


# ------------------------------------------------------------------------------- terminal


def print_summary(data: ReportData, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    ov = data.overview
    summary = Table(title="MCloudTT data", show_header=False)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    for key in ("messages", "devices", "topics", "bytes"):
        summary.add_row(key, f"{ov.get(key) or 0:,}")
    summary.add_row("first event", _when(ov.get("first_event")))
    summary.add_row("last event", _when(ov.get("last_event")))
    summary.add_row("anomalies", f"{len(data.anomalies):,}")
    summary.add_row("stale devices", f"{len(data.stale):,}")
    console.print(summary)
    if data.top_devices:
        top = Table(title="Busiest devices")
        top.add_column("device")
        top.add_column("messages", justify="right")
        top.add_column("last seen")
        for row in data.top_devices:
            top.add_row(str(row["device_id"]), f"{row['messages']:,}", _when(row["last_seen"]))
        console.print(top)
    if data.stale:
        stale = Table(title="Stale devices")
        for col in ("device", "messages", "last seen", "avg interval s", "silent s"):
            stale.add_column(col, justify="right" if col != "device" else "left")
        for row in data.stale[:20]:
            stale.add_row(
                str(row["device_id"]),
                f"{row['messages']:,}",
                _when(row["last_seen"]),
                f"{row['avg_interval_s'] or 0:.1f}",
                f"{row['silent_s']:.1f}",
            )
        console.print(stale)
    if data.anomalies:
        anomalies = Table(title=f"Anomalies (latest of {len(data.anomalies):,})")
        for col in ("time", "device", "metric", "value", "kind", "score"):
            anomalies.add_column(col)
        for row in data.anomalies[-15:]:
            anomalies.add_row(
                _when(row["event_time"]),
                str(row["device_id"]),
                str(row["metric"]),
                f"{row['value']:.4g}",
                row["kind"],
                f"{row['score']:.2f}",
            )
        console.print(anomalies)
