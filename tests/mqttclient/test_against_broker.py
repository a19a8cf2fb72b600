"""The client codec and the broker's codec read each other's bytes the same way.

They share no code (the client codec is the tests' oracle), so agreement here is evidence for
both: what the client builds, the broker decodes to the same fields; what the broker encodes, the
client parses to the same fields. The property names are mapped here, not taken from the broker.
"""

from __future__ import annotations

from typing import Any

import mcloudtt_mqttclient as c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcloudtt_broker import mqtt as b

# client property id -> broker Properties field (MQTT 5.0 section 2.2.2.2)
NAMES = {
    c.PAYLOAD_FORMAT: "payload_format_indicator",
    c.MESSAGE_EXPIRY: "message_expiry_interval",
    c.CONTENT_TYPE: "content_type",
    c.RESPONSE_TOPIC: "response_topic",
    c.CORRELATION_DATA: "correlation_data",
    c.SESSION_EXPIRY: "session_expiry_interval",
    c.ASSIGNED_CLIENT_ID: "assigned_client_identifier",
    c.SERVER_KEEP_ALIVE: "server_keep_alive",
    c.AUTH_METHOD: "authentication_method",
    c.AUTH_DATA: "authentication_data",
    c.REQUEST_PROBLEM_INFO: "request_problem_information",
    c.WILL_DELAY: "will_delay_interval",
    c.REASON_STRING: "reason_string",
    c.RECEIVE_MAXIMUM: "receive_maximum",
    c.TOPIC_ALIAS_MAXIMUM: "topic_alias_maximum",
    c.TOPIC_ALIAS: "topic_alias",
    c.MAXIMUM_QOS: "maximum_qos",
    c.RETAIN_AVAILABLE: "retain_available",
    c.MAXIMUM_PACKET_SIZE: "maximum_packet_size",
    c.SERVER_REFERENCE: "server_reference",
}


def as_broker(props: list[tuple[int, Any]] | None) -> b.Properties:
    values: dict[str, Any] = {}
    for pid, value in props or ():
        if pid == c.USER_PROPERTY:
            values["user_properties"] = (*values.get("user_properties", ()), value)
        elif pid == c.SUBSCRIPTION_ID:
            values["subscription_identifiers"] = (
                *values.get("subscription_identifiers", ()),
                value,
            )
        else:
            values[NAMES[pid]] = value
    return b.Properties(**values) if values else b.EMPTY_PROPERTIES


def broker_decodes(raw: bytes, version: int | None) -> b.Packet:
    decoder = b.Decoder(version=version)
    decoder.feed(raw)
    packet = decoder.next_packet()
    assert packet is not None and decoder.buffered == 0
    return packet


def client_parses(packet: b.Packet, version: int) -> c.Packet:
    frames = c.Reader().frames(b.encode_bytes(packet, version))
    assert len(frames) == 1
    return c.parse(*frames[0], version)


_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)
_topic = _text.filter(lambda t: "+" not in t and "#" not in t and len(t) > 0)
_user = st.lists(st.tuples(_text, _text), max_size=3)


@settings(max_examples=150, deadline=None)
@given(
    version=st.sampled_from([4, 5]),
    client_id=_text,
    clean=st.booleans(),
    keepalive=st.integers(min_value=0, max_value=65_535),
    will=st.none() | st.tuples(_topic, st.binary(max_size=20), st.sampled_from([0, 1, 2])),
    retain=st.booleans(),
    username=st.none() | _text,
    password=st.none() | st.binary(max_size=10),
    expiry=st.none() | st.integers(min_value=0, max_value=2**32 - 1),
    user=_user,
)
def test_connect_decodes_the_same(
    version: int,
    client_id: str,
    clean: bool,
    keepalive: int,
    will: tuple[str, bytes, int] | None,
    retain: bool,
    username: str | None,
    password: bytes | None,
    expiry: int | None,
    user: list[tuple[str, str]],
) -> None:
    if version == 4 and password is not None and username is None:
        username = "u"  # MQTT-3.1.2-22: 3.1.1 has no password without a user name
    props: list[tuple[int, Any]] = (
        [(c.USER_PROPERTY, pair) for pair in user] if version == 5 else []
    )
    if expiry is not None and version == 5:
        props.insert(0, (c.SESSION_EXPIRY, expiry))
    will_props = [(c.WILL_DELAY, 5), (c.CONTENT_TYPE, "t")] if version == 5 else None
    c_will = None
    if will is not None:
        c_will = c.Will(
            topic=will[0], payload=will[1], qos=will[2], retain=retain, props=will_props
        )
    raw = c.connect(
        client_id,
        version=version,
        clean=clean,
        keepalive=keepalive,
        props=props,
        will=c_will,
        username=username,
        password=password,
    )
    got = broker_decodes(raw, None)
    assert got == b.Connect(
        client_id=client_id,
        protocol_level=version,
        clean_start=clean,
        keep_alive=keepalive,
        username=username,
        password=password,
        will=None
        if will is None
        else b.Will(
            topic=will[0],
            payload=will[1],
            qos=will[2],
            retain=retain,
            properties=as_broker(will_props),
        ),
        properties=as_broker(props),
    )


@settings(max_examples=150, deadline=None)
@given(
    version=st.sampled_from([4, 5]),
    topic=_topic,
    payload=st.binary(max_size=200),
    qos=st.sampled_from([0, 1, 2]),
    retain=st.booleans(),
    dup=st.booleans(),
    pid=st.integers(min_value=1, max_value=65_535),
    user=_user,
    corr=st.none() | st.binary(max_size=8),
)
def test_publish_both_ways(
    version: int,
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    pid: int,
    user: list[tuple[str, str]],
    corr: bytes | None,
) -> None:
    dup = dup and qos > 0  # MQTT-3.3.1-2
    props: list[tuple[int, Any]] = []
    if version == 5:
        props = [(c.USER_PROPERTY, pair) for pair in user]
        if corr is not None:
            props += [(c.CORRELATION_DATA, corr), (c.RESPONSE_TOPIC, "r")]
    raw = c.publish(
        topic, payload, version=version, qos=qos, retain=retain, dup=dup, packet_id=pid, props=props
    )
    expected = b.Publish(
        topic=topic,
        payload=payload,
        qos=qos,
        retain=retain,
        dup=dup,
        packet_id=pid if qos else None,
        properties=as_broker(props),
    )
    assert broker_decodes(raw, version) == expected
    p = client_parses(expected, version)
    assert (p.topic, p.payload, p.qos, p.retain, p.dup) == (topic, payload, qos, retain, dup)
    assert p.packet_id == (pid if qos else 0)
    assert as_broker(p.props) == expected.properties


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize(
    ("ptype", "cls"),
    [(c.PUBACK, b.PubAck), (c.PUBREC, b.PubRec), (c.PUBREL, b.PubRel), (c.PUBCOMP, b.PubComp)],
)
@pytest.mark.parametrize("code", [0, 0x10, 0x92])
def test_acks_both_ways(version: int, ptype: int, cls: Any, code: int) -> None:
    props = [(c.REASON_STRING, "why"), (c.USER_PROPERTY, ("a", "b"))] if code else None
    if version == 4:
        code, props = 0, None
    raw = c.ack(ptype, 0x0102, version=version, code=code, props=props)
    expected = cls(packet_id=0x0102, reason_code=code, properties=as_broker(props))
    assert broker_decodes(raw, version) == expected
    p = client_parses(expected, version)
    assert (p.type, p.packet_id, p.code, p.props) == (ptype, 0x0102, code, props or [])


@settings(max_examples=100, deadline=None)
@given(
    version=st.sampled_from([4, 5]),
    filters=st.lists(
        st.tuples(_text.filter(bool), st.sampled_from([0, 1, 2]), st.booleans(), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    rh=st.sampled_from([0, 1, 2]),
    sub_id=st.none() | st.integers(min_value=1, max_value=268_435_455),
)
def test_subscribe_and_unsubscribe_decode_the_same(
    version: int, filters: list[tuple[str, int, bool, bool]], rh: int, sub_id: int | None
) -> None:
    v5 = version == 5
    pairs = [
        (f, c.sub_opts(q, no_local=nl, rap=rap, rh=rh) if v5 else q) for f, q, nl, rap in filters
    ]
    props = [(c.SUBSCRIPTION_ID, sub_id)] if sub_id is not None and v5 else []
    got = broker_decodes(c.subscribe(7, pairs, version=version, props=props), version)
    assert got == b.Subscribe(
        packet_id=7,
        subscriptions=tuple(
            b.SubscriptionRequest(
                topic_filter=f,
                qos=q,
                no_local=nl and v5,
                retain_as_published=rap and v5,
                retain_handling=rh if v5 else 0,
            )
            for f, q, nl, rap in filters
        ),
        properties=as_broker(props),
    )
    names = [f for f, *_ in filters]
    assert broker_decodes(c.unsubscribe(8, names, version=version), version) == b.Unsubscribe(
        packet_id=8, topic_filters=tuple(names)
    )


@pytest.mark.parametrize("version", [4, 5])
def test_small_client_packets_decode_the_same(version: int) -> None:
    assert broker_decodes(c.pingreq(), version) == b.PingReq()
    assert broker_decodes(c.disconnect(version=version), version) == b.Disconnect()
    if version == 5:
        raw = c.disconnect(0x04, [(c.SESSION_EXPIRY, 0), (c.REASON_STRING, "bye")])
        assert broker_decodes(raw, 5) == b.Disconnect(
            reason_code=0x04,
            properties=b.Properties(session_expiry_interval=0, reason_string="bye"),
        )
        raw = c.auth(0x19, [(c.AUTH_METHOD, "m"), (c.AUTH_DATA, b"\x01")])
        assert broker_decodes(raw, 5) == b.Auth(
            reason_code=0x19,
            properties=b.Properties(authentication_method="m", authentication_data=b"\x01"),
        )


@pytest.mark.parametrize("version", [4, 5])
def test_server_packets_parse_the_same(version: int) -> None:
    v5 = version == 5
    connack_props = (
        b.Properties(
            assigned_client_identifier="auto-1",
            receive_maximum=10,
            maximum_qos=1,
            topic_alias_maximum=5,
            server_keep_alive=30,
            user_properties=(("k", "v"),),
        )
        if v5
        else b.EMPTY_PROPERTIES
    )
    p = client_parses(
        b.ConnAck(session_present=True, reason_code=0, properties=connack_props), version
    )
    assert (p.type, p.session_present, p.code) == (c.CONNACK, True, 0)
    assert as_broker(p.props) == connack_props
    codes = (0, 1, 2, 0x80) if not v5 else (0, 1, 2, 0x87, 0x9E)
    suback_props = b.Properties(reason_string="r") if v5 else b.EMPTY_PROPERTIES
    p = client_parses(b.SubAck(packet_id=9, reason_codes=codes, properties=suback_props), version)
    assert (p.type, p.packet_id, p.codes, as_broker(p.props)) == (
        c.SUBACK,
        9,
        list(codes),
        suback_props,
    )
    p = client_parses(b.UnsubAck(packet_id=9, reason_codes=(0, 0x11) if v5 else ()), version)
    assert (p.type, p.packet_id, p.codes) == (c.UNSUBACK, 9, [0, 0x11] if v5 else [])
    assert client_parses(b.PingResp(), version).type == c.PINGRESP
    if v5:
        props = b.Properties(server_reference="other:1883", reason_string="moved")
        p = client_parses(b.Disconnect(reason_code=0x9D, properties=props), 5)
        assert (p.type, p.code, as_broker(p.props)) == (c.DISCONNECT, 0x9D, props)
        p = client_parses(b.Disconnect(reason_code=0x8B), 5)
        assert (p.code, p.props) == (0x8B, [])
        props = b.Properties(authentication_method="m", authentication_data=b"d")
        p = client_parses(b.Auth(reason_code=0x18, properties=props), 5)
        assert (p.type, p.code, as_broker(p.props)) == (c.AUTH, 0x18, props)
