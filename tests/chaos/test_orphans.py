"""Nothing outlives a SIGKILLed harness: not the Redis Cluster nodes and brokers of a pytest run
that never ran its teardown, not a bare `subprocess.Popen` child, not a child started from a
worker thread (PR_SET_PDEATHSIG would have killed it when the thread ended, and spares it when
the process dies), not a load test's Mosquitto peer, not the brokers and Redis of a
`mcloudtt-chaos run`."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from mcloudtt_chaos.procs import Process, console_script, wait_for

TESTS = Path(__file__).resolve().parents[1]

# Run by a pytest of its own with the suite's conftest as a plugin: the real fixtures.
_INNER = """
import json, os, subprocess, sys, threading, time
from pathlib import Path
from mcloudtt_chaos.procs import Process

def test_hold_everything(redis_cluster, broker_factory):
    brokers = [broker_factory("--redis", redis_cluster.url, "--id", f"b{i}") for i in (1, 2)]
    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    from_thread = []
    worker = threading.Thread(target=lambda: from_thread.append(
        Process(["sleep", "300"], die_with_parent=True).start()))
    worker.start()
    worker.join()  # the thread that started it has ended
    # A load test's comparison peer, as mcloudtt-bench starts it.
    from mcloudtt_chaos.procs import free_port
    from mcloudtt_loadtest.brokers import RunningBroker, make_launcher
    launcher = make_launcher("mosquitto", cache_dir=Path.cwd())
    launcher.prepare()
    peer = RunningBroker(launcher, free_port(), Path.cwd()).start().wait_port()
    pids = {
        "redis": [node.pid for node in redis_cluster.nodes],
        "brokers": [b.pid for b in brokers],
        "other": [bare.pid, from_thread[0].pid, peer.pid],
    }
    Path(os.environ["PIDS_FILE"]).write_text(json.dumps(pids))
    time.sleep(300)
"""


def _alive(pid: int) -> bool:
    """Running (a zombie has exited: only its parent, init here, has not reaped it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2 :][:1] not in (b"Z", b"X")


def _descendants(root: int) -> set[int]:
    """Every process below `root`, read from /proc (PPid), whatever session it is in."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "(gone)"


def _kill_and_expect_none_left(parent: Process, pids: set[int]) -> None:
    assert pids and all(_alive(pid) for pid in pids), {p: _alive(p) for p in pids}
    parent.kill()  # SIGKILL: no teardown, no atexit
    try:
        wait_for(
            lambda: not any(_alive(pid) for pid in pids),
            timeout=5,
            what="every child of the SIGKILLed parent gone",
        )
    except TimeoutError:
        left = {pid: _cmdline(pid) for pid in pids if _alive(pid)}
        for pid in left:  # not left for the next tests
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"left running after SIGKILL: {left}") from None


@pytest.mark.parametrize("workers", [[], ["-n", "1"]], ids=["one-process", "xdist"])
def test_a_sigkilled_pytest_leaves_no_redis_cluster_node_broker_or_child(
    tmp_path: Path, workers: list[str]
) -> None:
    # With xdist (as `./mcloudtt test` runs) the controller is killed, not the worker.
    (tmp_path / "test_inner.py").write_text(_INNER)
    pids_file = tmp_path / "pids.json"
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
        "-p", "no:locust", *workers, "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py"),
    ]  # fmt: skip
    inner = Process(
        command,
        name="inner-pytest",
        cwd=tmp_path,
        env={"PIDS_FILE": str(pids_file), "PYTHONPATH": str(TESTS)},
        log_path=tmp_path / "inner.log",
    )
    with inner.start():
        recorded = json.loads(
            inner.wait_until(
                lambda: pids_file.exists() and pids_file.read_text(),
                what="the inner test recording its children",
                timeout=60,
            )
        )
        assert len(recorded["redis"]) == 6 and len(recorded["brokers"]) == 2
        assert len(recorded["other"]) == 3
        pids = {pid for group in recorded.values() for pid in group}
        # Whatever else it started (the watchdog is meant to outlive it by a moment).
        pids |= {p for p in _descendants(inner.pid) if "watchdog.py" not in _cmdline(p)}
        _kill_and_expect_none_left(inner, pids)


def test_a_sigkilled_chaos_run_leaves_no_broker_redis_or_proxy(tmp_path: Path) -> None:
    command = [
        *console_script("mcloudtt-chaos"), "run", "redis-freeze", "--backend", "local",
        "--brokers", "2", "--seconds", "60", "--workdir", str(tmp_path / "run"),
    ]  # fmt: skip
    run = Process(
        command,
        name="chaos-run",
        log_path=tmp_path / "chaos.log",
    )
    with run.start():

        def brokers_up() -> set[int] | None:
            below = _descendants(run.pid)
            brokers = [p for p in below if "mcloudtt-broker" in _cmdline(p)]
            return below if len(brokers) == 2 else None

        below = run.wait_until(brokers_up, what="its two brokers running", timeout=60)
        time.sleep(0.5)  # Redis and the proxies are up with them
        pids = {p for p in _descendants(run.pid) | below if "watchdog.py" not in _cmdline(p)}
        assert any("redis-server" in _cmdline(p) for p in pids), [_cmdline(p) for p in pids]
        _kill_and_expect_none_left(run, pids)


def test_a_normal_exit_leaves_children_as_before(tmp_path: Path) -> None:
    # What a harness leaves running when it exits normally stays (an atexit hook tells the
    # watchdog so); only a parent that dies without exiting takes its children with it.
    code = (
        "from mcloudtt_chaos.procs import Process\n"
        "print(Process(['sleep', '60']).start().pid, flush=True)\n"
    )
    parent = Process([sys.executable, "-c", code], log_path=tmp_path / "parent.log").start()
    child = int(parent.wait_log(r"(?m)^(\d+)$").group(1))
    assert parent.proc is not None and parent.proc.wait(10) == 0
    try:
        time.sleep(1.0)  # the watchdog has seen the pipe close
        assert _alive(child)
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_killed_watchdog_is_replaced_before_the_next_child(tmp_path: Path) -> None:
    code = (
        "import os, signal, time\n"
        "from mcloudtt_chaos.procs import Process\n"
        "from mcloudtt_chaos.watchdog import guard\n"
        "first = Process(['sleep', '60']).start()\n"
        "os.kill(guard().proc.pid, signal.SIGKILL)\n"
        "guard().proc.wait()\n"
        "second = Process(['sleep', '61']).start()\n"
        "print(first.pid, second.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = Process([sys.executable, "-c", code], log_path=tmp_path / "parent.log").start()
    with parent:
        match = parent.wait_log(r"(?m)^(\d+) (\d+)$")
        _kill_and_expect_none_left(parent, {int(match.group(1)), int(match.group(2))})
