"""`mcloudtt-adapter`: run the adapter or write a report (the benchmark is `mcloudtt-adapter-bench`,
in the loadtest member).

    mcloudtt-adapter [run] --mqtt 127.0.0.1:1883 --duckdb data.duckdb --http 127.0.0.1:9100
    mcloudtt-adapter run --redis redis://127.0.0.1:6379/0 --bigquery PROJECT.DATASET.TABLE
    mcloudtt-adapter report --duckdb data.duckdb --out report.html

Every `run` option can also be given as an environment variable (`--batch-rows` is
`MCLOUDTT_ADAPTER_BATCH_ROWS`; repeatable options take a comma-separated list there) or in a TOML
file (`--config`); they are declared in `mcloudtt_adapter.config`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

from mcloudtt_broker.cluster.redis_url import RedisUrlError, check_redis_url
from mcloudtt_broker.config import ConfigError

from .app import AdapterConfig, run_adapter
from .config import ADAPTER, adapter_config

COMMANDS = ("run", "report")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _run_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="ingest messages (the default command)")
    ADAPTER.add_arguments(p)
    return p  # type: ignore[no-any-return]


def _report_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="HTML report and terminal summary")
    p.add_argument("--duckdb", metavar="PATH")
    p.add_argument("--table", default="messages")
    p.add_argument("--bigquery", metavar="PROJECT.DATASET.TABLE")
    p.add_argument("--bigquery-endpoint", metavar="URL")
    p.add_argument("--out", default="report.html")
    p.add_argument("--since", help="ISO time: only events at or after it")
    p.add_argument("--until", help="ISO time: only events before it")
    p.add_argument("--zscore", type=float, default=3.0)
    p.add_argument("--window", type=int, default=30, help="previous values the z-score uses")
    p.add_argument("--threshold", action="append", default=[], metavar="METRIC>VALUE")
    p.add_argument("--stale-intervals", type=float, default=3.0)
    p.add_argument(
        "--stale-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="fixed reporting interval (default: each device's own average)",
    )
    p.add_argument(
        "--stale-min",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="never call a device stale before this much silence",
    )
    p.add_argument("--no-dedup", action="store_true", help="skip de-duplication on message_id")
    return p  # type: ignore[no-any-return]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mcloudtt-adapter", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    _run_parser(sub)
    _report_parser(sub)
    return parser


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> tuple[AdapterConfig, dict[str, Any]]:
    """The run options from the command line, the environment and the TOML file, checked
    (`ConfigError` otherwise), as the adapter's configuration and the resolved values."""
    cli = vars(args)
    env = os.environ if environ is None else environ
    values = ADAPTER.resolve(cli, env, ADAPTER.config_path(cli, env))
    return adapter_config(values), values


def _run(args: argparse.Namespace) -> int:
    try:
        config, values = config_from_args(args)
        if config.redis:
            check_redis_url(config.redis)  # reads the TLS files now, not at each retry
    except (ConfigError, RedisUrlError) as error:
        print(f"mcloudtt-adapter: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=values["log-level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvloop
    except ImportError:
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    from .app import tune_runtime

    tune_runtime()
    return int(runner(run_adapter(config)))


def _parse_time(text: str | None) -> int | None:
    if not text:
        return None
    from .decode import parse_time_us

    us = parse_time_us(text)
    if us is None:
        raise ValueError(f"cannot read the time {text!r}")
    return us


def _report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .analysis import (
        Analysis,
        AnomalyRules,
        BigQueryEngine,
        DuckDBEngine,
        Engine,
        Threshold,
        Window,
    )
    from .report import build_report, print_summary, render_html

    console = Console(stderr=False)
    try:
        rules = AnomalyRules(
            zscore=args.zscore,
            window=args.window,
            thresholds=tuple(Threshold.parse(t) for t in args.threshold),
        )
        window = Window(_parse_time(args.since), _parse_time(args.until))
    except ValueError as error:
        print(f"mcloudtt-adapter report: error: {error}", file=sys.stderr)
        return 2
    engine: Engine
    if args.bigquery:
        from .sinks.bigquery import make_client, split_table_id

        project = split_table_id(args.bigquery)[0]
        engine = BigQueryEngine(make_client(project, args.bigquery_endpoint), args.bigquery)
    else:
        path = args.duckdb or "mcloudtt.duckdb"
        if not os.path.exists(path):
            print(f"mcloudtt-adapter report: error: no such file {path}", file=sys.stderr)
            return 2
        try:
            engine = DuckDBEngine.open(path, args.table)
        except Exception as error:
            print(
                f"mcloudtt-adapter report: error: cannot open {path} ({error}); while an adapter "
                "writes it, use its /report endpoint instead",
                file=sys.stderr,
            )
            return 2
    try:
        data = build_report(
            Analysis(engine, dedup=not args.no_dedup),
            window=window,
            rules=rules,
            stale_intervals=args.stale_intervals,
            stale_interval_seconds=args.stale_interval,
            stale_min_seconds=args.stale_min,
        )
    finally:
        engine.close()
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(render_html(data))
    print_summary(data, console)
    console.print(f"report written to [bold]{args.out}[/bold]")
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")
    parser = build_parser()
    args = parser.parse_args(argv)
    code = _run(args) if args.command == "run" else _report(args)
    sys.exit(code)


if __name__ == "__main__":
    main()
