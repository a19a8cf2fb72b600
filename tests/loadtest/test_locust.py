"""loadtest/locustfile.py under locust, in a subprocess (locust monkey-patches the process for
gevent; nothing of it is imported here), against real brokers: a smoke run per scenario, the
saturation shape on a short ramp, two local workers, and the loss detector on made-up sequences.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from brokerproc import BrokerProcess
from mcloudtt_chaos.procs import NotInstalled, Process, console_script, free_port, mosquitto_binary
from redisproc import RedisProcess

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
SATURATION = ROOT / "loadtest" / "saturation.py"
COMPONENT = ROOT / "kind" / "components" / "locust"


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerProcess]:
    with BrokerProcess() as b:
        yield b


def locust_command(
    tmp_path: Path, host: str, *args: str, users: int = 20, seconds: float = 3, files: str = ""
) -> list[str]:
    cmd = [
        *console_script("locust", "locust"),
        "-f",
        files or str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "--csv",
        str(tmp_path / "run"),
        "--json-file",
        str(tmp_path / "stats"),  # locust adds .json
        "--mqtt-summary",
        str(tmp_path / "summary.json"),
        "--only-summary",
        "--loss-grace",
        "1",
        *args,
    ]
    if not files:
        cmd += ["-u", str(users), "-r", str(max(users, 1)), "-t", f"{seconds}s"]
    return cmd


Rows = dict[tuple[str, str], dict[str, str]]


def results(tmp_path: Path, returncode: int, output: str) -> tuple[Rows, dict[str, Any], str]:
    """(stats rows by (type, name), the MQTT summary, the output) of a finished run."""
    assert "Traceback" not in output, output[-4000:]
    assert returncode == 0, output[-4000:]
    # The CSV is rewritten every second while locust runs (its last write may miss the final
    # second); the JSON file is written once, after the users have stopped: counts from it.
    with open(tmp_path / "run_stats.csv") as handle:
        header = set(next(csv.reader(handle)))
        assert {"Type", "Name", "Request Count", "Failure Count", "99%"} <= header
    rows = {
        (e["method"], e["name"]): {
            "Request Count": str(e["num_requests"]),
            "Failure Count": str(e["num_failures"]),
        }
        for e in json.loads((tmp_path / "stats.json").read_text())
    }
    rows[("", "Aggregated")] = {
        "Request Count": str(sum(int(r["Request Count"]) for r in rows.values())),
        "Failure Count": str(sum(int(r["Failure Count"]) for r in rows.values())),
    }
    return rows, json.loads((tmp_path / "summary.json").read_text()), output


def locust(
    tmp_path: Path, host: str, *args: str, users: int = 20, seconds: float = 3, files: str = ""
) -> tuple[Rows, dict[str, Any], str]:
    """Run locust headless to the end."""
    cmd = locust_command(tmp_path, host, *args, users=users, seconds=seconds, files=files)
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path
    )
    return results(tmp_path, done.returncode, done.stdout + done.stderr)


def count(
    rows: dict[tuple[str, str], dict[str, str]], kind: str, column: str = "Request Count"
) -> int:
    return sum(int(r[column]) for (t, name), r in rows.items() if t == kind and name != "duplicate")


def assert_clean(rows: dict[tuple[str, str], dict[str, str]], summary: dict[str, Any]) -> None:
    total = rows[("", "Aggregated")]
    failures = [(k, r["Failure Count"]) for k, r in rows.items() if int(r["Failure Count"])]
    assert int(total["Failure Count"]) == 0, failures
    assert summary["counters"]["lost"] == 0
    assert summary["counters"]["duplicates"] == 0


@pytest.mark.parametrize(
    ("scenario", "extra"),
    [
        ("fan-in", ["--qos", "1", "--interval", "0.2"]),
        ("fan-out", ["--interval", "0.1"]),
        ("shared", ["--interval", "0.2"]),
        ("qos-mix", ["--interval", "0.2"]),
    ],
)
def test_message_scenarios_deliver_without_loss(
    tmp_path: Path, broker: BrokerProcess, scenario: str, extra: list[str]
) -> None:
    rows, summary, _ = locust(
        tmp_path, f"mqtt://127.0.0.1:{broker.port}", "--scenario", scenario, *extra
    )
    assert_clean(rows, summary)
    received = count(rows, "RECV")
    assert received > 20, rows
    assert summary["counters"]["received"] == received
    assert summary["scenario"] == scenario
    assert count(rows, "CONNECT") == 20
    assert count(rows, "SUBSCRIBE") >= 2
    if scenario == "qos-mix":  # every QoS has its own PUBLISH entry, timed to its last ack
        assert {n for t, n in rows if t == "PUBLISH"} == {
            "device qos0",
            "device qos1",
            "device qos2",
        }
    if scenario == "shared":  # one group: each message once, not once per consumer
        assert received <= summary["counters"]["published"]


def test_tags_pick_a_scenario_and_reports_are_written(
    tmp_path: Path, broker: BrokerProcess
) -> None:
    html = tmp_path / "report.html"
    rows, summary, _ = locust(
        tmp_path,
        f"mqtt://127.0.0.1:{broker.port}",
        "--tags",
        "fan-out",
        "--html",
        str(html),
        "--interval",
        "0.2",
    )
    assert summary["scenario"] == "fan-out"
    assert ("PUBLISH", "commander qos0") in rows
    assert_clean(rows, summary)
    assert "commands/all" in html.read_text()


def test_connect_and_reconnect_storms(tmp_path: Path, broker: BrokerProcess) -> None:
    host = f"mqtt://127.0.0.1:{broker.port}"
    rows, summary, _ = locust(tmp_path, host, "--scenario", "connect-storm", users=200)
    assert_clean(rows, summary)
    assert count(rows, "CONNECT") == 200 and count(rows, "SUBSCRIBE") == 200
    assert summary["counters"].get("dropped_connections", 0) == 0
    rows, summary, _ = locust(
        tmp_path, host, "--scenario", "reconnect-storm", "--interval", "0.2", users=20
    )
    assert_clean(rows, summary)
    assert count(rows, "CONNECT") > 20 * 5  # each reconnected several times


def _mosquitto() -> str | None:
    try:
        return mosquitto_binary()
    except NotInstalled:
        return None


@pytest.mark.skipif(_mosquitto() is None, reason="needs Mosquitto (apt-get install -y mosquitto)")
def test_a_refused_connect_fails_with_its_reason_code(tmp_path: Path) -> None:
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\n")
    with Process([str(_mosquitto()), "-c", str(conf)], name="mosquitto", port=port) as mosquitto:
        mosquitto.wait_port(timeout=10)
        locust(
            tmp_path,
            f"mqtt://127.0.0.1:{port}",
            "--scenario",
            "connect-storm",
            "--exit-code-on-error",
            "0",
            users=5,
            seconds=2,
        )
    with open(tmp_path / "run_failures.csv") as handle:
        failures = {
            (r["Method"], r["Error"]): int(r["Occurrences"]) for r in csv.DictReader(handle)
        }
    # MQTT 5.0: 0x87 Not authorized (3.2.2.2); each user tried once a second.
    assert set(failures) == {("CONNECT", "MqttError('CONNACK 0x87')")}, failures
    assert failures[("CONNECT", "MqttError('CONNACK 0x87')")] >= 5


def test_retained_heavy_subscribe(tmp_path: Path, broker: BrokerProcess) -> None:
    rows, summary, _ = locust(
        tmp_path,
        f"mqtt://127.0.0.1:{broker.port}",
        "--scenario",
        "retained",
        "--retained",
        "300",
        "--interval",
        "0.5",
        users=10,
    )
    assert_clean(rows, summary)
    rounds = int(rows[("RETAINED", "all")]["Request Count"])
    assert rounds >= 9  # every subscriber got all 300 at least once
    assert count(rows, "RECV") >= rounds * 300


def test_cross_broker_traffic_goes_through_the_cluster(tmp_path: Path) -> None:
    with RedisProcess() as redis:
        cluster = [
            BrokerProcess("--redis", redis.url, "--id", f"b{i}", "--presence-ttl", "2")
            for i in (1, 2)
        ]
        with cluster[0], cluster[1]:
            deadline = time.monotonic() + 10
            while any(b.metric("mcloudtt_cluster_peers") < 1 for b in cluster):
                assert time.monotonic() < deadline, "the brokers never saw each other"
                time.sleep(0.1)
            hosts = ",".join(f"mqtt://127.0.0.1:{b.port}" for b in cluster)
            rows, summary, _ = locust(
                tmp_path,
                f"mqtt://127.0.0.1:{cluster[0].port}",
                "--scenario",
                "cross-broker",
                "--hosts",
                hosts,
                "--qos",
                "1",
                "--consumers",
                "1",
                "--interval",
                "0.2",
                seconds=4,
            )
            published_on = [b.metric("mcloudtt_messages_received_total", qos="1") for b in cluster]
            delivered_by = [b.metric("mcloudtt_messages_sent_total", qos="1") for b in cluster]
    assert_clean(rows, summary)
    # The one consumer is on the first broker; the devices alternate, half on the second. What
    # the consumer got from devices on the second went through Redis.
    assert published_on[1] > 20 and delivered_by[1] == 0
    # (the broker may send a few more while the consumer is stopping)
    assert delivered_by[0] >= count(rows, "RECV") > published_on[0]


def test_users_reconnect_and_resubscribe_after_a_broker_restart(tmp_path: Path) -> None:
    with BrokerProcess() as b:
        cmd = locust_command(
            tmp_path,
            f"mqtt://127.0.0.1:{b.port}",
            "--interval",
            "0.1",
            "--exit-code-on-error",
            "0",
            seconds=6,
        )
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
        )
        time.sleep(2.5)
        b.stop()
        time.sleep(0.5)
        b.start()  # the same port
        output, _ = proc.communicate(timeout=60)
    rows, summary, _ = results(tmp_path, proc.returncode, output)
    c = summary["counters"]
    assert c["dropped_connections"] == 20  # every user saw its connection go
    assert (
        int(rows[("CONNECT", "device")]["Request Count"])
        - int(rows[("CONNECT", "device")]["Failure Count"])
        >= 2 * 18
    )  # and connected again
    assert int(rows[("SUBSCRIBE", "telemetry/+")]["Request Count"]) == 4  # consumers resubscribed
    # Messages flowed again after the restart: more than the 2.5 s before it could carry.
    assert c["received"] > 2 * 18 * 10 * 2.5


def test_saturation_shape_finds_the_highest_step_that_held(
    tmp_path: Path, broker: BrokerProcess
) -> None:
    out = tmp_path / "saturation.json"
    _, summary, output = locust(
        tmp_path,
        f"mqtt://127.0.0.1:{broker.port}",
        "--interval",
        "0.05",
        "--sat-step-users",
        "10",
        "--sat-step-time",
        "2",
        "--sat-max-users",
        "30",
        "--sat-p99-ms",
        "1000",
        "--sat-out",
        str(out),
        files=f"{LOCUSTFILE},{SATURATION}",
    )
    result = json.loads(out.read_text())
    steps = result["steps"]
    assert [s["users"] for s in steps] == [10, 20, 30]
    assert all(s["held"] for s in steps)
    # 10 users, of which 2 consumers: 8 devices at 20 msg/s each, received by both consumers.
    assert result["highest_held"]["users"] == 30
    assert result["highest_held"]["received_per_s"] > steps[0]["received_per_s"]
    assert "SATURATION: highest sustained rate" in output
    assert summary["counters"]["lost"] == 0


def test_saturation_shape_stops_at_the_latency_bound(tmp_path: Path, broker: BrokerProcess) -> None:
    out = tmp_path / "saturation.json"
    locust(
        tmp_path,
        f"mqtt://127.0.0.1:{broker.port}",
        "--interval",
        "0.05",
        "--sat-step-users",
        "10",
        "--sat-step-time",
        "2",
        "--sat-p99-ms",
        "-1",  # no step can hold: the first one fails and nothing is reported as held
        "--sat-out",
        str(out),
        files=f"{LOCUSTFILE},{SATURATION}",
    )
    result = json.loads(out.read_text())
    assert result["highest_held"] is None
    assert "p99" in result["first_failed"]["why_not"]
    assert len(result["steps"]) == 1


def test_two_local_workers_sum_their_counters(tmp_path: Path, broker: BrokerProcess) -> None:
    rows, summary, _ = locust(
        tmp_path,
        f"mqtt://127.0.0.1:{broker.port}",
        "--processes",
        "2",
        "--interval",
        "0.2",
        seconds=4,
    )
    assert_clean(rows, summary)
    # The master's PUBLISH count comes from both workers' stats; the MQTT counters from both
    # workers' reports: they agree only when both were summed.
    published = count(rows, "PUBLISH")
    assert published > 20
    assert summary["counters"]["published"] == published
    assert summary["counters"]["received"] == count(rows, "RECV")
    assert summary["counters"]["connects"] == 20
    assert summary["workers"] == 2


DETECTOR = """
import json, sys
sys.path.insert(0, sys.argv[1])
from locustfile import SequenceTracker
t = SequenceTracker(grace=1.0)
out = {}
out["in_order"] = [t.seen(b"p", s, 0.0) for s in (5, 6, 7)]
out["gap"] = t.seen(b"p", 9, 10.0)  # 8 dropped
out["early"] = t.expire(10.5)
out["late"] = [list(k) for k in t.expire(11.0)]
out["dup"] = t.seen(b"p", 9, 11.0)
t.seen(b"q", 1, 0.0); t.seen(b"q", 3, 0.0)
out["reordered"] = t.seen(b"q", 2, 0.5)
t.seen(b"q", 5, 0.0)
out["flushed"] = [list(k) for k in t.flush()]
json.dump(out, sys.stdout, default=lambda b: b.decode())
"""


def test_the_loss_detector_sees_a_dropped_message() -> None:
    done = subprocess.run(
        [sys.executable, "-c", DETECTOR, str(LOCUSTFILE.parent)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out = json.loads(done.stdout)
    assert out["in_order"] == ["ok", "ok", "ok"]
    assert out["gap"] == "ok"
    assert out["early"] == []  # within the grace period it may still come
    assert out["late"] == [["p", 8]]
    assert out["dup"] == "duplicate"
    assert out["reordered"] == "reordered"
    assert out["flushed"] == [["q", 4]]


def test_a_dropped_message_is_a_failure_in_the_reports(
    tmp_path: Path, broker: BrokerProcess
) -> None:
    # The devices skip every 5th sequence number: to each consumer that is one message lost
    # (a RECV failure), whatever the broker does.
    rows, summary, _ = locust(
        tmp_path,
        f"mqtt://127.0.0.1:{broker.port}",
        "--skip-every",
        "5",
        "--interval",
        "0.1",
        "--exit-code-on-error",
        "0",
    )
    lost = summary["counters"]["lost"]
    received = summary["counters"]["received"]
    assert int(rows[("RECV", "telemetry/+")]["Failure Count"]) == lost
    # Two consumers see every device's gaps: about one per four delivered.
    assert received / 4 * 0.7 < lost <= received / 4 + 2 * 18
    assert summary["counters"]["duplicates"] == 0
    with open(tmp_path / "run_failures.csv") as handle:
        errors = {r["Error"] for r in csv.DictReader(handle)}
    assert errors and all(e.startswith("MessageLost('publisher ") for e in errors), errors


def test_the_component_carries_the_same_locustfiles() -> None:
    # kustomize's load restrictor keeps the ConfigMap's files inside the component: copies.
    for name in ("locustfile.py", "saturation.py"):
        assert (COMPONENT / name).read_bytes() == (ROOT / "loadtest" / name).read_bytes(), (
            f"kind/components/locust/{name} differs: cp loadtest/{name} kind/components/locust/"
        )
