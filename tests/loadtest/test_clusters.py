"""The cluster head-to-head of `mcloudtt-bench`: MCloudTT and Aedes on one Redis, short.

Aedes needs Node.js and npm (Debian: `apt-get install -y nodejs npm`) and, on first use, the npm
registry (the pinned packages go to ~/.cache/mcloudtt/aedes); without node/npm the Aedes test
is skipped and the skip itself is checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mcloudtt_loadtest.brokers import BrokerUnavailable
from mcloudtt_loadtest.clusters import prepare_aedes, run_clusters, write_html

HAVE_NODE = shutil.which("node") is not None and shutil.which("npm") is not None


@pytest.mark.skipif(not HAVE_NODE, reason="needs Node.js and npm (apt-get install -y nodejs npm)")
def test_two_node_clusters_of_both_systems_deliver_across_redis(tmp_path: Path) -> None:
    # The command as a user runs it, clusters only (--scenarios none), one short run.
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "mcloudtt_loadtest.bench", "--brokers", "mcloudtt"]
    cmd += ["--scenarios", "none", "--clusters", "2", "--runs", "1", "--warmup", "0.2"]
    cmd += ["--duration", "0.6", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    doc = json.loads(out.read_text())
    result = doc["clusters"]
    assert result["errors"] == [], result["errors"]
    assert result["versions"]["aedes"]["aedes"] == "1.2.0"
    assert result["nodes"]["2"] == {"publishers": 1, "subscriber": 2}
    for system in ("mcloudtt", "aedes"):
        figures = result["median"][system]["2"]
        # The subscriber is on the other node: anything received crossed Redis.
        assert figures["qos0_msg_per_s"] > 0 and figures["qos1_msg_per_s"] > 0, system
    assert set(result["ratios"]["2"]) == {"qos0", "qos1"}
    ours = result["median"]["mcloudtt"]["2"]
    assert ours["pub_node_deliveries"] == 0 and ours["sub_node_client_publishes"] == 0
    (target,) = result["targets"]
    assert target["value"] == result["ratios"]["2"]["qos1"] and target["pass"] is not None
    assert "ratio QoS 1" in done.stdout and "MCloudTT/Aedes at 2 nodes" in done.stdout
    meta = doc["meta"]
    assert meta["machine"]["cpus"] and meta["machine"]["loadavg_1_5_15"]
    assert "aedes" in meta["brokers"] and "commit" in meta
    text = out.with_suffix(".html").read_text()
    assert "Clusters on one Redis" in text and "data:image/png;base64," in text
    assert "target: cross-broker QoS 1" in text
    page = tmp_path / "report.html"
    write_html({"meta": {"commit": "abc"}, "clusters": result}, page)
    assert "Clusters on one Redis" in page.read_text()


def test_without_node_aedes_is_skipped_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no node, no npm
    with pytest.raises(BrokerUnavailable, match=r"Node\.js and npm are not installed"):
        prepare_aedes(tmp_path / "cache")
    lines: list[str] = []
    result = run_clusters([], runs=1, warmup=0.1, duration=0.1, log=lines.append)
    assert "aedes" in result["skipped"]
    assert any(line.startswith("skipping Aedes: Node.js and npm") for line in lines)
    assert os.environ["PATH"] == str(tmp_path)
