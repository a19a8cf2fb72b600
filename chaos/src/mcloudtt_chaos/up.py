"""`mcloudtt up`: the whole system on one machine.

Redis (the system's redis-server, else a bundled one), three brokers clustered through it, the
adapter writing what flows through the cluster into DuckDB, a simulated fleet driving the
brokers, and a live view of all of it. Ctrl-C (or --seconds) stops the fleet, lets the adapter
drain, stops brokers and Redis, and writes the HTML report.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from .dashboard import Canary, DashboardServer, Sampler, Watched, adapter_figures, final_page
from .local import LocalCluster, workdir
from .procs import Metrics, Process, console_script, free_port, port_free, scrape

DEFAULT_DEVICES = 300
# smart-building devices report about once a model minute: 3,000 at 60x is ~3,000 msg/s.
LOAD_DEVICES = 3000
LOAD_SPEEDUP = 60.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mcloudtt", description="MCloudTT on one machine.")
    sub = parser.add_subparsers(dest="command")
    up = sub.add_parser("up", help="Redis, brokers, adapter, fleet and a live view")
    up.add_argument("--brokers", type=int, default=3, help="brokers in the cluster (default 3)")
    up.add_argument("--base-port", type=int, default=1883, help="MQTT port of the first broker")
    up.add_argument("--http-port", type=int, default=8080, help="HTTP port of the first broker")
    up.add_argument("--scenario", default="smart-building", help="simulator scenario")
    up.add_argument(
        "--devices", type=int, default=DEFAULT_DEVICES, help="simulated devices (0: no fleet)"
    )
    up.add_argument("--seconds", type=float, default=0, help="stop after this long (0: at Ctrl-C)")
    up.add_argument("--duckdb", type=Path, default=Path("reports/mcloudtt.duckdb"))
    up.add_argument("--report", type=Path, default=Path("reports/report.html"))
    up.add_argument(
        "--workdir", type=Path, default=None, help="logs and Redis data (default: a temp dir)"
    )
    up.add_argument("--no-adapter", action="store_true", help="do not run the adapter")
    up.add_argument(
        "--load",
        action="store_true",
        help=f"a busy fleet: {LOAD_DEVICES} devices at {LOAD_SPEEDUP:g}x model time "
        "(thousands of msg/s)",
    )
    up.add_argument(
        "--dashboard",
        default="127.0.0.1:8000",
        metavar="HOST:PORT",
        help="where the live dashboard is served (default 127.0.0.1:8000; a free port if taken)",
    )
    up.add_argument("--no-dashboard", action="store_true", help="no dashboard, no canary")
    up.add_argument(
        "--kind",
        action="store_true",
        help="the dashboard, canary and fleet against the kind cluster kind/up.sh made "
        "(needs docker, kind and kubectl)",
    )
    up.add_argument(
        "--dry-run", action="store_true", help="with --kind: print the endpoints and commands"
    )
    up.add_argument(
        "--redis-cluster",
        action="store_true",
        help="with --kind: the cluster was made by kind/up.sh --redis-cluster (a Redis Cluster of"
        " 3 primaries + 3 replicas; the dashboard's Redis buttons are off)",
    )
    args = parser.parse_args(argv)
    host, _, port = args.dashboard.rpartition(":")
    if not host or not port.isdigit():
        parser.error("--dashboard takes HOST:PORT")
    args.dashboard_at = (host, int(port))
    if args.load and args.devices == DEFAULT_DEVICES:
        args.devices = LOAD_DEVICES
    if args.command is None:
        parser.print_help()
        raise SystemExit(2)
    if args.brokers < 1:
        parser.error("--brokers must be at least 1")
    if args.dry_run and not args.kind:
        parser.error("--dry-run goes with --kind")
    if args.redis_cluster and not args.kind:
        parser.error("--redis-cluster goes with --kind")
    return args


def _rate(now: dict[str, float], before: dict[str, float], key: str, seconds: float) -> float:
    return max(0.0, (now.get(key, 0.0) - before.get(key, 0.0)) / seconds) if seconds > 0 else 0.0


def _scrape(port: int) -> Metrics | None:
    try:
        return scrape(port, timeout=0.5)
    except OSError:
        return None  # down, or not serving yet


def view(
    cluster: Watched,
    adapter_http: int | None,
    previous: dict[str, dict[str, float]],
    elapsed: float,
    interval: float,
) -> Group:
    brokers = Table(title=f"MCloudTT on this machine — {elapsed:,.0f} s", expand=False)
    for column in (
        "broker",
        "MQTT",
        "clients",
        "in msg/s",
        "out msg/s",
        "Redis link",
        "peers",
        "retained",
    ):
        brokers.add_column(column, justify="right" if column not in ("broker", "MQTT") else "left")
    for service in cluster.services:
        if not service.name.startswith("broker-") or service.http_port is None:
            continue
        metrics = _scrape(service.http_port)
        if metrics is None:
            brokers.add_row(service.name, f"127.0.0.1:{service.port}", "down")
            continue
        now = {
            "in": metrics.total("mcloudtt_messages_received_total"),
            "out": metrics.total("mcloudtt_messages_sent_total"),
        }
        before = previous.get(service.name, now)
        previous[service.name] = now
        link = metrics.get(("mcloudtt_cluster_link_up", ()))
        brokers.add_row(
            service.name,
            f"127.0.0.1:{service.port}",
            f"{metrics.value('mcloudtt_connections'):,.0f}",
            f"{_rate(now, before, 'in', interval):,.0f}",
            f"{_rate(now, before, 'out', interval):,.0f}",
            "up" if link == 1 else "down" if link == 0 else "?",
            f"{metrics.value('mcloudtt_cluster_peers'):.0f}",
            f"{metrics.value('mcloudtt_retained_messages'):,.0f}",
        )
    parts: list[Table] = [brokers]
    if adapter_http is not None:
        metrics = _scrape(adapter_http) or Metrics()
        now = adapter_figures(metrics)
        before = previous.get("adapter", now)
        previous["adapter"] = now
        adapter = Table(title="adapter → DuckDB")
        for column in ("rows stored", "rows/s", "pending", "lag s", "sink errors"):
            adapter.add_column(column, justify="right")
        adapter.add_row(
            f"{now['rows_out_total']:,.0f}",
            f"{_rate(now, before, 'rows_out_total', interval):,.0f}",
            f"{now['pending']:,.0f}",
            f"{now['lag_seconds']:.3f}",
            f"{now['sink_errors_total']:,.0f}",
        )
        parts.append(adapter)
    return Group(*parts)


def _sample_forever(sampler: Sampler, canary: Canary, server: DashboardServer) -> None:
    while not server.stopping.wait(1.0):
        canary.tick()
        sampler.sample()


def _analytics_forever(sampler: Sampler, server: DashboardServer) -> None:
    # Its own thread: a query under load must not hold up the once-a-second sample. Every 5 s,
    # or less often when the queries take long (the adapter's CPU is for ingesting).
    pause = 5.0
    while not server.stopping.wait(pause):
        began = time.monotonic()
        sampler.refresh_analytics()
        pause = max(5.0, 3 * (time.monotonic() - began))


def apply_action(
    cluster: LocalCluster,
    sampler: Sampler | None,
    intended: set[str],
    action: tuple[str, str],
) -> None:
    """A fault (or its repair) from the dashboard, on the main thread that started the
    processes (a child started from a short-lived thread would die with that thread)."""
    target, verb = action
    service: Process | None = next((s for s in cluster.services if s.name == target), None)
    if service is None:
        return
    note = sampler.event if sampler is not None else (lambda text, level="info": None)
    if verb == "kill":
        intended.add(target)
        service.kill()
        note(f"{target} killed (SIGKILL) from the dashboard", "bad")
    elif verb == "stop":
        intended.add(target)
        service.stop(timeout=10.0)
        if sampler is not None and target == "redis":
            sampler.redis_state = "stopped"
        note(f"{target} stopped from the dashboard", "bad")
    elif verb in ("restart", "start"):
        if service.alive():
            service.resume()
            service.stop(timeout=10.0)
        try:
            cluster.restart(service)
        except (OSError, RuntimeError) as error:
            note(f"{target} did not start: {error}", "bad")
            return
        intended.discard(target)
        if sampler is not None and target == "redis":
            sampler.redis_state = "running"
        note(f"{target} started again from the dashboard", "good")
    elif verb == "freeze":
        service.pause()
        if sampler is not None:
            sampler.redis_state = "frozen"
        note(f"{target} frozen (SIGSTOP) from the dashboard", "bad")
    elif verb == "thaw":
        service.resume()
        if sampler is not None:
            sampler.redis_state = "running"
        note(f"{target} thawed (SIGCONT) from the dashboard", "good")


def up(args: argparse.Namespace) -> int:
    console = Console()
    folder = workdir(args.workdir)
    cluster = LocalCluster(
        folder, brokers=args.brokers, base_port=args.base_port, base_http_port=args.http_port
    )
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    adapter_http: int | None = None
    sim = None
    failed = False  # a child died on its own: everything stopped, exit status 1
    canary: Canary | None = None
    server: DashboardServer | None = None
    sampler: Sampler | None = None
    try:
        console.print(f"[bold]starting[/] Redis and {args.brokers} brokers (logs in {folder})")
        cluster.start_redis()
        cluster.start_brokers("--tap-stream", "mcloudtt:tap", "--sys-interval", "5")
        for note in cluster.notes:
            console.print(f"[yellow]{note}[/]")
        endpoints = [
            f"127.0.0.1:{s.port}" for s in cluster.services if s.name.startswith("broker-")
        ]
        if not args.no_adapter:
            args.duckdb.parent.mkdir(parents=True, exist_ok=True)
            adapter_http = free_port()
            cluster.start(
                "adapter",
                [
                    *console_script("mcloudtt-adapter"),
                    "run",
                    "--redis",
                    cluster.redis_url,
                    "--redis-mode",
                    "stream",
                    "--tap-stream",
                    "mcloudtt:tap",
                    "--duckdb",
                    str(args.duckdb),
                    "--http",
                    f"127.0.0.1:{adapter_http}",
                ],
                http_port=adapter_http,
            )
        if args.devices > 0:
            seconds = args.seconds if args.seconds > 0 else 365 * 24 * 3600.0
            command = [
                *console_script("mcloudtt-sim"),
                "run",
                "--scenario",
                args.scenario,
                "--devices",
                str(args.devices),
                "--seconds",
                str(seconds),
            ]
            if args.load:  # the verifier's subscriber would double the broker's work
                command += ["--speedup", str(LOAD_SPEEDUP), "--verify", "none"]
            for endpoint in endpoints:
                command += ["--broker", endpoint]
            sim = cluster.start("simulator", command)
        console.print(
            "MQTT: "
            + ", ".join(endpoints)
            + "   metrics: "
            + ", ".join(
                f"http://127.0.0.1:{s.http_port}/metrics"
                for s in cluster.services
                if s.name.startswith("broker-")
            )
        )
        if not args.no_dashboard:
            canary = Canary(
                [s.port for s in cluster.services if s.name.startswith("broker-") and s.port]
            )
            canary.start()
            sampler = Sampler(cluster, adapter_http=adapter_http, fleet=sim, canary=canary)
            sampler.sample()
            host, port = args.dashboard_at
            if not port_free(port, host):
                chosen = free_port(host)
                console.print(f"[yellow]dashboard port {port} is in use: using {chosen}[/]")
                port = chosen
            server = DashboardServer(sampler, host, port)
            server.start()
            sampler_thread = threading.Thread(
                target=_sample_forever, args=(sampler, canary, server), daemon=True
            )
            sampler_thread.start()
            threading.Thread(target=_analytics_forever, args=(sampler, server), daemon=True).start()
            console.print(f"[bold]dashboard:[/] {server.url}")
        console.print("[dim]Ctrl-C stops everything and writes the report.[/]")
        started = time.monotonic()
        previous: dict[str, dict[str, float]] = {}
        interval = 1.0
        intended: set[str] = set()  # stopped from the dashboard: not a failure
        with Live(
            view(cluster, adapter_http, previous, 0, interval),
            console=console,
            refresh_per_second=2,
            transient=False,
        ) as live:
            last = time.monotonic()
            while not stop_requested:
                deadline = last + interval
                while not stop_requested:
                    # At least one look per round: the view's scrapes may take longer than a
                    # round when a component hangs (a frozen Redis), and a thaw must still pass.
                    wait = max(0.0, deadline - time.monotonic())
                    if server is None:
                        time.sleep(wait)
                        break
                    try:
                        if wait > 0:
                            action = server.actions.get(timeout=min(wait, 0.1))
                        else:
                            action = server.actions.get_nowait()
                    except queue.Empty:
                        if wait <= 0:
                            break
                        continue
                    apply_action(cluster, sampler, intended, action)
                now = time.monotonic()
                elapsed = now - started
                live.update(view(cluster, adapter_http, previous, elapsed, now - last))
                last = now
                dead = [
                    s.name
                    for s in cluster.services
                    if not s.alive() and s is not sim and s.name not in intended
                ]
                if dead:
                    console.print(
                        f"[red]stopped unexpectedly:[/] {', '.join(dead)} (see logs in {folder})"
                    )
                    failed = True
                    break
                if args.seconds and elapsed >= args.seconds:
                    break
    finally:
        console.print("[bold]stopping[/]: fleet, adapter (drains), brokers, Redis")
        if sampler is not None and sampler.snapshot:
            with contextlib.suppress(OSError):
                args.report.parent.mkdir(parents=True, exist_ok=True)
                final = args.report.with_name(args.report.stem + "-dashboard.html")
                # The analytics and topics as they are now, not as last refreshed.
                sampler.refresh_analytics()
                sampler.refresh_topics(timeout=3.0)
                final.write_text(
                    final_page(
                        {
                            **sampler.snapshot,
                            "analytics": sampler.analytics,
                            "topics": sampler.topics,
                        }
                    )
                )
                console.print(f"dashboard's final state: {final.resolve()}")
        if canary is not None:
            canary.stop()
        if server is not None:
            server.stop()
        for service in cluster.services:
            service.resume()  # a frozen Redis would hold up the adapter's drain
        cluster.stop()
    if not args.no_adapter and args.duckdb.exists():
        args.report.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [
                *console_script("mcloudtt-adapter"),
                "report",
                "--duckdb",
                str(args.duckdb),
                "--out",
                str(args.report),
            ],
            check=False,
        )
        if result.returncode == 0:
            console.print(f"report: {args.report.resolve()}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.kind:
            from .upkind import up_kind

            sys.exit(up_kind(args))
        sys.exit(up(args))
    except (RuntimeError, TimeoutError) as error:
        print(f"mcloudtt: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
