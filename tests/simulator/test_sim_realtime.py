"""Real time: simulated devices over real MQTT connections, checked by the verifying subscriber.

The broker is `mcloudtt-broker` (`sim_brokers`; MCLOUDTT_TEST_TARGET=mosquitto runs the same
tests on Mosquitto), plus one run against a reference Mosquitto.
The machine is shared and noisy, so latency is checked for presence and sanity, not for speed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from brokerproc import BrokerProcess
from mcloudtt_simulator.cli import main
from mcloudtt_simulator.realtime import RunConfig, run


def check_clean(r: dict[str, Any]) -> None:
    assert r["sent"] > 0
    assert r["lost_by_qos"]["1"] == 0 and r["lost_by_qos"]["2"] == 0, r
    assert r["delivered"] == r["sent"] - r["lost"]
    assert r["malformed"] == 0
    assert 0 < r["latency_p50_ms"] <= r["latency_p99_ms"] <= r["latency_max_ms"] < 30_000


def test_steady_fleet_qos1_qos2_no_loss(
    sim_brokers: Callable[[], BrokerProcess],
    steady_scenario: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """300 devices (QoS 1 telemetry every ~second, QoS 2 alarm bursts), 3 s, through the CLI."""
    broker = sim_brokers()
    code = main(
        [
            "run",
            "--scenario",
            str(steady_scenario),
            "--devices",
            "300",
            "--seconds",
            "3",
            "--broker",
            f"127.0.0.1:{broker.port}",
            "--json",
            "--fail-on-loss",
        ]
    )
    r = json.loads(capsys.readouterr().out)
    assert code == 0
    check_clean(r)
    assert r["lost"] == 0 and r["duplicates"] == 0 and r["reordered"] == 0
    assert r["published_by_model"] == r["sent"] and r["unsent"] == 0
    assert r["sent_by_qos"]["1"] > 400 and r["sent_by_qos"]["2"] > 30
    assert r["connects"] == 300 and r["connect_failures"] == 0


def test_churning_fleet_on_two_brokers_two_processes(
    sim_brokers: Callable[[], BrokerProcess],
) -> None:
    """The smart-building fleet at 60x (sessions end, devices drop silently, wills fire,
    reconnects resend unacknowledged QoS 1), spread over two brokers by two worker processes;
    one verifier per broker checks its own devices."""
    brokers = [sim_brokers(), sim_brokers()]
    r = run(
        RunConfig(
            scenario="smart-building",
            devices=400,
            seconds=4,
            speedup=60,
            qos=1,
            processes=2,
            brokers=[("127.0.0.1", b.port) for b in brokers],
            verify="local",
            ramp=1.0,
        )
    )
    check_clean(r)
    assert r["processes"] == 2 and len(r["brokers"]) == 2
    assert r["connects"] >= 390 and r["disconnects"] + r["drops"] > 0


def test_outage_against_reference_mosquitto(mosquitto: int) -> None:
    """The vehicle fleet at 20x with a Berlin outage in the middle, against Mosquitto: checks the
    simulator itself on a reference broker (MQTT 5 this time)."""
    r = run(
        RunConfig(
            scenario="vehicle-fleet",
            devices=300,
            seconds=4,
            speedup=20,
            qos=1,
            protocol=5,
            brokers=[("127.0.0.1", mosquitto)],
            outages=[("berlin", 30.0, 30.0)],
            ramp=1.0,
        )
    )
    check_clean(r)
    assert r["drops"] >= 60  # Berlin holds 30 % of the fleet
    assert r["protocol"] == "5.0"
