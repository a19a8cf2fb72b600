"""Issue 16 across two brokers and a real redis-server: a takeover hands on only a session meant
to last, the will rules hold, and MQTT 3.1 clients cross the cluster like any other."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from broker.clients import PahoClient
from broker.mqttraw import WILL_DELAY, Will
from broker.takeovers import TAKEOVER_FIELDS, TAKEOVERS, session_kw
from brokerproc import BrokerProcess
from redisproc import RedisProcess

from .conftest import start_broker, wait_ready


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[BrokerProcess, BrokerProcess]]:
    """Two brokers on one redis-server, shared by this module's tests (each uses its own ids)."""
    server = RedisProcess().start()
    brokers = [start_broker(server.url, f"tk{i}") for i in (1, 2)]
    try:
        wait_ready(brokers)
        yield brokers[0], brokers[1]
    finally:
        for b in brokers:
            b.stop()
        server.close()


@pytest.mark.parametrize(TAKEOVER_FIELDS, TAKEOVERS)
def test_takeover_across_brokers_hands_on_only_a_lasting_session(
    pair, raw, uid, version, old_clean, old_exp, new_clean, new_exp, present
):
    a, b = pair
    old = raw(a.port, version=version)
    assert old.connect(uid, version=version, **session_kw(version, old_clean, old_exp)).code == 0
    old.subscribe((f"{uid}/s", 1))
    new = raw(b.port, version=version)
    ack = new.connect(uid, version=version, **session_kw(version, new_clean, new_exp))
    assert ack.code == 0
    assert ack.session_present == present  # the hand-over carried no session meant to end
    got = old.closed()
    if version == 5:
        assert [(p.type, p.code) for p in got] == [(14, 0x8E)]  # Session taken over
    new.subscribe((f"{uid}/m", 1))
    pub = raw(b.port, version=4)
    pub.connect(uid + "p", version=4)
    pub.publish(f"{uid}/s", b"after takeover", qos=1)
    pub.publish(f"{uid}/m", b"marker", qos=1)
    assert [p.payload for p in new.until(f"{uid}/m")] == ([b"after takeover"] if present else [])


@pytest.mark.parametrize("version", [4, 5])
def test_paho_clean_session_taken_over_on_another_broker(pair, uid, version):
    a, b = pair
    expiry: dict[str, Any] = {"session_expiry": 60} if version == 5 else {}
    old = PahoClient(a.port, uid, version=version, clean=True)
    new = None
    try:
        assert old.subscribe(f"{uid}/s", 1) == [1]
        new = PahoClient(b.port, uid, version=version, clean=False, **expiry)
        assert not new.session_present
        assert old.disconnected.wait(5)
    finally:
        old.stop()
        if new is not None:
            new.stop()


@pytest.mark.parametrize(
    ("version", "expiry", "delay", "published"),
    [
        pytest.param(5, 0, 30, True, id="5-delay-session-ends-published"),
        pytest.param(5, 60, 30, False, id="5-delay-session-continues-not-published"),
        pytest.param(4, 0, 0, True, id="311-published"),
        pytest.param(3, 0, 0, True, id="31-published"),
    ],
)
def test_will_on_takeover_across_brokers(pair, raw, uid, version, expiry, delay, published):
    a, b = pair
    watcher = raw(a.port)
    watcher.connect(uid + "w")
    watcher.subscribe((f"{uid}/will", 1), (f"{uid}/m", 1))
    will = Will(f"{uid}/will", b"gone", qos=1, props=[(WILL_DELAY, delay)] if delay else None)
    old = raw(a.port, version=version)
    old.connect(uid, version=version, will=will, **session_kw(version, False, expiry))
    new = raw(b.port, version=version)
    assert new.connect(uid, version=version, **session_kw(version, False, expiry)).code == 0
    old.closed()
    watcher.publish(f"{uid}/m", b"marker", qos=1)  # a has given the session up by now
    assert [p.payload for p in watcher.until(f"{uid}/m")] == ([b"gone"] if published else [])


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mqtt31_clients_across_brokers(pair, raw, uid, qos):
    a, b = pair
    sub = raw(a.port, version=3)
    sub.connect(uid, version=3, clean=False)
    sub.subscribe((f"{uid}/x", qos), (f"{uid}/probe", 0))
    pub = raw(b.port, version=3)
    pub.connect(uid + "p", version=3)
    # b routes to a once it has learnt a's filters: probe until a probe arrives (a count of b's
    # remote filters races with earlier tests' filters going away).
    deadline = time.monotonic() + 5
    while True:
        pub.publish(f"{uid}/probe", b"probe", qos=0)
        try:
            sub.next_publish(timeout=0.1)
            break
        except (TimeoutError, AssertionError, OSError):
            assert time.monotonic() < deadline, "b never routed to a's 3.1 subscription"
    sub.unsubscribe(f"{uid}/probe")
    pub.publish(f"{uid}/x", b"3.1 across", qos=qos)
    got = sub.next_publish()
    while got.topic == f"{uid}/probe":  # probes still in flight when the first one arrived
        got = sub.next_publish()
    assert (got.payload, got.qos) == (b"3.1 across", qos)
    # The 3.1 session moves to b like any other (3.1 has no session-present flag to say so).
    moved = raw(b.port, version=3)
    ack = moved.connect(uid, version=3, clean=False)
    assert (ack.code, ack.body[0]) == (0, 0)
    sub.closed()
    other = raw(a.port, version=3)
    other.connect(uid + "o", version=3)
    # a gave the session up and routes its filters to b from then on (the hand-over).
    other.publish(f"{uid}/x", b"after the move", qos=1)
    assert moved.next_publish().payload == b"after the move"
