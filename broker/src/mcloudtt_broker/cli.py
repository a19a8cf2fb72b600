"""`mcloudtt-broker`: run one broker."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import NoReturn

from .cluster.redis_url import RedisUrlError, check_redis_url
from .cluster.settings import ClusterSettings, DuplicateBrokerId
from .config import OPTIONS, ConfigError, env_name, environment, resolve
from .core.broker import BrokerSettings
from .server import ServerOptions, serve


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line, exit status 2 (the usage is one `--help` away).
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="mcloudtt-broker",
        description="MCloudTT MQTT 3.1.1/5.0 broker. Every option can also be set as an "
        "MCLOUDTT_* environment variable or in a TOML --config file.",
    )
    for option in OPTIONS:
        parser.add_argument(
            f"--{option.name}",
            dest=option.name,
            action="append" if option.repeatable else "store",
            default=None,
            metavar=option.metavar,
            help=f"{option.help} [env {env_name(option.name)}; default {option.default}]",
        )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file of options [env MCLOUDTT_CONFIG]"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    env = environment()
    try:
        values = resolve(args, env, args.get("config") or env.get("MCLOUDTT_CONFIG"))
        if values["redis"] is not None:
            check_redis_url(values["redis"])  # the TLS files are read now, not at each retry
    except (ConfigError, RedisUrlError) as error:
        print(f"mcloudtt-broker: error: {error}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(
        level=values["log-level"],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = BrokerSettings(
        broker_id=values["id"],
        max_keepalive=values["max-keepalive"],
        max_packet_size=values["max-packet-size"],
        max_queued_messages=values["max-queued-messages"],
        receive_maximum=values["receive-maximum"],
        max_inflight=values["max-inflight"],
        topic_alias_maximum=values["topic-alias-maximum"],
        mqtt31=values["mqtt31"],
        max_session_expiry=values["max-session-expiry"],
        connect_timeout=values["connect-timeout"],
        sys_interval=values["sys-interval"],
        sys_root="$SYS/broker" if values["redis"] is None else f"$SYS/brokers/{values['id']}",
    )
    options = ServerOptions(
        binds=values["bind"],
        tls_binds=values["tls-bind"],
        ws_binds=values["ws-bind"],
        tls_cert=values["tls-cert"],
        tls_key=values["tls-key"],
        http=values["http"],
        drain_timeout=values["drain-timeout"],
        ready_without_redis=values["ready-without-redis"],
        cluster=None
        if values["redis"] is None
        else ClusterSettings(
            url=values["redis"],
            broker_id=values["id"],
            mode=values["cluster-mode"],
            sync_channel=values["sync-channel"],
            prefix=values["redis-prefix"],
            tap_stream=values["tap-stream"],
            tap_maxlen=values["tap-maxlen"],
            buffer_limit=values["cluster-buffer"],
            presence_ttl=values["presence-ttl"],
            backoff_max=values["redis-backoff-max"],
        ),
    )
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(settings, options))
    except DuplicateBrokerId as error:
        print(f"mcloudtt-broker: error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        # e.g. the port is taken: one line, not a traceback.
        print(f"mcloudtt-broker: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
