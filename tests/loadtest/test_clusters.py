"""The cluster head-to-head of `mcloudtt-bench`: MCloudTT and Aedes on one Redis, short.

Aedes needs Node.js and npm (Debian: `apt-get install -y nodejs npm`) and, on first use, the npm
registry (the pinned packages go to ~/.cache/mcloudtt/aedes); without node/npm the Aedes test
is skipped and the skip itself is checked.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from mcloudtt_loadtest.brokers import BrokerUnavailable
from mcloudtt_loadtest.clusters import prepare_aedes, run_clusters, write_html

HAVE_NODE = shutil.which("node") is not None and shutil.which("npm") is not None


@pytest.mark.skipif(not HAVE_NODE, reason="needs Node.js and npm (apt-get install -y nodejs npm)")
def test_two_node_clusters_of_both_systems_deliver_across_redis(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_clusters([2], runs=1, warmup=0.2, duration=0.6, log=lines.append)
    assert result["errors"] == [], result["errors"]
    assert result["versions"]["aedes"]["aedes"] == "1.2.0"
    for system in ("mcloudtt", "aedes"):
        figures = result["median"][system]["2"]
        # The subscriber is on the other node: anything received crossed Redis.
        assert figures["qos0_msg_per_s"] > 0 and figures["qos1_msg_per_s"] > 0, system
    assert set(result["ratios"]["2"]) == {"qos0", "qos1"}
    page = tmp_path / "report.html"
    write_html({"meta": {"commit": "abc"}, "clusters": result}, page)
    text = page.read_text()
    assert "Clusters on one Redis" in text and "data:image/png;base64," in text


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
