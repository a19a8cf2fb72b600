"""The process contract: options, environment, config file, HTTP endpoints, $SYS, signals."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from brokerproc import TARGET, broker_command, free_port, wait_for_port
from mcloudtt_chaos.procs import Process, run_concurrently
from prometheus_client.parser import text_string_to_metric_families

from .clients import mcloudtt_only
from .mqttraw import (
    DISCONNECT,
    MAXIMUM_PACKET_SIZE,
    PUBACK,
    TOPIC_ALIAS_MAXIMUM,
    Packet,
    RawClient,
    ack,
)

MOSQUITTO = TARGET == "mosquitto"


@contextmanager
def started(*args: str, env: dict[str, str] | None = None, port: int) -> Iterator[Process]:
    """Run the broker with exactly these arguments until the block ends."""
    with Process([*broker_command(), *args], name="broker", env=env) as proc:
        proc.wait_port(port, timeout=10)
        yield proc


def connack_props(port: int) -> Packet:
    with RawClient(port) as c:
        connack = c.connect("cli-check")
        assert connack.code == 0
        c.disconnect()
        return connack


# -- bad command lines -----------------------------------------------------------------------------

# name -> (arguments, environment, config file text or None, what the one line must name)
BAD: dict[str, tuple[list[str], dict[str, str], str | None, str]] = {
    "unknown-option": (["--no-such-option"], {}, None, "--no-such-option"),
    "not-a-number": (["--max-packet-size", "lots"], {}, None, "max-packet-size"),
    "port-out-of-range": (["--bind", "127.0.0.1:99999"], {}, None, "bind"),
    "env-value": ([], {"MCLOUDTT_MAX_PACKET_SIZE": "lots"}, None, "MCLOUDTT_MAX_PACKET_SIZE"),
    "toml-syntax": ([], {}, 'bind = ["127.0.0.1:1"\nmax-packet-size = ', "broker.toml"),
    "toml-unknown-key": ([], {}, "no-such-key = 1\n", "no-such-key"),
    "toml-value": ([], {}, 'max-packet-size = "lots"\n', "max-packet-size in"),
    "env-listener": ([], {"MCLOUDTT_WS_BIND": "nowhere"}, None, "MCLOUDTT_WS_BIND"),
    "config-missing": (["--config", "/nonexistent/nope.toml"], {}, None, "nope.toml"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Every BAD command line, run at once (each start costs a second of imports)."""
    if MOSQUITTO:
        pytest.skip("mcloudtt-specific contract")
    commands = {}
    for name, (args, env, toml, _) in BAD.items():
        if toml is not None:
            cfg = tmp_path_factory.mktemp(name) / "broker.toml"
            cfg.write_text(toml)
            args = [*args, "--config", str(cfg)]
        commands[name] = ([*broker_command(), *args], {**os.environ, **env})
    return run_concurrently(commands)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_configuration_one_line_exit_2(bad_runs, name):
    code, err = bad_runs[name]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, f"want exactly one line on stderr, got:\n{err}"
    assert BAD[name][3] in lines[0], f"{BAD[name][3]!r} not named in: {lines[0]}"


# -- configuration sources -------------------------------------------------------------------------


@mcloudtt_only
def test_repeated_bind_listens_on_each():
    p1, p2, http = free_port(), free_port(), free_port()
    with started(
        "--bind",
        f"127.0.0.1:{p1}",
        "--bind",
        f"127.0.0.1:{p2}",
        "--http",
        f"127.0.0.1:{http}",
        port=p1,
    ):
        wait_for_port(p2)
        for p in (p1, p2):
            assert connack_props(p).code == 0


@mcloudtt_only
def test_environment_variables_configure_the_broker():
    p1, p2, http = free_port(), free_port(), free_port()
    env = {
        "MCLOUDTT_BIND": f"127.0.0.1:{p1},127.0.0.1:{p2}",
        "MCLOUDTT_HTTP": f"127.0.0.1:{http}",
        "MCLOUDTT_MAX_PACKET_SIZE": "2048",
        "MCLOUDTT_TOPIC_ALIAS_MAXIMUM": "7",
    }
    with started(env=env, port=p1):
        wait_for_port(p2)
        ack = connack_props(p2)
        assert ack.prop(MAXIMUM_PACKET_SIZE) == 2048
        assert ack.prop(TOPIC_ALIAS_MAXIMUM) == 7
        wait_for_port(http)


@mcloudtt_only
def test_config_file_with_dashes_and_underscores(tmp_path):
    port, http = free_port(), free_port()
    cfg = tmp_path / "broker.toml"
    cfg.write_text(
        f'bind = ["127.0.0.1:{port}"]\n'
        f'http = "127.0.0.1:{http}"\n'
        "max-packet-size = 4096\n"
        "topic_alias_maximum = 9\n"
        'log-level = "debug"\n'
    )
    with started("--config", str(cfg), port=port):
        ack = connack_props(port)
        assert ack.prop(MAXIMUM_PACKET_SIZE) == 4096
        assert ack.prop(TOPIC_ALIAS_MAXIMUM) == 9


# -- HTTP endpoints and metrics --------------------------------------------------------------------


@mcloudtt_only
def test_health_and_readiness(mq):
    broker = mq
    assert broker.http_get("/healthz")[0] == 200
    assert broker.http_get("/readyz")[0] == 200
    assert broker.http_get("/no-such-page")[0] == 404


README = Path(__file__).resolve().parents[2] / "README.md"


def documented_metrics(section: str) -> set[str]:
    """The metric names the README's `section` (a heading) lists."""
    text = README.read_text(encoding="utf-8").split(section + "\n", 1)[1]
    text = text.split("\n## ", 1)[0].split("\n### ", 1)[0]
    return set(re.findall(r"`(mcloudtt_\w+)", text))


def exposed(text: str) -> dict[str, str]:
    """Sample name (labels aside) -> family type, read with prometheus-client's own parser."""
    return {
        sample.name: family.type
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def assert_documented_families(text: str, section: str) -> None:
    names = documented_metrics(section)
    assert len(names) >= 7, names
    types = exposed(text)
    assert names - set(types) == set(), f"documented in {section!r}, not exposed"
    for name in names:
        assert types[name] == ("counter" if name.endswith("_total") else "gauge"), name


@mcloudtt_only
def test_metrics_scrape_has_every_documented_family(mq):
    status, text = mq.http_get("/metrics")
    assert status == 200
    assert_documented_families(text, "### Metrics")


@mcloudtt_only
def test_cluster_metrics_scrape_has_every_documented_family(broker_factory, redis_server):
    b = broker_factory("--redis", redis_server.url, "--id", "scraped", "--sys-interval", "0")
    deadline = time.monotonic() + 10
    while b.http_get("/readyz")[0] != 200:
        assert time.monotonic() < deadline, "the cluster link never came up"
        time.sleep(0.05)
    text = b.http_get("/metrics")[1]
    assert_documented_families(text, "## The cluster")
    assert exposed(text)["mcloudtt_cluster_link_up"] == "gauge"
    assert b.metric("mcloudtt_cluster_link_up") == 1


@mcloudtt_only
def test_metrics_follow_traffic(broker, raw):
    m = broker.metric
    assert m("mcloudtt_connections") == 0
    sub = raw(broker.port)
    sub.connect("msub")
    sub.subscribe(("mt/#", 1), ("mz/zero", 0))
    pub = raw(broker.port)
    pub.connect("mpub")
    assert m("mcloudtt_connections") == 2
    assert m("mcloudtt_connections_total") == 2
    assert m("mcloudtt_subscriptions") == 2

    pub.publish("mt/one", b"x" * 100, qos=1)
    delivered = sub.next_publish(ack_it=False)
    assert m("mcloudtt_messages_received_total", qos="1") == 1
    assert m("mcloudtt_messages_sent_total", qos="1") == 1
    assert m("mcloudtt_inflight_messages") == 1  # not acknowledged yet
    sub.send(ack(PUBACK, delivered.packet_id))
    pub.publish("mz/zero", b"z", qos=0)
    pub.publish("mt/two", b"t", qos=2, retain=True)
    assert [p.topic for p in sub.publishes(2)] == ["mz/zero", "mt/two"]
    assert m("mcloudtt_inflight_messages") == 0
    assert m("mcloudtt_messages_received_total", qos="0") == 1
    assert m("mcloudtt_messages_received_total", qos="2") == 1
    assert m("mcloudtt_retained_messages") == 1
    assert m("mcloudtt_bytes_received_total") > 100
    assert m("mcloudtt_bytes_sent_total") > 100

    sub.disconnect()
    pub.disconnect()
    assert m("mcloudtt_connections") == 0
    assert m("mcloudtt_connections_total") == 2
    assert m("mcloudtt_subscriptions") == 0
    assert m("mcloudtt_sessions") == 0


# -- $SYS --------------------------------------------------------------------------------------

SYS_TOPICS = [
    "$SYS/broker/clients/connected",
    "$SYS/broker/messages/received",
    "$SYS/broker/messages/sent",
    "$SYS/broker/uptime",
]


def _number(payload: bytes) -> int:
    return int(payload.split()[0])  # Mosquitto says "12 seconds", a bare number is fine too


def test_sys_topics_retained(shared_broker, raw):
    b = shared_broker() if MOSQUITTO else shared_broker("--sys-interval", "1")

    def first_of_each(cid: str) -> dict[str, Packet]:
        c = raw(b.port)
        c.connect(cid)
        c.subscribe(*[(t, 0) for t in SYS_TOPICS])
        seen: dict[str, Packet] = {}
        deadline = time.monotonic() + 5
        while len(seen) < len(SYS_TOPICS):
            p = c.next_publish(timeout=max(0.0, deadline - time.monotonic()))
            seen.setdefault(p.topic, p)
        return seen

    first_of_each("sys1")  # they exist (published at start or within one interval)
    seen = first_of_each("sys2")  # so a later subscriber gets the stored copies at once
    assert sorted(seen) == sorted(SYS_TOPICS)
    for p in seen.values():
        assert p.retain, p
        assert _number(p.payload) >= 0


@mcloudtt_only
def test_sys_topics_updated_every_interval(shared_broker, raw):
    b = shared_broker("--sys-interval", "1")
    c = raw(b.port)
    c.connect("sys")
    c.subscribe(*[(t, 0) for t in SYS_TOPICS])
    c.publish("sysx/x", b"")  # matched by nothing; still a received message
    latest: dict[str, list[int]] = {}
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        p = c.next_publish(timeout=max(0.1, deadline - time.monotonic()))
        latest.setdefault(p.topic, []).append(_number(p.payload))
        if all(len(latest.get(t, [])) >= 3 for t in SYS_TOPICS):
            break
    uptimes = latest["$SYS/broker/uptime"]
    assert len(uptimes) >= 3 and uptimes[-1] > uptimes[0]  # republished, and counting
    assert latest["$SYS/broker/clients/connected"][-1] >= 1
    assert latest["$SYS/broker/messages/received"][-1] >= 1


# -- signals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_drains_and_exits_zero(broker, raw, sig):
    v5 = raw(broker.port)
    v5.connect("v5")
    v4 = raw(broker.port, version=4)
    v4.connect("v4", version=4)
    t0 = time.monotonic()
    broker.signal(sig)
    got5 = v5.closed(timeout=8)
    got4 = v4.closed(timeout=8)
    assert broker.proc.wait(10) == 0
    assert time.monotonic() - t0 < 10
    if MOSQUITTO:  # Mosquitto 2.0.11 just closes
        assert all(p.type == DISCONNECT and p.code == 0x8B for p in got5), got5
    else:
        assert [(p.type, p.code) for p in got5] == [(DISCONNECT, 0x8B)]  # Server shutting down
    assert got4 == []  # 3.1.1 has no server DISCONNECT


@mcloudtt_only
def test_drain_refuses_newcomers_and_is_bounded_by_drain_timeout(broker_factory, raw):
    b = broker_factory("--drain-timeout", "1")
    stuck = raw(b.port, rcvbuf=4096)  # never reads: its undelivered data keeps the drain busy
    stuck.connect("stuck")
    stuck.subscribe(("drain/#", 1))
    pub = raw(b.port)
    pub.connect("pub")
    for _ in range(100):
        pub.publish("drain/x", b"y" * 16_000, qos=1)  # far more than the stuck socket holds
    t0 = time.monotonic()
    b.signal(signal.SIGTERM)
    refused = False
    while not refused and time.monotonic() - t0 < 1.5:
        try:
            with RawClient(b.port, timeout=1) as c:
                refused = c.connect("late").code != 0
        except (OSError, AssertionError):  # refused, reset, or closed without a CONNACK
            refused = True
    assert refused  # stop accepting first
    assert b.proc.wait(8) == 0
    assert time.monotonic() - t0 <= 1 + 2.0  # the drain timeout, plus the exit itself


@mcloudtt_only
def test_the_broker_raises_its_open_files_limit_to_the_hard_limit() -> None:
    # One descriptor per connection: started with the soft limit a distribution often sets
    # (here 256), the broker must not refuse the 257th device when the hard limit allows more.
    import resource
    import sys

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open files limit here is {hard}")
    port = free_port()
    low_then_exec = (
        "import os, resource, sys;"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1];"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard));"
        "os.execvp(sys.argv[1], sys.argv[1:])"
    )
    command = [
        sys.executable,
        "-c",
        low_then_exec,
        *broker_command(),
        "--bind",
        f"127.0.0.1:{port}",
    ]
    with Process(command, name="broker") as proc:
        proc.wait_port(port, timeout=10)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
    soft = next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[
        3
    ]
    assert soft == ("unlimited" if hard == resource.RLIM_INFINITY else str(hard))
