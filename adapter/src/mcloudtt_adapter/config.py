"""The options of `mcloudtt-adapter run`, declared once with the broker's configuration scheme.

`--batch-rows` is also `MCLOUDTT_ADAPTER_BATCH_ROWS` and `batch-rows` (or `batch_rows`) in the
TOML file given with `--config` or `MCLOUDTT_ADAPTER_CONFIG`; repeatable options are lists in the
file and comma-separated in the environment. Each default is the one of the `AdapterConfig` or
`DecodeRules` field the option fills. docs/adapter.md's option table is generated from here.
"""

from __future__ import annotations

from typing import Any

from mcloudtt_broker.config import (
    ConfigError,
    Option,
    Scheme,
    address,
    boolean,
    bounded,
    choice,
    log_level,
    names,
    non_negative_float,
    positive_float,
    positive_int,
    redis_url,
    text,
)

from .app import AdapterConfig
from .decode import DecodeRules, TopicRule


def _group(value: Any) -> str | None:
    return text(value) or None  # '': a plain subscription


def _check(values: dict[str, Any]) -> None:
    if values["duckdb"] and values["bigquery"]:
        raise ConfigError("give --duckdb or --bigquery, not both")
    if not values["mqtt"] and not values["redis"]:
        raise ConfigError("give a source: --mqtt HOST:PORT and/or --redis URL")
    for rule in values["topic-rule"]:
        try:
            TopicRule(rule)
        except ValueError as error:
            raise ConfigError(f"--topic-rule: {error}") from None


def _option(section: str, name: str, convert: Any, help: str, **kwargs: Any) -> Option:
    return Option(name=name, convert=convert, help=help, section=section, **kwargs)


def _config(field: str) -> tuple[type[Any], str]:
    return (AdapterConfig, field)


def _rules(field: str) -> tuple[type[Any], str]:
    return (DecodeRules, field)


MQTT = "MQTT source"
REDIS = "Redis tap source"
SINKS = "sinks"
DECODING = "decoding"
BATCHING = "batching"
SERVICE = "service"

ADAPTER = Scheme(
    "mcloudtt-adapter",
    "MCLOUDTT_ADAPTER_",
    (
        _option(
            MQTT,
            "mqtt",
            address("127.0.0.1"),
            "broker to subscribe to",
            setting=_config("mqtt"),
            metavar="HOST:PORT",
        ),
        _option(
            MQTT, "filter", text, "topic filter", setting=_config("mqtt_filter"), metavar="FILTER"
        ),
        _option(
            MQTT,
            "group",
            _group,
            "shared subscription group ('' for a plain subscription)",
            setting=_config("mqtt_group"),
            metavar="NAME",
        ),
        _option(
            MQTT,
            "client-id",
            text,
            "stable MQTT ClientId; give each replica its own",
            setting=_config("client_id"),
            metavar="ID",
            shown="`mcloudtt-adapter-HOST`",
        ),
        _option(
            MQTT,
            "session-expiry",
            bounded(0, 2**32 - 1),
            "seconds the broker keeps the session (and queues) while the adapter is away",
            setting=_config("session_expiry"),
            metavar="SECONDS",
        ),
        _option(
            MQTT,
            "keepalive",
            bounded(0, 65_535),
            "MQTT keepalive",
            setting=_config("keepalive"),
            metavar="SECONDS",
        ),
        _option(
            MQTT,
            "qos",
            bounded(0, 1),
            "subscription QoS, 0 or 1",
            setting=_config("qos"),
            metavar="QOS",
        ),
        _option(
            MQTT, "username", text, "MQTT user name", setting=_config("username"), metavar="NAME"
        ),
        _option(
            MQTT, "password", text, "MQTT password", setting=_config("password"), metavar="SECRET"
        ),
        _option(
            MQTT,
            "broker-id",
            text,
            "broker_id column for MQTT rows",
            setting=_config("broker_id"),
            metavar="NAME",
        ),
        _option(
            REDIS,
            "redis",
            redis_url,
            "read the cluster's tap (redis://, rediss:// with ssl_* options, unix://; the "
            "broker's URL forms)",
            setting=_config("redis"),
            metavar="URL",
        ),
        _option(
            REDIS,
            "redis-mode",
            choice("stream", "pubsub"),
            "stream: the durable tap through a consumer group; pubsub: the sync channel",
            setting=_config("redis_mode"),
            metavar="MODE",
        ),
        _option(
            REDIS,
            "tap-stream",
            text,
            "the tap stream (the brokers' --tap-stream)",
            setting=_config("tap_stream"),
            metavar="KEY",
        ),
        _option(
            REDIS,
            "tap-streams",
            positive_int,
            "the brokers' --tap-streams: read all N tap streams (one consumer group each)",
            setting=_config("tap_streams"),
            metavar="N",
        ),
        _option(
            REDIS,
            "sync-channel",
            text,
            "the broadcast channel (--redis-mode pubsub)",
            setting=_config("sync_channel"),
            metavar="NAME",
        ),
        _option(
            REDIS,
            "sharded-pubsub",
            boolean,
            "the brokers' --sharded-pubsub: read the broadcast channel with SSUBSCRIBE (always "
            "on a Redis Cluster)",
            setting=_config("sharded_pubsub"),
            metavar="BOOL",
        ),
        _option(
            REDIS,
            "cluster-key-file",
            text,
            "the brokers' --cluster-key-file: only tap entries and sync envelopes with a valid "
            "HMAC-SHA256 tag are taken (the rest counted as bad messages and dropped)",
            setting=_config("cluster_key_file"),
            metavar="FILE",
        ),
        _option(
            REDIS,
            "redis-group",
            text,
            "consumer group",
            setting=_config("redis_group"),
            metavar="NAME",
        ),
        _option(
            REDIS,
            "consumer",
            text,
            "consumer name",
            setting=_config("consumer"),
            metavar="NAME",
            shown="the client id",
        ),
        _option(
            REDIS,
            "claim-idle",
            positive_float,
            "take over entries another replica left pending (unacknowledged) this long "
            "(XAUTOCLAIM)",
            setting=_config("claim_idle"),
            metavar="SECONDS",
        ),
        _option(
            REDIS,
            "start-id",
            text,
            "where a new group starts: 0 (all the stream holds) or $ (new entries only)",
            setting=_config("start_id"),
            metavar="ID",
        ),
        _option(
            SINKS,
            "duckdb",
            text,
            "DuckDB file (the default sink)",
            setting=_config("duckdb"),
            metavar="PATH",
            shown="`mcloudtt.duckdb` unless --bigquery",
        ),
        _option(
            SINKS,
            "duckdb-checkpoint",
            text,
            "write-ahead log size that triggers a DuckDB checkpoint (DuckDB's own default: 16MB)",
            setting=_config("duckdb_checkpoint"),
            metavar="SIZE",
        ),
        _option(
            SINKS, "table", text, "DuckDB table name", setting=_config("table"), metavar="NAME"
        ),
        _option(
            SINKS,
            "bigquery",
            text,
            "BigQuery table",
            setting=_config("bigquery"),
            metavar="PROJECT.DATASET.TABLE",
        ),
        _option(
            SINKS,
            "bigquery-endpoint",
            text,
            "BigQuery API endpoint (an emulator; no credentials)",
            setting=_config("bigquery_endpoint"),
            metavar="URL",
        ),
        _option(
            SINKS,
            "dead-letter-file",
            text,
            "where rejected rows go when the dead-letter table cannot take them",
            setting=_config("dead_letter_file"),
            metavar="PATH",
        ),
        _option(
            DECODING,
            "topic-rule",
            names,
            "topic pattern whose {names} become columns (repeatable)",
            setting=_rules("topic_rules"),
            metavar="PATTERN",
            repeatable=True,
        ),
        _option(
            DECODING,
            "device-field",
            names,
            "payload field naming the device (repeatable)",
            setting=_rules("device_fields"),
            metavar="NAME",
            repeatable=True,
        ),
        _option(
            DECODING,
            "time-field",
            names,
            "payload field holding the event time (repeatable)",
            setting=_rules("time_fields"),
            metavar="NAME",
            repeatable=True,
        ),
        _option(
            DECODING,
            "ignore-field",
            names,
            "payload field not to store as a metric (repeatable)",
            setting=_rules("ignore_fields"),
            metavar="NAME",
            repeatable=True,
        ),
        _option(
            DECODING,
            "metadata-field",
            names,
            "top-level payload field kept as an attribute, never a measurement (repeatable)",
            setting=_rules("metadata_fields"),
            metavar="NAME",
            repeatable=True,
        ),
        _option(
            DECODING,
            "max-flatten-bytes",
            positive_int,
            "larger JSON payloads are stored, not flattened into metrics",
            setting=_rules("max_flatten_bytes"),
            metavar="BYTES",
        ),
        _option(
            BATCHING,
            "batch-rows",
            positive_int,
            "rows that cut a batch",
            setting=_config("batch_rows"),
            metavar="N",
        ),
        _option(
            BATCHING,
            "batch-delay",
            positive_float,
            "seconds a batch may wait to fill",
            setting=_config("batch_delay"),
            metavar="SECONDS",
        ),
        _option(
            BATCHING,
            "linger",
            non_negative_float,
            "cut the batch when nothing arrived for this long",
            setting=_config("linger"),
            metavar="SECONDS",
        ),
        _option(
            BATCHING,
            "max-pending",
            positive_int,
            "messages received and not committed before the sources are held back",
            setting=_config("max_pending"),
            metavar="N",
        ),
        _option(
            SERVICE,
            "http",
            address("127.0.0.1"),
            "serve /healthz, /readyz, /metrics and /report",
            setting=_config("http"),
            metavar="HOST:PORT",
        ),
        _option(
            SERVICE,
            "drain-timeout",
            non_negative_float,
            "on SIGTERM: time to commit and acknowledge what is buffered",
            setting=_config("drain_timeout"),
            metavar="SECONDS",
        ),
        _option(
            SERVICE,
            "log-level",
            log_level,
            "debug, info, warning or error",
            default="info",
            metavar="LEVEL",
        ),
    ),
    check=_check,
)


def adapter_config(values: dict[str, Any]) -> AdapterConfig:
    """The `AdapterConfig` of resolved option values (`ADAPTER.resolve(...)`)."""
    return ADAPTER.settings(AdapterConfig, values, rules=ADAPTER.settings(DecodeRules, values))
