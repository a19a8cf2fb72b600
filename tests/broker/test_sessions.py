"""Persistent sessions: clean session / clean start, session expiry, queued messages, bounds."""

from __future__ import annotations

import time

import pytest

from .clients import mcloudtt_only
from .mqttraw import DISCONNECT, SESSION_EXPIRY, Will, disconnect

VERSIONS = pytest.mark.parametrize("version", [4, 5])


def session(version: int, expiry: int = 300, **kw):  # type: ignore[no-untyped-def]
    """CONNECT keywords for clean=0 with a session that outlives the connection."""
    kw = {"clean": False, "version": version, **kw}
    if version == 5:
        kw["props"] = [(SESSION_EXPIRY, expiry)]
    return kw


@VERSIONS
def test_session_present_flag(mq, raw, uid, version):
    def connect(**kw):  # type: ignore[no-untyped-def]
        c = raw(mq.port, version=version)
        ack = c.connect(uid, **kw)
        assert ack.code == 0
        c.disconnect()
        return ack.session_present

    assert connect(**session(version)) is False  # MQTT-3.2.2-3: nothing stored yet
    assert connect(**session(version)) is True  # MQTT-3.2.2-2
    assert connect(version=version, clean=True) is False  # MQTT-3.2.2-1
    assert connect(**session(version)) is False  # MQTT-3.1.2-6: the clean connect discarded it


@VERSIONS
def test_subscriptions_and_queued_messages_kept_while_away(mq, paho, uid, version):
    kw = {"clean": False}
    if version == 5:
        kw["session_expiry"] = 300
    sub = paho(mq.port, uid + "s", version=version, **kw)
    assert not sub.session_present
    sub.subscribe(f"{uid}/one", 1)
    sub.subscribe(f"{uid}/two", 2)
    sub.disconnect()

    pub = paho(mq.port, uid + "p", version=version)
    for i in range(5):
        pub.publish(f"{uid}/one", b"1-%d" % i, qos=1)
        pub.publish(f"{uid}/two", b"2-%d" % i, qos=2)

    back = paho(mq.port, uid + "s", version=version, **kw)
    assert back.session_present  # MQTT-3.2.2-2
    got = back.get_n(10)
    # MQTT-3.1.2-5 / 4.1: QoS 1 and 2 messages kept while disconnected, delivered in order
    assert [m.payload for m in got if m.topic == f"{uid}/one"] == [b"1-%d" % i for i in range(5)]
    assert [m.payload for m in got if m.topic == f"{uid}/two"] == [b"2-%d" % i for i in range(5)]
    assert {(m.topic, m.qos) for m in got} == {(f"{uid}/one", 1), (f"{uid}/two", 2)}
    # the subscriptions are still live without a new SUBSCRIBE
    pub.publish(f"{uid}/one", b"live", qos=1)
    assert back.get().payload == b"live"


@VERSIONS
def test_clean_connect_drops_subscriptions(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.connect(uid, **session(version))
    c.subscribe((f"{uid}/gone", 1), (f"{uid}/m", 1))
    c.disconnect()
    pub = raw(mq.port, version=version)
    pub.connect(uid + "p", version=version)
    pub.publish(f"{uid}/gone", b"queued", qos=1)

    c2 = raw(mq.port, version=version)
    assert not c2.connect(uid, version=version, clean=True).session_present
    c2.subscribe((f"{uid}/m", 1))
    pub.publish(f"{uid}/gone", b"after", qos=1)
    pub.publish(f"{uid}/m", b"marker", qos=1)
    assert c2.until(f"{uid}/m") == []  # neither the queued message nor the old subscription


def test_v311_clean_session_ends_at_disconnect(mq, raw, uid):
    c = raw(mq.port, version=4)
    c.connect(uid, version=4, clean=True)
    c.subscribe((f"{uid}/x", 1))
    c.disconnect()
    c2 = raw(mq.port, version=4)
    assert not c2.connect(uid, version=4, clean=False).session_present  # MQTT-3.1.2-6


def test_v5_absent_session_expiry_ends_session_at_disconnect(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid, clean=False)  # no Session Expiry Interval: 0
    c.subscribe((f"{uid}/x", 1))
    c.disconnect()
    c2 = raw(mq.port)
    assert not c2.connect(uid, clean=False).session_present  # 3.1.2.11.2


def test_v5_session_expires_after_interval(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid, **session(5, expiry=1))
    c.subscribe((f"{uid}/x", 1))
    c.disconnect()
    pub = raw(mq.port)
    pub.connect(uid + "p")
    pub.publish(f"{uid}/x", b"stale", qos=1)
    time.sleep(2.2)  # waiting for time itself to pass: the expiry is the behaviour under test
    c2 = raw(mq.port)
    ack = c2.connect(uid, **session(5, expiry=1))
    assert not ack.session_present  # 3.1.2.11.2: the session state is gone
    c2.subscribe((f"{uid}/m", 1))
    pub.publish(f"{uid}/m", b"marker", qos=1)
    assert c2.until(f"{uid}/m") == []


def test_v5_session_kept_within_interval(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid, **session(5, expiry=5))
    c.subscribe((f"{uid}/x", 1))
    c.disconnect()
    pub = raw(mq.port)
    pub.connect(uid + "p")
    pub.publish(f"{uid}/x", b"kept", qos=1)
    c2 = raw(mq.port)
    assert c2.connect(uid, **session(5, expiry=5)).session_present
    assert c2.next_publish().payload == b"kept"


def test_v5_disconnect_can_shorten_session_expiry(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid, **session(5, expiry=300))
    c.subscribe((f"{uid}/x", 1))
    c.disconnect(props=[(SESSION_EXPIRY, 0)])  # 3.14.2.2.2: ends the session now
    c2 = raw(mq.port)
    assert not c2.connect(uid, **session(5)).session_present


def test_v5_disconnect_cannot_set_expiry_when_connect_had_zero(mq, raw, uid):
    w = raw(mq.port)
    w.connect(uid + "w")
    w.subscribe(f"{uid}/will")
    c = raw(mq.port)
    c.connect(uid, will=Will(f"{uid}/will", b"W"))  # Session Expiry 0
    c.send(disconnect(0, [(SESSION_EXPIRY, 60)]))
    got = c.closed()
    # 3.14.2.2.2: a protocol error, so not a normal disconnection: the will is published
    assert all(p.type == DISCONNECT and p.code == 0x82 for p in got), got
    assert w.next_publish().payload == b"W"


@VERSIONS
def test_unacked_message_resent_to_the_taking_over_connection(mq, raw, uid, version):
    # a device that reconnects before the broker noticed the old socket died
    old = raw(mq.port, version=version)
    old.connect(uid, **session(version))
    old.subscribe((f"{uid}/q", 1))
    pub = raw(mq.port, version=version)
    pub.connect(uid + "p", version=version)
    pub.publish(f"{uid}/q", b"first", qos=1)
    assert old.next_publish(ack_it=False).payload == b"first"
    new = raw(mq.port, version=version)
    assert new.connect(uid, **session(version)).session_present
    again = new.next_publish()
    assert (again.payload, again.dup) == (b"first", True)  # MQTT-4.4.0-1


# -- broker limits (mcloudtt options) --------------------------------------------------------------


@mcloudtt_only
def test_max_session_expiry_caps_and_is_announced(broker_factory, raw, uid):
    b = broker_factory("--max-session-expiry", "1")
    c = raw(b.port)
    ack = c.connect(uid, **session(5, expiry=3600))
    # 3.2.2.3.2: the server tells the client the interval it uses instead
    assert ack.prop(SESSION_EXPIRY) == 1
    c.disconnect()
    time.sleep(1.6)  # the capped interval has to pass
    c2 = raw(b.port)
    assert not c2.connect(uid, **session(5, expiry=3600)).session_present


@mcloudtt_only
def test_offline_queue_is_bounded_and_overflow_counted(broker_factory, raw, uid):
    b = broker_factory("--max-queued-messages", "5")
    c = raw(b.port)
    c.connect(uid, **session(5))
    c.subscribe((f"{uid}/q", 1))
    c.disconnect()
    pub = raw(b.port)
    pub.connect(uid + "p")
    for i in range(20):
        pub.publish(f"{uid}/q", b"%d" % i, qos=1)
    assert b.metric("mcloudtt_queued_messages") == 5
    assert b.metric("mcloudtt_messages_dropped_total", reason="queue_full") == 15
    assert b.metric("mcloudtt_sessions") >= 1

    c2 = raw(b.port)
    assert c2.connect(uid, **session(5)).session_present
    c2.subscribe((f"{uid}/m", 1))
    pub.publish(f"{uid}/m", b"marker", qos=1)
    got = [int(p.payload) for p in c2.until(f"{uid}/m")]
    assert len(got) == 5 and got == sorted(got)  # bounded, still in order
    assert b.metric("mcloudtt_queued_messages") == 0


@mcloudtt_only
def test_sessions_gauge_follows_session_lifetime(broker_factory, raw, uid):
    b = broker_factory()
    base = b.metric("mcloudtt_sessions")
    c = raw(b.port)
    c.connect(uid, **session(5, expiry=300))
    c.disconnect()
    assert b.metric("mcloudtt_sessions") == base + 1  # kept while away
    c2 = raw(b.port)
    c2.connect(uid, clean=True)
    c2.disconnect()
    assert b.metric("mcloudtt_sessions") == base  # clean start discarded it
