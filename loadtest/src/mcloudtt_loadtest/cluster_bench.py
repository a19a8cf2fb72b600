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
  does not grow with the cluster for traffic it has no subscriber for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mcloudtt_chaos.procs import (
    NotInstalled,
    Process,
    RedisServer,
    console_script,
    free_port,
    scrape,
)
from rich.console import Console
from rich.table import Table

from . import clients as c
from .procstat import UsageMeter, cpu_seconds
from .scenarios import _percentile


def _metric(http_port: int, name: str) -> float:
    return scrape(http_port).value(name)


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


@contextlib.contextmanager
def cluster(mode: str, size: int = 3) -> Iterator[list[Proc]]:
    try:
        redis = RedisServer()
    except NotInstalled as error:
        raise SystemExit(str(error)) from None
    redis.start(timeout=20)
    brokers: list[Proc] = []
    try:
        for index in range(size):
            brokers.append(
                _start_broker(
                    "--redis",
                    redis.url,
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
        redis.close()


async def fanin(
    pub_port: int,
    sub_port: int,
    pids: list[int],
    qos: int,
    warmup: float,
    duration: float,
    wait_table: int | None = None,
) -> dict[str, Any]:
    flow = c.Flow(c.INFLIGHT_LIMIT)
    sub = await c.open_client(lambda: c.Subscriber(flow), sub_port, f"cb-sub-{qos}")
    pubs: list[c.Publisher] = []
    try:
        await sub.subscribe([("sensors/+/temp", qos)])
        if wait_table is not None:  # the publisher's broker must know the subscriber's filter
            deadline = time.monotonic() + 10
            while (
                time.monotonic() < deadline
                and _metric(wait_table, "mcloudtt_cluster_remote_filters") < 1
            ):
                await asyncio.sleep(0.02)
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
        r0 = sub.publishes
        await asyncio.sleep(duration)
        r1 = sub.publishes
        usage = meter.stop()
        cpu1 = [cpu_seconds(pid) for pid in pids]
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
    }


async def latency(
    pub_port: int, sub_port: int, warmup: float, duration: float, wait_table: int | None = None
) -> dict[str, float]:
    sub = await c.open_client(lambda: c.Subscriber(latency=True), sub_port, "cb-lat-sub")
    made = None
    try:
        await sub.subscribe([("sensors/+/temp", 0)])
        if wait_table is not None:
            deadline = time.monotonic() + 10
            while (
                time.monotonic() < deadline
                and _metric(wait_table, "mcloudtt_cluster_remote_filters") < 1
            ):
                await asyncio.sleep(0.02)
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


def one_run(warmup: float, duration: float, console: Console) -> dict[str, float]:
    out: dict[str, float] = {}

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
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    runs = []
    for index in range(args.runs):
        console.rule(f"run {index + 1}/{args.runs}")
        runs.append(one_run(args.warmup, args.duration, console))
    medians = summarize(runs)
    table = Table(title=f"Cluster benchmark (medians of {args.runs} runs)")
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
    Console().print(table)
    if args.out is not None:
        args.out.write_text(json.dumps({"medians": medians, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
