"""Fixtures for the simulator tests: a reference Mosquitto and a small steady scenario.

The real-time tests run against `mcloudtt-broker` started by the shared `BrokerProcess` helper
(`MCLOUDTT_TEST_TARGET=mosquitto` swaps in Mosquitto everywhere); one test also runs against a
Mosquitto started here, as a check of the simulator itself against a reference broker.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from brokerproc import BrokerProcess, free_port, wait_for_port

DATA = Path(__file__).parent / "data"


def _mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


@pytest.fixture
def mosquitto() -> Iterator[int]:
    """A Mosquitto on a free port (its port); skipped where Mosquitto is not installed."""
    binary = _mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        # max_queued_messages 0: no silent drop of QoS 1 for a slow subscriber (anchors.md)
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 0\nset_tcp_nodelay true\n"
        )
        proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        try:
            wait_for_port(port, proc=proc)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def sim_brokers() -> Iterator[Callable[[], BrokerProcess]]:
    """Start brokers on free ports; each is stopped, and its output pipe closed, afterwards."""
    started: list[BrokerProcess] = []

    def start() -> BrokerProcess:
        b = BrokerProcess().start()
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()
        if b.proc is not None and b.proc.stdout is not None:
            b.proc.stdout.close()


@pytest.fixture
def steady_scenario() -> Path:
    return DATA / "steady.toml"
