"""Fixtures for the simulator tests: a reference Mosquitto and a small steady scenario.

The real-time tests run against `mcloudtt-broker` started by the shared `BrokerProcess` helper
(`MCLOUDTT_TEST_TARGET=mosquitto` swaps in Mosquitto everywhere); one test also runs against a
Mosquitto started here, as a check of the simulator itself against a reference broker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from brokerproc import BrokerProcess, broker_pool, free_port
from mcloudtt_chaos.procs import NotInstalled, Process, mosquitto_binary, mosquitto_config

DATA = Path(__file__).parent / "data"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[int]:
    """A Mosquitto on a free port (its port); skipped where Mosquitto is not installed."""
    try:
        binary = mosquitto_binary()
    except NotInstalled:
        pytest.skip("mosquitto is not installed")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    # max_queued_messages 0: no silent drop of QoS 1 for a slow subscriber (anchors.md)
    conf.write_text(mosquitto_config(port, "set_tcp_nodelay true"))
    with Process([binary, "-c", str(conf)], name="mosquitto", port=port) as proc:
        proc.wait_port(timeout=10)
        yield port


@pytest.fixture
def sim_brokers() -> Iterator[Callable[[], BrokerProcess]]:
    """Start brokers on free ports; each is stopped afterwards."""
    with broker_pool() as start:
        yield start


@pytest.fixture
def steady_scenario() -> Path:
    return DATA / "steady.toml"
