"""Redis commands per cross-broker message against the message rate: what batching saves.

A short measurement (seconds per rate, not a benchmark): one redis-server, two routed brokers,
a QoS 0 publisher on broker A at each mean rate of --rates (Poisson arrivals), a subscriber on B; the
`INFO commandstats` delta over the window, less the idle background measured before, divided by
the messages B delivered. `full` in --rates is the unpaced QoS 1 fan-in of
`mcloudtt-cluster-bench` (4 publishers) for the same window. The simulator's batching model
(`mcloudtt_simulator.sizing.redis_ops_per_cross`) is checked against the recorded output
(tests/simulator/data/redis_batching.json, tests/simulator/test_redis_ops.py).

    python -m mcloudtt_loadtest.batching --rates 1,100,1000,3000,10000,full --seconds 3 \
        --out tests/simulator/data/redis_batching.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mcloudtt_chaos.procs import RedisServer

from . import clients as c
from .cluster_bench import _brokers, calls_delta, fanin, redis_totals, wait_remote_filter


class PoissonPublisher(c.PacedPublisher):
    """QoS 0 at a mean rate with exponential gaps (many independent devices, not a metronome):
    at each wake-up it sends what is due by then."""

    async def run(self, rate: float, until: float) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(rate)
        due = loop.time()
        while loop.time() < until and self.transport is not None:
            now = loop.time()
            while due <= now:
                self.transport.write(
                    self.prefix + time.perf_counter_ns().to_bytes(8, "big") + self.pad
                )
                self.sent += 1
                due += rng.expovariate(rate)
            await asyncio.sleep(max(due - loop.time(), 0.0))


async def paced(
    pub_port: int, sub_port: int, wait_table: int, rate: float, seconds: float, probe: Any
) -> dict[str, Any]:
    sub = await c.open_client(lambda: c.Subscriber(), sub_port, "batch-sub")
    pub = None
    try:
        await sub.subscribe([("sensors/+/temp", 0)])
        await wait_remote_filter(wait_table)
        made = await c.open_client(
            lambda: PoissonPublisher("sensors/0/temp"), pub_port, "batch-pub"
        )
        assert isinstance(made, PoissonPublisher)
        pub = made
        loop = asyncio.get_running_loop()
        runner = asyncio.ensure_future(pub.run(rate, loop.time() + 0.5 + seconds))
        await asyncio.sleep(0.5)  # warm-up
        before = probe()
        r0, t0 = sub.publishes, time.monotonic()
        await runner
        await asyncio.sleep(0.2)  # the last ones arrive
        after = probe()
        delivered = sub.publishes - r0
        window = time.monotonic() - t0
    finally:
        await c.close_all([sub] + ([pub] if pub is not None else []))
    return {"before": before, "after": after, "delivered": delivered, "window": window}


def measure(rates: list[str], seconds: float) -> list[dict[str, float]]:
    points = []
    with RedisServer().start(timeout=20) as server, _brokers("routed", 2, server.url) as (a, b):
        ports = [server.port]
        for rate in rates:
            idle0, t0 = redis_totals(ports)[1], time.monotonic()
            time.sleep(1.0)
            idle_rate = sum(calls_delta(idle0, redis_totals(ports)[1]).values()) / (
                time.monotonic() - t0
            )
            if rate == "full":
                began: list[float] = []

                def probe(began: list[float] = began) -> tuple[float, dict[str, int]]:
                    began.append(time.monotonic())
                    return redis_totals(ports)

                r = asyncio.run(
                    fanin(a.port, b.port, [a.pid, b.pid], 1, 0.5, seconds, a.http_port, probe)
                )
                (_, calls0), (_, calls1) = r["probe"]
                delivered, window = r["delivered"], began[1] - began[0]
            else:
                got = asyncio.run(
                    paced(
                        a.port,
                        b.port,
                        a.http_port,
                        float(rate),
                        seconds,
                        lambda: redis_totals(ports),
                    )
                )
                (_, calls0), (_, calls1) = got["before"], got["after"]
                delivered, window = got["delivered"], got["window"]
            calls = sum(calls_delta(calls0, calls1).values()) - idle_rate * window
            point = {
                "msg_s": delivered / window,
                "ops_per_msg": calls / delivered,
                "delivered": delivered,
                "paced": rate != "full",
            }
            print(json.dumps(point))
            points.append(point)
    return points


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mcloudtt_loadtest.batching", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rates", default="1,100,1000,3000,10000,full")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is kept")
    parser.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    runs = [measure(rates, args.seconds) for _ in range(args.repeat)]
    points = []
    for index, rate in enumerate(rates):
        # The median run of this rate (by commands per message); every run is kept.
        ordered = sorted((run[index] for run in runs), key=lambda p: p["ops_per_msg"])
        points.append({"rate": rate, **ordered[len(ordered) // 2]})
    if args.out is not None:
        record = {
            "command": "python -m mcloudtt_loadtest.batching " + " ".join(argv),
            "measured": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(),
            "points": points,
            "runs": runs,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
