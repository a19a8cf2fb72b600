"""`mcloudtt-adapter-bench`: the adapter's sustained ingest into DuckDB, publish-to-queryable delay.

A real broker (`mcloudtt-broker` subprocess), a load generator in its own process
(`mcloudtt_loadtest.adapter_bench_publisher`), and the adapter in this process, MQTT source ->
DuckDB sink, with the default at-least-once path (QoS 1, PUBACK after commit). With `--pin` (default on machines
with 2+ cores) the adapter runs on CPU 0 and the broker and generator on the others, so "one
core" is literal. Three phases:

1. backlog: the adapter's persistent session is created, the adapter leaves, the generator
   publishes N messages at QoS 1 (the broker queues them), the adapter comes back and drains the
   queue: the sustained rate of broker -> adapter -> DuckDB, with no generator competing.
2. live: the generator publishes M messages as fast as its window allows while the adapter
   ingests; generator, broker and adapter all run at once.
3. latency: the generator publishes at a steady rate; for every row, commit time minus the
   publish time carried in its payload (`ts`): the delay until the row is queryable.

Rates are given per wall-clock second and per adapter CPU second (process CPU time of this
process, DuckDB's threads included), which is robust to a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mcloudtt_adapter.app import Adapter, AdapterConfig, tune_runtime
from mcloudtt_adapter.records import Batch
from mcloudtt_adapter.sinks.base import WriteResult
from mcloudtt_chaos.procs import Process, console_script, free_port


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--messages", type=int, default=300_000, help="backlog phase size")
    p.add_argument("--live-messages", type=int, default=200_000, help="live phase size (0: skip)")
    p.add_argument("--latency-rate", type=float, default=2_000, help="msg/s in the latency phase")
    p.add_argument("--latency-seconds", type=float, default=10.0)
    p.add_argument("--batch-rows", type=int, default=10_000)
    p.add_argument("--batch-delay", type=float, default=0.25)
    p.add_argument("--linger", type=float, default=0.005)
    p.add_argument(
        "--broker-inflight",
        type=int,
        default=20_000,
        help="broker --max-inflight (QoS 1 messages in flight to the adapter)",
    )
    p.add_argument(
        "--pin",
        choices=("auto", "on", "off"),
        default="auto",
        help="adapter on CPU 0, broker and generator on the other CPUs",
    )
    p.add_argument("--out", default=None, help="directory for the DuckDB file and results.json")
    p.add_argument("--keep", action="store_true", help="keep the DuckDB file")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _calibrate() -> float:
    """CPU nanoseconds per step of a plain Python loop: how fast this machine is right now."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        total = 0
        for i in range(2_000_000):
            total += i
        best = min(best, (time.process_time() - started) / 2_000_000 * 1e9)
    return best


class _Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = (
            Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mcloudtt-adapter-bench-"))
        )
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.db = self.tmp / "bench.duckdb"
        for suffix in ("", ".wal"):
            Path(str(self.db) + suffix).unlink(missing_ok=True)
        self.port = free_port()
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        self.pin = args.pin == "on" or (args.pin == "auto" and len(cpus) >= 2)
        self.adapter_cpus = {min(cpus)} if self.pin else None
        self.other_cpus = (cpus - {min(cpus)}) if self.pin else None
        self.broker: Process | None = None
        self.results: dict[str, Any] = {"pinned": self.pin}

    def _preexec(self) -> Any:
        other = self.other_cpus
        if not other:
            return None
        return lambda: os.sched_setaffinity(0, other)

    def start_broker(self) -> None:
        total = (
            self.args.messages
            + self.args.live_messages
            + int(self.args.latency_rate * self.args.latency_seconds)
        )
        cmd = [
            *console_script("mcloudtt-broker", "mcloudtt_broker"),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--max-inflight",
            str(self.args.broker_inflight),
            "--max-queued-messages",
            str(total + 10_000),
            "--sys-interval",
            "0",
            "--log-level",
            "warning",
        ]
        self.broker = Process(cmd, name="broker", port=self.port, cpus=self.other_cpus or None)
        self.broker.start().wait_port(timeout=15)

    def config(self) -> AdapterConfig:
        a = self.args
        return AdapterConfig(
            mqtt=("127.0.0.1", self.port),
            client_id="bench-adapter",
            duckdb=str(self.db),
            batch_rows=a.batch_rows,
            batch_delay=a.batch_delay,
            linger=a.linger,
            max_pending=max(100_000, 4 * a.batch_rows),
        )

    async def publisher(self, count: int, rate: float = 0.0) -> dict[str, float]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mcloudtt_loadtest.adapter_bench_publisher",
            "--port",
            str(self.port),
            "--count",
            str(count),
            "--rate",
            str(rate),
            stdout=asyncio.subprocess.PIPE,
            preexec_fn=self._preexec(),
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"publisher failed with {proc.returncode}")
        result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
        return result

    async def adapter(self) -> Adapter:
        adapter = Adapter(self.config())
        await adapter.start()
        deadline = time.monotonic() + 15
        while not all(s.connected for s in adapter.sources):
            if time.monotonic() > deadline:
                raise TimeoutError("adapter did not connect")
            await asyncio.sleep(0.01)
        return adapter

    async def until_committed(self, adapter: Adapter, total: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while adapter.pipeline.committed < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {adapter.pipeline.committed} of {total} committed")
            await asyncio.sleep(0.005)

    async def run(self, progress: Any) -> dict[str, Any]:
        a = self.args
        if self.adapter_cpus:
            os.sched_setaffinity(0, self.adapter_cpus)
        self.start_broker()
        assert self.broker is not None
        # 1. backlog
        adapter = await self.adapter()  # creates the persistent session and subscription
        await adapter.stop()
        progress(f"publishing {a.messages:,} messages into the broker's queue")
        pub = await self.publisher(a.messages)
        progress(f"backlog queued ({pub['rate']:,.0f} msg/s); draining it into DuckDB")
        broker_cpu0 = _cpu_seconds(self.broker.pid)
        cpu0, t0 = time.process_time(), time.monotonic()
        adapter = Adapter(self.config())
        await adapter.start()
        await self.until_committed(adapter, a.messages)
        t1, cpu1 = time.monotonic(), time.process_time()
        broker_cpu = _cpu_seconds(self.broker.pid) - broker_cpu0
        self.results["backlog"] = {
            "messages": a.messages,
            "seconds": round(t1 - t0, 3),
            "rate": round(a.messages / (t1 - t0)),
            "adapter_cpu_seconds": round(cpu1 - cpu0, 3),
            "rate_per_adapter_cpu_second": round(a.messages / max(1e-9, cpu1 - cpu0)),
            "broker_cpu_seconds": round(broker_cpu, 3),
        }
        committed = adapter.pipeline.committed
        batches = adapter.metrics.value("mcloudtt_adapter_batches_total", sink="duckdb")
        self.results["backlog"]["batches"] = int(batches)
        # 2. live
        if a.live_messages:
            progress(f"live: publishing {a.live_messages:,} messages while ingesting")
            cpu0, t0 = time.process_time(), time.monotonic()
            broker_cpu0 = _cpu_seconds(self.broker.pid)
            pub_task = asyncio.create_task(self.publisher(a.live_messages))
            await self.until_committed(adapter, committed + a.live_messages)
            t1, cpu1 = time.monotonic(), time.process_time()
            pub = await pub_task
            self.results["live"] = {
                "messages": a.live_messages,
                "seconds": round(t1 - t0, 3),
                "rate": round(a.live_messages / (t1 - t0)),
                "adapter_cpu_seconds": round(cpu1 - cpu0, 3),
                "rate_per_adapter_cpu_second": round(a.live_messages / max(1e-9, cpu1 - cpu0)),
                "broker_cpu_seconds": round(_cpu_seconds(self.broker.pid) - broker_cpu0, 3),
                "generator_cpu_seconds": round(pub["cpu_seconds"], 3),
                "batches": int(
                    adapter.metrics.value("mcloudtt_adapter_batches_total", sink="duckdb") - batches
                ),
            }
            committed = adapter.pipeline.committed
        # 3. latency
        count = int(a.latency_rate * a.latency_seconds)
        if count:
            progress(f"latency: {a.latency_rate:,.0f} msg/s for {a.latency_seconds:g} s")
            delays: list[float] = []

            def listener(batch: Batch, result: WriteResult, now: float) -> None:
                now_us = int(now * 1e6)
                delays.extend((now_us - t) / 1000.0 for t in batch.event_time)

            adapter.pipeline.commit_listeners.append(listener)
            await self.publisher(count, a.latency_rate)
            await self.until_committed(adapter, committed + count)
            adapter.pipeline.commit_listeners.remove(listener)
            self.results["latency_ms"] = {
                "messages": len(delays),
                "rate": a.latency_rate,
                "p50": round(_percentile(delays, 0.50), 2),
                "p90": round(_percentile(delays, 0.90), 2),
                "p99": round(_percentile(delays, 0.99), 2),
                "max": round(max(delays), 2) if delays else None,
                "batch_delay_s": a.batch_delay,
            }
            committed = adapter.pipeline.committed
        await adapter.stop()
        import duckdb

        with duckdb.connect(str(self.db), read_only=True) as con:
            row = con.execute(
                "SELECT COUNT(*), COUNT(DISTINCT message_id) FROM messages"
            ).fetchone()
        assert row is not None
        self.results["rows_in_duckdb"] = int(row[0])
        self.results["committed"] = committed
        return self.results

    def close(self) -> None:
        if self.broker is not None:
            self.broker.close()
        if not self.args.keep and not self.args.out:
            shutil.rmtree(self.tmp, ignore_errors=True)


def run_bench(args: argparse.Namespace) -> int:
    import logging

    from rich.console import Console
    from rich.table import Table

    logging.basicConfig(level=logging.WARNING)
    console = Console()
    bench = _Bench(args)
    tune_runtime()  # as `mcloudtt-adapter run` does
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    calibration = _calibrate()
    try:
        with console.status("starting") as status:
            results = runner(bench.run(lambda text: status.update(text)))
    finally:
        bench.close()
    results["python_loop_ns"] = round(calibration, 1)
    table = Table(title="mcloudtt-adapter-bench: broker -> adapter (MQTT, QoS 1) -> DuckDB")
    table.add_column("phase")
    table.add_column("messages", justify="right")
    table.add_column("msg/s (wall)", justify="right")
    table.add_column("msg per adapter CPU-s", justify="right")
    table.add_column("adapter CPU s", justify="right")
    table.add_column("broker CPU s", justify="right")
    for phase in ("backlog", "live"):
        r = results.get(phase)
        if r:
            table.add_row(
                phase,
                f"{r['messages']:,}",
                f"{r['rate']:,}",
                f"{r['rate_per_adapter_cpu_second']:,}",
                f"{r['adapter_cpu_seconds']:.2f}",
                f"{r['broker_cpu_seconds']:.2f}",
            )
    console.print(table)
    lat = results.get("latency_ms")
    if lat:
        console.print(
            f"publish -> queryable at {lat['rate']:,.0f} msg/s: p50 {lat['p50']} ms, "
            f"p90 {lat['p90']} ms, p99 {lat['p99']} ms, max {lat['max']} ms "
            f"(batch delay {lat['batch_delay_s']} s)"
        )
    console.print(
        f"rows in DuckDB: {results['rows_in_duckdb']:,} (committed {results['committed']:,}); "
        f"adapter pinned to one CPU: {results['pinned']}; machine speed: "
        f"{results['python_loop_ns']} ns per Python loop step (the CPU time of this process; "
        "an idle modern x86 core takes 20-40)"
    )
    out = bench.tmp / "results.json" if args.out else None
    if out is not None:
        out.write_text(json.dumps(results, indent=2))
        console.print(f"results in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcloudtt-adapter-bench", description=__doc__.split("\n\n")[0].strip("`")
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_bench(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
