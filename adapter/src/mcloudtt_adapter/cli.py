"""`mcloudtt-adapter`: run the adapter or write a report (the benchmark is `mcloudtt-adapter-bench`,
in the loadtest member).

    mcloudtt-adapter [run] --mqtt 127.0.0.1:1883 --duckdb data.duckdb --http 127.0.0.1:9100
    mcloudtt-adapter run --redis redis://127.0.0.1:6379/0 --bigquery PROJECT.DATASET.TABLE
    mcloudtt-adapter report --duckdb data.duckdb --out report.html

Every `run` option can also be given as an environment variable: `--batch-rows` is
`MCLOUDTT_ADAPTER_BATCH_ROWS`; repeatable options take a comma-separated list there.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any, NoReturn

from .app import AdapterConfig, run_adapter
from .decode import DecodeRules

COMMANDS = ("run", "report")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65_536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _env(name: str) -> str | None:
    return os.environ.get("MCLOUDTT_ADAPTER_" + name.upper().replace("-", "_"))


def _add(
    parser: argparse.ArgumentParser, name: str, *, repeat: bool = False, **kwargs: Any
) -> None:
    env = _env(name)
    if env is not None:
        if repeat:
            kwargs["default"] = [item for item in env.split(",") if item]
        elif kwargs.get("action") == "store_true":
            kwargs["default"] = env.lower() in ("1", "true", "yes", "on")
        else:
            convert = kwargs.get("type", str)
            kwargs["default"] = convert(env)
    if repeat:
        kwargs["action"] = "append"
    parser.add_argument(f"--{name}", **kwargs)


def _run_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="ingest messages (the default command)")
    g = p.add_argument_group("MQTT source")
    _add(g, "mqtt", type=_address, metavar="HOST:PORT", help="broker to subscribe to")
    _add(g, "filter", default="#", help="topic filter (default #)")
    _add(
        g,
        "group",
        default="mcloudtt-adapter",
        help="shared subscription group ('' for a plain subscription)",
    )
    _add(g, "client-id", default=None, help="stable MQTT ClientId (default mcloudtt-adapter-HOST)")
    _add(
        g,
        "session-expiry",
        type=int,
        default=86_400,
        help="seconds the broker keeps the session (and queues) while the adapter is away",
    )
    _add(g, "keepalive", type=int, default=30)
    _add(g, "qos", type=int, choices=(0, 1), default=1)
    _add(g, "username", default=None)
    _add(g, "password", default=None)
    _add(g, "broker-id", default=None, help="broker_id column for MQTT rows")
    g = p.add_argument_group("Redis tap source")
    _add(g, "redis", metavar="URL", help="redis://host:port/db")
    _add(
        g,
        "redis-mode",
        choices=("stream", "pubsub"),
        default="stream",
        help="stream: durable tap via consumer group (default); pubsub: the sync channel",
    )
    _add(g, "tap-stream", default="mcloudtt:tap")
    _add(g, "sync-channel", default="sync")
    _add(g, "redis-group", default="mcloudtt-adapter", help="consumer group")
    _add(g, "consumer", default=None, help="consumer name (default: the client id)")
    _add(g, "start-id", default="0", help="where a new group starts: 0 (all kept) or $ (new only)")
    g = p.add_argument_group("sinks")
    _add(g, "duckdb", metavar="PATH", help="DuckDB file (the default sink: mcloudtt.duckdb)")
    _add(
        g,
        "duckdb-checkpoint",
        default="256MB",
        help="write-ahead log size that triggers a DuckDB checkpoint (DuckDB's default: 16MB)",
    )
    _add(g, "table", default="messages", help="DuckDB table name")
    _add(g, "bigquery", metavar="PROJECT.DATASET.TABLE", help="BigQuery table")
    _add(g, "bigquery-endpoint", metavar="URL", help="API endpoint (an emulator); no credentials")
    _add(
        g,
        "dead-letter-file",
        default="mcloudtt-dead-letter.jsonl",
        help="where rejected rows go when the dead-letter table cannot take them",
    )
    g = p.add_argument_group("decoding")
    _add(
        g,
        "topic-rule",
        repeat=True,
        metavar="PATTERN",
        help="e.g. devices/{device_id}/{metric} (repeatable; default that one)",
    )
    _add(g, "device-field", repeat=True, metavar="NAME", help="payload field naming the device")
    _add(g, "time-field", repeat=True, metavar="NAME", help="payload field holding the event time")
    _add(
        g, "ignore-field", repeat=True, metavar="NAME", help="payload field not to store as metric"
    )
    _add(g, "max-flatten-bytes", type=int, default=256 * 1024)
    g = p.add_argument_group("batching")
    _add(g, "batch-rows", type=int, default=10_000)
    _add(g, "batch-delay", type=float, default=0.25, help="seconds a batch may wait to fill")
    _add(
        g,
        "linger",
        type=float,
        default=0.005,
        help="cut the batch when nothing arrived for this long (seconds)",
    )
    _add(
        g,
        "max-pending",
        type=int,
        default=100_000,
        help="messages received but not committed before the sources are held back",
    )
    g = p.add_argument_group("service")
    _add(
        g,
        "http",
        type=_address,
        metavar="HOST:PORT",
        help="serve /healthz /readyz /metrics /report",
    )
    _add(g, "drain-timeout", type=float, default=30.0)
    _add(g, "log-level", default="info", choices=("debug", "info", "warning", "error"))
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


def config_from_args(args: argparse.Namespace) -> AdapterConfig:
    defaults = DecodeRules()
    rules = DecodeRules(
        topic_rules=tuple(args.topic_rule) if args.topic_rule else defaults.topic_rules,
        device_fields=tuple(args.device_field) if args.device_field else defaults.device_fields,
        time_fields=tuple(args.time_field) if args.time_field else defaults.time_fields,
        ignore_fields=tuple(args.ignore_field or ()),
        max_flatten_bytes=args.max_flatten_bytes,
    )
    config = AdapterConfig(
        mqtt=args.mqtt,
        mqtt_filter=args.filter,
        mqtt_group=args.group or None,
        session_expiry=args.session_expiry,
        keepalive=args.keepalive,
        qos=args.qos,
        username=args.username,
        password=args.password,
        broker_id=args.broker_id,
        redis=args.redis,
        redis_mode=args.redis_mode,
        tap_stream=args.tap_stream,
        sync_channel=args.sync_channel,
        redis_group=args.redis_group,
        consumer=args.consumer,
        start_id=args.start_id,
        duckdb=args.duckdb,
        table=args.table,
        duckdb_checkpoint=args.duckdb_checkpoint,
        bigquery=args.bigquery,
        bigquery_endpoint=args.bigquery_endpoint,
        dead_letter_file=args.dead_letter_file,
        rules=rules,
        batch_rows=args.batch_rows,
        batch_delay=args.batch_delay,
        linger=args.linger,
        max_pending=args.max_pending,
        http=args.http,
        drain_timeout=args.drain_timeout,
    )
    if args.client_id:
        config.client_id = args.client_id
    return config


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.duckdb and args.bigquery:
        print("mcloudtt-adapter: error: give --duckdb or --bigquery, not both", file=sys.stderr)
        return 2
    if not args.mqtt and not args.redis:
        print(
            "mcloudtt-adapter: error: give a source: --mqtt HOST:PORT and/or --redis URL",
            file=sys.stderr,
        )
        return 2
    try:
        config = config_from_args(args)
        from .decode import TopicRule

        for rule in config.rules.topic_rules:
            TopicRule(rule)
    except ValueError as error:
        print(f"mcloudtt-adapter: error: {error}", file=sys.stderr)
        return 2
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
