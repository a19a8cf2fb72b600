"""The `netns` backend: Redis and every broker in a network namespace of its own (root only).

Topology of one run (`ID` is random per run, so two runs never collide):

    root namespace (the workload)                  the run's namespaces
    ------------------------------                  --------------------
    bridge mcttIDc  10.N.N.1/25   <- clients ->     mcttID-b0: eth-c 10.N.N.10 ...
    bridge mcttIDr  10.N.N.129/25 <- backplane ->   mcttID-b0: eth-r 10.N.N.140 ...
                                                    mcttID-redis: eth-r .130 (real), .131 (service)

Each broker has two veths, one on the clients bridge and one on the backplane bridge with Redis,
and no default route, so nothing crosses from one bridge to the other. The workload in the root
namespace reaches brokers at their client addresses; the root's backplane address is only for
the harness (waiting for Redis, looking at a broker from behind while its clients are cut off).
Inside its namespace every process has the whole port space, so all use the usual ports.

Faults:
- kill/stop/freeze: signals to the process group, as in `local` (`ip netns exec` execs the
  program, so the process started is the server itself).
- `cut_from_redis`: the bridge end of the broker's backplane veth goes down, a cable pulled at
  the switch: packets are silently lost, TCP retransmits, ARP fails after a few seconds (a
  broker's heartbeat notices within a beat and its deadline, 1-2 s, and says `/readyz` 503).
- `cut_from_clients`: the same for its clients veth.
- `degrade_redis_link`: brokers use Redis's *service* address; degrading puts that address on
  the broker namespace's loopback and a fault proxy listening on it, which forwards to Redis's
  real address (no iptables needed; `tc netem` is not in every kernel). The proxy listens
  first (`ip_nonlocal_bind` in that namespace), then the address moves: connections open at
  that moment are reset (their packets now reach the proxy's socket), so the broker reconnects
  through the proxy. A bandwidth cap alone is `tc tbf` on both ends of the backplane veth when
  the kernel has it (no proxy, no reset), else the proxy's. `heal` removes all of it, the proxy
  before the address: its connections end at once instead of hanging.

Everything a run creates is named after its id and recorded in a state file with the owner's
pid and start time; `teardown()` (also from an atexit hook, and on SIGTERM/SIGHUP, which then
unwind like Ctrl-C) removes it, and `cleanup_stale()`, run at every setup, removes what a
SIGKILLed run left behind (the processes in its namespaces first: they run in sessions of their
own and outlive it), never touching a live run's. Subnets come from 10.203.0.0/16, a /24 that no address or route of the
root namespace overlaps, picked under a lock so two runs starting at once differ.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from ..backend import (
    HTTP_PORT,
    MQTT_PORT,
    Backend,
    ClusterSpec,
    LinkFault,
    ProcessBackend,
    TwoNetworkBackend,
    TwoNetworkBroker,
    owner_alive,
    process_start_time,
)
from ..procs import Process, ProcessError, RedisServer, console_script

PREFIX = "mctt"  # every namespace, bridge and veth of this backend starts with it
STATE_DIR = Path(tempfile.gettempdir()) / "mcloudtt-netns"
REDIS_PORT = 6379
MAX_BROKERS = 100
# Subnets tried: 10.203.X.0/24, split into clients (.0/25) and backplane (.128/25).
SUBNET_BASE = ipaddress.IPv4Network("10.203.0.0/16")


class NetnsUnavailable(RuntimeError):
    """This machine cannot run the netns backend (the message says why)."""


def unavailable_reason() -> str | None:
    """Why the backend cannot run here, or None when it can (a probe namespace is made)."""
    if os.geteuid() != 0:
        return "the netns backend needs root (network namespaces, veth links, bridges)"
    if shutil.which("ip") is None:
        return "the netns backend needs iproute2's `ip` (apt-get install iproute2)"
    probe = f"{PREFIX}probe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "set", "lo", "up")
    except NetnsError as error:
        return f"`ip netns` does not work here: {error}"
    finally:
        _ip("netns", "delete", probe, check=False)
    return None


# ------------------------------------------------------------------------------- iproute2


class NetnsError(RuntimeError):
    """An iproute2 or tc command failed (the message has the command and its stderr)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run("ip", *args, check=check)


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if check and result.returncode != 0:
        detail = result.stderr.strip() or f"exit status {result.returncode}"
        raise NetnsError(f"`{' '.join(args)}` failed: {detail}")
    return result


def _namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links() -> list[str]:
    out = _ip("-o", "link", "show", check=False).stdout
    # "12: mctt1a2b3c0@if11: <...>" -> "mctt1a2b3c0"
    return [m.group(1) for m in re.finditer(r"^\d+:\s+([^:@\s]+)", out, re.M)]


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the root namespace has an address or a route in."""
    used = []
    text = _ip("-4", "-o", "addr", "show", check=False).stdout
    for m in re.finditer(r"inet (\S+)", text):
        used.append(ipaddress.IPv4Interface(m.group(1)).network)
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        words = line.split()
        if words and words[0] in ("broadcast", "local", "unicast", "blackhole", "unreachable"):
            words = words[1:]
        if not words or words[0] == "default":
            continue
        with contextlib.suppress(ValueError):
            used.append(ipaddress.IPv4Network(words[0], strict=False))
    return used


def _pick_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    used = _used_networks()
    candidates = list(SUBNET_BASE.subnets(new_prefix=24))
    rng.shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(other) for other in used):
            return net
    raise NetnsUnavailable(f"no free /24 left in {SUBNET_BASE}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(ns: str) -> None:
    """SIGKILL whatever runs in `ns` (a crashed run's brokers outlive it: own sessions)."""
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # a frozen one too
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _remove_run(run_id: str) -> None:
    """Remove every namespace and link named after `run_id` (processes in them killed)."""
    base = PREFIX + run_id
    for ns in _namespaces():
        if ns.startswith(base + "-"):
            _kill_namespace_processes(ns)
            _ip("netns", "delete", ns, check=False)
    for link in _links():
        # Deleting one end of a veth deletes both; bridges go with their name.
        if link.startswith(base):
            _ip("link", "delete", link, check=False)
    (STATE_DIR / f"{run_id}.json").unlink(missing_ok=True)


def _run_id_of(name: str) -> str | None:
    m = re.match(rf"^{PREFIX}([0-9a-f]{{6}})", name)
    return m.group(1) if m else None


def cleanup_stale() -> list[str]:
    """Remove what earlier runs left (they crashed or were killed): the run ids removed.

    A run whose owner process still lives is left alone (two runs may share the machine)."""
    ids: set[str] = set()
    for name in [*_namespaces(), *_links()]:
        if (run_id := _run_id_of(name)) is not None:
            ids.add(run_id)
    if STATE_DIR.is_dir():
        ids.update(p.stem for p in STATE_DIR.glob("*.json"))
    for ns in _namespaces():  # a probe of `unavailable_reason()` killed mid-way
        if (m := re.fullmatch(rf"{PREFIX}probe(\d+)", ns)) and not _pid_alive(int(m.group(1))):
            _ip("netns", "delete", ns, check=False)
    removed = []
    for run_id in sorted(ids):
        if _owner_alive(run_id):
            continue  # a live run (ours included): its own teardown removes it
        _remove_run(run_id)
        removed.append(run_id)
    return removed


def _owner_alive(run_id: str) -> bool:
    """Whether the process that made this run still runs (not another one with its pid)."""
    try:
        state = json.loads((STATE_DIR / f"{run_id}.json").read_text())
        pid, started = int(state["pid"]), state.get("started")
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return owner_alive(pid, started)


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    """Two runs starting at once must not pick the same subnet."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------- processes


def _in_ns(ns: str, cmd: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


class _NsRedis(RedisServer):
    """redis-server inside a namespace, on every address of it."""

    def __init__(
        self, ns: str, host: str, *, appendonly: bool, data_dir: Path, log_path: Path
    ) -> None:
        super().__init__(REDIS_PORT, appendonly=appendonly, data_dir=data_dir, log_path=log_path)
        self.ns = ns
        self.host = host  # where the root namespace reaches it (backplane)
        self._binary = self.cmd[0]

    def extra_args(self) -> list[str]:
        # Reached from other namespaces, without a password: protected mode would refuse.
        return ["--bind", "0.0.0.0", "--protected-mode", "no", *super().extra_args()]

    def command(self) -> list[str]:
        self.cmd = [self._binary]  # the base builds on cmd[0]
        return _in_ns(self.ns, super().command())

    def start(self, timeout: float = 10.0) -> Self:
        self.cmd = self.command()
        Process.start(self)
        try:
            self.wait_port(timeout=timeout, host=self.host)
        except BaseException:
            self.stop()
            raise
        return self


@dataclass(kw_only=True)
class _Broker(TwoNetworkBroker):
    index: int
    ns: str
    host_client_veth: str  # the bridge end (root namespace) of each veth
    host_backplane_veth: str
    process: Process
    proxy: Process | None = None
    proxy_control: int | None = None
    tbf: bool = False
    service_on_lo: bool = False


class NetnsBackend(ProcessBackend, TwoNetworkBackend[_Broker]):
    """Redis and the brokers in namespaces of their own, joined by two bridges."""

    name = "netns"
    workdir_prefix = "mcloudtt-netns-"

    def __init__(self, workdir: Path | str | None = None, *, seed: int | None = None) -> None:
        super().__init__(workdir, seed=seed)
        self._rng = random.Random(seed)
        self.run_id = f"{random.SystemRandom().getrandbits(24):06x}"
        self.base = PREFIX + self.run_id
        self._proxies = 0
        self.brokers: dict[str, _Broker] = {}
        self.redis: _NsRedis | None = None
        self.redis_ns = f"{self.base}-redis"
        self.subnet: ipaddress.IPv4Network | None = None
        self.clients_bridge = f"{self.base}c"
        self.backplane_bridge = f"{self.base}r"
        self._made = False

    # ---------------------------------------------------------------- addresses

    def _addr(self, offset: int) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + offset)

    @property
    def root_client_addr(self) -> str:
        return self._addr(1)

    @property
    def root_backplane_addr(self) -> str:
        return self._addr(129)

    @property
    def redis_addr(self) -> str:
        """Redis's real address: where fault proxies forward to."""
        return self._addr(130)

    @property
    def redis_service_addr(self) -> str:
        """The address brokers are given (a degraded broker's namespace takes it over)."""
        return self._addr(131)

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis_service_addr}:{REDIS_PORT}/0"

    # ---------------------------------------------------------------- life cycle

    def _check(self, spec: ClusterSpec) -> None:
        if not 1 <= spec.brokers <= MAX_BROKERS:
            raise ValueError(f"the netns backend runs 1 to {MAX_BROKERS} brokers")
        if (reason := unavailable_reason()) is not None:
            raise NetnsUnavailable(reason)

    def _build(self, spec: ClusterSpec) -> None:
        self.brokers = {}
        self._fresh_workdir()
        cleanup_stale()  # what a SIGKILLed run left (a live run's is spared)
        with _allocation_lock():
            self.subnet = _pick_subnet(self._rng)
            self._record()
            self._made = True
            self._make_network(spec.brokers)

    def _record(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {
            "pid": os.getpid(),
            "started": process_start_time(os.getpid()),
            "subnet": str(self.subnet),
            "workdir": str(self._workdir()),
        }
        (STATE_DIR / f"{self.run_id}.json").write_text(json.dumps(state))

    def _make_network(self, count: int) -> None:
        assert self.subnet is not None
        for bridge, addr in (
            (self.clients_bridge, self.root_client_addr),
            (self.backplane_bridge, self.root_backplane_addr),
        ):
            _ip("link", "add", "name", bridge, "type", "bridge")
            _ip("addr", "add", f"{addr}/25", "dev", bridge)
            _ip("link", "set", bridge, "up")
        # Redis: one veth on the backplane, its real and its service address.
        _ip("netns", "add", self.redis_ns)
        self._veth(self.redis_ns, f"{self.base}rd", "eth-r", self.backplane_bridge)
        for addr in (self.redis_addr, self.redis_service_addr):
            _ip("-n", self.redis_ns, "addr", "add", f"{addr}/25", "dev", "eth-r")
        self.redis = _NsRedis(
            self.redis_ns,
            self.redis_addr,
            appendonly=self.spec.redis_appendonly,
            data_dir=self._workdir() / "redis",
            log_path=self._workdir() / "redis.log",
        )
        for index in range(count):
            name = f"b{index}"
            ns = f"{self.base}-{name}"
            _ip("netns", "add", ns)
            host_c = self._veth(ns, f"{self.base}c{index}", "eth-c", self.clients_bridge)
            host_r = self._veth(ns, f"{self.base}r{index}", "eth-r", self.backplane_bridge)
            client_addr, backplane_addr = self._addr(10 + index), self._addr(140 + index)
            _ip("-n", ns, "addr", "add", f"{client_addr}/25", "dev", "eth-c")
            _ip("-n", ns, "addr", "add", f"{backplane_addr}/25", "dev", "eth-r")
            cmd = [
                *console_script("mcloudtt-broker", "mcloudtt_broker"),
                "--bind",
                f"0.0.0.0:{MQTT_PORT}",
                "--http",
                f"0.0.0.0:{HTTP_PORT}",
                "--redis",
                self.redis_url,
                "--id",
                name,
                *self.spec.broker_args,
            ]
            process = Process(
                _in_ns(ns, cmd),
                name=name,
                log_path=self._workdir() / f"{name}.log",
                env=self.spec.env,
                port=MQTT_PORT,
                http_port=HTTP_PORT,
            )
            self.brokers[name] = _Broker(
                name=name,
                index=index,
                ns=ns,
                client_addr=client_addr,
                backplane_addr=backplane_addr,
                host_client_veth=host_c,
                host_backplane_veth=host_r,
                process=process,
            )

    def _veth(self, ns: str, host_end: str, inside: str, bridge: str) -> str:
        """A veth from the bridge into `ns` (named `inside` there), both ends up."""
        _ip("link", "add", "name", host_end, "type", "veth", "peer", "name", inside, "netns", ns)
        _ip("link", "set", host_end, "master", bridge)
        _ip("link", "set", host_end, "up")
        _ip("-n", ns, "link", "set", "dev", inside, "up")
        _ip("-n", ns, "link", "set", "dev", "lo", "up")
        return host_end

    def _stop_brokers(self) -> None:
        # All at once (each drains), their fault proxies with them.
        for broker in self.brokers.values():
            broker.process.signal_group(signal.SIGTERM)
        for broker in self.brokers.values():
            for process in (broker.proxy, broker.process):
                if process is not None and process.proc is not None:
                    with contextlib.suppress(Exception):
                        process.stop(timeout=5.0)
            broker.proxy = None

    def _release(self) -> None:
        if self._made:
            _remove_run(self.run_id)
            self._made = False

    def _process(self, broker: str) -> Process:
        return self.broker(broker).process

    def _serving_error(self, message: str) -> Exception:
        return ProcessError(message)

    # ---------------------------------------------------------------- links

    def cut_from_redis(self, broker: str) -> None:
        _ip("link", "set", self.broker(broker).host_backplane_veth, "down")

    def cut_from_clients(self, broker: str) -> None:
        _ip("link", "set", self.broker(broker).host_client_veth, "down")

    def heal(self, broker: str) -> None:
        b = self.broker(broker)
        for veth in (b.host_client_veth, b.host_backplane_veth):
            _ip("link", "set", veth, "up")
        self._undegrade(b)

    def degrade_redis_link(self, broker: str, fault: LinkFault) -> None:
        b = self.broker(broker)
        self._undegrade(b)
        rate = fault.bandwidth_bytes_per_s
        if rate is not None and self._tbf(b, rate):
            b.tbf = True
            rate = None  # the kernel caps it; the proxy does not
        ops: list[dict[str, object]] = []
        if fault.latency_ms is not None or fault.jitter_ms:
            ops.append(
                {"op": "latency", "ms": fault.latency_ms or 0.0, "jitter_ms": fault.jitter_ms}
            )
        if rate is not None:
            ops.append({"op": "bandwidth", "bytes_per_s": rate})
        if fault.slice_bytes is not None:
            ops.append({"op": "slicer", "average_size": fault.slice_bytes, "delay_ms": 1})
        if fault.blackhole:
            ops.append({"op": "blackhole"})
        if ops:
            self._start_proxy(b)
            self._control(b, ops)  # toxics on before any traffic goes through
            self._take_service_address(b)

    def _tbf(self, b: _Broker, bytes_per_s: float) -> bool:
        """Cap both directions of the backplane veth; False when the kernel has no tbf."""
        rate = f"{max(8, int(bytes_per_s * 8))}bit"
        # A burst of at least one MTU-sized packet, else nothing ever leaves.
        burst = str(max(3000, int(bytes_per_s / 50)))
        for prefix, dev in ((["-n", b.ns], "eth-r"), ([], b.host_backplane_veth)):
            result = _run(
                "tc", *prefix, "qdisc", "replace", "dev", dev, "root", "tbf",
                "rate", rate, "burst", burst, "latency", "1s",
                check=False,
            )  # fmt: skip
            if result.returncode != 0:
                self._untbf(b)
                return False
        return True

    def _untbf(self, b: _Broker) -> None:
        for prefix, dev in ((["-n", b.ns], "eth-r"), ([], b.host_backplane_veth)):
            _run("tc", *prefix, "qdisc", "del", "dev", dev, "root", check=False)
        b.tbf = False

    def _start_proxy(self, b: _Broker) -> None:
        """A fault proxy on Redis's service address inside the broker's namespace."""
        # It listens first (a non-local address may be bound: this namespace's own sysctl), so
        # no connection of the broker's is ever refused; then the service address becomes
        # local here: the broker's next connection to it is the proxy's, and its open ones are
        # reset (their packets now reach the proxy's socket, which knows nothing of them).
        _run(*_in_ns(b.ns, ["sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1"]))
        cmd = [
            sys.executable,
            "-m",
            "mcloudtt_chaos.faultproxy",
            "--upstream",
            f"{self.redis_addr}:{REDIS_PORT}",
            "--listen",
            f"{self.redis_service_addr}:{REDIS_PORT}",
            "--control",
            f"{b.backplane_addr}:0",
        ]
        # A log of its own per proxy: the port line read below must be this one's.
        self._proxies += 1
        log_path = self._workdir() / f"proxy-{b.name}-{self._proxies}.log"
        b.proxy = Process(_in_ns(b.ns, cmd), name=f"proxy-{b.name}", log_path=log_path)
        b.proxy.start()
        match = b.proxy.wait_log(r'\{"listen": \d+, "control": (\d+)\}', timeout=30.0)
        b.proxy_control = int(match.group(1))

    def _take_service_address(self, b: _Broker) -> None:
        _ip("-n", b.ns, "addr", "add", f"{self.redis_service_addr}/32", "dev", "lo")
        b.service_on_lo = True

    def _control(self, b: _Broker, ops: list[dict[str, object]]) -> dict[str, Any]:
        """Send each op to the broker's proxy (over the backplane); the state after the last."""
        if b.proxy_control is None:
            raise RuntimeError(f"{b.name}'s Redis link is not degraded")
        answer: dict[str, Any] = {}
        with socket.create_connection((b.backplane_addr, b.proxy_control), timeout=5.0) as s:
            reader = s.makefile("r")
            for op in ops:
                s.sendall(json.dumps(op).encode() + b"\n")
                answer = json.loads(reader.readline())
                if not answer.get("ok"):
                    raise ProcessError(f"fault proxy of {b.name} refused {op}: {answer}")
        return answer

    def proxy_state(self, broker: str) -> dict[str, Any]:
        """The toxics and counters (accepted, bytes per direction...) of a degraded broker's
        fault proxy."""
        return self._control(self.broker(broker), [{"op": "stats"}])

    def _undegrade(self, b: _Broker) -> None:
        if b.tbf:
            self._untbf(b)
        # The proxy stops first, while Redis's service address is still local here: its
        # connections end with a FIN the broker sees at once. Removed first, the address would
        # take their packets nowhere (the sockets' cached route is `lo`) and the broker's open
        # connections would hang until a timeout, a link slow but alive turned into a cut one
        # (slow-link: a reconnect step waited 5 s there and the broker's presence expired).
        # Connections opened in between are refused, and retried at once.
        if b.proxy is not None:
            b.proxy.stop(timeout=2.0)
            b.proxy = None
            b.proxy_control = None
        if b.service_on_lo:  # the broker's next connection goes straight to Redis
            _ip(
                "-n", b.ns, "addr", "del", f"{self.redis_service_addr}/32", "dev", "lo", check=False
            )
            b.service_on_lo = False

    # ---------------------------------------------------------------- helpers for tests

    def exec_in(
        self, broker: str, *cmd: str, timeout: float = 10.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside a broker's namespace."""
        return subprocess.run(
            _in_ns(self.broker(broker).ns, cmd), capture_output=True, text=True, timeout=timeout
        )


def create() -> NetnsBackend:
    """What `backends.load("netns")` returns."""
    return NetnsBackend()


if TYPE_CHECKING:  # mypy checks that the class implements the interface
    _implements: Backend = NetnsBackend()
