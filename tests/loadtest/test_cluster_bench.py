"""`mcloudtt-cluster-bench` end to end (short windows), and how it summarises runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mcloudtt_loadtest.cluster_bench import ops_check, summarize
from redisproc import redis_server_binary


def test_a_short_run_measures_every_figure_without_drops(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    env = dict(os.environ)
    env["PATH"] = f"{Path(redis_server_binary()).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mcloudtt_loadtest.cluster_bench",
            "--runs",
            "1",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--backplane",
            "none",  # the backplane figures: the next test
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    medians = json.loads(out.read_text())["medians"]
    for qos in (0, 1):
        assert medians[f"single_qos{qos}_msg_s"] > 1_000
        assert medians[f"cross_qos{qos}_msg_s"] > 1_000
        assert 0 < medians[f"qos{qos}_ratio"] < 5
    assert medians["cross_dropped"] == 0
    assert 0 < medians["cross_p50_ms"] <= medians["cross_p99_ms"]
    # Broker C has no subscriber: routed mode leaves it idle, broadcast mode does not.
    assert medians["routed_idle_broker_cpu_us_qos0"] < medians["broadcast_idle_broker_cpu_us_qos0"]
    assert "QoS 0 cross/single" in done.stdout and "cluster drops" in done.stdout


def test_backplanes_single_and_cluster_measure_redis_cost_against_the_plan(
    tmp_path: Path,
) -> None:
    """1 Redis and a 3-shard Redis Cluster in one short run: msg/s, Redis CPU and commands per
    cross-broker message for each, the plan's prediction beside the measured and its check."""
    from mcloudtt_simulator import sizing

    out = tmp_path / "backplanes.json"
    env = dict(os.environ)
    env["PATH"] = f"{Path(redis_server_binary()).parent}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "200"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mcloudtt_loadtest.cluster_bench",
            *("--runs", "1", "--duration", "0.5", "--warmup", "0.2", "--lone-messages", "30"),
            *("--backplane", "single,cluster", "--backplane-only", "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    medians = json.loads(out.read_text())["medians"]
    predicted = {0: sizing.REDIS_OPS_PER_CROSS_QOS0, 1: sizing.REDIS_OPS_PER_CROSS_QOS1}
    for kind in ("single", "cluster"):
        for qos in (0, 1):
            key = f"{kind}_qos{qos}"
            assert medians[f"{key}_backplane_msg_s"] > 1_000, key
            assert medians[f"{key}_redis_cpu_us_per_msg"] > 0, key
            assert medians[f"{key}_lone_redis_cpu_us_per_msg"] > 0, key
            # Batched at full load: far fewer commands per message than one at a time.
            assert (
                0 < medians[f"{key}_redis_ops_per_msg"] < medians[f"{key}_lone_redis_ops_per_msg"]
            )
            assert medians[f"{key}_predicted_ops_per_msg"] == predicted[qos]
            lone = medians[f"{key}_lone_redis_ops_per_msg"]
            assert medians[f"{key}_ops_ratio"] == pytest.approx(lone / predicted[qos])
            assert medians[f"{key}_ops_pass"] == float(abs(lone / predicted[qos] - 1) <= 0.2)
    # The backplane figures do not take the single-broker figure's name (the QoS 0/1 ratios').
    assert "single_qos0_msg_s" not in medians and "single_qos1_msg_s" not in medians
    assert "Cluster 3 shards" in done.stdout and "within 20 %" in done.stdout
    assert ("PASS" in done.stdout) or ("FAIL" in done.stdout)


def test_the_prediction_check_is_within_20_percent_of_the_plan() -> None:
    assert ops_check(5.9, 5.0) == (pytest.approx(1.18), True)
    assert ops_check(4.1, 5.0) == (pytest.approx(0.82), True)
    assert ops_check(6.1, 5.0)[1] is False and ops_check(3.9, 5.0)[1] is False
    medians = summarize([{"cluster_qos1_lone_redis_ops_per_msg": 7.0}])
    assert medians["cluster_qos1_ops_pass"] == 0.0
    assert medians["cluster_qos1_ops_ratio"] == pytest.approx(1.4)


def _run(single0: float, cross0: float, single1: float, cross1: float) -> dict[str, float]:
    return {
        "single_qos0_msg_s": single0,
        "cross_qos0_msg_s": cross0,
        "single_qos1_msg_s": single1,
        "cross_qos1_msg_s": cross1,
        "cross_qos0_dropped": 0.0,
        "cross_qos1_dropped": 0.0,
        "single_p50_ms": 0.1,
        "single_p99_ms": 0.3,
        "cross_p50_ms": 0.4,
        "cross_p99_ms": 1.0,
    }


def test_the_ratio_is_the_median_of_each_runs_own_ratio() -> None:
    # Per-run ratios 0.75, 0.6 and about 0.48: the median is 0.6, while the ratio of the medians
    # (100 / 200 = 0.5) would pair figures taken at different machine speeds.
    runs = [_run(200, 150, 100, 70), _run(100, 60, 50, 35), _run(210, 100, 110, 80)]
    medians = summarize(runs)
    assert medians["qos0_ratio"] == pytest.approx(0.6)
    assert medians["qos1_ratio"] == pytest.approx(0.7)
    assert medians["hop_adds_p99_ms"] == pytest.approx(0.7)
    assert medians["cross_dropped"] == 0
    runs[1]["cross_qos1_dropped"] = 3
    assert summarize(runs)["cross_dropped"] == 3
