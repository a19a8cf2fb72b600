"""`mcloudtt-adapter run` as a process: its options from the command line, the environment and a
TOML file (in that order), one line and exit status 2 for a bad one, and its /metrics."""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb
import pytest
from mcloudtt_chaos.procs import run_concurrently
from prometheus_client.parser import text_string_to_metric_families

from .helpers import adapter_command, wait_until

DOCS = Path(__file__).resolve().parents[2] / "docs" / "adapter.md"
SOURCE = ["--mqtt", "127.0.0.1:1"]  # nothing listens there: a good config starts, then waits

# name -> (arguments, environment, config file text or None, what the one line must name)
BAD: dict[str, tuple[list[str], dict[str, str], str | None, str]] = {
    "unknown-option": ([*SOURCE, "--no-such-option"], {}, None, "--no-such-option"),
    "flag-number": ([*SOURCE, "--batch-rows", "lots"], {}, None, "--batch-rows"),
    "flag-qos": ([*SOURCE, "--qos", "2"], {}, None, "--qos"),
    "flag-address": (["--mqtt", "nohost"], {}, None, "--mqtt"),
    "flag-topic-rule": ([*SOURCE, "--topic-rule", "a/#/b"], {}, None, "--topic-rule"),
    "env-number": (SOURCE, {"MCLOUDTT_ADAPTER_BATCH_ROWS": "lots"}, None, "BATCH_ROWS"),
    "env-float": (SOURCE, {"MCLOUDTT_ADAPTER_LINGER": "-1"}, None, "MCLOUDTT_ADAPTER_LINGER"),
    "env-choice": (SOURCE, {"MCLOUDTT_ADAPTER_REDIS_MODE": "x"}, None, "REDIS_MODE"),
    "env-address": ([], {"MCLOUDTT_ADAPTER_MQTT": "nohost"}, None, "MCLOUDTT_ADAPTER_MQTT"),
    "toml-value": (SOURCE, {}, 'max_pending = "many"\n', "max-pending in"),
    "toml-unknown-key": (SOURCE, {}, "no-such-key = 1\n", "no-such-key"),
    "toml-syntax": (SOURCE, {}, "batch_rows = \n", "adapter.toml"),
    "config-missing": (SOURCE, {"MCLOUDTT_ADAPTER_CONFIG": "/nonexistent/nope.toml"}, None, "nope"),
    "no-source": ([], {}, None, "--mqtt"),
    "two-sinks": ([*SOURCE, "--duckdb", "x", "--bigquery", "p.d.t"], {}, None, "--bigquery"),
}


def _environ(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCLOUDTT_ADAPTER_")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int | None, str]]:
    """Every BAD run at once, through the real console script."""
    commands = {}
    for name, (args, env, toml, _) in BAD.items():
        if toml is not None:
            cfg = tmp_path_factory.mktemp(name) / "adapter.toml"
            cfg.write_text(toml)
            args = [*args, "--config", str(cfg)]
        commands[name] = ([*adapter_command(), "run", *args], _environ(env))
    return run_concurrently(commands)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_configuration_one_line_exit_2(bad_runs, name) -> None:
    code, err = bad_runs[name]
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, f"want exactly one line on stderr, got:\n{err}"
    assert lines[0].startswith("mcloudtt-adapter")
    assert BAD[name][3] in lines[0], f"{BAD[name][3]!r} not named in: {lines[0]}"


def documented_metrics() -> dict[str, str]:
    """name -> type, from the metrics table of docs/adapter.md."""
    rows = re.findall(
        r"^\| `(mcloudtt_adapter_\w+)(?:\{[^}]*\})?` \| (\w+) \|", DOCS.read_text(), re.M
    )
    return dict(rows)


def test_options_from_flag_env_and_file_and_a_parsed_metrics_scrape(
    tmp_path, mqtt_broker, adapter_process, publisher
) -> None:
    broker = mqtt_broker()
    db = tmp_path / "data.duckdb"
    config = tmp_path / "adapter.toml"
    # The file's --mqtt is wrong: the environment must win over it; the flag wins over the
    # environment for --broker-id; the file's table wins over the default.
    config.write_text('mqtt = "127.0.0.1:1"\nbroker-id = "from-file"\ntable = "from_file"\n')
    env = {
        "MCLOUDTT_ADAPTER_CONFIG": str(config),
        "MCLOUDTT_ADAPTER_MQTT": f"127.0.0.1:{broker.port}",
        "MCLOUDTT_ADAPTER_BROKER_ID": "from-env",
    }
    adapter = adapter_process("--duckdb", str(db), "--broker-id", "from-flag", env=env)
    pub = publisher(broker.port, "cli-pub")
    for n in range(12):
        pub.publish(f"devices/d{n}/env", b'{"temp": 1}', qos=1)
    wait_until(lambda: adapter.metric("mcloudtt_adapter_rows_out_total", sink="duckdb") >= 12)

    status, text = adapter.get("/metrics")
    assert status == 200
    families = {family.name: family for family in text_string_to_metric_families(text)}
    documented = documented_metrics()
    assert len(documented) >= 15, documented
    for name, kind in documented.items():
        family = families.get(name.removesuffix("_total") if kind == "counter" else name)
        assert family is not None and family.type == kind, (name, kind)
    rows_in = families["mcloudtt_adapter_rows_in"].samples
    assert [(s.name, s.labels, s.value) for s in rows_in] == [
        ("mcloudtt_adapter_rows_in_total", {"source": "mqtt"}, 12.0)
    ]
    assert adapter.stop() == 0, adapter.log()

    with duckdb.connect(str(db), read_only=True) as con:
        got = con.execute("SELECT DISTINCT broker_id FROM from_file").fetchall()
    assert got == [("from-flag",)]
