"""Everything that depends on time, in virtual time: session expiry, wills, message expiry,
keepalive. The clock moves only in `cluster.advance`, which ticks every core as the shell does.
"""

from __future__ import annotations

import pytest
from broker.mqttraw import (
    DISCONNECT,
    MESSAGE_EXPIRY,
    PINGRESP,
    SERVER_KEEP_ALIVE,
    SESSION_EXPIRY,
    WILL_DELAY,
    Will,
)

from .harness import Client, Cluster


def _offline_subscriber(cluster: Cluster, core: str, expiry: int, topic: str = "t") -> None:
    sub = cluster.client(core)
    sub.connect("sub", clean=False, props=[(SESSION_EXPIRY, expiry)])
    sub.subscribe((topic, 1))
    sub.disconnect()


def _publisher(cluster: Cluster, core: str = "a") -> Client:
    pub = cluster.client(core)
    pub.connect("pub")
    return pub


def _watcher(cluster: Cluster, core: str, topic: str = "will/#") -> Client:
    watcher = cluster.client(core)
    watcher.connect(f"watcher-{core}")
    watcher.subscribe((topic, 1))
    return watcher


# ------------------------------------------------------------------ session expiry


def test_session_outlives_its_connection_for_the_expiry_interval() -> None:
    cluster = Cluster(("a", "b"))
    _offline_subscriber(cluster, "b", expiry=10)
    pub = _publisher(cluster)
    cluster.advance(1)
    pub.publish("t", b"queued", qos=1)  # routed to b, queued in the offline session
    cluster.advance(8.5)

    again = cluster.client("b")
    assert again.connect("sub", clean=False, props=[(SESSION_EXPIRY, 10)]).session_present
    assert again.payloads() == [b"queued"]


def test_session_ends_when_the_expiry_interval_has_passed() -> None:
    cluster = Cluster(("a", "b"))
    _offline_subscriber(cluster, "b", expiry=10)
    cluster.advance(9.75)
    assert "sub" in cluster.cores["b"].sessions
    assert cluster.cores["a"].peers["b"].filters == {"t"}
    cluster.advance(0.25)  # MQTT-3.1.2-23: kept for exactly the interval
    assert "sub" not in cluster.cores["b"].sessions
    # The ended session's subscription left the cluster table: a stops forwarding to b.
    assert cluster.cores["a"].peers["b"].filters == set()
    _publisher(cluster).publish("t", b"lost", qos=1)
    assert cluster.hub.stats["forwarded"] == 0

    again = cluster.client("b")
    assert not again.connect("sub", clean=False).session_present
    assert again.publishes() == []


def test_session_expiry_zero_ends_with_the_connection() -> None:
    cluster = Cluster(("a",))
    sub = cluster.client("a")
    sub.connect("sub", clean=False)  # no Session Expiry Interval: 0 (MQTT 5.0 3.1.2.11.2)
    sub.subscribe("t")
    sub.drop()
    assert "sub" not in cluster.cores["a"].sessions


def test_disconnect_can_extend_the_session_expiry() -> None:
    cluster = Cluster(("a",))
    sub = cluster.client("a")
    sub.connect("sub", clean=False, props=[(SESSION_EXPIRY, 5)])
    sub.disconnect(props=[(SESSION_EXPIRY, 100)])  # MQTT 5.0 3.14.2.2.2
    cluster.advance(50, step=1)
    assert cluster.client("a").connect("sub", clean=False).session_present


def test_server_caps_the_session_expiry_interval() -> None:
    cluster = Cluster(("a",), max_session_expiry=60)
    sub = cluster.client("a")
    ack = sub.connect("sub", clean=False, props=[(SESSION_EXPIRY, 3600)])
    assert ack.prop(SESSION_EXPIRY) == 60  # the server's value, told in CONNACK
    sub.drop()
    cluster.advance(59.5, step=0.5)
    assert "sub" in cluster.cores["a"].sessions
    cluster.advance(0.5)
    assert "sub" not in cluster.cores["a"].sessions


def test_mqtt311_persistent_session_lasts_up_to_the_maximum_session_expiry() -> None:
    cluster = Cluster(("a", "b"), max_session_expiry=3600)
    sub = cluster.client("b", version=4)
    sub.connect("old", clean=False)
    sub.subscribe(("t", 1))
    sub.drop()
    pub = _publisher(cluster)
    pub.publish("t", b"kept", qos=1)
    cluster.advance(3599, step=1)

    again = cluster.client("b", version=4)
    assert again.connect("old", clean=False).session_present
    assert again.payloads() == [b"kept"]
    again.drop()
    cluster.advance(3600, step=1)
    assert "old" not in cluster.cores["b"].sessions
    assert not cluster.client("b", version=4).connect("old", clean=False).session_present


def test_mqtt311_clean_session_is_not_kept() -> None:
    cluster = Cluster(("a",))
    sub = cluster.client("a", version=4)
    sub.connect("old", clean=True)
    sub.subscribe("t")
    sub.drop()
    assert "old" not in cluster.cores["a"].sessions


# ------------------------------------------------------------------ wills


def _will_client(cluster: Cluster, core: str, *, delay: int, expiry: int = 300) -> Client:
    client = cluster.client(core)
    client.connect(
        "dying",
        clean=False,
        props=[(SESSION_EXPIRY, expiry)],
        will=Will("will/dying", b"gone", qos=1, props=[(WILL_DELAY, delay)]),
    )
    return client


def test_will_is_published_after_the_will_delay() -> None:
    cluster = Cluster(("a", "b"))
    watcher = _watcher(cluster, "b")
    _will_client(cluster, "a", delay=5).drop()
    cluster.advance(4.75)
    assert watcher.publishes() == []
    cluster.advance(0.25)  # MQTT 5.0 3.1.3.2.2: once the Will Delay Interval has passed
    [will] = watcher.publishes()
    assert (will.topic, will.payload, will.qos) == ("will/dying", b"gone", 1)
    assert will.prop(WILL_DELAY) is None  # not a PUBLISH property


def test_will_without_delay_is_published_when_the_connection_drops() -> None:
    cluster = Cluster(("a", "b"))
    watcher = _watcher(cluster, "b")
    _will_client(cluster, "a", delay=0).drop()
    assert watcher.payloads() == [b"gone"]


@pytest.mark.parametrize("core", ["a", "b"])
def test_no_will_when_the_client_reconnects_within_the_delay(core: str) -> None:
    cluster = Cluster(("a", "b"))
    watcher = _watcher(cluster, "b")
    _will_client(cluster, "a", delay=5).drop()
    cluster.advance(3)
    # Back on the same core or on another one (the session is handed over).
    assert cluster.client(core).connect("dying", clean=False).session_present
    cluster.advance(30, step=1)
    assert watcher.publishes() == []  # MQTT-3.1.3-9


def test_will_is_published_when_the_session_ends_before_the_delay() -> None:
    cluster = Cluster(("a", "b"))
    watcher = _watcher(cluster, "b")
    _will_client(cluster, "a", delay=60, expiry=5).drop()
    cluster.advance(4.75)
    assert watcher.publishes() == []
    cluster.advance(0.25)  # MQTT 5.0 3.1.3.2.2: at the earlier of delay and session end
    assert watcher.payloads() == [b"gone"]
    cluster.advance(120, step=1)
    assert watcher.publishes() == []  # and only once


def test_normal_disconnect_discards_the_will_and_0x04_keeps_it() -> None:
    cluster = Cluster(("a", "b"))
    watcher = _watcher(cluster, "b")
    _will_client(cluster, "a", delay=0).disconnect()  # MQTT-3.1.2-10
    assert watcher.publishes() == []
    _will_client(cluster, "a", delay=0).disconnect(0x04)  # Disconnect with Will Message
    assert watcher.payloads() == [b"gone"]


def test_retained_will_reaches_a_later_subscriber_on_another_core() -> None:
    cluster = Cluster(("a", "b"))
    client = cluster.client("a")
    client.connect("lwt", will=Will("will/lwt", b"offline", retain=True))
    client.drop()
    late = cluster.client("b")
    late.connect("late")
    late.subscribe("will/#")
    assert [(p.payload, p.retain) for p in late.publishes()] == [(b"offline", True)]


# ------------------------------------------------------------------ message expiry


def test_queued_message_is_dropped_after_its_expiry() -> None:
    cluster = Cluster(("a", "b"))
    _offline_subscriber(cluster, "b", expiry=300)
    pub = _publisher(cluster)
    pub.publish("t", b"short", qos=1, props=[(MESSAGE_EXPIRY, 5)])
    pub.publish("t", b"long", qos=1, props=[(MESSAGE_EXPIRY, 60)])
    pub.publish("t", b"forever", qos=1)
    cluster.advance(6)

    again = cluster.client("b")
    assert again.connect("sub", clean=False).session_present
    got = again.publishes()
    assert [p.payload for p in got] == [b"long", b"forever"]  # MQTT-3.3.2-5
    # MQTT-3.3.2-6: the interval that remains, counted from the publish on core a.
    assert [p.prop(MESSAGE_EXPIRY) for p in got] == [54, None]
    assert cluster.cores["b"].stats.dropped["expired"] == 1


def test_remaining_expiry_counts_the_time_on_the_bus() -> None:
    cluster = Cluster(("a", "b"), auto_pump=False)
    sub = cluster.client("b")
    sub.connect("sub")
    sub.subscribe(("t", 1))
    pub = _publisher(cluster)
    pub.publish("t", b"slow", qos=1, props=[(MESSAGE_EXPIRY, 10)])
    pub.publish("t", b"too slow", qos=1, props=[(MESSAGE_EXPIRY, 2)])
    cluster.clock.advance(3)  # in transit, not yet delivered
    cluster.pump()

    [got] = sub.publishes()
    assert (got.payload, got.prop(MESSAGE_EXPIRY)) == (b"slow", 7)
    assert cluster.hub.stats["expired"] == 1


# ------------------------------------------------------------------ keepalive


def test_keepalive_timeout_closes_the_connection_and_publishes_the_will() -> None:
    cluster = Cluster(("a", "b"))
    watcher = _watcher(cluster, "b")
    client = cluster.client("a")
    client.connect("idle", keepalive=10, will=Will("will/idle", b"timeout"))
    cluster.advance(15)
    assert client.open  # exactly 1.5 x keepalive is still in time
    cluster.advance(0.25)  # MQTT-3.1.2-22
    assert not client.open and client.closed
    assert client.expect(DISCONNECT).code == 0x8D  # Keep Alive timeout
    assert watcher.payloads() == [b"timeout"]


def test_any_packet_within_the_keepalive_keeps_the_connection() -> None:
    cluster = Cluster(("a",))
    client = cluster.client("a")
    client.connect("busy", keepalive=10)
    for _ in range(6):
        cluster.advance(14)
        client.pingreq()
        assert client.expect(PINGRESP)
    assert client.open
    cluster.advance(15.25)
    assert not client.open


def test_keepalive_zero_never_times_out() -> None:
    cluster = Cluster(("a",))
    client = cluster.client("a")
    client.connect("quiet", keepalive=0)
    cluster.advance(24 * 3600, step=60)
    assert client.open


def test_server_keepalive_overrides_the_client_s() -> None:
    cluster = Cluster(("a",), max_keepalive=20)
    client = cluster.client("a")
    ack = client.connect("lazy", keepalive=0)
    assert ack.prop(SERVER_KEEP_ALIVE) == 20  # MQTT-3.2.2-21
    cluster.advance(30)
    assert client.open
    cluster.advance(0.25)
    assert not client.open


def test_mqtt311_keepalive_timeout_closes_without_disconnect() -> None:
    cluster = Cluster(("a",))
    client = cluster.client("a", version=4)
    client.connect("old", keepalive=4)
    cluster.advance(6.25)
    assert not client.open
    assert client.take() == []  # 3.1.1 has no server DISCONNECT


def test_connection_without_connect_is_closed_after_the_connect_timeout() -> None:
    cluster = Cluster(("a",), connect_timeout=10.0)
    client = cluster.client("a")
    cluster.advance(10)
    assert client.open
    cluster.advance(0.25)
    assert not client.open and client.closed
    assert cluster.cores["a"].connections == set()


# ------------------------------------------------------------------ periodic work


def test_each_core_publishes_its_own_sys_statistics_every_interval() -> None:
    cluster = Cluster(("a", "b"), sys_interval=10)
    watcher = cluster.client("b")
    watcher.connect("watcher")
    watcher.subscribe("$SYS/brokers/+/clients/connected")
    cluster.advance(9.75)
    assert watcher.publishes() == []
    cluster.advance(0.25)
    got = {p.topic: p.payload for p in watcher.publishes()}
    assert got == {
        "$SYS/brokers/a/clients/connected": b"0",
        "$SYS/brokers/b/clients/connected": b"1",
    }
    cluster.advance(10)
    assert len(watcher.publishes()) == 2
