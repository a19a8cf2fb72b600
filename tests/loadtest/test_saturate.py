"""`mcloudtt-saturate` on a short ramp (one 2-second step of 10 users per scenario): fresh real
brokers (a standalone one; three on a real redis-server), locust in a subprocess with the
saturation shape, one table and one JSON document."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SHORT = ("--step-users", "10", "--step-time", "2", "--max-users", "10", "--p99-ms", "1000")


def saturate(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "saturation.json"
    cmd = [sys.executable, "-m", "mcloudtt_loadtest.saturate", *SHORT, "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_one_broker_per_scenario_messages_and_connects(tmp_path: Path) -> None:
    doc, output = saturate(
        tmp_path, "--sizes", "1", "--scenarios", "fan-in,cross-broker,reconnect-storm,retained"
    )
    per = doc["results"]["1"]
    fan_in = per["fan-in"]
    best = fan_in["highest_held"]
    assert fan_in["measure"] == "recv" and best["held"] and best["users"] == 10
    # 8 devices at 20 msg/s, each message to both consumers; the step saw its own messages.
    assert best["received_per_s"] > 50 and best["lost"] == 0 and best["failures"] == 0
    assert 0 < best["p99_ms"] <= 1000
    assert fan_in["published_on_broker"][0] > 0
    assert per["cross-broker"] == {"skipped": "needs 2 or more brokers"}
    storm = per["reconnect-storm"]
    # No messages in a storm: judged on CONNECT (10 users reconnecting every 0.5 s).
    assert storm["measure"] == "connect"
    assert storm["highest_held"]["connects_per_s"] > 5
    assert storm["highest_held"]["received_per_s"] == 0
    retained = per["retained"]
    # Judged on the time from SUBSCRIBE to the last of the 100 retained messages.
    assert retained["measure"] == "retained"
    assert retained["highest_held"]["p99_ms"] > 0
    assert retained["highest_held"]["received_per_s"] >= 100
    assert doc["meta"]["versions"]["locust"] and doc["meta"]["machine"]["cpus"]
    assert "saturation: highest step that held" in output and "connects/s" in output


def test_three_brokers_share_the_load_and_messages_cross(tmp_path: Path) -> None:
    doc, output = saturate(tmp_path, "--sizes", "3", "--scenarios", "cross-broker")
    r = doc["results"]["3"]["cross-broker"]
    best = r["highest_held"]
    assert best is not None and best["lost"] == 0 and best["received_per_s"] > 50
    # Users go round-robin over the three brokers (consumers from the first, devices from the
    # second on): the devices published on the other two, so what arrived crossed Redis.
    published = r["published_on_broker"]
    assert published[1] > 0 and published[2] > 0, published
    assert best["locust_processes"] == 1 and 0 <= best["locust_cpu"] < 2
    assert "cross-broker" in output
