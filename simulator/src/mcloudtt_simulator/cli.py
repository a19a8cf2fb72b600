"""`mcloudtt-sim`: plan a fleet's load in virtual time, or drive real brokers with it.

mcloudtt-sim scenarios
mcloudtt-sim plan --scenario smart-building --devices 1000000 --hours 24 [--json]
mcloudtt-sim run  --scenario vehicle-fleet --devices 2000 --seconds 60 --broker 127.0.0.1:1883 [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from . import sizing
from .fleet import Fleet, parse_outage_arg, parse_time_of_day
from .scenario import ScenarioError, list_scenarios, load_scenario

__all__ = ["main"]


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return v


def _fraction(text: str) -> float:
    v = _positive_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]: {text!r}")
    return v


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _time_of_day(text: str) -> float:
    try:
        return parse_time_of_day(text)
    except ScenarioError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _capacity_from(path: str) -> float:
    """A broker capacity (msg/s) from a benchmark's JSON: FILE or FILE:KEY (dotted)."""
    file, _, key = path.partition(":") if not Path(path).exists() else (path, "", "")
    data = json.loads(Path(file).read_text())
    keys = [key] if key else ["capacity_msg_s", "delivered_msg_s", "qos1_delivered_msg_s", "msg_s"]
    for k in keys:
        node: Any = data
        for part in k.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, int | float) and node > 0:
            return float(node)
    raise SystemExit(f"mcloudtt-sim: no positive number under {' or '.join(keys)} in {file}")


def _interactive(args: argparse.Namespace) -> bool:
    return not args.json and sys.stderr.isatty()


def _console() -> Any:
    """Rich output on stdout; wide enough for the tables when it is a file or a pipe."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcloudtt-sim", description="MCloudTT fleet simulator")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("scenarios", help="list the shipped scenarios")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--scenario", required=True, help="a shipped scenario name or a TOML file")
    common.add_argument(
        "--devices", type=_positive_int, help="fleet size (default: the scenario's)"
    )
    common.add_argument("--seed", type=int, help="override the scenario's seed")
    common.add_argument(
        "--json", action="store_true", help="print a JSON summary on stdout, no live display"
    )

    pl = sub.add_parser(
        "plan", parents=[common], help="expected load and cluster sizing in virtual time"
    )
    pl.add_argument(
        "--hours", type=_positive_float, default=24.0, help="virtual hours (default 24)"
    )
    pl.add_argument(
        "--start-time",
        type=_time_of_day,
        default=0.0,
        metavar="HH:MM",
        help="time of day at start (00:00)",
    )
    pl.add_argument(
        "--resolution", type=_positive_float, default=1.0, help="seconds per step (default 1)"
    )
    pl.add_argument(
        "--model",
        choices=["cohort", "device"],
        default="cohort",
        help="cohort: counts per class (any size); device: a simpy process per device (small fleets)",
    )
    pl.add_argument(
        "--broker-capacity",
        type=_positive_float,
        metavar="MSG_S",
        help=f"delivered msg/s one broker sustains (default {sizing.BROKER_CAPACITY_MSG_S:,.0f})",
    )
    pl.add_argument(
        "--capacity-from", metavar="FILE[:KEY]", help="read the capacity from a benchmark's JSON"
    )
    pl.add_argument(
        "--headroom", type=_fraction, default=sizing.HEADROOM, help="planned peak utilisation (0.6)"
    )
    pl.add_argument("--spare", type=int, default=sizing.SPARE_PODS, help="extra pods for N+k (1)")
    pl.add_argument(
        "--max-connections-per-broker",
        type=_positive_int,
        default=sizing.MAX_CONNECTIONS_PER_BROKER,
    )
    pl.add_argument(
        "--connect-rate",
        type=_positive_float,
        default=sizing.CONNECT_RATE_PER_BROKER,
        help="connects/s one broker sustains",
    )
    pl.add_argument("--cluster-overhead", type=float, default=sizing.CLUSTER_OVERHEAD)
    pl.add_argument(
        "--peak-window",
        type=_positive_float,
        default=sizing.PEAK_WINDOW_S,
        help="seconds a peak must last to size for it (10)",
    )
    pl.add_argument(
        "--out", type=Path, help="folder for plan.png and summary.json (default reports/sim/...)"
    )
    pl.add_argument("--no-plot", action="store_true")

    rn = sub.add_parser(
        "run", parents=[common], help="drive real brokers in real time and verify delivery"
    )
    rn.add_argument("--seconds", type=_positive_float, required=True, help="wall-clock duration")
    rn.add_argument(
        "--broker",
        type=_hostport,
        action="append",
        required=True,
        metavar="HOST:PORT",
        help="repeatable; devices are spread over the brokers",
    )
    rn.add_argument(
        "--processes", type=_positive_int, help="device processes (default: 1 per ~4,000 devices)"
    )
    rn.add_argument("--protocol", choices=["3.1.1", "5"], default="3.1.1")
    rn.add_argument(
        "--speedup",
        type=_positive_float,
        default=1.0,
        help="model seconds per wall second (compress a scenario's day)",
    )
    rn.add_argument(
        "--ramp", type=float, default=2.0, help="seconds over which the fleet first connects (2)"
    )
    rn.add_argument("--qos", type=int, choices=[0, 1, 2], help="override every stream's QoS")
    rn.add_argument(
        "--verify",
        choices=["cluster", "local", "none"],
        default="cluster",
        help="cluster: one subscriber on the first broker sees everything; local: one per broker, "
        "each checks its own devices; none",
    )
    rn.add_argument(
        "--drain", type=float, default=5.0, help="seconds to wait for the last deliveries (5)"
    )
    rn.add_argument(
        "--start-time",
        type=_time_of_day,
        default=12 * 3600.0,
        metavar="HH:MM",
        help="the fleet's time of day at start (12:00)",
    )
    rn.add_argument(
        "--outage",
        action="append",
        default=[],
        metavar="REGION:START:DURATION",
        help="an extra regional outage, in model seconds from the start",
    )
    rn.add_argument(
        "--fail-on-loss", action="store_true", help="exit 1 if a QoS 1/2 message was lost"
    )
    return p


def cmd_scenarios(args: argparse.Namespace) -> int:
    from rich.table import Table

    table = Table(title="shipped scenarios")
    table.add_column("name")
    table.add_column("devices", justify="right")
    table.add_column("classes")
    table.add_column("description")
    for name in list_scenarios():
        s = load_scenario(name)
        table.add_row(name, f"{s.devices:,}", ", ".join(c.name for c in s.classes), s.description)
    _console().print(table)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from . import report
    from .plan import PlanRun, simulate_cohorts

    scenario = load_scenario(args.scenario)
    fleet = Fleet(
        scenario,
        args.devices,
        horizon=args.hours * 3600.0,
        start_tod=args.start_time,
        seed=args.seed,
    )
    if args.model == "device" and fleet.devices > 50_000:
        raise SystemExit(
            "mcloudtt-sim: --model device is for fleets up to 50,000 devices; use the cohort model"
        )
    capacity = sizing.BROKER_CAPACITY_MSG_S
    if args.capacity_from:
        capacity = _capacity_from(args.capacity_from)
    if args.broker_capacity:
        capacity = args.broker_capacity

    progress = None
    if _interactive(args):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("[bold]plan[/] {task.description}"),
            BarColumn(),
            TextColumn("{task.fields[vt]}"),
            TimeElapsedColumn(),
            transient=True,
        )
    if args.model == "cohort":
        if progress is not None:
            with progress:
                task = progress.add_task(
                    f"{fleet.scenario.name}, {fleet.devices:,} devices", total=fleet.horizon, vt=""
                )
                run = simulate_cohorts(
                    fleet,
                    args.resolution,
                    lambda t: progress.update(
                        task, completed=t, vt=f"{t / 3600:.1f} / {fleet.horizon / 3600:g} h"
                    ),
                )
        else:
            run = simulate_cohorts(fleet, args.resolution)
    else:
        from .device import simulate_devices

        began = time.perf_counter()
        rec = simulate_devices(fleet, args.resolution)
        run = PlanRun(fleet=fleet, rec=rec, runtime_s=time.perf_counter() - began, model="device")
    summary, ser = report.summarize(
        run,
        capacity_msg_s=capacity,
        headroom=args.headroom,
        spare=args.spare,
        max_connections=args.max_connections_per_broker,
        connect_rate=args.connect_rate,
        cluster_overhead=args.cluster_overhead,
        peak_window_s=args.peak_window,
    )
    out = (
        args.out
        or Path("reports") / "sim" / f"plan-{fleet.scenario.name}-{fleet.devices}-{args.hours:g}h"
    )
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if not args.no_plot:
        plots.append(str(report.plot_plan(summary, ser, run, out / "plan.png")))
    summary["plots"] = plots
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_plan(summary, out)
    return 0


def _print_plan(s: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    con = _console()
    t = Table(
        title=f"{s['scenario']}: {s['devices']:,} devices, {s['hours']:g} h from {s['start_time']} "
        f"(seed {s['seed']}, {s['runtime_s']:.1f} s)",
        show_header=False,
    )
    t.add_column(justify="right", style="bold")
    t.add_column()
    rows = [
        (
            "messages",
            f"{s['messages_total']:,} ({s['status_messages_total']:,} status, {s['wills_total']:,} wills)",
        ),
        (
            "mean",
            f"{s['mean_msg_s']:,.1f} msg/s (analytic without outages {s['expected_mean_msg_s']:,.1f}), "
            f"{s['mean_bytes_s'] / 1e6:,.2f} MB/s",
        ),
        (
            "peak",
            f"{s['peak_msg_s']:,.0f} msg/s at {s['peak_time']}; {s['peak_msg_s_window']:,.0f} msg/s over "
            f"{s['peak_window_s']:g} s at {s['peak_window_time']}",
        ),
        (
            "deliveries",
            f"{s['mean_deliveries_s']:,.1f} /s mean, {s['peak_deliveries_s']:,.0f} /s peak",
        ),
        (
            "connections",
            f"{s['connections_min']:,}..{s['connections_max']:,}; connects peak {s['peak_connects_s']:,.0f}/s",
        ),
        (
            "retained",
            f"{s['retained_topics']:,} topics; {s['persistent_sessions']:,} persistent sessions",
        ),
        (
            "outages",
            ", ".join(f"{o['region']} {o['start']} {o['minutes']:g} min" for o in s["outages"])
            or "none",
        ),
    ]
    b, r = s["brokers"], s["redis"]
    rows += [
        (
            "brokers",
            f"[green]{b['brokers_recommended']} pods[/] (bound by {b['binding']}: messages {b['by_messages']}, "
            f"connections {b['by_connections']}, connects {b['by_connects']}; +{b['spare']} spare; "
            f"{b['capacity_msg_s']:,.0f} msg/s each at {b['headroom']:.0%})",
        ),
        (
            "redis",
            f"[green]{r['maxmemory_gb']} GB[/] maxmemory ({r['memory_bytes'] / 2**20:,.0f} MiB used), "
            f"{r['ops_s_peak']:,.0f} ops/s peak ({r['ops_per_message']:g} per message, "
            f"{r['ops_per_cross']:g} per crossing with batching), "
            f"{r['ops_s_mean']:,.0f} mean, {r['primaries']} primary(ies): "
            + (
                "[green]one Memorystore for Redis instance[/]"
                if r["backend"] == "instance"
                else f"[green]Memorystore for Redis Cluster, {r['shards']} shards x "
                f"{r['replicas']} replica(s)[/]"
            ),
        ),
        ("terraform.tfvars", "\n".join(r["tfvars"])),
    ]
    if r["settings"]:
        rows.append(("brokers, adapter", " ".join(r["settings"])))
    for k, v in rows:
        t.add_row(k, v)
    con.print(t)
    tt = Table(title="per stream")
    for col in (
        "stream",
        "filter",
        "qos",
        "topics",
        "mean msg/s",
        "peak msg/s",
        "analytic",
        "per topic",
        "payload B",
    ):
        tt.add_column(col, justify="left" if col in ("stream", "filter") else "right")
    for x in s["topics"]:
        tt.add_row(
            x["stream"],
            x["filter"],
            f"{x['qos']}{'r' if x['retain'] else ''}",
            f"{x['topics']:,}",
            f"{x['mean_msg_s']:,.1f}",
            f"{x['peak_msg_s']:,.0f}",
            f"{x['expected_msg_s']:,.1f}",
            f"1/{x['per_topic_interval_s']:g}s" if x["per_topic_interval_s"] else "-",
            f"{x['payload_bytes']:.0f}",
        )
    con.print(tt)
    con.print(f"wrote {out / 'summary.json'}" + (f" and {s['plots'][0]}" if s["plots"] else ""))


class _LiveRun:
    """A live view of a real-time run (rich), fed by snapshots from the run."""

    def __init__(self, args: argparse.Namespace) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)
        self.last: dict[str, Any] | None = None
        brokers = ", ".join(f"{h}:{p}" for h, p in args.broker)
        self.title = (
            f"mcloudtt-sim run: {args.scenario}, {args.devices or 'default'} devices -> {brokers}"
        )
        self.last_t = time.time()
        self.rate = 0.0

    def __enter__(self) -> _LiveRun:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def update(self, snap: dict[str, Any]) -> None:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        now = time.time()
        if self.last is not None and now > self.last_t:
            self.rate = (snap.get("sent", 0) - self.last.get("sent", 0)) / (now - self.last_t)
        self.last, self.last_t = snap, now
        elapsed = max(0.0, min(snap["elapsed"], snap["seconds"]))
        t = Table(show_header=False, box=None, title=self.title, title_justify="left")
        t.add_column(justify="right", style="bold")
        t.add_column()
        p50, p99 = snap.get("p50"), snap.get("p99")
        lat = "-" if p50 is None or p50 != p50 else f"{p50:.1f} / {p99:.1f} ms (last 2,000)"
        t.add_row(
            f"{elapsed:.0f} / {snap['seconds']:g} s",
            ProgressBar(total=snap["seconds"], completed=elapsed, width=50),
        )
        t.add_row(
            "connected",
            f"{snap.get('connected', 0):,}  (connects {snap.get('connects', 0):,}, "
            f"drops {snap.get('drops', 0):,}, failures {snap.get('connect_failures', 0):,})",
        )
        t.add_row("sent", f"{snap.get('sent', 0):,}  ({self.rate:,.0f} msg/s)")
        t.add_row(
            "received",
            f"{snap['received']:,}  (in flight {snap.get('sent', 0) - snap['received']:,})",
        )
        t.add_row("latency p50/p99", lat)
        self.live.update(t)


def cmd_run(args: argparse.Namespace) -> int:
    from .realtime import RunConfig, build_fleet, default_processes, run

    scenario = load_scenario(args.scenario)
    devices = args.devices or scenario.devices
    outages = []
    for text in args.outage:
        o = parse_outage_arg(text, scenario)
        outages.append((scenario.regions[o.region].name, o.start, o.end - o.start))
    cfg = RunConfig(
        scenario=args.scenario,
        devices=devices,
        seconds=args.seconds,
        brokers=args.broker,
        processes=args.processes or default_processes(devices),
        protocol=5 if args.protocol == "5" else 4,
        speedup=args.speedup,
        ramp=max(0.0, args.ramp),
        qos=args.qos,
        verify=args.verify,
        drain=max(0.0, args.drain),
        start_tod=args.start_time,
        outages=outages,
        seed=args.seed,
    )
    build_fleet(cfg)  # validate before opening connections
    if _interactive(args):
        with _LiveRun(args) as live:
            cfg.progress = live.update
            result = run(cfg)
    else:
        result = run(cfg)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_run(result)
    lost_acked = 0
    if result.get("lost_by_qos"):
        lost_acked = result["lost_by_qos"].get("1", 0) + result["lost_by_qos"].get("2", 0)
    return 1 if args.fail_on_loss and lost_acked else 0


def _print_run(r: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(
        title=f"{r['scenario']}: {r['devices']:,} devices, {r['seconds']:g} s x{r['speedup']:g} "
        f"against {', '.join(r['brokers'])} (MQTT {r['protocol']})",
        show_header=False,
    )
    t.add_column(justify="right", style="bold")
    t.add_column()
    t.add_row(
        "sent", f"{r['sent']:,} ({r['mean_sent_msg_s']:,.1f} msg/s; by QoS {r['sent_by_qos']})"
    )
    if r["delivered"] is not None:
        lost = r["lost"]
        colour = "green" if not lost else "red"
        t.add_row("delivered", f"{r['delivered']:,}")
        t.add_row("lost", f"[{colour}]{lost:,}[/] (by QoS {r['lost_by_qos']})")
        t.add_row("duplicates / reordered", f"{r['duplicates']:,} / {r['reordered']:,}")
        if r["latency_p50_ms"] is not None:
            t.add_row(
                "latency",
                f"p50 {r['latency_p50_ms']:.2f} ms, p90 {r['latency_p90_ms']:.2f}, "
                f"p99 {r['latency_p99_ms']:.2f}, max {r['latency_max_ms']:.2f}",
            )
        if r["latency_steady_p50_ms"] is not None:
            t.add_row(
                "after the ramp",
                f"p50 {r['latency_steady_p50_ms']:.2f} ms, p99 {r['latency_steady_p99_ms']:.2f}",
            )
    t.add_row(
        "connections",
        f"{r['connects']:,} connects, {r['disconnects']:,} disconnects, {r['drops']:,} drops, "
        f"{r['connect_failures']:,} failures, {r['lost_connections']:,} lost",
    )
    t.add_row(
        "device side",
        f"{r['status_sent']:,} status, {r['resent']:,} resent, {r['unsent']:,} unsent",
    )
    _console().print(t)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "scenarios":
            return cmd_scenarios(args)
        if args.command == "plan":
            return cmd_plan(args)
        return cmd_run(args)
    except ScenarioError as e:
        print(f"mcloudtt-sim: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
