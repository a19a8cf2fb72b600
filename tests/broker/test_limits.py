"""Limits over TCP with real clients: each refused or slowed as documented, and counted."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from brokerproc import BrokerProcess, free_port

from .clients import mcloudtt_only, wait_until
from .mqttraw import MQTT_311, RawClient, disconnect_codes

pytestmark = mcloudtt_only

Factory = Callable[..., BrokerProcess]


def limited(b: BrokerProcess, limit: str) -> float:
    return b.metric("mcloudtt_limited_total", limit=limit)


def test_max_connections_refuses_with_quota_exceeded(broker_factory: Factory, paho, uid) -> None:
    b = broker_factory("--max-connections", "2")
    first = paho(b.port, f"{uid}-1")
    paho(b.port, f"{uid}-2")
    refused = paho(b.port, f"{uid}-3")
    assert refused.reason == 0x97  # Quota exceeded
    with RawClient(b.port, version=MQTT_311) as raw:
        assert raw.connect(f"{uid}-4", version=MQTT_311).code == 0x03  # Server unavailable
    assert limited(b, "connections") == 2
    refused.stop()  # (paho would retry)
    # The refused ones were closed; one leaving makes room.
    first.stop()
    wait_until(lambda: b.metric("mcloudtt_connections") == 1)
    assert paho(b.port, f"{uid}-5").reason == 0


def test_max_listener_connections_counts_each_listener(broker_factory: Factory, paho, uid) -> None:
    other = free_port()
    b = broker_factory("--bind", f"127.0.0.1:{other}", "--max-listener-connections", "1")
    time.sleep(0.5)  # the start-up probe's connection to b.port has been seen closed
    assert paho(b.port, f"{uid}-a").reason == 0
    assert paho(other, f"{uid}-b").reason == 0  # the other listener has its own count
    assert paho(b.port, f"{uid}-c").reason == 0x97
    assert limited(b, "listener_connections") == 1
    assert limited(b, "connections") == 0


def test_connect_rate_per_source_address(broker_factory: Factory, paho, uid) -> None:
    b = broker_factory("--connect-rate", "0.5", "--connect-burst", "2")
    clients = [paho(b.port, f"{uid}-{i}") for i in range(3)]
    clients[2].stop()  # (paho would retry, spending the tokens)
    assert [c.reason for c in clients] == [0, 0, 0x97]
    assert limited(b, "connect_rate") == 1
    time.sleep(2.1)  # one token back
    again = paho(b.port, f"{uid}-again")
    assert again.reason == 0, limited(b, "connect_rate")


@pytest.mark.parametrize(
    ("option", "value", "limit", "count", "size", "least_seconds"),
    [
        ("--publish-rate", "100", "publish_rate", 300, 10, 1.5),
        ("--bandwidth", "20000", "bandwidth", 60, 1000, 1.5),
    ],
)
def test_a_fast_publisher_is_slowed_not_dropped(
    broker_factory: Factory,
    paho,
    uid,
    option: str,
    value: str,
    limit: str,
    count: int,
    size: int,
    least_seconds: float,
) -> None:
    b = broker_factory(option, value)
    sub = paho(b.port, f"{uid}-sub")
    sub.subscribe(f"{uid}/t", qos=1)
    pub = paho(b.port, f"{uid}-pub")
    started = time.monotonic()
    infos = [pub.publish(f"{uid}/t", bytes(size), qos=1, wait=False) for _ in range(count)]
    got = sub.get_n(count, timeout=20)
    elapsed = time.monotonic() - started
    for info in infos:
        info.wait_for_publish(5)
    assert len(got) == count  # nothing lost
    # One second's burst, then the rate: (count - rate) / rate seconds at least.
    assert elapsed >= least_seconds, elapsed
    assert limited(b, limit) > 0
    assert pub.c.is_connected()


def test_max_subscriptions(broker_factory: Factory, paho, uid) -> None:
    b = broker_factory("--max-subscriptions", "2")
    for version, refused in ((5, 0x97), (4, 0x80)):
        c = paho(b.port, f"{uid}-{version}", version=version)
        assert c.subscribe(f"{uid}/a") == [0]
        assert c.subscribe(f"{uid}/b", qos=1) == [1]
        assert c.subscribe(f"{uid}/c") == [refused]
        assert c.subscribe(f"{uid}/a", qos=1) == [1]  # replacing one is not one more
        c.unsubscribe(f"{uid}/b")
        assert c.subscribe(f"{uid}/c") == [0]
    assert limited(b, "subscriptions") == 2


def test_topic_length_and_levels(broker_factory: Factory, paho, uid) -> None:
    b = broker_factory("--max-topic-length", "40", "--max-topic-levels", "3")
    long_topic = f"{uid}/" + "x" * 40
    deep_topic = f"{uid}/a/b/c"
    c5 = paho(b.port, f"{uid}-5")
    assert c5.subscribe(long_topic) == [0x8F]  # Topic Filter invalid
    assert c5.subscribe(deep_topic) == [0x8F]
    assert c5.subscribe(f"{uid}/a/#") == [0]
    c4 = paho(b.port, f"{uid}-4", version=4)
    assert c4.subscribe(deep_topic) == [0x80]
    for topic, limit in ((long_topic, "topic_length"), (deep_topic, "topic_levels")):
        with RawClient(b.port) as raw:
            raw.connect(f"{uid}-raw5")
            raw.publish(topic, b"x")
            assert disconnect_codes(raw.closed()) == [0x90]  # Topic Name invalid
        with RawClient(b.port, version=MQTT_311) as raw:
            raw.connect(f"{uid}-raw4", version=MQTT_311)
            raw.publish(topic, b"x")
            assert raw.closed() == []  # 3.1.1 closes without a word
        assert limited(b, limit) >= 2
    assert limited(b, "topic_length") == 3
    assert limited(b, "topic_levels") == 4
