"""`mcloudtt-bench`: MCloudTT head to head with Mosquitto and amqtt, one generator for all.

Order of work: for each run, for each scenario, each broker in turn on a fresh process; so slow
drift of a noisy machine touches every broker alike. Each figure is the median of the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from . import clusters as cl
from . import report
from .brokers import (
    BROKER_NAMES,
    BrokerUnavailable,
    Launcher,
    default_cache_dir,
    make_launcher,
    start_broker,
)
from .procstat import raise_nofile_limit
from .scenarios import RUNNERS, SCENARIO_TITLES, SCENARIOS, Settings

GENERATOR_CPU_WARN = 0.9
OTHER_CPU_WARN = 0.25  # other processes on the machine, share of one core

QUICK = Settings(
    warmup=0.3,
    duration=1.0,
    idle_connections=1_000,
    connect_clients=200,
    devices=1_000,
    retained=1_000,
    setup_budget=20.0,
)


def _csv(choices: Sequence[str], *, none: bool = False) -> Any:
    def parse(text: str) -> list[str]:
        if none and text.strip() == "none":
            return []
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(bad)}; choose from {', '.join(choices)}"
            )
        return list(dict.fromkeys(items))

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcloudtt-bench",
        description="Benchmark mcloudtt against Mosquitto and amqtt with one load generator. "
        "The first broker listed is the subject of the ratios.",
    )
    p.add_argument(
        "--brokers",
        type=_csv(BROKER_NAMES),
        default=list(BROKER_NAMES),
        help="comma-separated subset of %(default)s",
    )
    p.add_argument(
        "--scenarios",
        type=_csv(SCENARIOS, none=True),
        default=list(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}; 'none': only the clusters",
    )
    p.add_argument(
        "--runs",
        type=int,
        help="fresh-broker runs per figure; the median is reported (default 3, 1 with --quick)",
    )
    p.add_argument(
        "--duration", type=float, help="measurement window in seconds (default 5, 1 with --quick)"
    )
    p.add_argument(
        "--warmup",
        type=float,
        help="warm-up before each window in seconds (default 1, 0.3 with --quick)",
    )
    p.add_argument(
        "--quick", action="store_true", help="short windows and fewer connections: a smoke run"
    )
    p.add_argument(
        "--idle-connections", type=int, help="connections for the memory scenario (default 10000)"
    )
    p.add_argument(
        "--connect-clients", type=int, help="clients for the connect-rate scenario (default 1000)"
    )
    p.add_argument(
        "--devices", type=int, help="subscribed clients in the loaded scenario (default 10000)"
    )
    p.add_argument(
        "--retained", type=int, help="retained messages in the loaded scenario (default 10000)"
    )
    p.add_argument(
        "--setup-budget",
        type=float,
        help="seconds allowed to build the loaded state (default 60, 20 with --quick)",
    )
    p.add_argument("--concurrency", type=int, help="connects in flight at once (default 100)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("reports/bench-results.json"),
        help="JSON results file (default %(default)s)",
    )
    p.add_argument("--plot", type=Path, help="PNG bar chart of the ratios")
    p.add_argument(
        "--clusters",
        default="1,2,3",
        help="node counts for the cluster head-to-head, MCloudTT against Aedes on one Redis "
        "(default %(default)s; 'none' to skip; run only when mcloudtt is among --brokers)",
    )
    p.add_argument(
        "--html",
        type=Path,
        help="the HTML report with charts (default: --out with .html)",
    )
    p.add_argument(
        "--aedes-cache",
        type=Path,
        help="where npm installs Aedes (default ~/.cache/mcloudtt/aedes)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        help="where amqtt gets its own venv (default %(default)s)",
    )
    p.add_argument(
        "--mcloudtt-args", default="", help="extra arguments for mcloudtt-broker, as one string"
    )
    p.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="generator event loop (default uvloop when installed)",
    )
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else Settings()
    overrides = {
        "warmup": args.warmup,
        "duration": args.duration,
        "idle_connections": args.idle_connections,
        "connect_clients": args.connect_clients,
        "devices": args.devices,
        "retained": args.retained,
        "setup_budget": args.setup_budget,
        "concurrency": args.concurrency,
    }
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


class ProgressReporter:
    """Feeds the scenarios' phases into the second bar; collects warnings."""

    def __init__(self, progress: Progress, console: Console) -> None:
        self.progress = progress
        self.console = console
        self.task: TaskID = progress.add_task("", total=None)
        self.prefix = ""
        self.warnings: list[str] = []

    def phase(self, text: str, total: float | None = None) -> None:
        self.progress.reset(
            self.task, total=total, completed=0, description=f"  {self.prefix}{text}"
        )

    def advance_to(self, completed: float) -> None:
        self.progress.update(self.task, completed=completed)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.console.print(f"[yellow]warning:[/] {text}")


def _clean(v: Any) -> Any:
    """JSON without NaN: NaN and infinities become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


async def _run_all(
    args: argparse.Namespace,
    settings: Settings,
    launchers: dict[str, Launcher],
    workdir: Path,
    console: Console,
    results: dict[str, dict[str, dict[str, Any]]],
) -> list[str]:
    brokers = list(launchers)
    scenarios: list[str] = args.scenarios
    total = args.runs * len(scenarios) * len(brokers)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        overall = progress.add_task("benchmark", total=total)
        rep = ProgressReporter(progress, console)
        for run in range(1, args.runs + 1):
            for scenario in scenarios:
                for name in brokers:
                    label = f"run {run}/{args.runs} · {SCENARIO_TITLES[scenario]} · {name}"
                    progress.update(overall, description=label)
                    rep.prefix = f"{name}: "
                    rep.phase("starting broker", None)
                    outcome: dict[str, Any]
                    try:
                        broker = await asyncio.to_thread(start_broker, launchers[name], workdir)
                    except Exception as e:
                        outcome = {"error": f"start failed: {e}"}
                        rep.warn(f"{label}: {outcome['error']}")
                    else:
                        try:
                            outcome = await RUNNERS[scenario](broker, settings, rep)
                        except Exception as e:
                            outcome = {"error": f"{type(e).__name__}: {e}"}
                            rep.warn(f"{label}: {outcome['error']}")
                            if os.environ.get("MCLOUDTT_BENCH_DEBUG"):
                                console.print(traceback.format_exc())
                        finally:
                            rep.phase("stopping broker", None)
                            await asyncio.to_thread(broker.stop)
                    gen = outcome.get("generator_cpu")
                    if isinstance(gen, float) and gen > GENERATOR_CPU_WARN:
                        rep.warn(
                            f"{label}: the generator used {gen:.0%} of a core; "
                            "this figure may be the generator's limit, not the broker's"
                        )
                    other = outcome.get("other_cpu")
                    if isinstance(other, float) and other > OTHER_CPU_WARN:
                        rep.warn(
                            f"{label}: other processes used {other:.0%} of a core meanwhile; "
                            "the machine is busy and this figure is suspect"
                        )
                    lost = outcome.get("lost")
                    if isinstance(lost, int | float) and lost > 0:
                        rep.warn(
                            f"{label}: {lost:.0f} messages never arrived (counted lost after a stall)"
                        )
                    results[name].setdefault(scenario, {"runs": []})["runs"].append(outcome)
                    progress.advance(overall)
        progress.update(overall, description="benchmark done")
        progress.remove_task(rep.task)
    return rep.warnings


def _partial_notes(results: dict[str, dict[str, dict[str, Any]]], settings: Settings) -> list[str]:
    notes = []
    for broker, per in results.items():
        runs = [r for r in per.get("loaded", {}).get("runs", []) if "error" not in r]
        short = [r for r in runs if not r.get("complete")]
        if short:
            devices = sorted(int(r.get("devices", 0)) for r in short)
            retained = sorted(int(r.get("retained", 0)) for r in short)
            notes.append(
                f"loaded: {broker} reached {'/'.join(map(str, devices))} of {settings.devices} devices and "
                f"{'/'.join(map(str, retained))} of {settings.retained} retained messages within the "
                f"{settings.setup_budget:g} s setup budget"
            )
    return notes


def _install_loop(choice: str) -> str:
    if choice == "uvloop":
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            return f"uvloop {getattr(uvloop, '__version__', '')}".strip()
        except ImportError:
            pass
    return "asyncio"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    machine = _machine()  # before the run: its load average is the other jobs'
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    settings = settings_from(args)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and CI: no wrapping of the results table

    # Each idle connection and device takes a descriptor here; brokers inherit the limit.
    need = max(settings.idle_connections, settings.devices + 64) + 1024
    nofile = raise_nofile_limit(need)
    if nofile < need:
        console.print(f"[yellow]warning:[/] open-file limit is {nofile}, below the {need} wanted")

    launchers: dict[str, Launcher] = {}
    versions: dict[str, str] = {}
    for name in args.brokers:
        launcher = make_launcher(name, cache_dir=args.cache_dir, mcloudtt_args=args.mcloudtt_args)
        try:
            with console.status(f"preparing {name}"):
                launcher.prepare()
            versions[name] = launcher.version()
            launchers[name] = launcher
        except BrokerUnavailable as e:
            console.print(f"[red]skipping {name}:[/] {e}")
    if not launchers:
        console.print("[red]no broker can run[/]")
        return 2
    brokers = list(launchers)

    loop_name = _install_loop(args.loop)
    console.print(
        f"brokers: {', '.join(f'{b} {versions[b]}' for b in brokers)}; scenarios: {', '.join(args.scenarios)}; "
        f"runs: {args.runs}; window {settings.warmup:g}+{settings.duration:g} s; generator loop: {loop_name}"
    )
    results: dict[str, dict[str, dict[str, Any]]] = {b: {} for b in brokers}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mcloudtt-bench-") as tmp:
        warnings = asyncio.run(_run_all(args, settings, launchers, Path(tmp), console, results))

    medians: dict[str, dict[str, dict[str, float]]] = {}
    gen_cpu: dict[str, dict[str, float | None]] = {}
    other_cpu: dict[str, dict[str, float | None]] = {}
    for b, per_scenario in results.items():
        medians[b] = {}
        gen_cpu[b] = {}
        other_cpu[b] = {}
        for s, data in per_scenario.items():
            data["median"] = report.median_of_runs(data["runs"])
            data["errors"] = sum(1 for r in data["runs"] if "error" in r)
            medians[b][s] = data["median"]
            cpus = [
                r["generator_cpu"]
                for r in data["runs"]
                if isinstance(r.get("generator_cpu"), float)
            ]
            gen_cpu[b][s] = max(cpus) if cpus else None
            others = [r["other_cpu"] for r in data["runs"] if isinstance(r.get("other_cpu"), float)]
            other_cpu[b][s] = max(others) if others else None
    runs = {b: {s: data["runs"] for s, data in per.items()} for b, per in results.items()}
    summary = report.summarize(medians, brokers, runs)
    summary["notes"] = _partial_notes(results, settings)

    if args.scenarios:  # --scenarios none: only the clusters
        console.print(report.results_table(summary, brokers, versions))
        console.print(report.generator_table(gen_cpu, other_cpu, args.scenarios))
    for t in summary["targets"]:
        if t["pass"] is False:
            console.print(
                f"[red]target missed:[/] {t['metric']} {t['target']} (got {t['value']:.3g})"
            )

    cluster_doc: dict[str, Any] | None = None
    sizes = [] if args.clusters == "none" else [int(x) for x in args.clusters.split(",") if x]
    if sizes and "mcloudtt" in brokers:
        console.print(f"clusters on one Redis: {', '.join(map(str, sizes))} node(s)")
        cluster_doc = cl.run_clusters(
            sizes,
            runs=args.runs,
            warmup=settings.warmup,
            duration=settings.duration,
            log=console.log,
            aedes_cache=args.aedes_cache,
        )
        console.print(cl.cluster_table(cluster_doc))
        for t in cluster_doc["targets"]:
            if t["pass"] is None:
                console.print(f"[yellow]target not measured:[/] {t['metric']} {t['target']}")
            else:
                mark = "[green]target met:[/]" if t["pass"] else "[red]target missed:[/]"
                console.print(f"{mark} {t['metric']} {t['target']} (got {t['value']:.2f}\u00d7)")
        aedes = cluster_doc["versions"].get("aedes")
        if aedes:
            versions["aedes"] = (
                f"{aedes['aedes']} (mqemitter-redis {aedes['mqemitter-redis']}, "
                f"aedes-persistence-redis {aedes['aedes-persistence-redis']}, "
                f"Node.js {aedes['node']})"
            )

    doc = {
        "meta": {
            "commit": cl.git_commit(),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "seconds": round(time.time() - started, 1),
            "command": ["mcloudtt-bench", *(argv if argv is not None else sys.argv[1:])],
            "machine": machine,
            "generator_loop": loop_name,
            "brokers": versions,
            "scenarios": args.scenarios,
            "runs": args.runs,
            "quick": args.quick,
            "settings": asdict(settings),
        },
        "results": results,
        "subject": summary["subject"],
        "summary": summary["summary"],
        "ratios": summary["ratios"],
        "targets": summary["targets"],
        "notes": summary["notes"],
        "generator_cpu": gen_cpu,
        "other_cpu": other_cpu,
        "warnings": warnings,
        "clusters": cluster_doc,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_clean(doc), indent=2) + "\n")
    console.print(f"results: {args.out}")
    if args.plot:
        try:
            report.plot_ratios(summary, args.plot)
            console.print(f"chart: {args.plot}")
        except ValueError as e:
            console.print(f"[yellow]no chart:[/] {e}")
    html_path = args.html or args.out.with_suffix(".html")
    chart = args.plot
    if chart is None:
        chart = html_path.with_suffix(".ratios.png")
        try:
            report.plot_ratios(summary, chart)
        except ValueError:
            chart = None
    cl.write_html(_clean(doc), html_path, chart)
    console.print(f"report: {html_path}")
    figures = [data for per in results.values() for data in per.values()]
    failed = bool(figures) and all(data["errors"] == len(data["runs"]) for data in figures)
    if cluster_doc is not None and not args.scenarios:
        failed = not any(cluster_doc["median"].values())
    return 1 if failed else 0


def _machine() -> dict[str, Any]:
    """What the figures are taken on: CPUs (and their model), memory, the load average now."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_total_mb": mem_kb // 1024,
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    raise SystemExit(main())
