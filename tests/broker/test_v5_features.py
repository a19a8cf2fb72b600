"""MQTT 5.0 extras: CONNACK capabilities, topic aliases, packet size limits, message expiry,
properties passed through, reason codes and reason strings."""

from __future__ import annotations

import asyncio
import time

import aiomqtt
import pytest
from brokerproc import TARGET
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .clients import mcloudtt_only
from .mqttraw import (
    CONTENT_TYPE,
    CORRELATION_DATA,
    DISCONNECT,
    MAXIMUM_PACKET_SIZE,
    MAXIMUM_QOS,
    MESSAGE_EXPIRY,
    PAYLOAD_FORMAT,
    PUBREC,
    REASON_STRING,
    RECEIVE_MAXIMUM,
    REQUEST_PROBLEM_INFO,
    RESPONSE_TOPIC,
    RETAIN_AVAILABLE,
    SESSION_EXPIRY,
    SHARED_SUB_AVAILABLE,
    SUB_ID_AVAILABLE,
    TOPIC_ALIAS,
    TOPIC_ALIAS_MAXIMUM,
    USER_PROPERTY,
    WILDCARD_SUB_AVAILABLE,
    publish,
)

MOSQUITTO = TARGET == "mosquitto"
LIMITED = ("--receive-maximum", "3", "--topic-alias-maximum", "0", "--max-packet-size", "1024")
METRICS = ("--id", "v5-metrics")  # a broker of their own: these tests count drops exactly


# -- CONNACK capabilities ---------------------------------------------------------------------


def test_connack_advertises_what_the_tests_rely_on(mq, raw, uid):
    ack = raw(mq.port).connect(uid)
    # absent means "supported" / QoS 2 (3.2.2.3); these features are exercised elsewhere
    assert ack.prop(MAXIMUM_QOS, 2) == 2
    assert ack.prop(RETAIN_AVAILABLE, 1) == 1
    assert ack.prop(WILDCARD_SUB_AVAILABLE, 1) == 1
    assert ack.prop(SUB_ID_AVAILABLE, 1) == 1
    assert ack.prop(SHARED_SUB_AVAILABLE, 1) == 1
    assert ack.prop(TOPIC_ALIAS_MAXIMUM, 0) >= 1


@mcloudtt_only
def test_connack_defaults(mq, raw, uid):
    ack = raw(mq.port).connect(uid)
    assert ack.prop(RECEIVE_MAXIMUM) == 1024
    assert ack.prop(TOPIC_ALIAS_MAXIMUM) == 64
    assert ack.prop(MAXIMUM_PACKET_SIZE) == 4 * 1024 * 1024


@mcloudtt_only
def test_connack_follows_options(shared_broker, raw, uid):
    b = shared_broker(*LIMITED)
    ack = raw(b.port).connect(uid)
    assert ack.prop(RECEIVE_MAXIMUM) == 3
    assert ack.prop(TOPIC_ALIAS_MAXIMUM, 0) == 0  # 0 may be said by leaving it out
    assert ack.prop(MAXIMUM_PACKET_SIZE) == 1024


# -- topic aliases --------------------------------------------------------------------------------


def test_client_topic_alias_resolved(mq, raw, uid):
    sub = raw(mq.port)
    sub.connect(uid + "s")
    sub.subscribe((f"{uid}/#", 1))
    pub = raw(mq.port)
    pub.connect(uid + "p")
    pub.publish(f"{uid}/a", b"1", qos=1, props=[(TOPIC_ALIAS, 1)])  # set alias 1
    pub.publish("", b"2", qos=1, props=[(TOPIC_ALIAS, 1)])  # use it
    pub.publish(f"{uid}/b", b"3", qos=1, props=[(TOPIC_ALIAS, 1)])  # re-bind it
    pub.publish("", b"4", qos=1, props=[(TOPIC_ALIAS, 1)])
    got = [(p.topic, p.payload) for p in sub.publishes(4)]
    assert got == [(f"{uid}/a", b"1"), (f"{uid}/a", b"2"), (f"{uid}/b", b"3"), (f"{uid}/b", b"4")]


@pytest.mark.parametrize("case", ["zero", "above-maximum", "unknown", "empty-topic-no-alias"])
def test_bad_topic_alias_disconnects(mq, raw, uid, case):
    c = raw(mq.port)
    ack = c.connect(uid)
    maximum = ack.prop(TOPIC_ALIAS_MAXIMUM, 0)
    if case == "zero":
        # MQTT-3.3.2-8 forbids sending it; the receiver's code is not pinned down
        data, codes = publish(f"{uid}/x", b"", props=[(TOPIC_ALIAS, 0)]), {0x81, 0x82, 0x94}
    elif case == "above-maximum":
        data, codes = publish(f"{uid}/x", b"", props=[(TOPIC_ALIAS, maximum + 1)]), {0x94}  # -9
    elif case == "unknown":
        data, codes = publish("", b"", props=[(TOPIC_ALIAS, 1)]), {0x82}  # 3.3.4: never set
    else:
        data, codes = publish("", b""), {0x82}  # 3.3.2.1: an empty topic needs an alias
    c.send(data)
    got = c.closed()
    assert len(got) == 1 and got[0].type == DISCONNECT and got[0].code in codes, got


def test_topic_aliases_do_not_survive_reconnect(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid)
    c.publish(f"{uid}/x", b"", qos=1, props=[(TOPIC_ALIAS, 1)])
    c.disconnect()
    c2 = raw(mq.port)
    c2.connect(uid)
    c2.send(publish("", b"", props=[(TOPIC_ALIAS, 1)]))  # MQTT-3.3.2-7: per connection
    got = c2.closed()
    assert [(p.type, p.code) for p in got] == [(DISCONNECT, 0x82)]


@mcloudtt_only
def test_topic_alias_maximum_zero_refuses_aliases(shared_broker, raw, uid):
    b = shared_broker(*LIMITED)
    c = raw(b.port)
    assert c.connect(uid).prop(TOPIC_ALIAS_MAXIMUM, 0) == 0
    c.send(publish(f"{uid}/x", b"", props=[(TOPIC_ALIAS, 1)]))
    assert [(p.type, p.code) for p in c.closed()] == [(DISCONNECT, 0x94)]


def test_no_aliases_toward_client_that_did_not_allow_them(mq, raw, uid):
    sub = raw(mq.port)
    sub.connect(uid + "s")  # no Topic Alias Maximum: 0
    sub.subscribe((f"{uid}/+", 1))
    pub = raw(mq.port)
    pub.connect(uid + "p")
    for i in range(20):
        pub.publish(f"{uid}/{i % 2}", b"x", qos=1)
    got = sub.publishes(20)
    assert all(p.prop(TOPIC_ALIAS) is None for p in got)  # MQTT-3.1.2-27
    assert [p.topic for p in got] == [f"{uid}/{i % 2}" for i in range(20)]


def test_aliases_toward_client_stay_within_its_maximum(mq, raw, uid):
    sub = raw(mq.port)
    sub.connect(uid + "s", props=[(TOPIC_ALIAS_MAXIMUM, 2)])
    sub.subscribe((f"{uid}/+", 1))
    pub = raw(mq.port)
    pub.connect(uid + "p")
    topics = [f"{uid}/{'abcd'[i % 4]}" for i in range(40)]
    for t in topics:
        pub.publish(t, t.encode(), qos=1)
    got = sub.publishes(40)  # RawClient resolves aliases and fails on an unknown one
    assert [(p.topic, p.payload) for p in got] == [(t, t.encode()) for t in topics]
    assert all(1 <= p.prop(TOPIC_ALIAS, 1) <= 2 for p in got)  # MQTT-3.1.2-26


# -- Maximum Packet Size ------------------------------------------------------------------------


def test_broker_drops_packets_larger_than_client_maximum(mq, raw, uid):
    sub = raw(mq.port)
    sub.connect(uid + "s", props=[(MAXIMUM_PACKET_SIZE, 200)])
    sub.subscribe((f"{uid}/mp", 1))
    pub = raw(mq.port)
    pub.connect(uid + "p")
    pub.publish(f"{uid}/mp", b"x" * 500, qos=1)
    pub.publish(f"{uid}/mp", b"y" * 100, qos=1)
    pub.publish(f"{uid}/mp", b"small", qos=1)
    # MQTT-3.1.2-24/-25: too large for this client, so discarded without telling anyone
    assert [p.payload for p in sub.publishes(2)] == [b"y" * 100, b"small"]


@mcloudtt_only
def test_dropped_oversize_delivery_counted(shared_broker, raw, uid):
    b = shared_broker(*METRICS)
    before = b.metric("mcloudtt_messages_dropped_total", reason="packet_too_large")
    sub = raw(b.port)
    sub.connect(uid + "s", props=[(MAXIMUM_PACKET_SIZE, 100)])
    sub.subscribe((f"{uid}/mp", 1))
    sub.publish(f"{uid}/mp", b"x" * 500, qos=1)
    sub.publish(f"{uid}/mp", b"ok", qos=1)
    assert sub.next_publish().payload == b"ok"
    assert b.metric("mcloudtt_messages_dropped_total", reason="packet_too_large") == before + 1


@mcloudtt_only
@pytest.mark.parametrize("version", [4, 5])
def test_broker_maximum_packet_size_enforced(shared_broker, raw, uid, version):
    b = shared_broker(*LIMITED)
    ok = raw(b.port, version=version)
    ok.connect(uid + "ok", version=version)
    topic = f"{uid}/mps"
    ok.subscribe((topic, 1))
    n = 1024 - len(publish(topic, b"", version=version, qos=1, packet_id=1)) - 1  # 2-byte length
    assert len(publish(topic, b"z" * n, version=version, qos=1, packet_id=1)) == 1024
    ok.publish(topic, b"z" * n, qos=1)  # exactly the limit: fine
    assert len(ok.next_publish().payload) == n

    c = raw(b.port, version=version)
    c.connect(uid, version=version)
    c.send(publish(topic, b"z" * 2000, version=version, qos=1, packet_id=1))
    got = c.closed()
    if version == 5:
        assert [(p.type, p.code) for p in got] == [(DISCONNECT, 0x95)]  # 3.2.2.3.6
    else:
        assert got == []


# -- Message Expiry Interval ---------------------------------------------------------------------


def test_message_expiry_forwarded_live(mq, raw, uid):
    sub = raw(mq.port)
    sub.connect(uid + "s")
    sub.subscribe((f"{uid}/e", 1))
    sub.publish(f"{uid}/e", b"x", qos=1, props=[(MESSAGE_EXPIRY, 30)])
    assert 29 <= sub.next_publish().prop(MESSAGE_EXPIRY) <= 30  # MQTT-3.3.2-6


def test_queued_message_expiry_decremented_or_dropped(mq, raw, uid):
    kw = {"clean": False, "props": [(SESSION_EXPIRY, 300)]}
    sub = raw(mq.port)
    sub.connect(uid + "s", **kw)
    sub.subscribe((f"{uid}/e", 1))
    sub.disconnect()
    pub = raw(mq.port)
    pub.connect(uid + "p")
    pub.publish(f"{uid}/e", b"short", qos=1, props=[(MESSAGE_EXPIRY, 1)])
    pub.publish(f"{uid}/e", b"long", qos=1, props=[(MESSAGE_EXPIRY, 60)])
    pub.publish(f"{uid}/e", b"forever", qos=1)
    time.sleep(2.1)  # letting the interval pass is the point
    back = raw(mq.port)
    back.connect(uid + "s", **kw)
    got = back.publishes(2)
    assert [p.payload for p in got] == [b"long", b"forever"]  # MQTT-3.3.2-5
    assert 50 <= got[0].prop(MESSAGE_EXPIRY) <= 58  # MQTT-3.3.2-6: time waiting subtracted
    assert got[1].prop(MESSAGE_EXPIRY) is None


@mcloudtt_only
def test_expired_messages_counted(shared_broker, raw, uid):
    b = shared_broker(*METRICS)
    before = b.metric("mcloudtt_messages_dropped_total", reason="expired")
    kw = {"clean": False, "props": [(SESSION_EXPIRY, 300)]}
    sub = raw(b.port)
    sub.connect(uid + "s", **kw)
    sub.subscribe((f"{uid}/e", 1))
    sub.disconnect()
    pub = raw(b.port)
    pub.connect(uid + "p")
    pub.publish(f"{uid}/e", b"short", qos=1, props=[(MESSAGE_EXPIRY, 1)])
    time.sleep(1.5)  # letting the interval pass is the point
    back = raw(b.port)
    back.connect(uid + "s", **kw)
    back.subscribe((f"{uid}/m", 1))
    back.publish(f"{uid}/m", b"", qos=1)
    assert back.until(f"{uid}/m") == []
    assert b.metric("mcloudtt_messages_dropped_total", reason="expired") == before + 1


# -- properties passed through -------------------------------------------------------------------

APP_PROPS = [
    (PAYLOAD_FORMAT, 1),
    (CONTENT_TYPE, "application/json; charset=utf-8"),
    (RESPONSE_TOPIC, "replies/ünïcode"),
    (CORRELATION_DATA, bytes(range(256))),
    (USER_PROPERTY, ("b", "2")),
    (USER_PROPERTY, ("a", "1")),
    (USER_PROPERTY, ("b", "3")),  # the same name twice is allowed
    (USER_PROPERTY, ("ключ", "")),
]


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_application_properties_passed_through_unchanged(mq, raw, uid, qos):
    sub = raw(mq.port)
    sub.connect(uid + "s")
    sub.subscribe((f"{uid}/p", 2))
    pub = raw(mq.port)
    pub.connect(uid + "p")
    pub.publish(f"{uid}/p", b'{"t":21.5}', qos=qos, props=APP_PROPS)
    p = sub.next_publish()
    assert p.payload == b'{"t":21.5}'
    assert p.prop(PAYLOAD_FORMAT) == 1  # MQTT-3.3.2-4
    assert p.prop(CONTENT_TYPE) == "application/json; charset=utf-8"  # MQTT-3.3.2-20
    assert p.prop(RESPONSE_TOPIC) == "replies/ünïcode"  # MQTT-3.3.2-15
    assert p.prop(CORRELATION_DATA) == bytes(range(256))  # MQTT-3.3.2-16
    # MQTT-3.3.2-17, MQTT-3.3.2-18: every User Property, in order
    assert p.user_props == [("b", "2"), ("a", "1"), ("b", "3"), ("ключ", "")]


def test_properties_not_sent_to_v311_subscriber(mq, raw, uid):
    sub = raw(mq.port, version=4)
    sub.connect(uid + "s", version=4)
    sub.subscribe((f"{uid}/p", 1))
    pub = raw(mq.port)
    pub.connect(uid + "p")
    pub.publish(f"{uid}/p", b"plain", qos=1, props=APP_PROPS)
    p = sub.next_publish()  # a 3.1.1 PUBLISH has no property field: payload must be intact
    assert (p.topic, p.payload) == (f"{uid}/p", b"plain")


def test_aiomqtt_request_response(mq, uid):
    v5 = aiomqtt.ProtocolVersion.V5

    async def main():  # type: ignore[no-untyped-def]
        async with (
            aiomqtt.Client("127.0.0.1", mq.port, identifier=uid + "srv", protocol=v5) as srv,
            aiomqtt.Client("127.0.0.1", mq.port, identifier=uid + "cli", protocol=v5) as cli,
        ):
            await srv.subscribe(f"{uid}/req", qos=1)
            await cli.subscribe(f"{uid}/resp", qos=1)
            req = Properties(PacketTypes.PUBLISH)
            req.ResponseTopic = f"{uid}/resp"
            req.CorrelationData = b"id-42"
            req.UserProperty = [("trace", "abc"), ("hop", "1")]
            await cli.publish(f"{uid}/req", b"ping", qos=1, properties=req)
            async with asyncio.timeout(5):
                m = await anext(srv.messages)
                seen = (
                    m.payload,
                    m.properties.ResponseTopic,
                    m.properties.CorrelationData,
                    m.properties.UserProperty,
                )
                resp = Properties(PacketTypes.PUBLISH)
                resp.CorrelationData = m.properties.CorrelationData
                await srv.publish(m.properties.ResponseTopic, b"pong", qos=1, properties=resp)
                r = await anext(cli.messages)
                return seen, (r.payload, r.topic.value, r.properties.CorrelationData)

    seen, answer = asyncio.run(main())
    assert seen == (b"ping", f"{uid}/resp", b"id-42", [("trace", "abc"), ("hop", "1")])
    assert answer == (b"pong", f"{uid}/resp", b"id-42")


# -- flow control toward the broker ---------------------------------------------------------------


@pytest.mark.xfail(
    MOSQUITTO, strict=True, reason="Mosquitto 2.0.11 answers PUBREC 0x97 and keeps the connection"
)
def test_exceeding_broker_receive_maximum_disconnects(mq, raw, uid):
    c = raw(mq.port)
    maximum = c.connect(uid).prop(RECEIVE_MAXIMUM, 65535)
    assert maximum <= 1024, "too large to exercise here"
    c.send(b"".join(publish(f"{uid}/rm", b"", qos=2, packet_id=i + 1) for i in range(maximum + 1)))
    got = c.closed()
    assert all(p.type == PUBREC for p in got[:-1])
    # 3.3.4: more unacknowledged QoS 2 PUBLISHes than Receive Maximum -> DISCONNECT 0x93
    assert (got[-1].type, got[-1].code) == (DISCONNECT, 0x93)


# -- reason strings -------------------------------------------------------------------------------


@mcloudtt_only
def test_protocol_error_disconnect_carries_reason_string(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid)
    c.send(publish(f"{uid}/+", b""))
    [d] = c.closed()
    assert (d.type, d.code) == (DISCONNECT, 0x90)
    assert d.prop(REASON_STRING)  # 3.14.2.2.3: human-readable, for diagnostics


def test_request_problem_information_zero_suppresses_reason_strings(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid, props=[(REQUEST_PROBLEM_INFO, 0)])
    ack = c.unsubscribe(f"{uid}/never")
    assert ack.codes == [0x11]
    # MQTT-3.1.2-29: no Reason String or User Property outside PUBLISH, CONNACK, DISCONNECT
    assert ack.prop(REASON_STRING) is None and ack.user_props == []
    if not MOSQUITTO:  # Mosquitto closes on a bad filter instead of a failing SUBACK
        sub = c.subscribe((f"{uid}/#/x", 1), (f"{uid}/ok", 1))
        assert sub.codes == [0x8F, 1]
        assert sub.prop(REASON_STRING) is None and sub.user_props == []
