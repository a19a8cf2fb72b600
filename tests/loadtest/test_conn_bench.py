"""`mcloudtt-conn-bench` end to end at 2,000 idle subscribed connections, over two source
addresses and two generator processes, against a real mcloudtt-broker process."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from mcloudtt_loadtest.conn_bench import client_packets, flatness, limits_note


def test_two_thousand_connections_are_held_and_measured(tmp_path: Path) -> None:
    out = tmp_path / "conn.json"
    cmd = [
        *(sys.executable, "-m", "mcloudtt_loadtest.conn_bench"),
        *("--steps", "1000,2000", "--per-source", "1200", "--generators", "2"),
        *("--fanin-seconds", "0.5", "--rest-seconds", "0.5", "--json", str(out)),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["sources"] == 2  # 127.0.0.2 and 127.0.0.3: past one address's share
    assert [row["held"] for row in result["steps"]] == [1000, 2000]
    assert result["largest_held"] == 2000
    assert result["stopped_by"] is None
    for row in result["steps"]:
        assert not row["connect_errors"]
        assert row["connect_per_s"] > 0
        assert 0 < row["kb_per_conn"] < 50  # RSS grew with the connections (noisy, so loose)
        assert 0 < row["kb_per_conn_step"] < 50  # and with this step's connections alone
        assert row["qos0_fanin_msg_per_s"] > 0  # the broker still routes with them all held
    assert "2,000 held" in done.stdout
    assert "per connection, step over step: " in done.stdout


def test_step_over_step_memory_is_called_flat_only_within_ten_percent() -> None:
    assert flatness([{"kb_per_conn_step": 2.30}, {"kb_per_conn_step": 2.35}]) == (
        "2.30 -> 2.35 KB: flat (within 2%)"
    )
    rising = flatness([{"kb_per_conn_step": 2.0}, {"kb_per_conn_step": 2.6}])
    assert rising == "2.00 -> 2.60 KB: rising (30% apart), not flat"


def test_a_step_beyond_the_descriptor_limit_is_refused_with_the_reason() -> None:
    cap, reason = limits_note(10**9)
    assert cap < 10**9
    assert reason is not None and reason.startswith("descriptors:")


def test_each_client_subscribes_to_its_own_filter() -> None:
    first, second = client_packets(1), client_packets(2)
    assert b"devices/1/cmd" in first and b"cb-1" in first
    assert b"devices/2/cmd" in second and first != second


def _hard_limit_2500() -> None:
    # Lowering a hard limit needs no privilege: the same situation as this machine's 20,000.
    resource.setrlimit(resource.RLIMIT_NOFILE, (2_500, 2_500))


def test_a_million_blocked_by_descriptors_is_said_in_one_line_and_the_limit_is_reached(
    tmp_path: Path,
) -> None:
    out = tmp_path / "conn.json"
    cmd = [
        *(sys.executable, "-m", "mcloudtt_loadtest.conn_bench"),
        *("--steps", "1000,1000000", "--per-source", "1200", "--generators", "2"),
        *("--fanin-seconds", "0.3", "--rest-seconds", "0.3", "--json", str(out)),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, preexec_fn=_hard_limit_2500
    )
    assert done.returncode == 0, done.stderr[-2000:]
    first = done.stdout.splitlines()[0]
    assert first.startswith("limits: at most 1,500 connections here, so 1,000,000 is blocked:")
    assert "hard limit is 2500" in first or "fs." in first  # CAP_SYS_RESOURCE could raise it
    result = json.loads(out.read_text())
    # The steps below the limit, then the limit itself; then what stopped it.
    assert [row["target"] for row in result["steps"]] == [1000, 1500]
    assert result["largest_held"] == 1500
    assert result["stopped_by"].startswith("1,000,000 is over the 1,500 the limits allow;")
    assert result["limit"]["connections"] == 1500
