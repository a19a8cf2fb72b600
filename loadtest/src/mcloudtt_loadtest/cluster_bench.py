"""`mcloudtt-cluster-bench`: what crossing brokers through Redis costs.

One generator, one run, fresh processes for each figure (medians of --runs):

* throughput of QoS 0 and QoS 1 fan-in (4 publishers, 100-byte payloads, one wildcard
  subscriber; publishers paused above 2,000 in flight) with everything on one broker, and with
  the publishers on broker A and the subscriber on broker B of a 3-broker cluster: the ratio
  cross/single (target >= 0.5), taken in each run from the cross figure and the mean of single
  figures measured just before and just after it, median over runs;
* latency at a paced 1,000 msg/s, p50/p99, on one broker and A -> B: what the hop adds (target
  p99 <= 3 ms);
* the CPU per message of broker C, which has no subscriber, while A -> B traffic flows, in routed
  mode (it should do nothing) and in broadcast mode (it receives everything): a broker's cost
  does not grow with the cluster for traffic it has no subscriber for;
* for each backplane of --backplane (`single`: one redis-server; `cluster`: a 3-shard Redis
  Cluster, 3 primaries + 3 replicas), 3 brokers, publishers on A, the subscriber on B, QoS 0
  and 1: the fan-in's msg/s with Redis CPU and commands per cross-broker message at that load
  (the `INFO cpu` used_cpu_sys+used_cpu_user and `INFO commandstats` deltas summed over the
  primaries; batches are full there, so commands per message are far below the plan's); and
  the same two figures for --lone-messages messages sent one at a time (each delivered before
  the next: every message its own batch, as the plan counts a large fleet's per-pod-pair
  rates), whose commands per message, less the idle background, go beside the simulator's
  `REDIS_OPS_PER_CROSS_QOS0/1` with their ratio and pass within 20 %.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import redis
from mcloudtt_chaos.procs import (
    NotInstalled,
    Process,
    RedisClusterProcess,
    RedisServer,
    console_script,
    free_port,
    redis_cli_binary,
    scrape,
)
from mcloudtt_simulator import sizing
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

from . import clients as c
from .procstat import UsageMeter, cpu_seconds
from .scenarios import _percentile


def _metric(http_port: int, name: str) -> float:
    return scrape(http_port).value(name)


async def wait_remote_filter(http_port: int, timeout: float = 10.0) -> None:
    """Until the broker on `http_port` has a remote subscription in its table (at most
    `timeout`): the publisher starts once its messages have somewhere to go."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _metric(http_port, "mcloudtt_cluster_remote_filters") < 1:
        await asyncio.sleep(0.02)


def _metric_total(http_port: int, name: str) -> float:
    """The sum of a metric over all its labels."""
    return scrape(http_port).total(name)


class Proc(Process):
    """A process of the benchmark, started and listening on `port`."""

    def __init__(self, cmd: list[str], port: int, http_port: int) -> None:
        super().__init__(cmd, port=port, http_port=http_port)
        self.port: int = port
        self.http_port: int = http_port
        self.start()
        try:
            self.wait_port(timeout=20)
        except BaseException:
            self.close()
            raise

    def ready(self) -> None:
        self.wait_http(path="/readyz", timeout=20)


def _start_broker(*extra: str) -> Proc:
    """A broker on free ports, without $SYS traffic or chatter, plus `extra` options."""
    port, http = free_port(), free_port()
    try:
        broker = console_script("mcloudtt-broker")
    except NotInstalled as error:
        raise SystemExit(str(error)) from None
    command = [*broker, "--bind", f"127.0.0.1:{port}", "--http", f"127.0.0.1:{http}"]
    return Proc([*command, *extra, "--sys-interval", "0", "--log-level", "warning"], port, http)


@contextlib.contextmanager
def single_broker() -> Iterator[list[Proc]]:
    broker = _start_broker()
    try:
        broker.ready()
        yield [broker]
    finally:
        broker.close()


BACKPLANES = ("single", "cluster")
PREDICTED_OPS = {0: sizing.REDIS_OPS_PER_CROSS_QOS0, 1: sizing.REDIS_OPS_PER_CROSS_QOS1}
OPS_TOLERANCE = 0.20


@dataclass
class Backplane:
    """The Redis the brokers share: its URL and the primaries (ports) whose INFO is summed."""

    kind: str
    url: str
    primaries: list[int]


@contextlib.contextmanager
def backplane(kind: str) -> Iterator[Backplane]:
    """One redis-server (`single`) or a 3-shard Redis Cluster with a replica each (`cluster`)."""
    try:
        if kind == "single":
            with RedisServer().start(timeout=20) as server:
                yield Backplane(kind, server.url, [server.port])
        elif kind == "cluster":
            with RedisClusterProcess(primaries=3, replicas=1) as rc:
                yield Backplane(kind, rc.seed_url, [node.port for node, _ in rc.shards()])
        else:
            raise SystemExit(f"unknown backplane {kind!r} (single, cluster)")
    except NotInstalled as error:
        raise SystemExit(str(error)) from None


def redis_totals(ports: list[int]) -> tuple[float, dict[str, int]]:
    """CPU seconds (sys + user) and calls per command, summed over these Redis nodes. The
    INFO calls themselves are left out: they are the benchmark's, not the brokers'."""
    cpu = 0.0
    calls: dict[str, int] = {}
    for port in ports:
        with redis.Redis(port=port, socket_timeout=5) as r:
            info = r.info("cpu")
            cpu += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
            for name, value in r.info("commandstats").items():
                command = str(name).removeprefix("cmdstat_")
                if command != "info":
                    calls[command] = calls.get(command, 0) + int(value["calls"])
    return cpu, calls


def calls_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


class LonePair:
    """paho publisher on broker A, paho subscriber on broker B; `send(qos)` returns once B has
    delivered the message, so every message crosses alone."""

    def __init__(self, pub_port: int, sub_port: int) -> None:
        import threading

        self.got = 0
        self.cond = threading.Condition()
        self.sub = self._client(sub_port, "lone-sub")
        self.sub.on_message = self._on_message
        self.sub.subscribe("lone/#", qos=1)
        self.pub = self._client(pub_port, "lone-pub")
        # Until B's subscription is in A's routing table nothing crosses.
        deadline = time.monotonic() + 15
        while not self.send(0, timeout=0.3):
            if time.monotonic() > deadline:
                raise SystemExit("the subscription did not cross brokers in 15 s")

    @staticmethod
    def _client(port: int, client_id: str) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        client.connect("127.0.0.1", port)
        client.loop_start()
        deadline = time.monotonic() + 5
        while not client.is_connected():
            if time.monotonic() > deadline:
                raise SystemExit(f"no CONNACK from port {port}")
            time.sleep(0.01)
        return client

    def _on_message(self, _client: object, _userdata: object, _message: object) -> None:
        with self.cond:
            self.got += 1
            self.cond.notify_all()

    def send(self, qos: int, timeout: float = 5.0) -> bool:
        with self.cond:
            want = self.got + 1
        self.pub.publish("lone/sensor/1", b"21.5", qos=qos).wait_for_publish(timeout)
        with self.cond:
            return self.cond.wait_for(lambda: self.got >= want, timeout)

    def close(self) -> None:
        for client in (self.pub, self.sub):
            client.loop_stop()
            client.disconnect()


def lone_messages(
    bp: Backplane, pub_port: int, sub_port: int, qos: int, count: int, idle_rate: float
) -> tuple[float, float]:
    """Redis commands (less the idle background) and CPU µs per message for `count` messages
    crossing one at a time."""
    pair = LonePair(pub_port, sub_port)
    try:
        cpu0, calls0 = redis_totals(bp.primaries)
        began = time.monotonic()
        for _ in range(count):
            if not pair.send(qos):
                raise SystemExit(f"a lone QoS {qos} message was not delivered in 5 s")
        elapsed = time.monotonic() - began
        cpu1, calls1 = redis_totals(bp.primaries)
    finally:
        pair.close()
    calls = sum(calls_delta(calls0, calls1).values()) - idle_rate * elapsed
    return calls / count, (cpu1 - cpu0) / count * 1e6


def ops_check(measured: float, predicted: float) -> tuple[float, bool]:
    """measured / predicted, and whether it is within OPS_TOLERANCE of 1."""
    ratio = measured / predicted if predicted else float("nan")
    return ratio, abs(ratio - 1.0) <= OPS_TOLERANCE


@contextlib.contextmanager
def cluster(mode: str, size: int = 3, redis_url: str | None = None) -> Iterator[list[Proc]]:
    """`size` brokers in `mode` on `redis_url`, or on a redis-server of their own."""
    with contextlib.ExitStack() as stack:
        if redis_url is None:
            redis_url = stack.enter_context(backplane("single")).url
        yield stack.enter_context(_brokers(mode, size, redis_url))


@contextlib.contextmanager
def _brokers(mode: str, size: int, redis_url: str) -> Iterator[list[Proc]]:
    brokers: list[Proc] = []
    try:
        for index in range(size):
            brokers.append(
                _start_broker(
                    "--redis",
                    redis_url,
                    "--id",
                    f"bench-{index}",
                    "--cluster-mode",
                    mode,
                )
            )
        for broker in brokers:
            broker.ready()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            _metric(b.http_port, "mcloudtt_cluster_peers") < size - 1 for b in brokers
        ):
            time.sleep(0.05)
        yield brokers
    finally:
        for broker in brokers:
            broker.close()


async def fanin(
    pub_port: int,
    sub_port: int,
    pids: list[int],
    qos: int,
    warmup: float,
    duration: float,
    wait_table: int | None = None,
    probe: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """`probe()`, if given, is called as the window opens and as it closes (both results are
    returned as "probe"), e.g. to read Redis' counters over exactly the measured window."""
    flow = c.Flow(c.INFLIGHT_LIMIT)
    sub = await c.open_client(lambda: c.Subscriber(flow), sub_port, f"cb-sub-{qos}")
    pubs: list[c.Publisher] = []
    try:
        await sub.subscribe([("sensors/+/temp", qos)])
        if wait_table is not None:  # the publisher's broker must know the subscriber's filter
            await wait_remote_filter(wait_table)
        for n in range(4):
            topic = f"sensors/{n}/temp"

            def make(topic: str = topic) -> c.BaseClient:
                if qos == 0:
                    return c.QoS0Publisher(flow, topic)
                return c.QoS1Publisher(flow, topic, window=c.QOS1_WINDOW)

            pub = await c.open_client(make, pub_port, f"cb-pub-{qos}-{n}")
            assert isinstance(pub, c.Publisher)
            pubs.append(pub)
        flow.publishers = pubs
        flow.start()
        await asyncio.sleep(warmup)
        meter = UsageMeter(pids[0])
        meter.start()
        cpu0 = [cpu_seconds(pid) for pid in pids]
        probed = [probe()] if probe is not None else []
        r0 = sub.publishes
        await asyncio.sleep(duration)
        r1 = sub.publishes
        usage = meter.stop()
        cpu1 = [cpu_seconds(pid) for pid in pids]
        if probe is not None:
            probed.append(probe())
        await flow.stop()
    finally:
        await c.close_all([sub, *pubs])
    delivered = r1 - r0
    return {
        "msg_per_s": delivered / usage.wall,
        "cpu_us_per_msg": [
            (b - a) / delivered * 1e6 if delivered else float("nan")
            for a, b in zip(cpu0, cpu1, strict=True)
        ],
        "generator_cpu": usage.generator_core_share,
        "delivered": delivered,
        "probe": probed,
    }


async def latency(
    pub_port: int, sub_port: int, warmup: float, duration: float, wait_table: int | None = None
) -> dict[str, float]:
    sub = await c.open_client(lambda: c.Subscriber(latency=True), sub_port, "cb-lat-sub")
    made = None
    try:
        await sub.subscribe([("sensors/+/temp", 0)])
        if wait_table is not None:
            await wait_remote_filter(wait_table)
        made = await c.open_client(
            lambda: c.PacedPublisher("sensors/0/temp"), pub_port, "cb-lat-pub"
        )
        assert isinstance(made, c.PacedPublisher)
        loop = asyncio.get_running_loop()
        runner = asyncio.ensure_future(made.run(1000.0, loop.time() + warmup + duration))
        await asyncio.sleep(warmup)
        first = len(sub.latencies_ns)
        await runner
        await asyncio.sleep(0.05)
        samples = sorted(v / 1e6 for v in sub.latencies_ns[first:])
    finally:
        await c.close_all([sub] + ([made] if made is not None else []))
    return {
        "p50_ms": _percentile(samples, 0.5),
        "p99_ms": _percentile(samples, 0.99),
        "samples": len(samples),
    }


def backplane_run(
    kind: str, warmup: float, duration: float, lone: int, console: Console
) -> dict[str, float]:
    """QoS 0 then QoS 1 (the same brokers) from A to B of 3 routed brokers on this backplane:
    msg/s, Redis CPU and commands per cross-broker message at full load and one message at a
    time, the latter against the plan's commands per message."""
    out: dict[str, float] = {}
    with backplane(kind) as bp, _brokers("routed", 3, bp.url) as (a, b, cc):
        for qos in (0, 1):
            # The idle background (heartbeats, blocking reads timing out) over a short
            # while, taken off the window's count as test_redis_ops does.
            idle0, t0 = redis_totals(bp.primaries)[1], time.monotonic()
            time.sleep(max(0.5, warmup))
            idle = sum(calls_delta(idle0, redis_totals(bp.primaries)[1]).values())
            idle_rate = idle / (time.monotonic() - t0)
            lone_ops, lone_cpu = lone_messages(bp, a.port, b.port, qos, lone, idle_rate)
            began: list[float] = []

            def probe(began: list[float] = began) -> tuple[float, dict[str, int]]:
                began.append(time.monotonic())
                return redis_totals(bp.primaries)

            r = asyncio.run(
                fanin(
                    a.port,
                    b.port,
                    [a.pid, b.pid, cc.pid],
                    qos,
                    warmup,
                    duration,
                    wait_table=a.http_port,
                    probe=probe,
                )
            )
            (cpu0, calls0), (cpu1, calls1) = r["probe"]
            delivered = r["delivered"]
            window = began[1] - began[0]
            calls = sum(calls_delta(calls0, calls1).values()) - idle_rate * window
            key = f"{kind}_qos{qos}"
            # Not `single_qos{qos}_msg_s`: that is the single-broker figure the ratios use.
            out[f"{key}_backplane_msg_s"] = r["msg_per_s"]
            out[f"{key}_redis_cpu_us_per_msg"] = (
                (cpu1 - cpu0) / delivered * 1e6 if delivered else float("nan")
            )
            out[f"{key}_redis_ops_per_msg"] = calls / delivered if delivered else float("nan")
            out[f"{key}_lone_redis_ops_per_msg"] = lone_ops
            out[f"{key}_lone_redis_cpu_us_per_msg"] = lone_cpu
            out[f"{key}_predicted_ops_per_msg"] = PREDICTED_OPS[qos]
            out[f"{key}_ops_ratio"] = ops_check(lone_ops, PREDICTED_OPS[qos])[0]
            console.log(
                f"{kind} backplane QoS {qos}: {r['msg_per_s']:,.0f} msg/s, "
                f"{out[f'{key}_redis_cpu_us_per_msg']:.2f} µs Redis CPU/msg and "
                f"{out[f'{key}_redis_ops_per_msg']:.3f} Redis ops/msg at that load; one at a "
                f"time {lone_cpu:.1f} µs, {lone_ops:.2f} ops/msg (plan {PREDICTED_OPS[qos]:g})"
            )
    return out


def one_run(
    warmup: float,
    duration: float,
    console: Console,
    backplanes: tuple[str, ...] = (),
    classic: bool = True,
    lone: int = 200,
) -> dict[str, float]:
    out: dict[str, float] = {}
    for kind in backplanes:
        out.update(backplane_run(kind, warmup, duration, lone, console))
    if not classic:
        return out

    def single(qos: int) -> dict[str, Any]:
        with single_broker() as (a,):
            r = asyncio.run(fanin(a.port, a.port, [a.pid], qos, warmup, duration))
        console.log(f"single broker QoS {qos}: {r['msg_per_s']:,.0f} msg/s")
        return r

    for qos in (0, 1):
        before = single(qos)
        with cluster("routed") as (a, b, cc):
            r = asyncio.run(
                fanin(
                    a.port,
                    b.port,
                    [a.pid, b.pid, cc.pid],
                    qos,
                    warmup,
                    duration,
                    wait_table=a.http_port,
                )
            )
            out[f"cross_qos{qos}_msg_s"] = r["msg_per_s"]
            out[f"routed_idle_broker_cpu_us_qos{qos}"] = r["cpu_us_per_msg"][2]
            out[f"cross_qos{qos}_a_cpu_us"] = r["cpu_us_per_msg"][0]
            out[f"cross_qos{qos}_b_cpu_us"] = r["cpu_us_per_msg"][1]
            out[f"cross_qos{qos}_generator_cpu"] = r["generator_cpu"]
            # Anything the cluster path dropped (buffer or unconfirmed overflow) on the way.
            out[f"cross_qos{qos}_dropped"] = _metric_total(
                a.http_port, "mcloudtt_cluster_dropped_total"
            ) + _metric_total(b.http_port, "mcloudtt_cluster_dropped_total")
        console.log(f"A -> B QoS {qos}: {out[f'cross_qos{qos}_msg_s']:,.0f} msg/s")
        # The single figure before and after the cross one: this machine's speed drifts.
        after = single(qos)
        out[f"single_qos{qos}_msg_s"] = (before["msg_per_s"] + after["msg_per_s"]) / 2
        out[f"single_qos{qos}_cpu_us"] = (
            before["cpu_us_per_msg"][0] + after["cpu_us_per_msg"][0]
        ) / 2
        ratio = out[f"cross_qos{qos}_msg_s"] / out[f"single_qos{qos}_msg_s"]
        console.log(f"QoS {qos} cross/single in this run: {ratio:.2f}")
    with cluster("broadcast") as (a, b, cc):
        r = asyncio.run(
            fanin(
                a.port, b.port, [a.pid, b.pid, cc.pid], 0, warmup, duration, wait_table=a.http_port
            )
        )
        out["broadcast_idle_broker_cpu_us_qos0"] = r["cpu_us_per_msg"][2]
        out["broadcast_cross_qos0_msg_s"] = r["msg_per_s"]
    with single_broker() as (a,):
        r = asyncio.run(latency(a.port, a.port, warmup, duration))
        out["single_p50_ms"], out["single_p99_ms"] = r["p50_ms"], r["p99_ms"]
    with cluster("routed") as (a, b, _c):
        r = asyncio.run(latency(a.port, b.port, warmup, duration, wait_table=a.http_port))
        out["cross_p50_ms"], out["cross_p99_ms"] = r["p50_ms"], r["p99_ms"]
    return out


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    """Medians of every figure over the runs, and the derived ratios and differences."""
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    for kind in BACKPLANES:
        for qos in (0, 1):
            key = f"{kind}_qos{qos}"
            if f"{key}_lone_redis_ops_per_msg" in medians:
                ratio, ok = ops_check(medians[f"{key}_lone_redis_ops_per_msg"], PREDICTED_OPS[qos])
                medians[f"{key}_ops_ratio"] = ratio
                medians[f"{key}_ops_pass"] = float(ok)
    if "cross_qos0_msg_s" not in medians:  # --backplane-only
        return medians
    # Each run measures single around cross, so its ratio is taken while the machine runs at
    # one speed (a shared VM drifts by tens of percent within minutes): the median of ratios.
    for qos in (0, 1):
        medians[f"qos{qos}_ratio"] = statistics.median(
            run[f"cross_qos{qos}_msg_s"] / run[f"single_qos{qos}_msg_s"] for run in runs
        )
    medians["hop_adds_p50_ms"] = medians["cross_p50_ms"] - medians["single_p50_ms"]
    medians["hop_adds_p99_ms"] = medians["cross_p99_ms"] - medians["single_p99_ms"]
    medians["cross_dropped"] = max(run[f"cross_qos{qos}_dropped"] for run in runs for qos in (0, 1))
    return medians


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mcloudtt-cluster-bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None, help="write the medians as JSON")
    parser.add_argument(
        "--backplane",
        default=None,
        help="comma list of Redis backplanes for the Redis-cost figures: single, cluster "
        "(default: both if redis-cli is found, else single; 'none' for neither)",
    )
    parser.add_argument(
        "--lone-messages",
        type=int,
        default=200,
        help="messages sent one at a time per backplane and QoS for the commands per message",
    )
    parser.add_argument(
        "--backplane-only",
        action="store_true",
        help="only the Redis-cost figures per backplane (not single vs cross, latency, idle C)",
    )
    args = parser.parse_args(argv)
    if args.backplane is None:
        try:
            redis_cli_binary()
            backplanes: tuple[str, ...] = BACKPLANES
        except NotInstalled:
            backplanes = ("single",)
    elif args.backplane == "none":
        backplanes = ()
    else:
        backplanes = tuple(k.strip() for k in args.backplane.split(",") if k.strip())
        unknown = set(backplanes) - set(BACKPLANES)
        if unknown:
            parser.error(f"unknown backplane(s) {', '.join(sorted(unknown))} (single, cluster)")
    if args.backplane_only and not backplanes:
        parser.error("--backplane-only with no backplane")
    console = Console(stderr=True)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    runs = []
    for index in range(args.runs):
        console.rule(f"run {index + 1}/{args.runs}")
        runs.append(
            one_run(
                args.warmup,
                args.duration,
                console,
                backplanes,
                classic=not args.backplane_only,
                lone=args.lone_messages,
            )
        )
    medians = summarize(runs)
    out = Console()
    if backplanes:
        out.print(backplane_table(medians, backplanes, args.runs))
    if not args.backplane_only:
        out.print(classic_table(medians, args.runs))
    if args.out is not None:
        args.out.write_text(json.dumps({"medians": medians, "runs": runs}, indent=2))


def backplane_table(medians: dict[str, float], backplanes: tuple[str, ...], runs: int) -> Table:
    table = Table(
        title=f"Redis cost per cross-broker message, A -> B of 3 brokers (medians of {runs} runs)"
    )
    for column in (
        "backplane",
        "QoS",
        "msg/s",
        "Redis CPU µs/msg",
        "Redis ops/msg",
        "1 at a time: CPU µs/msg",
        "ops/msg",
        "plan ops/msg",
        "measured/plan",
        "within 20 %",
    ):
        table.add_column(column)
    for kind in backplanes:
        for qos in (0, 1):
            key = f"{kind}_qos{qos}"
            table.add_row(
                "1 Redis" if kind == "single" else "Cluster 3 shards",
                str(qos),
                f"{medians[f'{key}_backplane_msg_s']:,.0f}",
                f"{medians[f'{key}_redis_cpu_us_per_msg']:.2f}",
                f"{medians[f'{key}_redis_ops_per_msg']:.3f}",
                f"{medians[f'{key}_lone_redis_cpu_us_per_msg']:.1f}",
                f"{medians[f'{key}_lone_redis_ops_per_msg']:.2f}",
                f"{PREDICTED_OPS[qos]:g}",
                f"{medians[f'{key}_ops_ratio']:.2f}",
                "PASS" if medians[f"{key}_ops_pass"] else "FAIL",
            )
    return table


def classic_table(medians: dict[str, float], runs: int) -> Table:
    table = Table(title=f"Cluster benchmark (medians of {runs} runs)")
    for column in ("figure", "value", "target", "status"):
        table.add_column(column)

    def row(name: str, value: float, fmt: str, target: str = "", ok: bool | None = None) -> None:
        table.add_row(
            name, format(value, fmt), target, "" if ok is None else ("pass" if ok else "FAIL")
        )

    row("single broker QoS 0 msg/s", medians["single_qos0_msg_s"], ",.0f")
    row("A -> B QoS 0 msg/s", medians["cross_qos0_msg_s"], ",.0f")
    row("QoS 0 cross/single", medians["qos0_ratio"], ".2f", ">= 0.5", medians["qos0_ratio"] >= 0.5)
    row("single broker QoS 1 msg/s", medians["single_qos1_msg_s"], ",.0f")
    row("A -> B QoS 1 msg/s", medians["cross_qos1_msg_s"], ",.0f")
    row("QoS 1 cross/single", medians["qos1_ratio"], ".2f", ">= 0.5", medians["qos1_ratio"] >= 0.5)
    dropped = medians["cross_dropped"]
    row("cluster drops in A -> B runs", dropped, ",.0f", "0", dropped == 0)
    row(
        "latency p50 single / A->B ms",
        medians["cross_p50_ms"],
        ".2f",
        f"single {medians['single_p50_ms']:.2f}",
    )
    row(
        "latency p99 A->B ms",
        medians["cross_p99_ms"],
        ".2f",
        "<= 3 ms",
        medians["cross_p99_ms"] <= 3.0,
    )
    row("hop adds p99 ms", medians["hop_adds_p99_ms"], ".2f")
    row("idle broker C CPU µs/msg, routed", medians["routed_idle_broker_cpu_us_qos0"], ".2f")
    row("idle broker C CPU µs/msg, broadcast", medians["broadcast_idle_broker_cpu_us_qos0"], ".2f")
    return table


if __name__ == "__main__":
    main()
