"""What a chaos backend does: the one interface the scenarios are written against.

A scenario says *what* breaks ("kill broker b", "cut b from Redis for 5 s"); a backend says *how*
on its platform: signals and a fault proxy for `local`, network namespaces and links for `netns`,
kubectl for `kind`, the Docker CLI for `docker`. The workload only ever sees `Endpoint`s, so the
same scenario, workload and checker run on every backend.

Brokers are named `b0`, `b1`, ... (their broker ids); `redis` is the one Redis server.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Generic, Literal, Protocol, Self, TypeVar

from .procs import Process, RedisServer, http_get, port_open, wait_for


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """Where the workload reaches one broker."""

    name: str  # the broker id
    host: str
    mqtt_port: int
    http_port: int  # /healthz, /readyz, /metrics


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """The cluster a scenario asks for."""

    brokers: int = 3
    # Extra broker options as on the command line (e.g. ["--presence-ttl", "3"]).
    broker_args: tuple[str, ...] = ()
    # Redis starts only when `start_redis()` is called (brokers-before-redis).
    redis_first: bool = True
    redis_appendonly: bool = True
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class LinkFault:
    """A degraded link (Toxiproxy's toxics); None leaves that toxic off."""

    latency_ms: float | None = None
    jitter_ms: float = 0.0
    bandwidth_bytes_per_s: float | None = None
    slice_bytes: int | None = None  # deliver in pieces of this size
    blackhole: bool = False  # accept and forward nothing


class Backend(Protocol):
    """One platform's way of running and breaking a cluster. Every method blocks until done."""

    name: str

    def setup(self, spec: ClusterSpec) -> None:
        """Start Redis (unless `spec.redis_first` is False) and the brokers; return once each
        broker serves MQTT (not necessarily ready: Redis may be down on purpose)."""
        ...

    def teardown(self) -> None:
        """Stop everything and remove all the run made (processes, namespaces, containers).
        Safe to call twice and after a partial setup."""
        ...

    def endpoints(self) -> list[Endpoint]:
        """Every broker, in id order, also those currently down (their address stays)."""
        ...

    def readyz(self, broker: str) -> tuple[int, str]:
        """`/readyz` of one broker: (status, body); (0, reason) when it cannot be reached."""
        ...

    # Redis
    def start_redis(self) -> None: ...
    def kill_redis(self) -> None:
        """SIGKILL (or the platform's equivalent); data not yet on disk is gone."""
        ...

    def restart_redis(self, *, keep_data: bool = True) -> None:
        """Start Redis again after `kill_redis`; with keep_data False it comes back empty."""
        ...

    def freeze_redis(self) -> None: ...  # SIGSTOP / docker pause
    def thaw_redis(self) -> None: ...

    # Brokers
    def kill_broker(self, broker: str) -> None: ...  # SIGKILL, no drain
    def stop_broker(self, broker: str) -> None: ...  # SIGTERM and its drain
    def start_broker(self, broker: str) -> None:
        """Start a broker again under the same id and address (a StatefulSet pod)."""
        ...

    def freeze_broker(self, broker: str) -> None: ...
    def thaw_broker(self, broker: str) -> None: ...

    # Links
    def cut_from_redis(self, broker: str) -> None:
        """The broker loses Redis; its clients still reach it."""
        ...

    def cut_from_clients(self, broker: str) -> None:
        """The broker's clients lose it; it still reaches Redis."""
        ...

    def heal(self, broker: str) -> None:
        """Undo every cut and degradation of this broker's links."""
        ...

    def degrade_redis_link(self, broker: str, fault: LinkFault) -> None:
        """Slow the link between one broker and Redis (both directions)."""
        ...


# --------------------------------------------------------------------------- shared by backends

_LIVE: set[BackendBase] = set()  # torn down at exit, whatever happened


def _teardown_all() -> None:
    for backend in list(_LIVE):
        with contextlib.suppress(Exception):
            backend.teardown()


atexit.register(_teardown_all)


def _unwind(signum: int, frame: FrameType | None) -> None:
    # As Ctrl-C does: the callers' `finally` blocks and the atexit hook tear the run down
    # (the default action of SIGTERM/SIGHUP skips both).
    raise SystemExit(128 + signum)


def unwind_on_signals() -> None:
    """SIGTERM (a CI job cancelled, `kill`) and SIGHUP (the terminal closed) end the run like
    Ctrl-C; only in the main thread and where nobody has chosen a handler already. `setup`
    calls it, and so must whoever calls `setup` off the main thread (the scenario runner)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _unwind)


def process_start_time(pid: int) -> str | None:
    """When a process started (clock ticks since boot): with the pid, who it is (None: gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_alive(pid: int, started: str | None) -> bool:
    """Whether the process that made a run still runs (not another one that got its pid)."""
    now = process_start_time(pid)
    return now is not None and (started is None or now == started)


def rss_of(pid: int | None) -> int | None:
    """Resident memory of a process in bytes (None: not running)."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


class BackendBase:
    """The life cycle every process-running backend shares; a subclass says only how.

    The order is the base's: `setup` builds everything without starting it (`_build`), starts
    Redis unless the scenario wants it late, starts every broker, then waits until each serves
    MQTT; on any failure, also Ctrl-C half way, it tears down what it made. `teardown` stops the
    brokers first (they drain), Redis last, then removes what the run made (`_release`), each
    step whatever the one before did, and is safe twice; an atexit hook and SIGTERM/SIGHUP
    (unwound like Ctrl-C) call it for runs whose caller did not.
    """

    name: str
    workdir_prefix = "mcloudtt-chaos-"

    def __init__(self, workdir: Path | str | None = None, *, seed: int | None = None) -> None:
        # None: a temporary directory made at setup and removed at teardown; one set (by the
        # caller, or by the runner: the run's directory) keeps the logs and Redis's files.
        self.workdir: Path | None = Path(workdir) if workdir else None
        self._own_dir = False
        self.seed = seed
        self.spec = ClusterSpec()

    # ---------------------------------------------------------------- what a backend says

    def _check(self, spec: ClusterSpec) -> None:
        """Raise (with why) when this machine cannot run `spec`; before anything is made."""

    def _build(self, spec: ClusterSpec) -> None:
        """Make Redis and the brokers (networks, processes, containers), starting none."""
        raise NotImplementedError

    def broker_names(self) -> list[str]:
        raise NotImplementedError

    def _start_broker(self, broker: str) -> None:
        raise NotImplementedError

    def _broker_running(self, broker: str) -> bool:
        raise NotImplementedError

    def _wait_serving(self, broker: str) -> None:
        """Until the broker accepts MQTT."""
        raise NotImplementedError

    def _broker_pid(self, broker: str) -> int | None:
        """The broker's process id as this machine sees it (None: not running)."""
        raise NotImplementedError

    def _stop_brokers(self) -> None:
        raise NotImplementedError

    def _stop_redis(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        """Remove what `_build` made beyond processes (proxies, namespaces, networks)."""

    def start_redis(self) -> None:
        raise NotImplementedError

    def kill_redis(self) -> None:
        raise NotImplementedError

    def _redis_running(self) -> bool:
        raise NotImplementedError

    def _redis_data_dir(self) -> Path:
        raise NotImplementedError

    # ---------------------------------------------------------------- life cycle

    def _workdir(self) -> Path:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=self.workdir_prefix))
            self._own_dir = True
        self.workdir = self.workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self.workdir

    def _fresh_workdir(self) -> Path:
        """The work directory, without an earlier run's Redis files (they would bring back
        its persistent sessions, which then queue and drop this run's messages) or logs."""
        workdir = self._workdir()
        shutil.rmtree(workdir / "redis", ignore_errors=True)
        for log in workdir.glob("*.log"):
            log.unlink()
        return workdir

    def setup(self, spec: ClusterSpec) -> None:
        self._check(spec)
        self.spec = spec
        _LIVE.add(self)
        unwind_on_signals()
        try:
            self._build(spec)
            if spec.redis_first:
                self.start_redis()
            names = self.broker_names()
            for broker in names:
                self._start_broker(broker)
            for broker in names:
                self._wait_serving(broker)
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        try:
            for step in (self._stop_brokers, self._stop_redis, self._release):
                with contextlib.suppress(Exception):
                    step()
        finally:
            _LIVE.discard(self)
            if self._own_dir and self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None
                self._own_dir = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.teardown()

    # ---------------------------------------------------------------- the shared calls

    def rss(self, broker: str) -> int | None:
        """Resident memory of the broker in bytes (None: not running)."""
        return rss_of(self._broker_pid(broker))

    def restart_redis(self, *, keep_data: bool = True) -> None:
        if self._redis_running():
            self.kill_redis()
        if not keep_data:
            # As after a failover to a replica that had none of it.
            for path in list(self._redis_data_dir().iterdir()):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        self.start_redis()

    def start_broker(self, broker: str) -> None:
        if not self._broker_running(broker):
            self._start_broker(broker)
        self._wait_serving(broker)


class ProcessBackend(BackendBase):
    """A backend whose Redis and brokers are processes this one started (local, netns): every
    fault on them is a signal, the same on both."""

    redis: RedisServer | None

    def _process(self, broker: str) -> Process:
        raise NotImplementedError

    def _redis(self) -> RedisServer:
        if self.redis is None:
            raise RuntimeError("setup() first")
        return self.redis

    def log(self, name: str) -> str:
        """The log of `redis` or a broker (for reports and failing tests)."""
        process = self.redis if name == "redis" else self._process(name)
        return "" if process is None else process.log_text()

    # Redis
    def start_redis(self) -> None:
        redis = self._redis()
        if not redis.alive():
            redis.start()

    def kill_redis(self) -> None:
        self._redis().kill()

    def _redis_running(self) -> bool:
        return self._redis().alive()

    def _redis_data_dir(self) -> Path:
        return self._redis().data_dir

    def freeze_redis(self) -> None:
        self._redis().pause()

    def thaw_redis(self) -> None:
        self._redis().resume()

    def _stop_redis(self) -> None:
        if self.redis is not None and self.redis.proc is not None:
            self.redis.stop(timeout=5.0)

    # brokers
    def _start_broker(self, broker: str) -> None:
        self._process(broker).start()

    def _broker_running(self, broker: str) -> bool:
        return self._process(broker).alive()

    def _broker_pid(self, broker: str) -> int | None:
        process = self._process(broker)
        return process.pid if process.alive() else None

    def _gone(self, broker: str) -> str | None:
        """Why the broker will not come to serve (it exited), None while it may."""
        process = self._process(broker)
        return None if process.alive() else f"exited with status {process.returncode}"

    def kill_broker(self, broker: str) -> None:
        self._process(broker).kill()

    def stop_broker(self, broker: str) -> None:
        self._process(broker).stop(timeout=15.0)

    def freeze_broker(self, broker: str) -> None:
        self._process(broker).pause()

    def thaw_broker(self, broker: str) -> None:
        self._process(broker).resume()


@dataclass(kw_only=True)
class TwoNetworkBroker:
    """A broker with an address on the clients network and one on the backplane with Redis."""

    name: str
    client_addr: str
    backplane_addr: str


B = TypeVar("B", bound=TwoNetworkBroker)

MQTT_PORT = 1883
HTTP_PORT = 8080


class TwoNetworkBackend(BackendBase, Generic[B]):
    """A backend whose brokers sit on two networks of the run's own (netns, docker): clients
    reach them on the first, they reach Redis on the second; the harness sees both (a broker
    cut from its clients still answers from behind). Inside its own network stack each uses
    the usual ports."""

    brokers: dict[str, B]

    def broker_names(self) -> list[str]:
        return list(self.brokers)

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(name=b.name, host=b.client_addr, mqtt_port=MQTT_PORT, http_port=HTTP_PORT)
            for b in self.brokers.values()
        ]

    def broker(self, broker: str) -> B:
        try:
            return self.brokers[broker]
        except KeyError:
            raise KeyError(f"no broker {broker!r} (have {', '.join(self.brokers)})") from None

    def readyz(
        self, broker: str, *, via: Literal["clients", "backplane"] = "clients"
    ) -> tuple[int, str]:
        """`/readyz` as the clients see it, or `via="backplane"` from behind (a broker cut
        from its clients still answers there)."""
        b = self.broker(broker)
        host = b.client_addr if via == "clients" else b.backplane_addr
        try:
            return http_get(HTTP_PORT, "/readyz", timeout=2.0, host=host)
        except OSError as error:
            return 0, f"{broker} unreachable at {host}:{HTTP_PORT}: {error}"

    def wait_ready(
        self,
        broker: str,
        *,
        timeout: float = 30.0,
        via: Literal["clients", "backplane"] = "clients",
    ) -> None:
        wait_for(
            lambda: self.readyz(broker, via=via)[0] == 200,
            timeout=timeout,
            what=f"{broker} /readyz 200 via {via}",
            interval=0.1,
        )

    def log(self, name: str) -> str:
        raise NotImplementedError

    def _wait_serving(self, broker: str, timeout: float = 60.0) -> None:
        """Until it accepts MQTT on whichever of its links is up (a cut one stays cut across
        a restart)."""
        b = self.broker(broker)

        def serving() -> bool:
            if (why := self._gone(broker)) is not None:  # no use waiting
                raise self._serving_error(f"{broker} {why}\n{self.log(broker)[-2000:]}")
            return port_open(MQTT_PORT, b.client_addr) or port_open(MQTT_PORT, b.backplane_addr)

        try:
            wait_for(
                serving,
                timeout=timeout,
                what=f"{b.name} serving MQTT on {b.client_addr} or {b.backplane_addr}",
                interval=0.1,
            )
        except TimeoutError as error:
            raise self._serving_error(f"{error}\n{self.log(broker)[-2000:]}") from None

    def _gone(self, broker: str) -> str | None:
        """Why the broker will not come to serve (it exited), None while it may."""
        return None

    def _serving_error(self, message: str) -> Exception:
        return RuntimeError(message)
