from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
from mcloudtt_adapter.app import AdapterConfig
from mcloudtt_adapter.config import ADAPTER, adapter_config
from mcloudtt_adapter.decode import DecodeRules
from mcloudtt_broker.cluster.settings import ClusterSettings
from mcloudtt_broker.config import (
    BROKER,
    CLUSTER_SECTION,
    ConfigError,
    Option,
    Scheme,
    redact_url,
    resolve,
    table_keys,
    update_tables,
)
from mcloudtt_broker.core.broker import BrokerSettings
from mcloudtt_broker.server import ServerOptions

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rediss://:s3cret@10.0.0.3:6378/0", "rediss://:***@10.0.0.3:6378/0"),
        ("redis://user:pw@host/1", "redis://user:***@host/1"),
        ("redis://host:6379/0", "redis://host:6379/0"),
    ],
)
def test_passwords_never_shown(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_environment_then_file_then_default(tmp_path) -> None:
    config = tmp_path / "b.toml"
    config.write_text('max_keepalive = 30\nbind = ["0.0.0.0:1884"]\n')
    values = resolve({"max-keepalive": None}, {"MCLOUDTT_MAX_KEEPALIVE": "60"}, str(config))
    assert values["max-keepalive"] == 60  # the environment wins over the file
    assert values["bind"] == [("0.0.0.0", 1884)]
    assert values["max-queued-messages"] == 1000


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        ({"redis": "http://x"}, "redis:// or rediss://"),
        ({"cluster-mode": "mesh"}, "routed, broadcast"),
        ({"bind": ["nohost"]}, "HOST:PORT"),
        ({"max-keepalive": "2.5"}, "--max-keepalive: expected a whole number"),
    ],
)
def test_bad_values_say_what_is_wrong(cli: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(cli, {}, None)


@pytest.mark.parametrize("scheme", [BROKER, ADAPTER], ids=["broker", "adapter"])
def test_command_line_then_environment_then_file(scheme: Scheme, tmp_path: Path) -> None:
    option = scheme.option("drain-timeout")
    path = tmp_path / "c.toml"
    path.write_text("drain_timeout = 3\n")
    env = {scheme.env_name("drain-timeout"): "2"}
    base = {"mqtt": "127.0.0.1:1883"} if scheme is ADAPTER else {}

    def value(cli: dict[str, Any], environ: dict[str, str], file: str | None) -> Any:
        return scheme.resolve({**base, **cli}, environ, file)["drain-timeout"]

    assert value({"drain-timeout": "1"}, env, str(path)) == 1.0
    assert value({}, env, str(path)) == 2.0
    assert value({}, {}, str(path)) == 3.0
    assert value({}, {}, None) == option.default
    # The file is --config, else PREFIX_CONFIG.
    assert scheme.config_path({}, {scheme.config_env: str(path)}) == str(path)
    assert scheme.config_path({"config": "x.toml"}, {scheme.config_env: str(path)}) == "x.toml"


def test_adapter_repeatable_options_from_each_source(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('mqtt = "127.0.0.1:1"\ntopic_rule = ["a/{device_id}", "b/{device_id}/#"]\n')
    from_file = ADAPTER.resolve({}, {}, str(path))
    assert from_file["topic-rule"] == ("a/{device_id}", "b/{device_id}/#")
    from_env = ADAPTER.resolve({}, {"MCLOUDTT_ADAPTER_DEVICE_FIELD": "dev,id"}, str(path))
    assert from_env["device-field"] == ("dev", "id")
    config = adapter_config(ADAPTER.resolve({"time-field": ["t"], "group": ""}, {}, str(path)))
    assert config.rules.time_fields == ("t",)
    assert config.rules.device_fields == DecodeRules().device_fields
    assert config.mqtt == ("127.0.0.1", 1)
    assert config.mqtt_group is None  # '' asks for a plain subscription


def test_broker_settings_from_declared_defaults_equal_the_dataclasses() -> None:
    values = resolve({}, {}, None)
    extra = {"broker_id": "b", "sys_root": "$SYS/broker"}
    assert BROKER.settings(BrokerSettings, values, **extra) == BrokerSettings(**extra)
    assert BROKER.settings(ServerOptions, values) == ServerOptions()
    cluster = {"url": "redis://h", "broker_id": "b"}
    assert BROKER.settings(ClusterSettings, values, **cluster) == ClusterSettings(**cluster)


def test_adapter_config_from_declared_defaults_equals_the_dataclass() -> None:
    values = ADAPTER.resolve({"mqtt": "127.0.0.1:1883"}, {}, None)
    assert adapter_config(values) == AdapterConfig(mqtt=("127.0.0.1", 1883))


# A field with no option, and why: nothing else of these dataclasses may be left unconfigurable.
INTERNAL = {
    BrokerSettings: {"broker_id", "sys_root"},  # from --id and --redis
    # keys: read from --cluster-key-file
    ClusterSettings: {"url", "broker_id", "inbox_maxlen", "handover_timeout", "client_ttl", "keys"},
    ServerOptions: {"cluster"},
    AdapterConfig: {"rules"},
    DecodeRules: {"max_fields", "extra"},
}


@pytest.mark.parametrize("cls", list(INTERNAL), ids=lambda cls: cls.__name__)
def test_every_settings_field_has_one_option(cls: type[Any]) -> None:
    options = [o for s in (BROKER, ADAPTER) for o in s.options if o.setting and o.setting[0] is cls]
    names = [o.attribute for o in options]
    assert len(names) == len(set(names)), f"a field set by two options: {sorted(names)}"
    assert {f.name for f in fields(cls)} - set(names) == INTERNAL[cls]


def test_a_default_cannot_be_declared_twice() -> None:
    @dataclass
    class Settings:
        limit: int = 5

    assert Option(name="limit", convert=int, help="", setting=(Settings, "limit")).default == 5
    with pytest.raises(TypeError, match="a default here and in Settings"):
        Option(name="limit", convert=int, help="", default=6, setting=(Settings, "limit"))


def test_docs_tables_are_the_declarations() -> None:
    """README.md and docs/adapter.md show the tables generated from the declarations.

    After changing an option: `MCLOUDTT_UPDATE_GOLDEN=1 pytest tests/unit/test_config.py`."""
    tables = {
        "broker": BROKER.markdown("broker"),
        "cluster": BROKER.markdown(CLUSTER_SECTION),
        "adapter": ADAPTER.markdown(),
    }
    docs = {ROOT / "README.md": ["broker", "cluster"], ROOT / "docs" / "adapter.md": ["adapter"]}
    for path, keys in docs.items():
        document = path.read_text(encoding="utf-8")
        assert table_keys(document) == keys, path
        expected = update_tables(document, tables)
        if os.environ.get("MCLOUDTT_UPDATE_GOLDEN") and expected != document:
            path.write_text(expected, encoding="utf-8")
            continue
        assert document == expected, f"{path.name}: option tables out of date (see docstring)"
    # Every option is in a table; every table row is an option.
    assert sum(t.count("\n| `--") for t in tables.values()) == len(BROKER.options) + len(
        ADAPTER.options
    )


def test_help_shows_env_and_default() -> None:
    from mcloudtt_broker.cli import build_parser

    usage = build_parser().format_help()
    assert "MCLOUDTT_MAX_PACKET_SIZE" in usage and "4194304 (4 MiB)" in usage
