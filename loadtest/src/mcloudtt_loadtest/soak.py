"""`mcloudtt-soak --minutes 60`: a 3-broker cluster with Redis under a steady mixed load with
reconnects, watched for memory growth, latency and losses.

Load: on each broker a QoS 1 and a QoS 0 publisher (`--rate` messages per second each, a
per-publisher sequence number and the send time in every payload) and a subscriber to `soak/#`
with a persistent session (QoS 1), so every message crosses the cluster to three subscribers.
Every `--reconnect-every` seconds one client, in turn, disconnects and connects again (a
subscriber resumes its session and gets what was queued for it meanwhile).

Every `--interval` seconds it prints each process's RSS, the latency percentiles of the deliveries
of that interval and the counts. At the end: the least-squares slope of each process's RSS after
`--warmup` (KB per minute) and the losses per publisher: QoS 1 must lose nothing, QoS 0 losses are
shown (they are allowed, e.g. while a subscriber is away). Exit status 1 when a slope is over
`--max-slope` or a QoS 1 message was lost.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from mcloudtt_chaos.local import LocalCluster
from mcloudtt_chaos.procs import Process, free_block
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .procstat import rss_bytes

TOPIC = "soak"
PAYLOAD_SIZE = 100


def slope_kb_per_minute(samples: Sequence[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, bytes) samples, in KB per minute (0 for < 2 samples)."""
    if len(samples) < 2:
        return 0.0
    xs = [t for t, _ in samples]
    ys = [b / 1024 for _, b in samples]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return cov / var * 60.0


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Client:
    """A paho 5.0 client that can reconnect to its broker on demand."""

    def __init__(self, name: str, port: int, *, persistent: bool) -> None:
        self.name = name
        self.port = port
        self.persistent = persistent
        self.connected = threading.Event()
        self.c = self._new()

    def _new(self) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.name, protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(100)
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *a: self.connected.clear()
        return c

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, p: Any) -> None:
        if rc == 0:
            self.connected.set()

    def connect(self, first: bool) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.persistent:
            props.SessionExpiryInterval = 3600
        self.c.connect(
            "127.0.0.1", self.port, 30, clean_start=first or not self.persistent, properties=props
        )
        self.c.loop_start()
        if not self.connected.wait(10):
            raise RuntimeError(f"{self.name}: no CONNACK from port {self.port}")

    def reconnect(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
        self.connected.clear()
        time.sleep(0.2)
        self.connect(first=False)

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Subscriber(_Client):
    def __init__(self, name: str, port: int) -> None:
        super().__init__(name, port, persistent=True)
        self.lock = threading.Lock()
        self.seen: dict[str, set[int]] = {}
        self.latencies: list[float] = []
        self.received = 0
        self.duplicates = 0
        self.c.on_message = self._on_message
        self.c.on_connect = self._on_connect_sub

    def _on_connect_sub(self, c: Any, u: Any, flags: Any, rc: Any, p: Any) -> None:
        if rc == 0:
            if not flags.session_present:
                c.subscribe(f"{TOPIC}/#", 1)
            self.connected.set()

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        publisher, seq, sent = msg.payload.split(b" ", 3)[:3]
        with self.lock:
            seqs = self.seen.setdefault(publisher.decode(), set())
            if int(seq) in seqs:
                self.duplicates += 1
            seqs.add(int(seq))
            self.latencies.append(now - float(sent))
            self.received += 1

    def take_latencies(self) -> list[float]:
        with self.lock:
            out, self.latencies = self.latencies, []
        return out


class Publisher(_Client):
    def __init__(self, name: str, port: int, qos: int, rate: float) -> None:
        super().__init__(name, port, persistent=False)
        self.qos = qos
        self.rate = rate
        self.seq = 0
        self.stopping = threading.Event()
        self.reconnect_wanted = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        period = 1.0 / self.rate
        next_at = time.monotonic()
        pending: list[mqtt.MQTTMessageInfo] = []
        while not self.stopping.is_set():
            if self.reconnect_wanted.is_set():
                for info in pending:
                    info.wait_for_publish(10)
                pending.clear()
                self.reconnect()
                self.reconnect_wanted.clear()
            payload = f"{self.name} {self.seq} {time.time():.6f} ".encode().ljust(PAYLOAD_SIZE)
            info = self.c.publish(f"{TOPIC}/{self.name}", payload, self.qos)
            self.seq += 1
            if self.qos:
                pending = [i for i in pending if not i.is_published()]
                pending.append(info)
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
        for info in pending:
            info.wait_for_publish(10)


@dataclass
class Report:
    seconds: float
    rss: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    slopes: dict[str, float] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)  # publisher -> messages lost (all subs)
    published: dict[str, int] = field(default_factory=dict)
    received: int = 0
    duplicates: int = 0
    intervals: list[dict[str, float]] = field(default_factory=list)

    @property
    def qos1_lost(self) -> int:
        return sum(n for name, n in self.lost.items() if "-q1" in name)


def soak(
    seconds: float,
    *,
    interval: float = 60.0,
    warmup: float | None = None,
    rate: float = 20.0,
    reconnect_every: float = 15.0,
    workdir: Path | None = None,
    out: Any = None,
) -> Report:
    """Run the soak for `seconds`; RSS slopes are fitted after `warmup` (default a fifth)."""
    from rich.console import Console

    console = Console(file=out) if out is not None else Console()
    warmup = seconds / 5 if warmup is None else warmup
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mcloudtt-soak-")
        workdir = Path(tmp.name)
    first = free_block(6)
    cluster = LocalCluster(workdir, brokers=3, base_port=first, base_http_port=first + 3)
    clients: list[_Client] = []
    try:
        redis = cluster.start_redis()
        brokers = cluster.start_brokers("--sys-interval", "0")
        processes: dict[str, Process] = {"redis": redis}
        processes.update({b.name: b for b in brokers})
        ports = [b.port for b in brokers if b.port is not None]
        assert len(ports) == len(brokers)  # brokers always have an MQTT port
        subscribers = [Subscriber(f"soak-sub-{i}", port) for i, port in enumerate(ports)]
        for sub in subscribers:
            sub.connect(first=True)
            clients.append(sub)
        time.sleep(1.0)  # the subscriptions reach every broker's table
        publishers = [
            Publisher(f"soak-pub{i}-q{qos}", port, qos, rate)
            for i, port in enumerate(ports)
            for qos in (0, 1)
        ]
        for pub in publishers:
            pub.connect(first=True)
            clients.append(pub)
            pub.thread.start()
        report = Report(seconds)
        started = time.monotonic()
        next_sample = started
        next_reconnect = started + reconnect_every
        turn = 0
        console.print(
            f"soak: 3 brokers + Redis, {len(publishers)} publishers at {rate:g}/s, "
            f"{len(subscribers)} subscribers, a reconnect every {reconnect_every:g} s, "
            f"{seconds:g} s"
        )
        while True:
            now = time.monotonic()
            if now >= next_sample:
                elapsed = now - started
                row: dict[str, float] = {"t": elapsed}
                for name, proc in processes.items():
                    rss = rss_bytes(proc.pid, tree=False)
                    report.rss.setdefault(name, []).append((elapsed, rss))
                    row[name] = rss / 1e6
                latencies = [x for sub in subscribers for x in sub.take_latencies()]
                row["n"] = len(latencies)
                row["p50_ms"] = percentile(latencies, 0.5) * 1000
                row["p99_ms"] = percentile(latencies, 0.99) * 1000
                row["max_ms"] = max(latencies, default=float("nan")) * 1000
                report.intervals.append(row)
                console.print(
                    f"t={elapsed:7.1f}s "
                    + " ".join(f"{name}={row[name]:.1f}MB" for name in processes)
                    + f" | {row['n']:.0f} deliveries p50={row['p50_ms']:.1f}ms "
                    f"p99={row['p99_ms']:.1f}ms max={row['max_ms']:.1f}ms"
                )
                for name, proc in processes.items():
                    if not proc.alive():
                        raise RuntimeError(f"{name} exited:\n{proc.log_tail(30)}")
                if elapsed >= seconds:
                    break
                next_sample += interval
            if now >= next_reconnect:
                client = clients[turn % len(clients)]
                turn += 1
                if isinstance(client, Publisher):
                    client.reconnect_wanted.set()
                else:
                    client.reconnect()
                next_reconnect += reconnect_every
            time.sleep(max(0.01, min(next_sample, next_reconnect) - time.monotonic()))
        for pub in publishers:
            pub.stopping.set()
        for pub in publishers:
            pub.thread.join(15)
        # Drain: every QoS 1 message reaches every subscriber.
        expected = {pub.name: pub.seq for pub in publishers}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(
                len(sub.seen.get(name, ())) >= n
                for sub in subscribers
                for name, n in expected.items()
                if "-q1" in name
            ):
                break
            time.sleep(0.2)
        time.sleep(0.5)
        for name, n in expected.items():
            report.published[name] = n
            report.lost[name] = sum(
                n - len(sub.seen.get(name, set()) & set(range(n))) for sub in subscribers
            )
        report.received = sum(sub.received for sub in subscribers)
        report.duplicates = sum(sub.duplicates for sub in subscribers)
        for name, samples in report.rss.items():
            report.slopes[name] = slope_kb_per_minute([s for s in samples if s[0] >= warmup])
        console.print(
            "RSS slope after warm-up (KB/min): "
            + ", ".join(f"{name} {slope:+.1f}" for name, slope in report.slopes.items())
        )
        console.print(
            f"published {sum(expected.values())}, delivered {report.received} "
            f"({report.duplicates} duplicates); lost per publisher (all subscribers): "
            + ", ".join(f"{name} {n}" for name, n in report.lost.items())
        )
        return report
    finally:
        for client in clients:
            with contextlib.suppress(Exception):  # a client already gone
                client.stop()
        cluster.stop()
        for service in cluster.services:
            service.close()
        if tmp is not None:
            tmp.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcloudtt-soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--interval", type=float, help="seconds between samples (default: 60)")
    parser.add_argument("--warmup", type=float, help="seconds before the RSS fit (default: 1/5)")
    parser.add_argument("--rate", type=float, default=20.0, help="messages/s per publisher")
    parser.add_argument("--reconnect-every", type=float, default=15.0, metavar="SECONDS")
    parser.add_argument(
        "--max-slope", type=float, default=100.0, help="KB/min of RSS allowed per broker"
    )
    parser.add_argument("--workdir", type=Path, help="keep the logs here")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    interval = args.interval or min(60.0, max(2.0, seconds / 30))
    report = soak(
        seconds,
        interval=interval,
        warmup=args.warmup,
        rate=args.rate,
        reconnect_every=args.reconnect_every,
        workdir=args.workdir,
    )
    growing = {n: s for n, s in report.slopes.items() if n != "redis" and s > args.max_slope}
    if growing or report.qos1_lost:
        print(f"FAIL: growing {growing}, QoS 1 lost {report.qos1_lost}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
