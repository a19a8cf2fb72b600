"""`mcloudtt-broker`: run one broker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import sys
from typing import NoReturn

from .cluster.keys import KeyFileError, read_key_file
from .cluster.redis_url import RedisUrlError, check_redis_url
from .cluster.settings import ClusterSettings, DuplicateBrokerId
from .config import BROKER, ConfigError, environment
from .core.broker import BrokerSettings
from .core.scram import use_decoy_key
from .server import ServerOptions, serve


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line, exit status 2 (the usage is one `--help` away).
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mcloudtt-broker",
        description="MCloudTT MQTT 3.1.1/5.0 broker. Every option can also be set as an "
        "MCLOUDTT_* environment variable or in a TOML --config file.",
    )
    BROKER.add_arguments(parser)
    return parser


def raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: one descriptor per connection, and a soft limit
    of 1,024 (many distributions' default) would refuse the 1,025th device although the
    operator granted more (as Go's runtime and EMQX do at start)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.getLogger("mcloudtt.broker").debug(
        "open files limit %s", resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    )


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["passwd"]:
        from .auth.passwd import main as passwd

        sys.exit(passwd(argv[1:]))
    if argv[:1] == ["migrate-keys"]:
        from .cluster.migrate import main as migrate_keys

        sys.exit(migrate_keys(argv[1:]))
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    env = environment()
    try:
        values = BROKER.resolve(args, env, BROKER.config_path(args, env))
        if values["redis"] is not None:
            check_redis_url(values["redis"])  # the TLS files are read now, not at each retry
        key_file = values["cluster-key-file"]
        keys = read_key_file(key_file) if key_file else ()
        if keys:
            use_decoy_key(keys[0])
    except (ConfigError, RedisUrlError, KeyFileError) as error:
        print(f"mcloudtt-broker: error: {error}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(
        level=values["log-level"],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    raise_open_files_limit()
    broker_id = values["id"]
    clustered = values["redis"] is not None
    settings = BROKER.settings(
        BrokerSettings,
        values,
        broker_id=broker_id,
        sys_root=f"$SYS/brokers/{broker_id}" if clustered else "$SYS/broker",
    )
    cluster = (
        BROKER.settings(
            ClusterSettings, values, url=values["redis"], broker_id=broker_id, keys=keys
        )
        if clustered
        else None
    )
    options = BROKER.settings(ServerOptions, values, cluster=cluster)
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
    except (OSError, ValueError) as error:
        # e.g. the port is taken, a password or ACL file is unreadable (the message names the
        # file and line, never a hash): one line, not a traceback.
        print(f"mcloudtt-broker: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
