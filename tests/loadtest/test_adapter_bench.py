"""`mcloudtt-adapter-bench` (moved out of the adapter package) end to end at a tiny size: a real
broker, the publisher process on the client codec, and the adapter ingesting into DuckDB."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_tiny_run_ingests_every_message(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "mcloudtt_loadtest.adapter_bench",
        "--messages",
        "3000",
        "--live-messages",
        "1000",
        "--latency-rate",
        "500",
        "--latency-seconds",
        "1",
        "--batch-rows",
        "500",
        "--pin",
        "off",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    # Every publish reached DuckDB once: the publisher's QoS 1 flow (its PUBLISH and PUBACK
    # handling) and the adapter's at-least-once path agree on the count.
    assert results["rows_in_duckdb"] == results["committed"] == 3000 + 1000 + 500
    assert results["backlog"]["messages"] == 3000 and results["backlog"]["rate"] > 0
    assert results["live"]["messages"] == 1000
    lat = results["latency_ms"]
    assert lat["messages"] == 500 and 0 < lat["p50"] <= lat["max"]
