"""Configuration: command line, then environment variables, then a TOML file.

Every option is declared once, as an `Option` of a `Scheme`: its name, its converter, its help,
its default (taken from the settings dataclass field it fills), and so its environment variable
(`--max-keepalive` is `MCLOUDTT_MAX_KEEPALIVE`) and TOML key (`max-keepalive` or
`max_keepalive`). `BROKER` is the broker's scheme; the adapter declares its own with the same
machinery (`mcloudtt_adapter.config`). The command line wins over the environment, which wins
over the file. Any mistake becomes a `ConfigError` whose message is the one line the command
prints before exiting with status 2. The README's option tables are generated from the
declarations (`update_tables`; a test keeps them equal).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, TypeVar

from .cluster.redis_url import parse_redis_url
from .cluster.redis_url import redact_url as redact_url  # where it lived before
from .cluster.settings import BROADCAST, ROUTED, ClusterSettings
from .core.broker import BrokerSettings
from .server import ServerOptions


class ConfigError(Exception):
    """A bad option, environment variable or configuration file."""


def parse_address(text: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65_535:
        raise ValueError(f"port {port} out of range in {text!r}")
    return host.strip("[]") or default_host, port


def address(default_host: str = "0.0.0.0") -> Callable[[Any], tuple[str, int]]:
    def convert(value: Any) -> tuple[str, int]:
        if isinstance(value, tuple):  # a default already parsed
            return parse_address(f"{value[0]}:{value[1]}", default_host)
        if not isinstance(value, str):
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        return parse_address(value, default_host)

    return convert


def parse_addresses(value: Any) -> list[tuple[str, int]]:
    if isinstance(value, str):
        items = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        items = [item if isinstance(item, str) else f"{item[0]}:{item[1]}" for item in value]
    else:
        raise ValueError(f"expected HOST:PORT or a list of them, got {value!r}")
    return [parse_address(item) for item in items]


def names(value: Any) -> tuple[str, ...]:
    """A repeatable text option: a list (command line, TOML) or comma-separated (environment)."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ValueError(f"expected a list of names, got {value!r}")


def name_list(value: Any) -> tuple[str, ...]:
    """Names given repeated or comma-separated, or both (`--auth-chain a,b --auth-chain c`)."""
    return tuple(part for item in names(value) for part in names(item))


def non_negative_int(value: Any) -> int:
    if isinstance(value, (bool, float)):
        raise ValueError(f"expected a whole number, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise ValueError(f"must not be negative, got {number}")
    return number


def positive_int(value: Any) -> int:
    number = non_negative_int(value)
    if number == 0:
        raise ValueError("must be at least 1")
    return number


def bounded(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        number = non_negative_int(value)
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}, got {number}")
        return number

    return convert


def non_negative_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if not number >= 0:  # also refuses nan
        raise ValueError(f"must not be negative, got {number}")
    return number


def positive_float(value: Any) -> float:
    number = non_negative_float(value)
    if number == 0:
        raise ValueError("must be greater than 0")
    return number


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = str(value).lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return convert


def redis_url(value: Any) -> str:
    text = str(value)
    parse_redis_url(text)  # a RedisUrlError is a ValueError, without the password
    return text


def text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"expected text, got {value!r}")
    return str(value)


def log_level(value: Any) -> str:
    level = str(value).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"expected debug, info, warning or error, got {value!r}")
    return level


# ---------------------------------------------------------------------------- the scheme


def field_default(cls: type[Any], name: str) -> Any:
    """The default of a settings dataclass's field (its factory called once)."""
    for item in fields(cls):
        if item.name == name:
            if item.default is not MISSING:
                return item.default
            if item.default_factory is not MISSING:
                return item.default_factory()
            raise TypeError(f"{cls.__name__}.{name} has no default")
    raise TypeError(f"{cls.__name__} has no field {name!r}")


@dataclass(frozen=True, kw_only=True)
class Option:
    """One option: `--NAME`, `PREFIX_NAME` in the environment, `NAME` (or with underscores) in
    the TOML file. An option that fills a settings dataclass's field names it in `setting` and
    takes that field's default, so each default is written once, next to the code that uses it.
    """

    name: str
    convert: Callable[[Any], Any]
    help: str
    default: Any = None
    setting: tuple[type[Any], str] | None = None
    metavar: str | None = None
    repeatable: bool = False
    section: str = ""
    shown: str | None = None  # the default in words, where its value says too little
    flag: bool = False  # a BOOL that may stand alone on the command line (meaning true)

    def __post_init__(self) -> None:
        if self.setting is not None:
            if self.default is not None:
                raise TypeError(f"--{self.name}: a default here and in {self.setting[0].__name__}")
            object.__setattr__(self, "default", field_default(*self.setting))

    @property
    def attribute(self) -> str:
        return self.setting[1] if self.setting is not None else self.name.replace("-", "_")

    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        return _show(self.default)


def _show(value: Any) -> str:
    if value is None or value == [] or value == ():
        return "\u2013"  # the en dash the README tables use for "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(
            _show(f"{item[0]}:{item[1]}" if isinstance(item, tuple) else item) for item in value
        )
    return f"`{value}`"


@dataclass(frozen=True)
class Scheme:
    """A command's options, read from the command line, the environment and a TOML file."""

    prog: str
    env_prefix: str  # "MCLOUDTT_": --max-keepalive is MCLOUDTT_MAX_KEEPALIVE
    options: tuple[Option, ...]
    check: Callable[[dict[str, Any]], None] | None = None  # rules across options

    def __post_init__(self) -> None:
        seen = [option.name for option in self.options]
        if len(seen) != len(set(seen)):
            raise TypeError(f"{self.prog}: an option declared twice")

    def env_name(self, name: str) -> str:
        return self.env_prefix + name.upper().replace("-", "_")

    @property
    def config_env(self) -> str:
        return self.env_prefix + "CONFIG"

    def option(self, name: str) -> Option:
        for option in self.options:
            if option.name == name:
                return option
        raise KeyError(name)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """One `--NAME` per option, grouped by section. Values stay text until `resolve()`."""
        groups: dict[str, Any] = {}
        for option in self.options:
            group = groups.get(option.section)
            if group is None:
                group = groups[option.section] = (
                    parser.add_argument_group(option.section) if option.section else parser
                )
            extra: dict[str, Any] = {"nargs": "?", "const": "true"} if option.flag else {}
            group.add_argument(
                f"--{option.name}",
                dest=option.name,
                action="append" if option.repeatable else "store",
                default=None,
                **extra,
                metavar=option.metavar,
                help=f"{option.help} [env {self.env_name(option.name)}; "
                f"default {option.default_text().replace('`', '')}]".replace("%", "%%"),
            )
        parser.add_argument(
            "--config", metavar="FILE", help=f"TOML file of options [env {self.config_env}]"
        )

    def load_file(self, path: str) -> dict[str, Any]:
        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
        known = {option.name for option in self.options}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.replace("_", "-")
            if name not in known:
                raise ConfigError(f"config file {path}: unknown option {key!r}")
            values[name] = value
        return values

    def config_path(self, cli: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
        """The TOML file: `--config`, else `PREFIX_CONFIG`."""
        path = cli.get("config") or environ.get(self.config_env)
        return str(path) if path else None

    def resolve(
        self, cli: Mapping[str, Any], environ: Mapping[str, str], config_path: str | None
    ) -> dict[str, Any]:
        """Merge the three sources (command line, then environment, then file) and convert
        every value; `ConfigError` names the option and where its bad value came from."""
        file_values = self.load_file(config_path) if config_path else {}
        resolved: dict[str, Any] = {}
        for option in self.options:
            source = f"--{option.name}"
            value = cli.get(option.name)
            if value is None or value == []:
                if self.env_name(option.name) in environ:
                    value = environ[self.env_name(option.name)]
                    source = self.env_name(option.name)
                elif option.name in file_values:
                    value = file_values[option.name]
                    source = f"{option.name} in {config_path}"
                else:
                    value = option.default
                    source = f"default of --{option.name}"
            if value is None:
                resolved[option.name] = None
                continue
            try:
                resolved[option.name] = option.convert(value)
            except (ValueError, TypeError) as error:
                raise ConfigError(f"{source}: {error}") from None
        if self.check is not None:
            self.check(resolved)
        return resolved

    def settings(self, cls: type[T], values: Mapping[str, Any], **more: Any) -> T:
        """`cls` built from the options whose `setting` is one of its fields, plus `more`."""
        kwargs = {
            option.attribute: values[option.name]
            for option in self.options
            if option.setting is not None and option.setting[0] is cls
        }
        return cls(**kwargs, **more)

    def markdown(self, section: str | None = None) -> str:
        """The option table of the docs: option, default, meaning."""
        rows = ["| option | default | meaning |", "|---|---|---|"]
        for option in self.options:
            if section is not None and option.section != section:
                continue
            flag = f"--{option.name}" + (f" {option.metavar}" if option.metavar else "")
            rows.append(f"| `{flag}` | {option.default_text()} | {option.help} |")
        return "\n".join(rows) + "\n"


T = TypeVar("T")

TABLE = re.compile(
    r"(<!-- options: (?P<key>[\w:-]+) -->\n)(?P<body>.*?)(<!-- /options -->)", re.DOTALL
)


def update_tables(document: str, tables: Mapping[str, str]) -> str:
    """The document with each `<!-- options: KEY -->` ... `<!-- /options -->` block replaced by
    `tables[KEY]` (how the README's tables are kept equal to the declarations)."""

    def replace(match: re.Match[str]) -> str:
        key = match["key"]
        if key not in tables:
            raise KeyError(f"no option table {key!r}")
        return match.group(1) + "\n" + tables[key] + "\n" + match.group(4)

    return TABLE.sub(replace, document)


def table_keys(document: str) -> list[str]:
    return [match["key"] for match in TABLE.finditer(document)]


# ---------------------------------------------------------------------------- the broker

BROKER_SECTION = "broker"
CLUSTER_SECTION = "cluster"


def _check_broker(values: dict[str, Any]) -> None:
    if values["id"] is None:
        values["id"] = socket.gethostname()
    if values["tls-bind"] and not values["tls-cert"]:
        raise ConfigError("--tls-bind needs --tls-cert (and --tls-key unless the key is in it)")
    if values["wss-bind"] and not values["tls-cert"]:
        raise ConfigError("--wss-bind needs --tls-cert (and --tls-key unless the key is in it)")
    if not (values["bind"] or values["tls-bind"] or values["ws-bind"] or values["wss-bind"]):
        raise ConfigError("no listener: give --bind, --tls-bind, --ws-bind or --wss-bind")
    if values["tls-require-client-cert"] and not values["tls-ca"]:
        raise ConfigError("--tls-require-client-cert needs --tls-ca")
    if values["tls-ca"] and not (values["tls-bind"] or values["wss-bind"]):
        raise ConfigError("--tls-ca needs a --tls-bind or --wss-bind listener")
    if values["jwt-audience"] and not (values["jwt-secret-file"] or values["jwks-file"]):
        raise ConfigError("--jwt-audience needs --jwt-secret-file or --jwks-file")
    if values["tap-streams"] > 1 and "{" in (values["tap-stream"] or ""):
        # A hash tag in the base key would put all the streams on one slot (cluster/tap.py).
        raise ConfigError("--tap-streams above 1 needs a --tap-stream without a {hash tag}")
    configured = {
        "password-file": ("password-file", values["password-file"]),
        "tls-cert": ("tls-ca", values["tls-ca"]),
        "redis": ("redis", values["redis"]),
        "jwt": ("jwt-secret-file or --jwks-file", values["jwt-secret-file"] or values["jwks-file"]),
    }
    for name in values["auth-chain"]:
        if name not in configured:
            raise ConfigError(
                f"--auth-chain: unknown authenticator {name!r} (known: {', '.join(configured)})"
            )
        needs, given = configured[name]
        if not given:
            raise ConfigError(f"--auth-chain names {name} but --{needs} is not given")


def _broker(name: str, convert: Callable[[Any], Any], help: str, **kwargs: Any) -> Option:
    return Option(name=name, convert=convert, help=help, section=BROKER_SECTION, **kwargs)


def _cluster(name: str, convert: Callable[[Any], Any], help: str, **kwargs: Any) -> Option:
    return Option(name=name, convert=convert, help=help, section=CLUSTER_SECTION, **kwargs)


BROKER = Scheme(
    "mcloudtt-broker",
    "MCLOUDTT_",
    (
        _broker(
            "bind",
            parse_addresses,
            "MQTT listener (repeatable)",
            setting=(ServerOptions, "binds"),
            metavar="HOST:PORT",
            repeatable=True,
        ),
        _broker(
            "tls-bind",
            parse_addresses,
            "MQTT over TLS listener (repeatable), with --tls-cert and --tls-key",
            setting=(ServerOptions, "tls_binds"),
            metavar="HOST:PORT",
            repeatable=True,
        ),
        _broker(
            "ws-bind",
            parse_addresses,
            "MQTT over WebSocket listener (repeatable; sub-protocol mqtt)",
            setting=(ServerOptions, "ws_binds"),
            metavar="HOST:PORT",
            repeatable=True,
        ),
        _broker(
            "wss-bind",
            parse_addresses,
            "MQTT over secure WebSocket listener (repeatable; sub-protocol mqtt), with "
            "--tls-cert and --tls-key",
            setting=(ServerOptions, "wss_binds"),
            metavar="HOST:PORT",
            repeatable=True,
        ),
        _broker(
            "tls-cert",
            text,
            "PEM certificate chain for --tls-bind and --wss-bind (read again on SIGHUP)",
            setting=(ServerOptions, "tls_cert"),
            metavar="FILE",
        ),
        _broker(
            "tls-key",
            text,
            "PEM private key for --tls-bind and --wss-bind (when not in the certificate file)",
            setting=(ServerOptions, "tls_key"),
            metavar="FILE",
        ),
        _broker(
            "tls-min-version",
            choice("1.2", "1.3"),
            "oldest TLS version accepted on --tls-bind and --wss-bind",
            setting=(ServerOptions, "tls_min_version"),
            metavar="VERSION",
        ),
        _broker(
            "tls-ciphers",
            text,
            "OpenSSL cipher list for TLS 1.2 (e.g. ECDHE+AESGCM); TLS 1.3 suites stay OpenSSL's",
            setting=(ServerOptions, "tls_ciphers"),
            metavar="STRING",
            shown="OpenSSL's defaults",
        ),
        _broker(
            "tls-ca",
            text,
            "PEM CA certificates of client certificates (mutual TLS on --tls-bind): a verified "
            "certificate's subject CN or a SAN is the username (authenticator tls-cert)",
            setting=(ServerOptions, "tls_ca"),
            metavar="FILE",
        ),
        _broker(
            "tls-require-client-cert",
            boolean,
            "refuse TLS clients without a certificate signed by --tls-ca",
            setting=(ServerOptions, "tls_require_client_cert"),
            metavar="BOOL",
            flag=True,
        ),
        _broker(
            "http",
            address(),
            "serve /healthz, /readyz and /metrics (Prometheus text)",
            setting=(ServerOptions, "http"),
            metavar="HOST:PORT",
        ),
        _broker(
            "id",
            text,
            "broker id (the pod name on Kubernetes); unique in a cluster: a second live broker "
            "with the same id is refused with exit status 2",
            metavar="NAME",
            shown="host name",
        ),
        _broker(
            "max-keepalive",
            bounded(0, 65_535),
            "longest keepalive granted; 5.0 clients asking more get Server Keep Alive",
            setting=(BrokerSettings, "max_keepalive"),
            metavar="SECONDS",
            shown="0 (no limit)",
        ),
        _broker(
            "max-packet-size",
            bounded(64, 268_435_460),
            "larger packets are refused (5.0: DISCONNECT 0x95)",
            setting=(BrokerSettings, "max_packet_size"),
            metavar="BYTES",
            shown="4194304 (4 MiB)",
        ),
        _broker(
            "max-queued-messages",
            non_negative_int,
            "QoS 1/2 messages kept per session while its client is away or slow",
            setting=(BrokerSettings, "max_queued_messages"),
            metavar="N",
        ),
        _broker(
            "receive-maximum",
            bounded(1, 65_535),
            "QoS 2 messages a client may have unreleased",
            setting=(BrokerSettings, "receive_maximum"),
            metavar="N",
        ),
        _broker(
            "max-inflight",
            bounded(1, 65_535),
            "unacknowledged QoS 1/2 deliveries per client (5.0 clients: at most their "
            "Receive Maximum)",
            setting=(BrokerSettings, "max_inflight"),
            metavar="N",
        ),
        _broker(
            "topic-alias-maximum",
            bounded(0, 65_535),
            "topic aliases accepted per 5.0 client",
            setting=(BrokerSettings, "topic_alias_maximum"),
            metavar="N",
        ),
        _broker(
            "mqtt31",
            boolean,
            "accept MQTT 3.1 clients (protocol name `MQIsdp`, level 3; false: CONNACK 0x01)",
            setting=(BrokerSettings, "mqtt31"),
            metavar="BOOL",
        ),
        _broker(
            "max-session-expiry",
            non_negative_int,
            "longest session expiry granted (3.1.1 persistent sessions get this)",
            setting=(BrokerSettings, "max_session_expiry"),
            metavar="SECONDS",
            shown="604800 (7 days)",
        ),
        _broker(
            "connect-timeout",
            non_negative_float,
            "time a new connection has to send CONNECT",
            setting=(BrokerSettings, "connect_timeout"),
            metavar="SECONDS",
        ),
        _broker(
            "drain-timeout",
            non_negative_float,
            "on SIGTERM/SIGINT: time to flush clients before exiting",
            setting=(ServerOptions, "drain_timeout"),
            metavar="SECONDS",
        ),
        _broker(
            "sys-interval",
            non_negative_float,
            "period of $SYS/broker/... updates (0: off)",
            setting=(BrokerSettings, "sys_interval"),
            metavar="SECONDS",
        ),
        _broker(
            "max-connections",
            non_negative_int,
            "open network connections, all listeners together; more: CONNACK 0x97 (5.0) / "
            "0x03 (3.1.1)",
            setting=(ServerOptions, "max_connections"),
            metavar="N",
            shown="0 (no limit)",
        ),
        _broker(
            "max-listener-connections",
            non_negative_int,
            "open network connections per listener; more: CONNACK 0x97 (5.0) / 0x03 (3.1.1)",
            setting=(ServerOptions, "max_listener_connections"),
            metavar="N",
            shown="0 (no limit)",
        ),
        _broker(
            "connect-rate",
            non_negative_float,
            "CONNECTs per second per source address (token bucket); more: CONNACK 0x97 / 0x03",
            setting=(ServerOptions, "connect_rate"),
            metavar="PER_SECOND",
            shown="0 (no limit)",
        ),
        _broker(
            "connect-burst",
            non_negative_int,
            "size of the --connect-rate bucket",
            setting=(ServerOptions, "connect_burst"),
            metavar="N",
            shown="one second's worth",
        ),
        _broker(
            "publish-rate",
            non_negative_float,
            "PUBLISH packets per second per client (token bucket); a faster client is slowed "
            "(its socket is not read), not dropped",
            setting=(BrokerSettings, "publish_rate"),
            metavar="PER_SECOND",
            shown="0 (no limit)",
        ),
        _broker(
            "publish-burst",
            non_negative_int,
            "size of the --publish-rate bucket",
            setting=(BrokerSettings, "publish_burst"),
            metavar="N",
            shown="one second's worth",
        ),
        _broker(
            "bandwidth",
            non_negative_int,
            "bytes of PUBLISH packets per second from each client (token bucket, one "
            "second's burst); a faster client is slowed, not dropped",
            setting=(BrokerSettings, "bandwidth"),
            metavar="BYTES",
            shown="0 (no limit)",
        ),
        _broker(
            "max-subscriptions",
            non_negative_int,
            "subscriptions per client; more: SUBACK 0x97 (5.0) / 0x80 (3.1.1)",
            setting=(BrokerSettings, "max_subscriptions"),
            metavar="N",
            shown="0 (no limit)",
        ),
        _broker(
            "max-topic-length",
            bounded(0, 65_535),
            "bytes in a topic name or filter; longer: DISCONNECT 0x90 (5.0) or close (3.1.1) on "
            "PUBLISH, SUBACK 0x8F / 0x80 on SUBSCRIBE",
            setting=(BrokerSettings, "max_topic_length"),
            metavar="BYTES",
            shown="0 (no limit)",
        ),
        _broker(
            "max-topic-levels",
            non_negative_int,
            "levels in a topic name or filter; more: as --max-topic-length",
            setting=(BrokerSettings, "max_topic_levels"),
            metavar="N",
            shown="0 (no limit)",
        ),
        _broker(
            "password-file",
            text,
            "users and salted scrypt hashes, one `USER:HASH` a line (`mcloudtt-broker passwd "
            "FILE USER`); read again on SIGHUP",
            setting=(ServerOptions, "password_file"),
            metavar="FILE",
        ),
        _broker(
            "allow-anonymous",
            boolean,
            "let clients without a username in",
            setting=(ServerOptions, "allow_anonymous"),
            metavar="BOOL",
            shown="true while no authenticator is configured",
        ),
        _broker(
            "auth-chain",
            name_list,
            "authenticators in the order they are asked (repeatable or comma-separated; "
            "known: tls-cert, jwt, password-file, redis: the hash {prefix}:users in the cluster's "
            "Redis); the first that knows the user decides",
            setting=(ServerOptions, "auth_chain"),
            metavar="NAMES",
            repeatable=True,
            shown="every configured one",
        ),
        _broker(
            "jwt-secret-file",
            text,
            "HS256 secret: a JWT in the password field logs in as its `sub` (authenticator jwt); "
            "`exp` required, `nbf` checked; an `acl` claim carries the client's topic rights",
            setting=(ServerOptions, "jwt_secret_file"),
            metavar="FILE",
        ),
        _broker(
            "jwks-file",
            text,
            "JWKS of the RS256/ES256 public keys JWTs are checked against (by `kid`)",
            setting=(ServerOptions, "jwks_file"),
            metavar="FILE",
        ),
        _broker(
            "jwt-audience",
            text,
            "the `aud` a JWT must carry",
            setting=(ServerOptions, "jwt_audience"),
            metavar="NAME",
        ),
        _broker(
            "acl-file",
            text,
            "topic rights in Mosquitto's ACL syntax (`user`, `topic`, `pattern` with %u, %c), "
            "checked on publish, subscribe and delivery; read again on SIGHUP",
            setting=(ServerOptions, "acl_file"),
            metavar="FILE",
        ),
        _broker(
            "acl-deny-action",
            choice("ignore", "disconnect"),
            "on a denied publish or subscription: ignore (dropped or refused with its reason "
            "code) or also disconnect the client",
            setting=(BrokerSettings, "acl_deny_action"),
            metavar="ACTION",
        ),
        _broker(
            "log-level",
            log_level,
            "debug, info, warning or error",
            default="info",
            metavar="LEVEL",
        ),
        _cluster(
            "redis",
            redis_url,
            "join the cluster through this Redis (redis://, rediss:// with ssl_* options, "
            "unix://; without it: a single node)",
            metavar="URL",
        ),
        _cluster(
            "cluster-mode",
            choice(ROUTED, BROADCAST),
            "routed: a publish goes only to brokers with a matching subscriber; broadcast: "
            "every publish on the Pub/Sub channel --sync-channel",
            setting=(ClusterSettings, "mode"),
            metavar="MODE",
        ),
        _cluster(
            "sync-channel",
            text,
            "the broadcast channel",
            setting=(ClusterSettings, "sync_channel"),
            metavar="NAME",
        ),
        _cluster(
            "redis-prefix",
            text,
            "prefix of the cluster's Redis keys",
            setting=(ClusterSettings, "prefix"),
            metavar="PREFIX",
        ),
        _cluster(
            "tap-stream",
            text,
            "also append every publish to this Redis stream (durable tap for the adapter), "
            "e.g. mcloudtt:tap",
            setting=(ClusterSettings, "tap_stream"),
            metavar="KEY",
        ),
        _cluster(
            "tap-maxlen",
            positive_int,
            "approximate length the tap stream is trimmed to",
            setting=(ClusterSettings, "tap_maxlen"),
            metavar="N",
        ),
        _cluster(
            "tap-streams",
            positive_int,
            "shard the tap into N streams by topic hash, each on its own Redis Cluster slot "
            "(1: the one --tap-stream key; give the adapter the same N)",
            setting=(ClusterSettings, "tap_streams"),
            metavar="N",
        ),
        _cluster(
            "sharded-pubsub",
            boolean,
            "broadcast mode on sharded Pub/Sub (SPUBLISH/SSUBSCRIBE, Redis 7) on one Redis too "
            "(on a Redis Cluster it is always on)",
            setting=(ClusterSettings, "sharded_pubsub"),
            metavar="BOOL",
        ),
        _cluster(
            "cluster-buffer",
            positive_int,
            "messages kept for the cluster while Redis is away (QoS 0 dropped first)",
            setting=(ClusterSettings, "buffer_limit"),
            metavar="N",
        ),
        _cluster(
            "max-locating",
            positive_int,
            "CONNECTs looking for their session in the cluster at once; more are refused with "
            "CONNACK 0x89 Server busy (3.1.1: 3, Server unavailable) and retry",
            setting=(ClusterSettings, "max_locating"),
            metavar="N",
        ),
        _cluster(
            "presence-ttl",
            positive_float,
            "how long a broker's presence lives without a heartbeat (one beat every TTL/5; a beat "
            "unanswered for two of them, 1 to 2 s, while nothing else comes back on the link, "
            "counts as a lost Redis link)",
            setting=(ClusterSettings, "presence_ttl"),
            metavar="SECONDS",
        ),
        _cluster(
            "inbox-replay",
            boolean,
            "replay a dead broker's inbox to the sessions taken from it (false only to show what is lost without it)",
            setting=(ClusterSettings, "replay"),
            metavar="BOOL",
        ),
        _cluster(
            "redis-backoff-max",
            positive_float,
            "longest wait between reconnect attempts (exponential, with jitter)",
            setting=(ClusterSettings, "backoff_max"),
            metavar="SECONDS",
        ),
        _cluster(
            "cluster-key-file",
            text,
            "shared key: every batch and control message on Redis carries an HMAC-SHA256 "
            "under it, the rest is counted and dropped; two lines during a rotation (sign with "
            "the first, accept either)",
            metavar="FILE",
        ),
        _cluster(
            "ready-without-redis",
            boolean,
            "report ready while serving locally without Redis",
            setting=(ServerOptions, "ready_without_redis"),
            metavar="BOOL",
        ),
    ),
    check=_check_broker,
)
OPTIONS = BROKER.options
OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


def env_name(option: str) -> str:
    return BROKER.env_name(option)


def load_file(path: str) -> dict[str, Any]:
    return BROKER.load_file(path)


def resolve(
    cli: Mapping[str, Any], environ: Mapping[str, str], config_path: str | None
) -> dict[str, Any]:
    """The broker's options from the three sources (see `Scheme.resolve`)."""
    return BROKER.resolve(cli, environ, config_path)


def environment() -> Mapping[str, str]:
    return os.environ
