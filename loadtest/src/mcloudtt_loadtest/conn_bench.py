"""`mcloudtt-conn-bench`: idle subscribed connections to one broker process, in steps.

Each step tops the held connections up to the next count (10k, 100k, 250k, 1M by default), then
reports the broker's memory per connection (VmRSS from /proc against the RSS before the first
connection), the connect rate of that step (CONNECT + SUBSCRIBE sent, CONNACK + SUBACK read),
the broker's CPU while the connections sit idle, and a QoS 0 fan-in with all of them held. It
stops at the largest count reached and says what stopped it (descriptors, source ports, memory,
connect errors, a broker that died). Each step also reports the memory of its own connections
alone (`kb_per_conn_step`), and the run says whether that stayed flat from step to step: the
honest test of extrapolating the largest count reached to a larger one.

A client here is a bare `asyncio.Protocol` with `__slots__` that writes one pre-encoded
CONNECT + SUBSCRIBE (from the `mcloudtt_mqttclient` codec) and counts the 9 bytes of CONNACK +
SUBACK: a few hundred bytes per connection on the generator side. Connections are spread over
source addresses 127.0.0.2, 127.0.0.3, ... (each gives its own range of ephemeral ports, which
is what caps a single source near 28,000 connections to one listener) and, with `--generators`,
over several generator processes.

Descriptor limits: the command raises RLIMIT_NOFILE for itself and the generators, and the broker
inherits it. Beyond the hard limit only root can raise it, and not above `fs.nr_open` (1,048,576
by default: a million connections need it a little higher, e.g. `sysctl -w fs.nr_open=1100000`);
machine-wide, `fs.file-max` must exceed both ends of every connection (2 per connection here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from mcloudtt_mqttclient import MQTT_311, connect, subscribe

from .brokers import BROKER_NAMES, RunningBroker, default_cache_dir, make_launcher, start_broker
from .procstat import cpu_seconds, raise_nofile_limit, rss_bytes
from .scenarios import NullReporter, Settings, _fanin, _settled_rss

DEFAULT_STEPS = (10_000, 100_000, 250_000, 1_000_000)
# CONNACK (4 bytes) + SUBACK with one return code (5 bytes), MQTT 3.1.1.
_ANSWER_BYTES = 9
_EXTRA_FDS = 1_000  # listeners, pipes, the fan-in clients, the broker's own files


def _port_range() -> int:
    """How many ephemeral ports one source address has towards one listener."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(hi) - int(lo) + 1
    except (OSError, ValueError):
        return 28_232  # Linux default 32768-60999


def _proc_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return 0


def _has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)  # CAP_SYS_RESOURCE is bit 24
    return False


def mem_available() -> int:
    return _meminfo("MemAvailable")


def client_packets(index: int) -> bytes:
    """CONNECT (clean, keepalive 0 so an idle client is never cut) + SUBSCRIBE to its own filter."""
    cid = f"cb-{index}"
    return connect(cid, version=MQTT_311, keepalive=0) + subscribe(
        1, [(f"devices/{index}/cmd", 0)], version=MQTT_311
    )


# Linux: bind() picks no port; connect() does, unique per (source, destination) pair, which is
# both faster than a bind-time search and not limited by ports taken towards other listeners.
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def _bound_socket(source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setblocking(False)
        sock.bind((source, 0))
    except BaseException:
        sock.close()
        raise
    return sock


class IdleClient(asyncio.Protocol):
    __slots__ = ("done", "got", "transport")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.got = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= _ANSWER_BYTES and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.done.done():
            self.done.set_exception(ConnectionError("closed by the broker"))


@dataclass
class OpenResult:
    opened: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    lost: int = 0  # held connections the broker closed meanwhile


class Generator:
    """Opens and holds idle clients in this process; the sources are assigned by index."""

    def __init__(self, port: int, sources: list[str], per_source: int, concurrency: int) -> None:
        self.port = port
        self.sources = sources
        self.per_source = per_source
        self.concurrency = concurrency
        self.clients: list[IdleClient] = []

    def source_of(self, index: int) -> str:
        return self.sources[index // self.per_source]

    async def open(self, indices: range, timeout: float) -> OpenResult:
        loop = asyncio.get_running_loop()
        result = OpenResult()
        it = iter(indices)
        stop = False

        async def one(i: int) -> None:
            nonlocal stop
            done: asyncio.Future[None] = loop.create_future()
            packet = client_packets(i)
            transport = None
            try:
                async with asyncio.timeout(timeout):
                    sock = _bound_socket(self.source_of(i))
                    try:
                        await loop.sock_connect(sock, ("127.0.0.1", self.port))
                    except BaseException:
                        sock.close()
                        raise
                    transport, client = await loop.create_connection(
                        lambda: IdleClient(done), sock=sock
                    )
                    transport.write(packet)
                    await done
                self.clients.append(client)
                result.opened += 1
            except (OSError, TimeoutError, ConnectionError) as e:
                if transport is not None:
                    transport.abort()
                name = type(e).__name__
                if isinstance(e, OSError) and e.errno is not None:
                    name = f"{name}: {os.strerror(e.errno)}"
                result.errors[name] = result.errors.get(name, 0) + 1
                if sum(result.errors.values()) > max(20, len(indices) // 200):
                    stop = True

        async def worker() -> None:
            for i in it:
                if stop:
                    return
                await one(i)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        result.seconds = time.perf_counter() - t0
        return result

    def held(self) -> int:
        return sum(1 for c in self.clients if c.transport is not None)

    def close(self) -> None:
        for c in self.clients:
            if c.transport is not None:
                c.transport.abort()
        self.clients.clear()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _worker_main(
    pipe: Connection, port: int, sources: list[str], per_source: int, conc: int
) -> None:
    """A generator process: ('open', start, stop, timeout) -> OpenResult; ('held',); ('close',)."""
    raise_nofile_limit(_proc_int("/proc/sys/fs/nr_open") or 1_048_576)
    loop = _new_loop()
    gen = Generator(port, sources, per_source, conc)
    try:
        while True:
            msg = pipe.recv()
            if msg[0] == "open":
                result = loop.run_until_complete(gen.open(range(msg[1], msg[2]), msg[3]))
                pipe.send(asdict(result))
            elif msg[0] == "held":
                pipe.send(gen.held())
            else:
                gen.close()
                loop.run_until_complete(asyncio.sleep(0.1))
                pipe.send(None)
                return
    finally:
        loop.close()


class Pool:
    """`count` generator processes; connection indices are dealt out in contiguous slices."""

    def __init__(self, count: int, port: int, sources: list[str], per_source: int, conc: int):
        ctx = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(count):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(theirs, port, sources, per_source, conc), daemon=True
            )
            proc.start()
            self.pipes.append(ours)
            self.procs.append(proc)

    def open(self, start: int, stop: int, timeout: float) -> OpenResult:
        n = len(self.pipes)
        bounds = [start + (stop - start) * k // n for k in range(n + 1)]
        t0 = time.perf_counter()
        for k, pipe in enumerate(self.pipes):
            pipe.send(("open", bounds[k], bounds[k + 1], timeout))
        total = OpenResult()
        for pipe in self.pipes:
            part = OpenResult(**pipe.recv())
            total.opened += part.opened
            for name, count in part.errors.items():
                total.errors[name] = total.errors.get(name, 0) + count
        total.seconds = time.perf_counter() - t0
        return total

    def held(self) -> int:
        for pipe in self.pipes:
            pipe.send(("held",))
        return sum(int(pipe.recv()) for pipe in self.pipes)

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("close",))
        for pipe, proc in zip(self.pipes, self.procs, strict=True):
            with contextlib.suppress(OSError, EOFError):
                if pipe.poll(30):
                    pipe.recv()
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def limits_note(target: int) -> tuple[int, str | None]:
    """Raise RLIMIT_NOFILE for this process (the broker and the generators inherit or raise it);
    the largest connection count the limits allow, and why when that is below `target`."""
    nr_open = _proc_int("/proc/sys/fs/nr_open") or 1_048_576
    soft = raise_nofile_limit(min(nr_open, target + _EXTRA_FDS))
    cap = soft - _EXTRA_FDS
    reason = None
    if cap < target:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard < min(nr_open, target + _EXTRA_FDS) and not _has_cap_sys_resource():
            why = (
                f"the hard limit is {hard} and this process may not raise it (no "
                "CAP_SYS_RESOURCE: a container's default); start it with a higher hard limit "
                f"(`ulimit -Hn {target + _EXTRA_FDS}`, docker `--ulimit nofile=...`)"
            )
        else:
            why = (
                f"fs.nr_open is {nr_open}: as root, `sysctl -w fs.nr_open="
                f"{target + 2 * _EXTRA_FDS}` and run again"
            )
        reason = f"descriptors: RLIMIT_NOFILE is {soft}, the broker needs one per connection; {why}"
    file_max = _proc_int("/proc/sys/fs/file-max")
    if file_max is not None and file_max < 2 * target + 10_000:
        cap = min(cap, (file_max - 10_000) // 2)
        reason = f"descriptors: fs.file-max {file_max} < 2 x {target} (both ends of each socket)"
    return max(0, cap), reason


async def _idle_cpu(pid: int, seconds: float) -> float:
    c0, t0 = cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.perf_counter() - t0)


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "mem_total_mb": round(_meminfo("MemTotal") / 2**20),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcloudtt-conn-bench",
        description="Idle subscribed connections to one broker process, in steps: memory per "
        "connection, connect rate, CPU at rest, QoS 0 fan-in with the connections held.",
    )
    p.add_argument(
        "--steps",
        default=",".join(str(s) for s in DEFAULT_STEPS),
        help="comma-separated connection counts (default %(default)s)",
    )
    p.add_argument("--broker", choices=BROKER_NAMES[:2], default="mcloudtt")
    p.add_argument("--mcloudtt-args", default="", help="extra arguments for mcloudtt-broker")
    p.add_argument(
        "--generators", type=int, default=1, help="generator processes (default %(default)s)"
    )
    p.add_argument("--concurrency", type=int, default=200, help="connects in flight per generator")
    p.add_argument(
        "--per-source",
        type=int,
        help="connections per loopback source address (default: half the ephemeral port range "
        "- 1000)",
    )
    p.add_argument("--fanin-seconds", type=float, default=3.0, help="QoS 0 fan-in window")
    p.add_argument("--rest-seconds", type=float, default=3.0, help="window for CPU at rest")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument(
        "--memory-reserve-mb",
        type=int,
        default=1024,
        help="stop before a step would leave less than this much MemAvailable",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    return p


async def run(args: argparse.Namespace) -> dict[str, Any]:
    steps = sorted({int(x.replace("_", "")) for x in args.steps.split(",") if x.strip()})
    target = steps[-1]
    cap, limit_reason = limits_note(target)
    if limit_reason is not None:
        # Said before anything is opened, in one line: the rest of the run is below this cap.
        print(
            f"limits: at most {cap:,} connections here, so {target:,} is blocked: {limit_reason}",
            flush=True,
        )
    # Half the ephemeral range: Linux gives connect() the even ports first, and ports held by
    # other sockets on the machine (TIME_WAIT included) count too; measured here: one source ran
    # out at 16,073 of a 28,232-port range.
    per_source = args.per_source or max(1_000, _port_range() // 2 - 1_000)
    # Addresses for what the limits let it open (a blocked million needs no 36 of them).
    reachable = min(target, max(cap, 1))
    sources = [f"127.0.0.{2 + k}" for k in range(max(1, math.ceil(reachable / per_source)))]
    if len(sources) > 250:
        raise SystemExit("too many source addresses needed: raise --per-source")
    workdir = Path(tempfile.mkdtemp(prefix="mcloudtt-conn-bench-"))
    launcher = make_launcher(
        args.broker, cache_dir=default_cache_dir(), mcloudtt_args=args.mcloudtt_args
    )
    launcher.prepare()
    broker: RunningBroker = start_broker(launcher, workdir)
    pool = Pool(args.generators, broker.port, sources, per_source, args.concurrency)
    out: dict[str, Any] = {
        "broker": args.broker,
        "version": launcher.version(),
        "machine": _machine(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "sources": len(sources),
        "per_source": per_source,
        "generators": args.generators,
        "steps": [],
        "stopped_by": None,
        "limit": {"connections": cap, "why": limit_reason},
    }
    try:
        # Warm the broker's code paths and allocator, then take the baseline.
        pool.open(0, min(200, target), args.connect_timeout)
        held_base = pool.held()
        base_rss = await _settled_rss(broker.pid)
        out["rss_base_mb"] = base_rss / 2**20
        reached = prev_held = held_base
        prev_rss = base_rss
        over = [s for s in steps if s > cap]
        allowed = [s for s in steps if s <= cap]
        if over and cap > max(allowed, default=0) and cap >= 100:
            allowed.append(cap)  # the largest count the limits allow, as the last step
        for step in allowed:
            avail = mem_available()
            prev_kb = out["steps"][-1]["kb_per_conn"] if out["steps"] else 8.0
            # Broker + generator + kernel socket memory, roughly, for the connections to add.
            need = (step - reached) * (prev_kb * 1024 + 6_000)
            if avail - need < args.memory_reserve_mb * 2**20:
                out["stopped_by"] = (
                    f"memory: {step} connections would need about {need / 2**30:.1f} GiB more, "
                    f"{avail / 2**30:.1f} GiB available"
                )
                break
            print(f"opening up to {step} connections ...", file=sys.stderr, flush=True)
            result = pool.open(reached, step, args.connect_timeout)
            held = pool.held()
            if not broker.alive():
                out["stopped_by"] = f"the broker exited:\n{broker.log_tail()}"
                break
            rss = await _settled_rss(broker.pid)
            cpu_rest = await _idle_cpu(broker.pid, args.rest_seconds)
            fanin = await _fanin(
                broker,
                Settings(warmup=0.5, duration=args.fanin_seconds, connect_timeout=30.0),
                NullReporter(),
                qos=0,
                label=f"fanin-{step}",
            )
            row = {
                "target": step,
                "held": held,
                "connect_per_s": result.opened / result.seconds if result.seconds else 0.0,
                "connect_errors": result.errors,
                "rss_mb": rss / 2**20,
                "kb_per_conn": (rss - base_rss) / max(1, held - held_base) / 1024,
                # This step's connections alone: flat from step to step means the figure
                # extrapolates to larger counts (a rising one would not).
                "kb_per_conn_step": (rss - prev_rss) / max(1, held - prev_held) / 1024,
                "broker_cpu_at_rest": cpu_rest,
                "qos0_fanin_msg_per_s": fanin["msg_per_s"],
                "generator_rss_mb": sum(rss_bytes(p.pid) for p in pool.procs) / 2**20,
            }
            out["steps"].append(row)
            print(_row_text(row), file=sys.stderr, flush=True)
            reached = prev_held = held
            prev_rss = rss
            if held < step:
                errors = ", ".join(f"{k} x{v}" for k, v in result.errors.items()) or "none"
                out["stopped_by"] = f"connects failed at {held} of {step} (errors: {errors})"
                break
        else:
            if over:
                out["stopped_by"] = (
                    f"{over[0]:,} is over the {cap:,} the limits allow; {limit_reason}"
                )
    finally:
        pool.close()
        broker.stop()
    out["largest_held"] = max((r["held"] for r in out["steps"]), default=0)
    return out


def flatness(steps: list[dict[str, Any]]) -> str:
    """Whether each step's connections cost what the first ones did (within 10 %): only then
    does the figure at the largest count reached extrapolate to larger ones."""
    marginal = [row["kb_per_conn_step"] for row in steps]
    figures = " -> ".join(f"{kb:.2f}" for kb in marginal) + " KB"
    spread = (max(marginal) - min(marginal)) / max(min(marginal), 1e-9)
    if spread <= 0.10:
        return f"{figures}: flat (within {spread:.0%})"
    trend = "rising" if marginal[-1] > marginal[0] else "falling"
    return f"{figures}: {trend} ({spread:.0%} apart), not flat"


def _row_text(row: dict[str, Any]) -> str:
    return (
        f"{row['held']:>9,} held  {row['kb_per_conn']:6.2f} KB/conn "
        f"({row['kb_per_conn_step']:5.2f} this step)  "
        f"RSS {row['rss_mb']:8.1f} MB  connect {row['connect_per_s']:8,.0f}/s  "
        f"CPU at rest {row['broker_cpu_at_rest'] * 100:5.1f} %  "
        f"QoS 0 fan-in {row['qos0_fanin_msg_per_s']:9,.0f} msg/s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = asyncio.run(run(args))
    print(f"{result['broker']} {result['version']}: {len(result['steps'])} steps")
    for row in result["steps"]:
        print(_row_text(row))
    print(f"largest count held: {result['largest_held']:,}")
    if len(result["steps"]) > 1:
        print(f"per connection, step over step: {flatness(result['steps'])}")
    if result["stopped_by"]:
        print(f"stopped by: {result['stopped_by']}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
