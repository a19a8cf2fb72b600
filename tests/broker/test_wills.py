"""Will messages: when they are published, when not, delay, and what they carry."""

from __future__ import annotations

import time

import pytest
from brokerproc import TARGET

from .clients import props
from .mqttraw import (
    CONTENT_TYPE,
    CORRELATION_DATA,
    MESSAGE_EXPIRY,
    PAYLOAD_FORMAT,
    RESPONSE_TOPIC,
    SESSION_EXPIRY,
    USER_PROPERTY,
    WILL_DELAY,
    Will,
    connect,
    publish,
)

VERSIONS = pytest.mark.parametrize("version", [4, 5])
KEEPALIVE_SLACK = 5.0 if TARGET == "mosquitto" else 1.0


def watcher(raw, port, uid, version=5, qos=2):  # type: ignore[no-untyped-def]
    w = raw(port, version=version)
    w.connect(uid + "w", version=version)
    w.subscribe((f"{uid}/will/#", qos), (f"{uid}/m", 1))
    return w


def no_will_before_marker(w, uid) -> bool:  # type: ignore[no-untyped-def]
    w.publish(f"{uid}/m", b"marker", qos=1)
    return w.until(f"{uid}/m") == []


@VERSIONS
def test_will_on_socket_close_without_disconnect(mq, raw, uid, version):
    w = watcher(raw, mq.port, uid)
    c = raw(mq.port, version=version)
    c.connect(uid, version=version, will=Will(f"{uid}/will/x", b"lost", qos=1))
    c.close()
    p = w.next_publish()
    # MQTT-3.1.2-8; the will's QoS is kept (granted 2)
    assert (p.topic, p.payload, p.qos, p.retain) == (f"{uid}/will/x", b"lost", 1, False)


@VERSIONS
def test_will_on_keepalive_timeout(mq, raw, uid, version):
    w = watcher(raw, mq.port, uid)
    c = raw(mq.port, version=version)
    c.connect(uid, version=version, keepalive=1, will=Will(f"{uid}/will/ka", b"silent"))
    t0 = time.monotonic()
    p = w.next_publish(timeout=1.5 + KEEPALIVE_SLACK + 1)
    assert p.payload == b"silent"  # MQTT-3.1.2-8: keepalive expiry is a failure
    assert time.monotonic() - t0 >= 1.5 - 0.2


@VERSIONS
def test_will_on_protocol_error(mq, raw, uid, version):
    w = watcher(raw, mq.port, uid)
    c = raw(mq.port, version=version)
    c.connect(uid, version=version, will=Will(f"{uid}/will/pe", b"broken"))
    c.send(publish(f"{uid}/bad/+", b"x", version=version))  # wildcard in a topic name
    c.closed()
    assert w.next_publish().payload == b"broken"  # MQTT-3.1.2-8


@VERSIONS
def test_will_on_garbage(mq, raw, uid, version):
    w = watcher(raw, mq.port, uid)
    c = raw(mq.port, version=version)
    c.connect(uid, version=version, will=Will(f"{uid}/will/g", b"garbage"))
    c.send(b"\x00\x00\xff\xff\xff\xff\xff")
    c.closed()
    assert w.next_publish().payload == b"garbage"


@VERSIONS
def test_no_will_after_normal_disconnect(mq, raw, uid, version):
    w = watcher(raw, mq.port, uid)
    c = raw(mq.port, version=version)
    c.connect(uid, version=version, will=Will(f"{uid}/will/n", b"should-not"))
    c.disconnect()  # returns once the broker closed the connection
    assert no_will_before_marker(w, uid)  # MQTT-3.1.2-10, MQTT-3.14.4-3


def test_disconnect_with_will_message_publishes_it(mq, raw, uid):
    w = watcher(raw, mq.port, uid)
    c = raw(mq.port)
    c.connect(uid, will=Will(f"{uid}/will/04", b"asked-for"))
    c.disconnect(0x04)  # 3.14.2.1: Disconnect with Will Message
    assert w.next_publish().payload == b"asked-for"


@VERSIONS
def test_retained_will(mq, raw, uid, version):
    w = watcher(raw, mq.port, uid)
    c = raw(mq.port, version=version)
    c.connect(uid, version=version, will=Will(f"{uid}/will/r", b"offline", qos=1, retain=True))
    c.close()
    w.next_publish()  # the will is published asynchronously: wait until it has gone out
    late = raw(mq.port, version=version)
    late.connect(uid + "late", version=version)
    late.subscribe((f"{uid}/will/r", 1), (f"{uid}/m", 1))
    late.publish(f"{uid}/m", b"", qos=1)
    got = late.until(f"{uid}/m")
    assert [(p.payload, p.retain, p.qos) for p in got] == [(b"offline", True, 1)]  # MQTT-3.1.2-15


def test_will_taken_over_connection_publishes_will(mq, raw, uid):
    w = watcher(raw, mq.port, uid)
    old = raw(mq.port)
    old.connect(uid, will=Will(f"{uid}/will/t", b"replaced"))
    new = raw(mq.port)
    new.connect(uid)  # clean start: the old session (and its will) ends now
    assert w.next_publish().payload == b"replaced"


def test_will_properties_carried(mq, raw, uid):
    w = watcher(raw, mq.port, uid)
    will_props = [
        (PAYLOAD_FORMAT, 1),
        (MESSAGE_EXPIRY, 3600),
        (CONTENT_TYPE, "application/json"),
        (RESPONSE_TOPIC, f"{uid}/reply"),
        (CORRELATION_DATA, b"\x00\x01corr"),
        (USER_PROPERTY, ("z", "1")),
        (USER_PROPERTY, ("a", "2")),
        (USER_PROPERTY, ("z", "3")),
    ]
    c = raw(mq.port)
    c.connect(uid, will=Will(f"{uid}/will/p", b'{"gone":true}', props=will_props))
    c.close()
    p = w.next_publish()
    assert p.payload == b'{"gone":true}'
    assert p.prop(PAYLOAD_FORMAT) == 1
    assert p.prop(CONTENT_TYPE) == "application/json"
    assert p.prop(RESPONSE_TOPIC) == f"{uid}/reply"
    assert p.prop(CORRELATION_DATA) == b"\x00\x01corr"
    assert p.user_props == [("z", "1"), ("a", "2"), ("z", "3")]  # MQTT-3.1.3-10: in order
    assert 3590 <= p.prop(MESSAGE_EXPIRY) <= 3600
    assert p.prop(WILL_DELAY) is None  # not a PUBLISH property


def test_paho_will_on_dropped_connection(mq, paho, uid):
    w = paho(mq.port, uid + "w")
    w.subscribe(f"{uid}/will/paho", 1)
    c = paho(
        mq.port,
        uid,
        will=(f"{uid}/will/paho", b"paho-gone", 1, False),
        will_props=props(ContentType="text/plain"),
    )
    c.kill()
    m = w.get()
    assert (m.topic, m.payload, m.qos) == (f"{uid}/will/paho", b"paho-gone", 1)
    assert m.properties.ContentType == "text/plain"


# -- Will Delay Interval -------------------------------------------------------------------------

WILL_SLACK = 2.0 if TARGET == "mosquitto" else 1.0  # Mosquitto checks delays once a second


def test_will_delay_interval(mq, raw, uid):
    w = watcher(raw, mq.port, uid)
    c = raw(mq.port)
    c.connect(
        uid,
        clean=False,
        props=[(SESSION_EXPIRY, 30)],
        will=Will(f"{uid}/will/d", b"late", props=[(WILL_DELAY, 1)]),
    )
    c.close()
    t0 = time.monotonic()
    p = w.next_publish(timeout=1 + WILL_SLACK + 1)
    elapsed = time.monotonic() - t0
    assert p.payload == b"late"
    assert 1 - 0.2 <= elapsed <= 1 + WILL_SLACK  # 3.1.3.2.2


def test_reconnect_within_will_delay_cancels_will(mq, raw, uid):
    w = watcher(raw, mq.port, uid)
    kw = {"clean": False, "props": [(SESSION_EXPIRY, 30)]}
    c = raw(mq.port)
    c.connect(uid, **kw, will=Will(f"{uid}/will/c", b"cancelled", props=[(WILL_DELAY, 1)]))
    c.close()
    back = raw(mq.port)
    assert back.connect(uid, **kw).session_present
    time.sleep(1 + WILL_SLACK)  # the delay must pass for the absence to mean anything
    assert no_will_before_marker(w, uid)  # MQTT-3.1.3-9


def test_will_sent_at_session_end_before_delay(mq, raw, uid):
    w = watcher(raw, mq.port, uid)
    c = raw(mq.port)
    c.connect(
        uid,
        clean=False,
        props=[(SESSION_EXPIRY, 1)],
        will=Will(f"{uid}/will/s", b"session-over", props=[(WILL_DELAY, 60)]),
    )
    c.close()
    t0 = time.monotonic()
    p = w.next_publish(timeout=1 + WILL_SLACK + 1)
    assert p.payload == b"session-over"  # 3.1.3.2.2: whichever comes first
    assert time.monotonic() - t0 <= 1 + WILL_SLACK


@VERSIONS
def test_will_topic_with_wildcard_refused(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.send(connect(uid, version=version, will=Will(f"{uid}/will/+", b"x")))
    got = c.closed()  # the Will Topic is a Topic Name: no wildcards (MQTT-3.3.2-2)
    assert not any(p.code == 0 for p in got), got
