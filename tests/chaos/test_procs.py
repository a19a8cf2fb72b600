"""The local-process toolkit against real processes: readiness waits with deadlines and log tails,
process-group stop/pause/resume/kill, the Redis starter, and /metrics through prometheus-client."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import redis
from mcloudtt_chaos.procs import (
    Metrics,
    Process,
    ProcessError,
    ProcessTimeout,
    RedisServer,
    console_script,
    free_block,
    free_port,
    mosquitto_binary,
    parse_metrics,
    port_free,
    redis_server_binary,
    run_concurrently,
    scrape,
    wait_for,
)

PY = sys.executable


def _python(code: str, **kwargs: object) -> Process:
    return Process([PY, "-u", "-c", code], name="child", **kwargs)  # type: ignore[arg-type]


def _gone(pid: int) -> bool:
    """Dead (SIGKILL is delivered asynchronously: callers wait for this)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); its state says it is dead.
    try:
        return _state(pid) == "Z"
    except FileNotFoundError:
        return True


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_free_ports_are_bindable_and_a_taken_one_is_not() -> None:
    port = free_port()
    assert port_free(port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert not port_free(port)
    first = free_block(3)
    assert all(port_free(first + i) for i in range(3))


def test_free_ports_are_never_the_kernels_picks_nor_given_twice() -> None:
    # A port from bind(0) is the kernel's next pick again (for a listener on port 0 or an
    # outgoing connection) once closed; ours come from below that range and are given once.
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert not [p for p in ports if low <= p <= high]
    block = free_block(4)
    assert not set(range(block, block + 4)) & set(ports)


def test_a_port_in_time_wait_is_free_as_the_servers_bind() -> None:
    # The servers bind with SO_REUSEADDR: a port whose last connection sits in TIME_WAIT (the
    # server closed first) takes a new listener, so the check must say free.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server's side closes first: it holds the TIME_WAIT
        client.recv(1)
        client.close()
    assert port_free(port)


def test_a_child_dies_with_its_parent_even_on_sigkill(tmp_path: Path) -> None:
    # The parent starts a `sleep` with die_with_parent, prints its pid, and is SIGKILLed.
    code = (
        "import sys, time\n"
        "from mcloudtt_chaos.procs import Process\n"
        "p = Process(['sleep', '300'], die_with_parent=True).start()\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    parent = _python(code, log_path=tmp_path / "parent.log").start()
    try:
        line = parent.wait_log(r"(?m)^(\d+)$")
        child = int(line.group(1))
        assert not _gone(child)
        parent.kill()
        wait_for(lambda: _gone(child), timeout=5, what="the child gone with its parent")
    finally:
        parent.close()


def test_binaries_are_found() -> None:
    assert Path(redis_server_binary()).exists()
    assert Path(mosquitto_binary()).exists()
    assert Path(console_script("mcloudtt-broker")[0]).exists()
    assert console_script("no-such-script", "mcloudtt_broker") == [PY, "-m", "mcloudtt_broker"]


def test_a_process_that_exits_before_listening_fails_with_its_log_tail() -> None:
    child = _python("print('config error: no such option --frobnicate'); raise SystemExit(2)")
    with child, pytest.raises(ProcessError) as caught:
        child.wait_port(free_port(), timeout=10)
    message = str(caught.value)
    assert "exited with 2 before listening" in message
    assert "config error: no such option --frobnicate" in message
    assert not isinstance(caught.value, TimeoutError)
    assert not child.log_path.exists()  # a temporary log goes with close()


def test_a_process_that_never_gets_ready_times_out_with_its_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "slow.log"
    child = _python("import time; print('still loading'); time.sleep(60)", log_path=log)
    started = time.monotonic()
    with child, pytest.raises(ProcessTimeout) as caught:
        child.wait_http(free_port(), "/readyz", timeout=0.5)
    assert time.monotonic() - started < 5
    assert isinstance(caught.value, TimeoutError)
    assert "not answering 200" in str(caught.value) and "still loading" in str(caught.value)
    assert log.exists()  # a log the caller named stays


def test_wait_log_and_wait_http_see_a_real_server() -> None:
    port = free_port()
    code = (
        "import http.server, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200 if self.path == '/readyz' else 404); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        f"s = http.server.HTTPServer(('127.0.0.1', {port}), H)\n"
        "print('serving on', s.server_port, flush=True)\n"
        "s.serve_forever()\n"
    )
    with _python(code, port=port, http_port=port) as child:
        match = child.wait_log(r"serving on (\d+)", timeout=10)
        assert int(match.group(1)) == port
        child.wait_port().wait_http()  # its own port, /readyz 200
        with pytest.raises(ProcessTimeout):
            child.wait_http(port, "/nothing-here", timeout=0.3)
        assert child.alive()
    assert child.returncode == -signal.SIGTERM


def test_stop_kills_the_whole_group_after_the_timeout() -> None:
    # The leader ignores SIGTERM and has a child that does too: both must go.
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "kid = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        "print('child', kid.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = _python(code).start()
    kid = int(child.wait_log(r"child (\d+)", timeout=10).group(1))
    started = time.monotonic()
    assert child.stop(timeout=0.5) == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 5
    wait_for(lambda: _gone(kid), timeout=2, what="the child to die")
    child.close()


def test_a_graceful_stop_reports_the_exit_status() -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    with _python(code) as child:
        child.wait_log("up")
        assert child.stop() == 0


def test_pause_freezes_the_group_resume_thaws_it_kill_crashes_it() -> None:
    code = (
        "import subprocess, sys, time\n"
        "kid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('child', kid.pid, flush=True)\n"
        "n = 0\n"
        "while True:\n"
        "    n += 1; print('tick', n, flush=True); time.sleep(0.02)\n"
    )
    with _python(code) as child:
        kid = int(child.wait_log(r"child (\d+)", timeout=10).group(1))
        child.wait_log("tick 3")
        child.pause()
        time.sleep(0.1)
        assert _state(child.pid) == "T" and _state(kid) == "T"
        frozen = child.log_text().count("tick")
        time.sleep(0.3)
        assert child.log_text().count("tick") == frozen
        child.resume()
        child.wait_until(lambda: child.log_text().count("tick") > frozen + 3, what="ticking")
        assert child.kill() == -signal.SIGKILL
        assert not child.alive()
        wait_for(lambda: _gone(kid), timeout=2, what="the child to die")


def test_a_paused_process_still_stops() -> None:
    with _python("import time; print('up', flush=True); time.sleep(60)") as child:
        child.wait_log("up")
        child.pause()
        assert child.stop(timeout=5) == -signal.SIGTERM


def test_redis_server_with_password_and_appendonly_restarts_on_its_port() -> None:
    with RedisServer(password="s3cret", appendonly=True).start() as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.set("k", "v")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, password="wrong").ping()
        client.close()
        server.kill()
        server.start()  # same port, same data directory: the append-only file is read back
        again = redis.Redis.from_url(server.url)
        assert again.get("k") == b"v"
        again.close()
    assert not server.data_dir.exists()


def test_redis_extra_args_come_last_and_override() -> None:
    with RedisServer(extra_args=["--databases", "3", "--appendonly", "yes"]).start() as server:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("databases") == {"databases": "3"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.close()


def test_parse_metrics_keys_samples_by_name_and_labels() -> None:
    text = (
        "# HELP mcloudtt_messages_received_total Messages received.\n"
        "# TYPE mcloudtt_messages_received_total counter\n"
        'mcloudtt_messages_received_total{qos="0"} 12345678901\n'
        'mcloudtt_messages_received_total{qos="1"} 2\n'
        "# TYPE mcloudtt_connections gauge\n"
        "mcloudtt_connections 3\n"
        "# TYPE x_seconds histogram\n"
        'x_seconds_bucket{le="0.1",op="a"} 1\n'
        'x_seconds_bucket{le="+Inf",op="a"} 2\n'
        'x_seconds_count{op="a"} 2\n'
        'x_seconds_sum{op="a"} 0.5\n'
    )
    metrics = parse_metrics(text)
    assert isinstance(metrics, Metrics)
    assert metrics.value("mcloudtt_messages_received_total", qos="0") == 12_345_678_901
    assert metrics.total("mcloudtt_messages_received_total") == 12_345_678_903
    assert metrics.value("mcloudtt_connections") == 3
    assert metrics.value("mcloudtt_connections", qos="0") == 0.0  # other labels: another sample
    assert metrics.value("x_seconds_bucket", op="a", le="+Inf") == 2
    assert metrics.total("x_seconds_bucket", op="a") == 3
    assert metrics.value("absent") == 0.0


def test_scrape_reads_a_real_broker(broker) -> None:  # type: ignore[no-untyped-def]
    metrics = scrape(broker.http_port)
    assert ("mcloudtt_connections", ()) in metrics
    assert metrics.value("mcloudtt_connections") == 0
    with pytest.raises(OSError):
        scrape(free_port())


def test_redis_takes_a_port_set_before_start() -> None:
    # Redis brought up where a client already waits: the command is made at start().
    server = RedisServer()
    server.port = free_port()
    with server.start():
        client = redis.Redis(port=server.port)
        assert client.ping()
        client.close()


def test_run_concurrently_collects_status_and_stderr_and_kills_what_does_not_exit() -> None:
    started = time.monotonic()
    results = run_concurrently(
        {
            "refuses": ([PY, "-c", "import sys; sys.exit('bad option --x')"], None),
            "hangs": ([PY, "-c", "import time; time.sleep(60)"], {"PATH": os.environ["PATH"]}),
        },
        timeout=1.0,
    )
    assert results["refuses"] == (1, "bad option --x\n")
    assert results["hangs"] == (-signal.SIGKILL, "")
    assert time.monotonic() - started < 10


def test_what_outlives_a_graceful_leader_is_killed_with_its_group() -> None:
    code = (
        "import signal, subprocess, sys, time\n"
        "kid = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "print('child', kid.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    with _python(code) as child:
        kid = int(child.wait_log(r"child (\d+)", timeout=10).group(1))
        assert child.stop() == 0
        wait_for(lambda: _gone(kid), timeout=2, what="the orphan to die")
        assert child.stop() == 0  # stopping again signals nobody, says the same


def test_a_process_can_be_pinned_to_cpus() -> None:
    cpu = min(os.sched_getaffinity(0))
    with _python("import time; print('up', flush=True); time.sleep(60)", cpus={cpu}) as child:
        child.wait_log("up")
        assert os.sched_getaffinity(child.pid) == {cpu}
