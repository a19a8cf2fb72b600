"""The benchmark scenarios. Each runs against one fresh broker and returns flat figures.

Every scenario reports `generator_cpu` (share of one core this process used while measuring) so
a generator-bound figure is never mistaken for the broker's.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import clients as c
from .brokers import RunningBroker
from .procstat import UsageMeter, rss_bytes

SCENARIOS = ("qos0", "qos1", "latency", "memory", "connect", "loaded")
SCENARIO_TITLES = {
    "qos0": "QoS 0 fan-in",
    "qos1": "QoS 1 fan-in",
    "latency": "latency at 1k msg/s",
    "memory": "memory per idle connection",
    "connect": "connect rate",
    "loaded": "loaded fan-in",
}


@dataclass(frozen=True, kw_only=True)
class Settings:
    warmup: float = 1.0
    duration: float = 5.0
    publishers: int = 4
    inflight_limit: int = c.INFLIGHT_LIMIT
    qos1_window: int = c.QOS1_WINDOW
    payload_size: int = c.PAYLOAD_SIZE
    latency_rate: float = 1000.0
    idle_connections: int = 10_000
    connect_clients: int = 1_000
    concurrency: int = 100  # below the usual listen backlog of 100, so no SYN is dropped
    devices: int = 10_000
    retained: int = 10_000
    setup_budget: float = 60.0  # seconds allowed to build the loaded state before going on
    connect_timeout: float = 30.0


class Reporter(Protocol):
    def phase(self, text: str, total: float | None = None) -> None: ...

    def advance_to(self, completed: float) -> None: ...

    def warn(self, text: str) -> None: ...


class NullReporter:
    def phase(self, text: str, total: float | None = None) -> None:
        pass

    def advance_to(self, completed: float) -> None:
        pass

    def warn(self, text: str) -> None:
        pass


async def _wait(seconds: float, rep: Reporter, offset: float = 0.0) -> None:
    """Sleep while the event loop serves the clients, ticking the progress bar."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        await asyncio.sleep(min(0.25, left))
        rep.advance_to(offset + seconds - max(0.0, end - loop.time()))


async def _fanin(
    broker: RunningBroker, s: Settings, rep: Reporter, *, qos: int, label: str
) -> dict[str, float]:
    flow = c.Flow(s.inflight_limit)
    sub = await c.open_client(lambda: c.Subscriber(flow), broker.port, f"bench-sub-{label}")
    pubs: list[c.Publisher] = []
    try:
        async with asyncio.timeout(s.connect_timeout):
            await sub.subscribe([("sensors/+/temp", qos)])
        for n in range(s.publishers):
            topic = f"sensors/{n}/temp"

            def make(topic: str = topic) -> c.BaseClient:
                if qos == 0:
                    return c.QoS0Publisher(flow, topic, payload_size=s.payload_size)
                return c.QoS1Publisher(
                    flow, topic, window=s.qos1_window, payload_size=s.payload_size
                )

            pub = await c.open_client(make, broker.port, f"bench-pub-{label}-{n}")
            assert isinstance(pub, c.Publisher)
            pubs.append(pub)
        flow.publishers = pubs
        rep.phase(f"{label}: warm-up and measure", s.warmup + s.duration)
        flow.start()
        await _wait(s.warmup, rep)
        meter = UsageMeter(broker.pid)
        meter.start()
        r0, l0 = sub.publishes, flow.lost
        await _wait(s.duration, rep, s.warmup)
        r1, l1 = sub.publishes, flow.lost
        usage = meter.stop()
        await flow.stop()
    finally:
        await c.close_all([sub, *pubs])
    delivered = r1 - r0
    if not broker.alive():
        raise RuntimeError(f"{broker.name} died during {label}:\n{broker.log_tail()}")
    return {
        "msg_per_s": delivered / usage.wall,
        "delivered": delivered,
        "lost": l1 - l0,
        "broker_cpu_us_per_msg": usage.broker_cpu / delivered * 1e6 if delivered else float("nan"),
        "broker_cpu": usage.broker_core_share,
        "generator_cpu": usage.generator_core_share,
        "other_cpu": usage.other_core_share,
    }


async def qos0(broker: RunningBroker, s: Settings, rep: Reporter) -> dict[str, float]:
    return await _fanin(broker, s, rep, qos=0, label="qos0")


async def qos1(broker: RunningBroker, s: Settings, rep: Reporter) -> dict[str, float]:
    return await _fanin(broker, s, rep, qos=1, label="qos1")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


async def latency(broker: RunningBroker, s: Settings, rep: Reporter) -> dict[str, float]:
    sub = await c.open_client(lambda: c.Subscriber(latency=True), broker.port, "bench-lat-sub")
    pub: c.PacedPublisher | None = None
    try:
        async with asyncio.timeout(s.connect_timeout):
            await sub.subscribe([("sensors/+/temp", 0)])
        made = await c.open_client(
            lambda: c.PacedPublisher("sensors/0/temp"), broker.port, "bench-lat-pub"
        )
        assert isinstance(made, c.PacedPublisher)
        pub = made
        loop = asyncio.get_running_loop()
        rep.phase("latency: paced publish", s.warmup + s.duration)
        total = s.warmup + s.duration
        runner = asyncio.ensure_future(pub.run(s.latency_rate, loop.time() + total))
        await _wait(s.warmup, rep)
        meter = UsageMeter(broker.pid)
        meter.start()
        first, sent0 = len(sub.latencies_ns), pub.sent
        await _wait(s.duration, rep, s.warmup)
        last, sent1 = len(sub.latencies_ns), pub.sent
        usage = meter.stop()
        await runner
        await asyncio.sleep(0.05)
    finally:
        await c.close_all([sub] + ([pub] if pub is not None else []))
    samples = sorted(v / 1e6 for v in sub.latencies_ns[first:last])
    return {
        "p50_ms": _percentile(samples, 0.50),
        "p99_ms": _percentile(samples, 0.99),
        "max_ms": samples[-1] if samples else float("nan"),
        "mean_ms": statistics.fmean(samples) if samples else float("nan"),
        "samples": len(samples),
        "sent_per_s": (sent1 - sent0) / usage.wall,
        "broker_cpu": usage.broker_core_share,
        "generator_cpu": usage.generator_core_share,
        "other_cpu": usage.other_core_share,
    }


async def _open_batch(
    broker: RunningBroker,
    s: Settings,
    rep: Reporter,
    n: int,
    make: Callable[[int], Awaitable[c.BaseClient]],
    *,
    text: str,
    deadline: float | None = None,
) -> tuple[list[c.BaseClient], list[BaseException]]:
    rep.phase(text, n)
    return await c.open_many(
        n, make, concurrency=s.concurrency, deadline=deadline, on_progress=rep.advance_to
    )


async def _settled_rss(pid: int, *, timeout: float = 3.0) -> int:
    """RSS once it stops moving (a broker may still be allocating for the last connections)."""
    prev = rss_bytes(pid)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        await asyncio.sleep(0.25)
        cur = rss_bytes(pid)
        if abs(cur - prev) <= max(64 * 1024, prev // 500):
            return cur
        prev = cur
    return prev


async def memory(broker: RunningBroker, s: Settings, rep: Reporter) -> dict[str, float]:
    def idle(prefix: str) -> Callable[[int], Awaitable[c.BaseClient]]:
        return lambda i: c.open_client(
            c.BaseClient, broker.port, f"{prefix}-{i}", keepalive=600, timeout=s.connect_timeout
        )

    # Warm up the broker's code paths and allocator before the baseline.
    warm, _ = await _open_batch(
        broker, s, rep, min(100, s.idle_connections), idle("warm"), text="memory: warm-up"
    )
    await c.close_all(warm)
    await asyncio.sleep(0.3)
    before = await _settled_rss(broker.pid)
    meter = UsageMeter(broker.pid)
    meter.start()
    conns, errors = await _open_batch(
        broker,
        s,
        rep,
        s.idle_connections,
        idle("idle"),
        text=f"memory: {s.idle_connections} idle connections",
    )
    usage = meter.stop()
    try:
        after = await _settled_rss(broker.pid)
        alive = sum(1 for x in conns if x.transport is not None)
    finally:
        rep.phase("memory: closing", None)
        await c.close_all(conns, wait=5.0)
    if errors:
        rep.warn(f"{broker.name}: {len(errors)} idle connections failed ({errors[0]!r})")
    if not alive:
        raise RuntimeError(f"{broker.name}: no idle connection stayed open")
    return {
        "connections": alive,
        "kb_per_conn": (after - before) / alive / 1024,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "connect_per_s": len(conns) / usage.wall,
        "generator_cpu": usage.generator_core_share,
        "other_cpu": usage.other_core_share,
    }


async def connect(broker: RunningBroker, s: Settings, rep: Reporter) -> dict[str, float]:
    n = s.connect_clients
    meter = UsageMeter(broker.pid)
    meter.start()
    conns, errors = await _open_batch(
        broker,
        s,
        rep,
        n,
        lambda i: c.open_client(c.BaseClient, broker.port, f"conn-{i}", timeout=s.connect_timeout),
        text=f"connect: {n} clients",
    )
    usage = meter.stop()
    await c.close_all(conns)
    if errors:
        rep.warn(f"{broker.name}: {len(errors)} connects failed ({errors[0]!r})")
    if not conns:
        raise RuntimeError(f"{broker.name}: no client connected")
    return {
        "clients": len(conns),
        "connect_per_s": len(conns) / usage.wall,
        "broker_cpu_us_per_connect": usage.broker_cpu / len(conns) * 1e6,
        "generator_cpu": usage.generator_core_share,
        "other_cpu": usage.other_core_share,
    }


async def _connect_devices(
    broker: RunningBroker,
    s: Settings,
    rep: Reporter,
    devices: list[c.BaseClient],
    device: Callable[[int], Awaitable[c.BaseClient]],
    deadline: float,
) -> tuple[int, float, float, float]:
    """Connect and subscribe devices in doubling batches until all are in or the budget is
    spent. Broker CPU is counted over whole batches only, so connects cut off by the budget
    (still costing the broker) do not blur the figure. Returns (devices counted, broker CPU,
    wall time, generator CPU) over the whole batches."""
    loop = asyncio.get_running_loop()
    rep.phase(f"loaded: {s.devices} devices connect+subscribe", s.devices)
    meter = UsageMeter(broker.pid)
    counted, broker_cpu, wall, gen_cpu = 0, 0.0, 0.0, 0.0
    batch = 4  # small first: on amqtt one CONNECT with 10,000 retained costs seconds
    while len(devices) < s.devices:
        if devices and loop.time() >= deadline:
            break
        size = min(batch, s.devices - len(devices))
        base = len(devices)
        # The first batch gets its time even when the retained messages took the budget.
        until = deadline if devices else max(deadline, loop.time() + s.connect_timeout)
        meter.start()

        def make(i: int, base: int = base) -> Awaitable[c.BaseClient]:
            return device(base + i)

        def progress(k: int, base: int = base) -> None:
            rep.advance_to(base + k)

        got, errors = await c.open_many(
            size, make, concurrency=min(size, s.concurrency), deadline=until, on_progress=progress
        )
        usage = meter.stop()
        devices.extend(got)
        if errors:
            rep.warn(f"{broker.name}: {len(errors)} device connects failed ({errors[0]})")
        if len(got) < size:
            break
        counted += size
        broker_cpu += usage.broker_cpu
        wall += usage.wall
        gen_cpu += usage.generator_cpu
        batch = min(batch * 2, 2_000)
    return counted, broker_cpu, wall, gen_cpu


async def _await_idle(pid: int, *, limit: float, busy: float = 0.1) -> float:
    """Seconds until the broker uses less than `busy` of a core over half a second."""
    meter = UsageMeter(pid)
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        meter.start()
        await asyncio.sleep(0.5)
        if meter.stop().broker_core_share < busy:
            break
    return time.monotonic() - t0


async def loaded(broker: RunningBroker, s: Settings, rep: Reporter) -> dict[str, float]:
    """QoS 0 fan-in before and after the broker holds `devices` subscribed clients (one topic
    each) and `retained` retained messages (on topics no one subscribes to)."""
    plain = await _fanin(broker, s, rep, qos=0, label="loaded: plain")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + s.setup_budget
    out: dict[str, float] = {"plain_msg_per_s": plain["msg_per_s"]}

    # Retained messages first, so each CONNECT+SUBSCRIBE below meets a full retained store.
    rep.phase(f"loaded: {s.retained} retained messages", s.retained)
    loader = await c.open_client(
        lambda: c.RetainedLoader(c.retained_packets(s.retained)), broker.port, "bench-retain"
    )
    assert isinstance(loader, c.RetainedLoader)
    t0 = loop.time()
    loader.start()
    stored = s.retained
    while not loader.done.done():
        await asyncio.wait([loader.done], timeout=0.25)
        rep.advance_to(loader.pubacks)
        if loop.time() > deadline:
            stored = loader.pubacks
            rep.warn(
                f"{broker.name}: setup budget spent after {stored} of {s.retained} retained messages"
            )
            break
    out["retained"] = stored
    out["retained_per_s"] = stored / max(loop.time() - t0, 1e-9)
    await c.close_all([loader])

    async def device(i: int) -> c.BaseClient:
        client = await c.open_client(
            c.BaseClient, broker.port, f"device-{i}", keepalive=600, timeout=s.connect_timeout
        )
        try:
            async with asyncio.timeout(s.connect_timeout):
                granted = await client.subscribe([(f"devices/{i}/cmd", 0)])
        except BaseException:
            client.close()
            raise
        if granted and granted[0] == 0x80:
            client.close()
            raise ConnectionError(f"subscription refused for device {i}")
        return client

    devices: list[c.BaseClient] = []
    try:
        counted, broker_cpu, wall, gen_cpu = await _connect_devices(
            broker, s, rep, devices, device, deadline
        )
        out["devices"] = len(devices)
        if len(devices) < s.devices:
            rep.warn(
                f"{broker.name}: {len(devices)} of {s.devices} devices connected within the setup budget"
            )
        out["connsub_per_s"] = counted / wall if wall else float("nan")
        out["connsub_cpu_ms"] = broker_cpu / counted * 1e3 if counted else float("nan")
        out["rss_loaded_mb"] = rss_bytes(broker.pid) / 2**20
        out["setup_generator_cpu"] = gen_cpu / wall if wall else float("nan")
        # A broker may still be busy with what the connects queued (retained replays, logs).
        rep.phase("loaded: waiting for the broker to go idle", None)
        out["settle_s"] = await _await_idle(broker.pid, limit=max(10.0, s.setup_budget / 2))
        hot = await _fanin(broker, s, rep, qos=0, label="loaded: with devices")
    finally:
        rep.phase("loaded: closing devices", None)
        await c.close_all(devices, wait=5.0)
    out["loaded_msg_per_s"] = hot["msg_per_s"]
    out["ratio"] = hot["msg_per_s"] / plain["msg_per_s"] if plain["msg_per_s"] else float("nan")
    out["loaded_broker_cpu_us_per_msg"] = hot["broker_cpu_us_per_msg"]
    out["lost"] = plain["lost"] + hot["lost"]
    out["generator_cpu"] = max(plain["generator_cpu"], hot["generator_cpu"])
    out["other_cpu"] = max(plain["other_cpu"], hot["other_cpu"])
    out["complete"] = float(out["devices"] == s.devices and out["retained"] == s.retained)
    return out


RUNNERS: dict[str, Callable[[RunningBroker, Settings, Reporter], Awaitable[dict[str, Any]]]] = {
    "qos0": qos0,
    "qos1": qos1,
    "latency": latency,
    "memory": memory,
    "connect": connect,
    "loaded": loaded,
}
