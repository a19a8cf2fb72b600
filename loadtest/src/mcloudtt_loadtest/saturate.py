"""`mcloudtt-saturate`: the saturation point of each locust scenario on 1 broker and on a cluster.

For each cluster size (`--sizes`, default 1 and 3) and each scenario (`--scenarios`) it starts
fresh brokers (one standalone broker; N brokers on a fresh redis-server), runs locust headless
with `loadtest/locustfile.py` and the step shape of `loadtest/saturation.py` against all of them
(`--hosts`: users spread round-robin, so on a cluster messages cross brokers), and collects the
highest step that held: nothing lost, no failed request, p99 end-to-end latency (CONNACK time for
the storms) within `--p99-ms`. One table and one JSON file (machine, versions, commit, every step).

Locust runs in a subprocess: it monkey-patches its process for gevent, and this one is asyncio.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from mcloudtt_chaos.procs import console_script, scrape
from rich.console import Console
from rich.table import Table

from .cluster_bench import Proc, cluster, single_broker
from .clusters import git_commit
from .procstat import raise_nofile_limit

HERE = Path(__file__).resolve().parents[2]
LOCUSTFILE = HERE / "locustfile.py"
SHAPE = HERE / "saturation.py"

# Every scenario of the locustfile. The storms receive no messages: judged on CONNECT.
SCENARIOS = (
    "fan-in",
    "fan-out",
    "shared",
    "qos-mix",
    "cross-broker",
    "retained",
    "connect-storm",
    "reconnect-storm",
)
# Per scenario, what differs from the common options: the storms and the retained subscribers
# act every half second (a reconnect or a full retained replay), message users every --interval.
SCENARIO_ARGS: dict[str, list[str]] = {
    "retained": ["--interval", "0.5", "--retained", "100"],
    "reconnect-storm": ["--interval", "0.5"],
}
NEEDS_CLUSTER = {"cross-broker"}


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _csv_scenarios(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {unknown}; known: {SCENARIOS}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcloudtt-saturate", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--sizes", type=_csv_ints, default=[1, 3], help="brokers (default 1,3)")
    p.add_argument(
        "--scenarios",
        type=_csv_scenarios,
        default=list(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    p.add_argument("--step-users", type=int, default=50, help="users added per step (50)")
    p.add_argument("--start-users", type=int, default=0, help="users of the first step")
    p.add_argument("--step-time", type=float, default=10.0, help="seconds per step (10)")
    p.add_argument("--max-users", type=int, default=2000, help="stop there if it holds (2000)")
    p.add_argument("--spawn-rate", type=float, default=200.0, help="users started per second")
    p.add_argument(
        "--p99-ms", type=float, default=100.0, help="p99 latency bound per step (100 ms)"
    )
    p.add_argument(
        "--interval", type=float, default=0.05, help="seconds between a user's publishes (0.05)"
    )
    p.add_argument("--qos", type=int, choices=(0, 1, 2), default=0, help="publish QoS (0)")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="locust processes (locust --processes; -1: one per core)",
    )
    p.add_argument(
        "--locust-args", default="", help="more locust/locustfile options, as one string"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("reports/saturation-all.json"),
        help="JSON results (default %(default)s)",
    )
    return p


@contextlib.contextmanager
def brokers(size: int) -> Iterator[list[Proc]]:
    """One standalone broker, or `size` brokers on a fresh Redis that see each other."""
    if size == 1:
        with single_broker() as one:
            yield one
    else:
        with cluster("routed", size) as many:
            yield many


def _published(b: Proc) -> float:
    return scrape(b.http_port).total("mcloudtt_messages_received_total")


def locust_command(
    args: argparse.Namespace, scenario: str, hosts: list[str], out: Path, work: Path
) -> list[str]:
    users_per_step = args.step_users
    cmd = [
        *console_script("locust", "locust"),
        "-f",
        f"{LOCUSTFILE},{SHAPE}",
        "--headless",
        "--only-summary",
        "--exit-code-on-error",
        "0",  # the step that breaks has failures by definition
        "--host",
        hosts[0],
        "--hosts",
        ",".join(hosts),
        "--scenario",
        scenario,
        "--qos",
        str(args.qos),
        "--interval",
        str(args.interval),
        "--sat-step-users",
        str(users_per_step),
        "--sat-start-users",
        str(args.start_users),
        "--sat-step-time",
        str(args.step_time),
        "--sat-max-users",
        str(args.max_users),
        "--sat-spawn-rate",
        str(args.spawn_rate),
        "--sat-p99-ms",
        str(args.p99_ms),
        "--sat-out",
        str(out),
        "--mqtt-summary",
        str(work / f"{scenario}-mqtt.json"),
        "--loss-grace",
        "1",
        *SCENARIO_ARGS.get(scenario, []),
        *shlex.split(args.locust_args),
    ]
    if args.processes != 1:
        cmd += ["--processes", str(args.processes)]
    return cmd


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_one(
    args: argparse.Namespace, size: int, scenario: str, work: Path, console: Console
) -> dict[str, Any]:
    out = work / f"{size}-{scenario}.json"
    steps = max(1, -(-(args.max_users - (args.start_users or args.step_users)) // args.step_users))
    budget = (steps + 1) * args.step_time + 90
    with brokers(size) as procs:
        hosts = [f"mqtt://127.0.0.1:{b.port}" for b in procs]
        cmd = locust_command(args, scenario, hosts, out, work)
        before = [_published(b) for b in procs]
        cpu0, t0 = _children_cpu(), time.monotonic()
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=budget, cwd=work, check=False
            )
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            output = f"locust ran past {budget:.0f} s: {e}"
        wall, cpu = time.monotonic() - t0, _children_cpu() - cpu0
        published_on = [_published(b) - n for b, n in zip(procs, before, strict=True)]
    if not out.is_file():
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise RuntimeError(f"locust wrote no saturation result:\n{tail}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["brokers"] = size
    result["wall_s"] = wall
    result["locust_cpu_s"] = cpu  # locust and its workers, over the whole run
    result["published_on_broker"] = published_on
    line = next((x for x in output.splitlines() if x.startswith("SATURATION:")), "")
    result["line"] = line
    console.log(f"{size} broker(s), {scenario}: {line or 'no SATURATION line'}")
    return result


def _rate(best: dict[str, Any]) -> tuple[float, str]:
    if best.get("measure") == "connect":
        return best["connects_per_s"], "connects/s"
    return best["received_per_s"], "msg/s recv"


def table(results: dict[str, dict[str, Any]], p99: float) -> Table:
    t = Table(title=f"saturation: highest step that held (nothing lost, p99 <= {p99:g} ms)")
    for col in ("brokers", "scenario", "rate", "unit", "published/s", "users", "p99 ms"):
        t.add_column(col, justify="left" if col in ("scenario", "unit") else "right")
    t.add_column("locust CPU", justify="right")
    t.add_column("msg ops/s per locust process", justify="right")
    t.add_column("next step", justify="left")
    for size, per in results.items():
        for scenario, r in per.items():
            if "error" in r or "skipped" in r:
                t.add_row(
                    size, scenario, "—", "", "", "", "", "", "", r.get("error") or r["skipped"]
                )
                continue
            best, broke = r["highest_held"], r["first_failed"]
            nxt = broke["why_not"] if broke else "held at --max-users"
            if best is None:
                t.add_row(size, scenario, "—", "", "", "", "", "", "", f"no step held: {nxt}")
                continue
            rate, unit = _rate(best)
            t.add_row(
                size,
                scenario,
                f"{rate:,.0f}",
                unit,
                f"{best['published_per_s']:,.0f}",
                str(best["users"]),
                f"{best['p99_ms']:.0f}",
                f"{best.get('locust_cpu', 0.0):.0%}",
                f"{best.get('msg_ops_per_s_per_process', 0.0):,.0f}",
                nxt,
            )
    return t


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console() if Console().is_terminal else Console(width=170)
    raise_nofile_limit(args.max_users * 2 + 1024)  # locust's sockets; the brokers inherit it
    started = time.time()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mcloudtt-saturate-") as tmp:
        for size in args.sizes:
            per = results.setdefault(str(size), {})
            for scenario in args.scenarios:
                if scenario in NEEDS_CLUSTER and size < 2:
                    per[scenario] = {"skipped": "needs 2 or more brokers"}
                    continue
                try:
                    per[scenario] = run_one(args, size, scenario, Path(tmp), console)
                except Exception as e:  # one scenario failing must not lose the others
                    console.log(f"[red]{size} broker(s), {scenario} failed:[/] {e}")
                    per[scenario] = {"error": str(e)}
    console.print(table(results, args.p99_ms))
    doc = {
        "meta": {
            "commit": git_commit(),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "seconds": round(time.time() - started, 1),
            "command": ["mcloudtt-saturate", *(argv if argv is not None else sys.argv[1:])],
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "loadavg": os.getloadavg(),
            },
            "versions": {
                "mcloudtt-broker": _version("mcloudtt-broker"),
                "locust": _version("locust"),
            },
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    console.print(f"results: {args.out}")
    failed = [(s, n) for s, per in results.items() for n, r in per.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
