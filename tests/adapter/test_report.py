"""The report command: an offline HTML page with charts, and a summary in the terminal."""

from __future__ import annotations

import re
import subprocess

from mcloudtt_adapter.analysis import Analysis, DuckDBEngine
from mcloudtt_adapter.report import build_report, render_html, svg_chart
from mcloudtt_adapter.sinks.duckdb import DuckDBSink

from .helpers import adapter_command, fleet


def _db(tmp_path):
    path = tmp_path / "r.duckdb"
    sink = DuckDBSink(path)
    sink.open()
    sink.write(fleet(900))
    sink.close()
    return path


def test_report_command_writes_offline_html_and_a_terminal_summary(tmp_path) -> None:
    path = _db(tmp_path)
    out = tmp_path / "report.html"
    result = subprocess.run(
        [
            *adapter_command(),
            "report",
            "--duckdb",
            str(path),
            "--out",
            str(out),
            "--threshold",
            "temp>40",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    assert page.count("<svg") >= 1 + 5  # message rate and one per device
    assert "Stale devices (1)" in page and "d4" in page
    # The charted measurement with its unit, on the heading and on each chart's axis.
    assert "<code>temp</code> in °C" in page and page.count('class="axis">°C</text>') >= 4
    assert "Anomalies (" in page and 'class="anomaly"' in page
    # Works offline: no scripts, no external references (the SVG namespace is not fetched).
    assert "<script" not in page
    assert not [
        u for u in re.findall(r"https?://[^\"' )]+", page) if u != "http://www.w3.org/2000/svg"
    ]
    assert "MCloudTT data" in result.stdout and "Stale devices" in result.stdout
    assert "Anomalies" in result.stdout


def test_report_errors_are_one_line(tmp_path) -> None:
    result = subprocess.run(
        [*adapter_command(), "report", "--duckdb", str(tmp_path / "none.duckdb")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "no such file" in result.stderr
    path = _db(tmp_path)
    result = subprocess.run(
        [*adapter_command(), "report", "--duckdb", str(path), "--threshold", "temp=>1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "METRIC>VALUE" in result.stderr


def test_empty_table_still_renders(tmp_path) -> None:
    sink = DuckDBSink(":memory:")
    sink.open()
    data = build_report(Analysis(DuckDBEngine(sink.con)))
    page = render_html(data)
    assert "no data" in page and "none" in page


def test_svg_chart_handles_flat_and_single_points() -> None:
    from datetime import UTC, datetime

    t = datetime(2026, 1, 1, tzinfo=UTC)
    svg = svg_chart([("a", [(t, 5.0)])])
    assert svg.startswith("<svg") and "circle" in svg
    svg = svg_chart([("a", [(t, 1.0), (t.replace(minute=1), 1.0)])], markers=[(t, 1.0, "x")])
    assert 'class="anomaly"' in svg
