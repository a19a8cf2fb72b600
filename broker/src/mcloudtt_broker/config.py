"""Configuration: command line, then `MCLOUDTT_*` environment variables, then a TOML file.

Every option has the same name in all three places (`--max-keepalive`, `MCLOUDTT_MAX_KEEPALIVE`,
`max-keepalive` or `max_keepalive` in the file). Any mistake becomes a `ConfigError` whose message
is the one line the command prints before exiting with status 2.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .cluster.redis_url import parse_redis_url


class ConfigError(Exception):
    """A bad option, environment variable or configuration file."""


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65_535:
        raise ValueError(f"port {port} out of range in {text!r}")
    return host.strip("[]") or "0.0.0.0", port


def parse_addresses(value: Any) -> list[tuple[str, int]]:
    if isinstance(value, str):
        items = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, list):
        items = [str(item) for item in value]
    else:
        raise ValueError(f"expected HOST:PORT or a list of them, got {value!r}")
    return [parse_address(item) for item in items]


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, got {value!r}")
    number = int(value)
    if number < 0:
        raise ValueError(f"must not be negative, got {number}")
    return number


def _positive_int(value: Any) -> int:
    number = _non_negative_int(value)
    if number == 0:
        raise ValueError("must be at least 1")
    return number


def _bounded(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        number = _non_negative_int(value)
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}, got {number}")
        return number

    return convert


def _non_negative_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    number = float(value)
    if number < 0:
        raise ValueError(f"must not be negative, got {number}")
    return number


def _positive_float(value: Any) -> float:
    number = _non_negative_float(value)
    if number == 0:
        raise ValueError("must be greater than 0")
    return number


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = str(value).lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return convert


def _redis_url(value: Any) -> str:
    text = str(value)
    parse_redis_url(text)  # a RedisUrlError is a ValueError, without the password
    return text


def _text(value: Any) -> str:
    if not isinstance(value, (str, int)):
        raise ValueError(f"expected text, got {value!r}")
    return str(value)


def _log_level(value: Any) -> str:
    level = str(value).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"expected debug, info, warning or error, got {value!r}")
    return level


@dataclass(frozen=True)
class Option:
    name: str
    convert: Callable[[Any], Any]
    default: Any
    help: str
    repeatable: bool = False
    metavar: str | None = None


OPTIONS: tuple[Option, ...] = (
    Option(
        "bind",
        parse_addresses,
        "127.0.0.1:1883",
        "MQTT listener HOST:PORT (repeatable)",
        True,
        "HOST:PORT",
    ),
    Option(
        "tls-bind",
        parse_addresses,
        "",
        "MQTT over TLS listener HOST:PORT (repeatable)",
        True,
        "HOST:PORT",
    ),
    Option(
        "ws-bind",
        parse_addresses,
        "",
        "MQTT over WebSocket listener HOST:PORT (repeatable; sub-protocol mqtt)",
        True,
        "HOST:PORT",
    ),
    Option("tls-cert", _text, None, "PEM certificate chain for --tls-bind", metavar="FILE"),
    Option("tls-key", _text, None, "PEM private key for --tls-bind", metavar="FILE"),
    Option(
        "http",
        lambda v: parse_address(str(v)),
        None,
        "serve /healthz, /readyz, /metrics on HOST:PORT",
        metavar="HOST:PORT",
    ),
    Option("id", _text, None, "broker id (default: the host name)", metavar="NAME"),
    Option(
        "max-keepalive",
        _bounded(0, 65_535),
        0,
        "longest keepalive granted, seconds (0: no limit; 5.0 Server Keep Alive)",
        metavar="SECONDS",
    ),
    Option(
        "max-packet-size",
        _bounded(64, 268_435_460),
        4 * 1024 * 1024,
        "largest packet accepted, bytes",
        metavar="BYTES",
    ),
    Option(
        "max-queued-messages",
        _non_negative_int,
        1000,
        "QoS 1/2 messages kept per session while its client is away or slow",
        metavar="N",
    ),
    Option(
        "receive-maximum",
        _bounded(1, 65_535),
        1024,
        "QoS 2 messages a client may have unreleased at once",
        metavar="N",
    ),
    Option(
        "max-inflight",
        _bounded(1, 65_535),
        1024,
        "unacknowledged QoS 1/2 deliveries per client",
        metavar="N",
    ),
    Option(
        "topic-alias-maximum",
        _bounded(0, 65_535),
        64,
        "topic aliases accepted per 5.0 client",
        metavar="N",
    ),
    Option(
        "mqtt31",
        _boolean,
        True,
        "accept MQTT 3.1 clients (protocol name MQIsdp, level 3)",
        metavar="BOOL",
    ),
    Option(
        "max-session-expiry",
        _non_negative_int,
        7 * 24 * 3600,
        "longest session expiry granted, seconds",
        metavar="SECONDS",
    ),
    Option(
        "connect-timeout",
        _non_negative_float,
        10.0,
        "seconds a new connection has to send CONNECT",
        metavar="SECONDS",
    ),
    Option(
        "drain-timeout",
        _non_negative_float,
        5.0,
        "seconds to flush clients on SIGTERM before exiting",
        metavar="SECONDS",
    ),
    Option(
        "sys-interval",
        _non_negative_float,
        10.0,
        "seconds between $SYS/broker updates (0: off)",
        metavar="SECONDS",
    ),
    Option("log-level", _log_level, "INFO", "debug, info, warning or error", metavar="LEVEL"),
    Option(
        "redis",
        _redis_url,
        None,
        "join the cluster through Redis (redis://, rediss:// with ssl_* options, unix://)",
        metavar="URL",
    ),
    Option(
        "cluster-mode",
        _choice("routed", "broadcast"),
        "routed",
        "routed (to matching brokers) or broadcast (all, on the sync channel)",
        metavar="MODE",
    ),
    Option("sync-channel", _text, "sync", "Pub/Sub channel of broadcast mode", metavar="NAME"),
    Option(
        "redis-prefix", _text, "mcloudtt", "prefix of the cluster's Redis keys", metavar="PREFIX"
    ),
    Option(
        "tap-stream",
        _text,
        None,
        "also append every publish to this Redis stream (for the adapter)",
        metavar="KEY",
    ),
    Option(
        "tap-maxlen",
        _positive_int,
        1_000_000,
        "approximate length the tap stream is trimmed to",
        metavar="N",
    ),
    Option(
        "cluster-buffer",
        _positive_int,
        100_000,
        "messages buffered for the cluster while Redis is away",
        metavar="N",
    ),
    Option(
        "presence-ttl",
        _positive_float,
        10.0,
        "seconds a broker's presence lives without heartbeat",
        metavar="SECONDS",
    ),
    Option(
        "redis-backoff-max",
        _positive_float,
        1.0,
        "longest wait between Redis reconnect attempts",
        metavar="SECONDS",
    ),
    Option(
        "ready-without-redis",
        _boolean,
        False,
        "report ready while serving locally without Redis",
        metavar="BOOL",
    ),
)
OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def env_name(option: str) -> str:
    return "MCLOUDTT_" + option.upper().replace("-", "_")


def load_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("_", "-")
        if name not in OPTIONS_BY_NAME:
            raise ConfigError(f"config file {path}: unknown option {key!r}")
        values[name] = value
    return values


def resolve(
    cli: Mapping[str, Any], environ: Mapping[str, str], config_path: str | None
) -> dict[str, Any]:
    """Merge the three sources (command line wins) and convert every value."""
    file_values = load_file(config_path) if config_path else {}
    resolved: dict[str, Any] = {}
    for option in OPTIONS:
        source = "default"
        value = cli.get(option.name)
        if value is not None and value != []:
            source = f"--{option.name}"
        elif env_name(option.name) in environ:
            value = environ[env_name(option.name)]
            source = env_name(option.name)
        elif option.name in file_values:
            value = file_values[option.name]
            source = f"{option.name} in {config_path}"
        else:
            value = option.default
        if value is None:
            resolved[option.name] = None
            continue
        try:
            resolved[option.name] = option.convert(value)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{source}: {error}") from None
    if resolved["id"] is None:
        resolved["id"] = socket.gethostname()
    if resolved["tls-bind"] and not resolved["tls-cert"]:
        raise ConfigError("--tls-bind needs --tls-cert (and --tls-key unless the key is in it)")
    if not (resolved["bind"] or resolved["tls-bind"] or resolved["ws-bind"]):
        raise ConfigError("no listener: give --bind, --tls-bind or --ws-bind")
    return resolved


def environment() -> Mapping[str, str]:
    return os.environ
