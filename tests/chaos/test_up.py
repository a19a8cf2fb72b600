"""`mcloudtt up`: the main job end to end (Redis, 3 brokers, adapter, fleet, report)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
from mcloudtt_chaos.procs import free_block


def test_up_runs_the_whole_system_and_writes_a_report(tmp_path: Path) -> None:
    exe = shutil.which("mcloudtt", path=str(Path(sys.executable).parent))
    assert exe is not None
    base, http = free_block(3), free_block(3)
    db = tmp_path / "up.duckdb"
    report = tmp_path / "report.html"
    result = subprocess.run(
        [
            exe,
            "up",
            "--seconds",
            "10",
            "--devices",
            "40",
            "--base-port",
            str(base),
            "--http-port",
            str(http),
            "--duckdb",
            str(db),
            "--report",
            str(report),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert report.exists() and "<svg" in report.read_text()
    with duckdb.connect(str(db), read_only=True) as con:
        rows, brokers = con.execute(
            "select count(*), count(distinct broker_id) from messages"
        ).fetchone()  # type: ignore[misc]
    assert rows > 0
    assert brokers >= 2  # the fleet is spread over the brokers; the tap carries every broker's id
    for name in ("redis", "broker-1", "broker-2", "broker-3", "adapter", "simulator"):
        assert (tmp_path / "work" / f"{name}.log").exists()
