"""Fixtures for the adapter tests: brokers, adapter processes, the BigQuery emulator."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from brokerproc import BrokerProcess, broker_pool

from .helpers import AdapterProcess, BigQueryEmulator, Publisher, install_bqemulator


@pytest.fixture
def mqtt_broker() -> Iterator[Callable[..., BrokerProcess]]:
    """`mqtt_broker("--max-queued-messages", "5000")`: a real mcloudtt-broker (quiet logs)."""
    with broker_pool("--log-level", "warning", "--sys-interval", "0") as start:
        yield start


@pytest.fixture
def adapter_process() -> Iterator[Callable[..., AdapterProcess]]:
    """`adapter_process("--mqtt", "127.0.0.1:1883", "--duckdb", path)`: started and ready."""
    made: list[AdapterProcess] = []

    def start(*args: str, ready: bool = True, env: dict[str, str] | None = None) -> AdapterProcess:
        a = AdapterProcess(*args, env=env)
        made.append(a)
        return a.start(ready=ready)

    yield start
    for a in made:
        a.close()


@pytest.fixture
def publisher() -> Iterator[Callable[..., Publisher]]:
    made: list[Publisher] = []

    def make(port: int, client_id: str = "", version: int = 5) -> Publisher:
        p = Publisher(port, client_id, version)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture(scope="session")
def bigquery_emulator() -> Iterator[BigQueryEmulator]:
    """bqemulator 1.4.0 in its own venv (installed once into the cache), on free ports."""
    try:
        exe, home = install_bqemulator()
    except Exception as error:  # no registry, no uv, no wheel for this platform
        pytest.skip(f"the BigQuery emulator could not be installed: {error}")
    emulator = BigQueryEmulator(exe, home).start()
    yield emulator
    emulator.stop()
