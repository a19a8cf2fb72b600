"""`mcloudtt up`: the main job end to end (Redis, 3 brokers, adapter, fleet, dashboard, report),
and nothing of it left behind afterwards, however it ends."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
from mcloudtt_chaos.procs import free_block, free_port, http_get, scrape, wait_for

METADATA = {"seq", "sent", "ts"}  # the simulator's message metadata: never a measurement


def mcloudtt() -> str:
    exe = shutil.which("mcloudtt", path=str(Path(sys.executable).parent))
    assert exe is not None
    return exe


def up_command(
    tmp_path: Path, seconds: float, devices: int = 40
) -> tuple[list[str], list[str], int]:
    """The command, the markers one of which every child's command line carries, and the
    dashboard port."""
    base, http, dashboard = free_block(3), free_block(3), free_port()
    markers = [str(tmp_path), *(f"127.0.0.1:{port}" for port in (base, base + 1, base + 2))]
    command = [
        mcloudtt(),
        "up",
        "--seconds",
        str(seconds),
        "--devices",
        str(devices),
        "--base-port",
        str(base),
        "--http-port",
        str(http),
        "--dashboard",
        f"127.0.0.1:{dashboard}",
        "--duckdb",
        str(tmp_path / "up.duckdb"),
        "--report",
        str(tmp_path / "report.html"),
        "--workdir",
        str(tmp_path / "work"),
    ]
    return command, markers, dashboard


def left_behind(markers: list[str]) -> list[str]:
    """Command lines of live processes that mention a marker (the run's directory, a broker's
    address), the test's own process excepted."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if any(marker in cmdline for marker in markers) and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def state(port: int) -> dict:
    status, body = http_get(port, "/state", timeout=2.0)
    assert status == 200
    return json.loads(body)


def test_up_runs_the_whole_system_and_writes_a_report(tmp_path: Path) -> None:
    command, markers, dashboard = up_command(tmp_path, 20)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The live lag is the adapter's own figure (it once summed a histogram's series).
        snap = wait_for(
            lambda: _try_state(dashboard, lambda s: (s.get("adapter") or {}).get("rows")),
            timeout=60,
            what="rows through the adapter",
        )
        for _ in range(3):
            live = state(dashboard)
            real = scrape(snap["adapter_http"]).value("mcloudtt_adapter_event_lag_seconds")
            # Sampled a moment apart from the scrape (the live view refreshes each second, and
            # the lag grows by as much between two batches), so within 1.5 s or half the lag
            # (the summed series it once showed were many times too large).
            tolerance = max(1.5, 0.5 * real)
            assert abs(live["adapter"]["lag_s"] - real) <= tolerance, (live["adapter"], real)
            time.sleep(1)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()  # also on a failure: not left to a later test's collection
    assert proc.returncode == 0, out[-3000:]
    assert f"dashboard: http://127.0.0.1:{dashboard}" in out
    report = tmp_path / "report.html"
    html = report.read_text()
    assert "<svg" in html
    final = (tmp_path / "report-dashboard.html").read_text()  # the dashboard's last state
    assert "const FINAL={" in final and "broker-3" in final
    with duckdb.connect(str(tmp_path / "up.duckdb"), read_only=True) as con:
        rows, brokers = con.execute(
            "select count(*), count(distinct broker_id) from messages"
        ).fetchone()  # type: ignore[misc]
        names = {
            name
            for (name,) in con.execute(
                "select distinct unnest(metrics).name from messages where device_id is not null"
                " and topic not like '$SYS/%'"
            ).fetchall()
        }
        canary = con.execute(
            "select count(*), count(metrics) filter (where len(metrics) > 0) from messages"
            " where topic = 'mcloudtt/canary'"
        ).fetchone()  # type: ignore[misc]
    assert rows > 0
    assert brokers >= 2  # the fleet is spread over the brokers; the tap carries every broker's id
    assert names and not names & METADATA, names
    assert canary[0] > 0 and canary[1] == 0  # the canary's probes: stored, nothing measured
    # The report's per-device series and rollups chart measurements only.
    assert not re.search(r"<td>(seq|ts)</td>", html)
    assert not re.search(r"devices/[^<]*</td><td>sent</td>", html)
    for name in ("redis", "broker-1", "broker-2", "broker-3", "adapter", "simulator"):
        assert (tmp_path / "work" / f"{name}.log").exists()
    assert wait_for(lambda: not left_behind(markers), timeout=10, what="no process left"), (
        left_behind(markers)
    )

    # Straight after, on the same ports (their old connections in TIME_WAIT): a clean start.
    again = subprocess.run(
        [*command[:3], "4", *command[4:]], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "in use" not in again.stdout
    assert wait_for(lambda: not left_behind(markers), timeout=10, what="no process left")


def _try_state(port: int, check):  # type: ignore[no-untyped-def]
    try:
        snap = state(port)
    except (OSError, ValueError, AssertionError):
        return None
    return snap if snap and check(snap) else None


def test_nothing_is_left_after_sigkill_of_mcloudtt_up(tmp_path: Path) -> None:
    command, markers, dashboard = up_command(tmp_path, 120, devices=10)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(
            lambda: _try_state(dashboard, lambda s: s["fleet"]["running"]),
            timeout=60,
            what="the system running",
        )
        assert len(left_behind(markers)) >= 6  # Redis, 3 brokers, adapter, simulator
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert wait_for(lambda: not left_behind(markers), timeout=10, what="no process left"), (
        left_behind(markers)
    )


def test_a_child_dying_stops_everything(tmp_path: Path) -> None:
    command, markers, dashboard = up_command(tmp_path, 120, devices=10)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(
            lambda: _try_state(dashboard, lambda s: s["fleet"]["running"]),
            timeout=60,
            what="the system running",
        )
        (broker,) = [line for line in left_behind(markers) if "--id broker-2" in line]
        os.kill(int(broker.split(":")[0]), signal.SIGKILL)  # not from the dashboard: a crash
        out, _ = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 1, out[-3000:]
    assert "stopped unexpectedly: broker-2" in out
    assert wait_for(lambda: not left_behind(markers), timeout=10, what="no process left")
