"""`mcloudtt-chaos`: list the scenarios, run them on a backend, show and write the verdicts.

    mcloudtt-chaos list
    mcloudtt-chaos run brokers-before-redis redis-restart --json chaos.json
    mcloudtt-chaos run all --backend local --html chaos.html
    mcloudtt-chaos run all --backend kind --dry-run

Exit status: 0 when every judged invariant held, 1 when one failed (or a run broke), 2 on bad
usage (an unknown scenario or backend, or a backend this build or machine lacks).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mcloudtt_chaos import report
from mcloudtt_chaos.backends import NAMES, BackendUnavailable, load
from mcloudtt_chaos.history import read_history
from mcloudtt_chaos.procs import raise_nofile_limit
from mcloudtt_chaos.scenarios import (
    SCENARIOS,
    RunOptions,
    Scenario,
    ScenarioResult,
    plan,
    resolve,
    run_scenario,
)

LOST_SAMPLE = 10


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcloudtt-chaos",
        description="Break an MCloudTT cluster on purpose and judge what its clients saw.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the scenarios, what each breaks and judges")
    run = commands.add_parser("run", help="run scenarios (or `all`)")
    run.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="names, or `all`")
    run.add_argument("--backend", choices=NAMES, default="local")
    run.add_argument("--brokers", type=_positive_int, help="brokers in the cluster (default 3)")
    run.add_argument("--seconds", type=_positive_float, help="length of the fault phase")
    run.add_argument("--rate", type=_positive_float, help="messages/s the workload publishes")
    run.add_argument("--seed", type=int, default=1, help="seed of the workload and the toxics")
    run.add_argument(
        "--storm-clients", type=_positive_int, default=2000, help="clients in reconnect-storm"
    )
    run.add_argument("--json", type=Path, metavar="FILE", help="write the verdicts as JSON")
    run.add_argument("--html", type=Path, metavar="FILE", help="write the HTML report")
    run.add_argument("--workdir", type=Path, help="histories and logs (default: a temp dir)")
    run.add_argument("--dry-run", action="store_true", help="print the plan, break nothing")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(log_path=False)
    if args.command == "list":
        show_list(console)
        return 0
    # The fault proxies and the workload's clients run in this process: two descriptors per
    # proxied link, one per client (a reconnect storm holds thousands).
    raise_nofile_limit(1 << 20)
    try:
        scenarios = resolve(list(args.scenarios))
    except KeyError as error:
        parser.error(f"unknown scenario {error.args[0]!r} (see `mcloudtt-chaos list`)")
    options = RunOptions(
        brokers=args.brokers,
        seconds=args.seconds,
        rate=args.rate,
        seed=args.seed,
        workdir=args.workdir,
        storm_clients=args.storm_clients,
    )
    try:
        load(args.backend)
    except BackendUnavailable as error:
        print(f"mcloudtt-chaos: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        for scenario in scenarios:
            console.rule(scenario.name)
            for line in asyncio.run(plan(scenario, load(args.backend), options)):
                console.print(line, markup=False, highlight=False, soft_wrap=True)
        return 0
    if options.workdir is None:  # made only for a real run: histories and logs stay there
        options = dataclasses.replace(
            options, workdir=Path(tempfile.mkdtemp(prefix="mcloudtt-chaos-"))
        )
    results = asyncio.run(_run_all(scenarios, args.backend, options, console))
    if args.json is not None:
        write_json(args.json, results)
    if args.html is not None:
        write_html(args.html, results)
    console.print(f"histories and logs in {options.workdir}", highlight=False)
    failed = [r.scenario for r in results if not r.passed]
    console.print(
        f"[bold red]FAILED[/] {', '.join(failed)}" if failed else "[bold green]all passed[/]"
    )
    return 1 if failed else 0


async def _run_all(
    scenarios: list[Scenario], backend_name: str, options: RunOptions, console: Console
) -> list[ScenarioResult]:
    results = []
    for number, scenario in enumerate(scenarios, 1):
        label = f"[{number}/{len(scenarios)}] {scenario.name}"
        with console.status(label) as status:

            def progress(
                text: str, status: Any = status, label: str = label, name: str = scenario.name
            ) -> None:
                status.update(f"{label}: {text}")
                console.log(f"{name}: {text}", highlight=False)

            # A fresh backend per scenario: nothing of one run leaks into the next.
            result = await run_scenario(scenario, load(backend_name), options, progress=progress)
        results.append(result)
        show_result(console, result)  # each verdict as soon as it is known
    return results


def show_list(console: Console) -> None:
    table = Table(title="chaos scenarios")
    table.add_column("scenario", style="bold", no_wrap=True)
    table.add_column("fault")
    table.add_column("also judges")
    table.add_column("not judged (why)")
    for scenario in SCENARIOS.values():
        skipped = "\n".join(f"{name}: {why}" for name, why in scenario.skip.items())
        table.add_row(
            scenario.name, scenario.summary, "\n".join(scenario.measures) or "-", skipped or "-"
        )
    console.print(
        "Every scenario judges the checker's invariants (no_lost, qos2_once, ordered, "
        "shared_once, wills, sessions_kept, delivered_were_sent, retained_equal, "
        "subscriptions_equal, recovered) unless it says otherwise; QoS 0 losses are counted.",
        highlight=False,
    )
    console.print(table)


def show_result(console: Console, result: ScenarioResult) -> None:
    verdict = "[green]passed[/]" if result.passed else "[red]FAILED[/]"
    table = Table(title=f"{result.scenario} on {result.backend}: {verdict}", title_justify="left")
    table.add_column("invariant", no_wrap=True)
    table.add_column("passed")
    table.add_column("checked", justify="right")
    table.add_column("failures", justify="right")
    table.add_column("counts / examples")
    report = result.report
    if report is not None:
        for name, v in report.invariants.items():
            mark = "yes" if v.passed else "[red]NO[/]"
            if not v.judged:
                mark = (
                    f"[dim]not judged[/] ({'counted' if name not in result.skipped else 'skipped'})"
                )
            detail = ", ".join(f"{k}={n}" for k, n in v.counts.items())
            if name == "no_lost" and report.lost:
                seqs = [f"{x.publisher}#{x.seq}->{x.subscriber}" for x in report.lost[:LOST_SAMPLE]]
                detail = f"{detail}; lost: {' '.join(seqs)}" + (
                    " ..." if len(report.lost) > LOST_SAMPLE else ""
                )
            elif not v.passed and v.examples:
                detail = f"{detail}; {json.dumps(v.examples[0], default=str)[:120]}"
            table.add_row(name, mark, str(v.checked), str(v.failures), detail)
    console.print(table)
    facts = []
    if report is not None:
        facts += [
            f"lost={len(report.lost)}",
            f"duplicates={report.duplicates}",
            f"qos0_lost={report.qos0_lost}",
            f"recovery_s={_seconds(report.recovery_s)}",
        ]
    for key, value in result.measurements.items():
        if isinstance(value, int | float | str) or value is None:
            facts.append(f"{key}={_seconds(value) if isinstance(value, float) else value}")
    facts.append(f"took {result.duration_s:.1f}s")
    console.print("  " + "  ".join(facts), highlight=False)
    if result.error:
        console.print(f"  [red]error:[/] {result.error}", highlight=False)
    if result.load_ignored:
        console.print(f"  [yellow]workload ignored:[/] {', '.join(result.load_ignored)}")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _for_report(results: list[ScenarioResult]) -> list[report.ScenarioResult]:
    """The runner's results as the report module takes them: the history (for the timeline),
    the verdicts (the scenario's own included) and the rest as extra fields."""
    out = []
    for result in results:
        assert result.report is not None
        data = result.to_json()
        extra = {
            key: data[key]
            for key in (
                "backend",
                "error",
                "duration_s",
                "history",
                "skipped",
                "measurements",
                "load_ignored",
            )
        }
        extra["passed"] = result.passed  # a run that broke fails even if nothing was judged
        records = read_history(result.history) if result.history else []
        out.append(report.ScenarioResult(result.scenario, records, result.report, extra))
    return out


def write_json(path: Path, results: list[ScenarioResult]) -> None:
    """The report's JSON (`scenarios`: a list, each with `passed`, every invariant, `lost`,
    `lost_messages`, `duplicates`, `recovery_s`, the timeline, backend and measurements)."""
    data = report.report_json(_for_report(results))
    data["passed"] = all(r.passed for r in results)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def write_html(path: Path, results: list[ScenarioResult]) -> None:
    report.write_html(path, _for_report(results))


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
