"""Fixtures for the black-box broker tests: shared and fresh brokers, tracked clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from brokerproc import TARGET, BrokerProcess

from .clients import PahoClient


def _start(*args: str, env: dict[str, str] | None = None) -> BrokerProcess:
    return BrokerProcess(*args, env=env).start()


def _stop(b: BrokerProcess) -> int:
    return b.stop()


@pytest.fixture
def broker() -> Iterator[BrokerProcess]:
    """A fresh broker with default options on free ports."""
    b = _start()
    yield b
    _stop(b)


@pytest.fixture
def broker_factory() -> Iterator[Callable[..., BrokerProcess]]:
    """`broker_factory("--max-keepalive", "10")`; skips under Mosquitto when given options."""
    started: list[BrokerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> BrokerProcess:
        if TARGET == "mosquitto" and (args or env):
            pytest.skip("option specific to mcloudtt-broker")
        b = _start(*args, env=env)
        started.append(b)
        return b

    yield start
    for b in started:
        _stop(b)


@pytest.fixture(scope="session")
def _shared_brokers() -> Iterator[dict[tuple[str, ...], BrokerProcess]]:
    started: dict[tuple[str, ...], BrokerProcess] = {}
    yield started
    for b in started.values():
        _stop(b)


def _alive(b: BrokerProcess) -> bool:
    return b.proc is not None and b.proc.poll() is None


@pytest.fixture
def shared_broker(
    _shared_brokers: dict[tuple[str, ...], BrokerProcess],
) -> Iterator[Callable[..., BrokerProcess]]:
    """`shared_broker("--max-keepalive", "1")`: one broker per option set, shared by the session.

    Starting a broker costs more than most tests; tests that only need some options set (and
    keep to their own `uid` topics and ids) share one. A test that needs counters nobody else
    touches can ask for an option set of its own (`shared_broker("--id", "mine")`).
    Skips under Mosquitto when given options. A test after which the broker is dead fails
    itself, and the next test gets a new broker.
    """
    used: list[BrokerProcess] = []

    def get(*args: str) -> BrokerProcess:
        if TARGET == "mosquitto" and args:
            pytest.skip("option specific to mcloudtt-broker")
        b = _shared_brokers.get(args)
        if b is None or not _alive(b):
            b = _shared_brokers[args] = _start(*args)
        used.append(b)
        return b

    yield get
    for b in used:
        assert _alive(b), "broker died during this test"


@pytest.fixture
def mq(shared_broker: Callable[..., BrokerProcess]) -> BrokerProcess:
    """The session's shared broker with default options (use `uid` to keep tests apart)."""
    return shared_broker()


@pytest.fixture
def paho() -> Iterator[Callable[..., PahoClient]]:
    """`paho(port, client_id, version=5, ...)`: a connected paho client stopped at teardown."""
    made: list[PahoClient] = []

    def make(port: int, client_id: str = "", **kw: Any) -> PahoClient:
        c = PahoClient(port, client_id, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()
