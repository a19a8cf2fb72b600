"""The client codec against byte strings written out by hand from the MQTT 3.1.1 and 5.0 specs."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcloudtt_mqttclient import (
    AUTH,
    AUTH_METHOD,
    CONNACK,
    CORRELATION_DATA,
    DISCONNECT,
    MESSAGE_EXPIRY,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    REASON_STRING,
    RECEIVE_MAXIMUM,
    SERVER_REFERENCE,
    SESSION_EXPIRY,
    SUBACK,
    SUBSCRIPTION_ID,
    TOPIC_ALIAS,
    UNSUBACK,
    USER_PROPERTY,
    WILL_DELAY,
    MalformedPacket,
    Packet,
    Reader,
    Will,
    ack,
    auth,
    connect,
    disconnect,
    encode_properties,
    packet_id,
    parse,
    pingreq,
    publish,
    read_varint,
    set_dup,
    split_publish,
    sub_opts,
    subscribe,
    unsubscribe,
    utf8,
    varint,
)


@pytest.mark.parametrize(
    ("n", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_variable_byte_integer_table(n: int, encoded: bytes) -> None:
    # MQTT 3.1.1 section 2.2.3 / MQTT 5.0 section 1.5.5: the size table
    assert varint(n) == encoded
    assert read_varint(b"\x30" + encoded + b"\xff", 1) == (n, 1 + len(encoded))
    for cut in range(1, len(encoded)):
        assert read_varint(encoded[:cut], 0) is None  # a strict prefix is incomplete


def test_variable_byte_integer_limits() -> None:
    with pytest.raises(ValueError):
        varint(268_435_456)
    with pytest.raises(ValueError):
        varint(-1)
    with pytest.raises(MalformedPacket):
        read_varint(b"\xff\xff\xff\xff\x01", 0)  # MQTT-1.5.5-1


def test_utf8_string_example() -> None:
    # MQTT 5.0 section 1.5.4, the string example: "A" U+2A6D4
    assert utf8("A\U0002a6d4") == b"\x00\x05\x41\xf0\xaa\x9b\x94"
    with pytest.raises(ValueError):
        utf8(b"x" * 65_536)


def test_connect_311_variable_header_example() -> None:
    # MQTT 3.1.1 section 3.1.2, the variable header example: MQTT level 4, flags 0xCE (username, password, will QoS 1,
    # will, clean session), keep alive 10.
    raw = connect(
        "c",
        version=4,
        keepalive=10,
        will=Will(topic="w", payload=b"bye", qos=1),
        username="u",
        password=b"p",
    )
    body = b"\x00\x04MQTT\x04\xce\x00\x0a" + b"\x00\x01c" + b"\x00\x01w\x00\x03bye"
    body += b"\x00\x01u\x00\x01p"
    assert raw == b"\x10" + bytes((len(body),)) + body


def test_connect_5_variable_header_example() -> None:
    # MQTT 5.0 section 3.1.2, the variable header example: level 5, flags 0xCE, keep alive 10, properties
    # length 5, Session Expiry Interval 10.
    raw = connect(
        "",
        keepalive=10,
        props=[(SESSION_EXPIRY, 10)],
        will=Will(topic="w", qos=1, props=[(WILL_DELAY, 30)]),
        username=b"u",
        password=b"",
    )
    header = b"\x00\x04MQTT\x05\xce\x00\x0a\x05\x11\x00\x00\x00\x0a"
    payload = b"\x00\x00" + b"\x05\x18\x00\x00\x00\x1e" + b"\x00\x01w\x00\x00"
    payload += b"\x00\x01u\x00\x00"
    assert raw == b"\x10" + bytes((len(header) + len(payload),)) + header + payload


def test_connect_flags_and_protocol_name_overrides() -> None:
    assert connect("x", version=3)[2:10] == b"\x00\x06MQIsdp"
    raw = connect("x", version=4, clean=False, will=Will(topic="t", qos=2, retain=True))
    assert raw[9] == 0x04 | 0x10 | 0x20  # MQTT-3.1.2-9, -14, -17: will, QoS 2, retain
    assert connect("x", version=4, flags=0x01)[9] == 0x01  # a reserved bit, as a test asks
    assert connect("x", version=4, proto_name=b"MQTX")[4:8] == b"MQTX"


def test_publish_variable_header_example() -> None:
    # MQTT 3.1.1 section 3.3.2, the variable header example: topic "a/b", packet identifier 10.
    assert publish("a/b", b"hi", version=4, qos=1, packet_id=10) == (
        b"\x32\x09\x00\x03a/b\x00\x0ahi"
    )
    # 5.0 adds the property length (section 3.3.2).
    assert publish("a/b", b"", qos=2, packet_id=10, dup=True, retain=True) == (
        b"\x3d\x08\x00\x03a/b\x00\x0a\x00"
    )
    assert publish("t", version=4) == b"\x30\x03\x00\x01t"  # QoS 0: no packet id
    with pytest.raises(ValueError):
        publish("t", qos=1)
    assert set_dup(publish("t", version=4, qos=1, packet_id=1))[0] == 0x3A


def test_publish_properties_in_order() -> None:
    props = [
        (MESSAGE_EXPIRY, 60),
        (USER_PROPERTY, ("k", "v")),
        (CORRELATION_DATA, b"\x00\x01"),
        (USER_PROPERTY, ("k", "w")),
        (TOPIC_ALIAS, 3),
    ]
    raw = publish("t", b"p", props=props)
    block = b"\x02\x00\x00\x00\x3c\x26\x00\x01k\x00\x01v\x09\x00\x02\x00\x01"
    block += b"\x26\x00\x01k\x00\x01w\x23\x00\x03"
    assert len(block) == 0x1B
    assert raw == b"\x30\x20\x00\x01t\x1b" + block + b"p"
    assert encode_properties([(SUBSCRIPTION_ID, 268_435_455)]) == b"\x05\x0b\xff\xff\xff\x7f"
    with pytest.raises(ValueError):
        encode_properties([(0x7F, 1)])
    with pytest.raises(TypeError):
        encode_properties([(MESSAGE_EXPIRY, "soon")])


def test_acks() -> None:
    assert ack(PUBACK, 0x1234, version=4) == b"\x40\x02\x12\x34"
    assert ack(PUBREC, 1) == b"\x50\x02\x00\x01"  # 5.0: success and no properties left off
    assert ack(PUBREL, 1) == b"\x62\x02\x00\x01"  # MQTT-3.6.1-1: flags 0010
    assert ack(PUBCOMP, 1, code=0x92) == b"\x70\x04\x00\x01\x92\x00"
    assert ack(PUBACK, 1, code=0x10, props=[(REASON_STRING, "no")]) == (
        b"\x40\x09\x00\x01\x10\x05\x1f\x00\x02no"
    )


def test_subscribe_and_unsubscribe_examples() -> None:
    # MQTT 3.1.1 section 3.8.3, the payload example: "a/b" QoS 1, "c/d" QoS 2, packet identifier 10.
    assert subscribe(10, [("a/b", 1), ("c/d", 2)], version=4) == (
        b"\x82\x0e\x00\x0a\x00\x03a/b\x01\x00\x03c/d\x02"
    )
    opts = sub_opts(1, no_local=True, rap=True, rh=2)
    assert opts == 0b0010_1101  # MQTT 5.0 section 3.8.3.1
    assert subscribe(1, [("a", opts)], props=[(SUBSCRIPTION_ID, 7)]) == (
        b"\x82\x09\x00\x01\x02\x0b\x07\x00\x01a\x2d"
    )
    # MQTT 3.1.1 section 3.10.3, the payload example
    assert unsubscribe(10, ["a/b", "c/d"], version=4) == (b"\xa2\x0c\x00\x0a\x00\x03a/b\x00\x03c/d")
    assert unsubscribe(2, ["a"]) == b"\xa2\x06\x00\x02\x00\x00\x01a"


def test_small_packets() -> None:
    assert pingreq() == b"\xc0\x00"
    assert disconnect() == b"\xe0\x00"
    assert disconnect(0x04, version=4) == b"\xe0\x00"  # 3.1.1 has no reason code
    assert disconnect(0x04) == b"\xe0\x02\x04\x00"  # Disconnect with Will Message
    assert disconnect(props=[(SESSION_EXPIRY, 0)]) == b"\xe0\x07\x00\x05\x11\x00\x00\x00\x00"
    assert auth() == b"\xf0\x00"
    assert auth(0x18, [(AUTH_METHOD, "x")]) == b"\xf0\x06\x18\x04\x15\x00\x01x"


def _parse(raw: bytes, version: int = 5) -> Packet:
    reader = Reader()
    frames = reader.frames(raw)
    assert len(frames) == 1 and reader.buffered == 0
    return parse(*frames[0], version)


def test_parse_connack() -> None:
    p = _parse(b"\x20\x02\x01\x00", 4)
    assert (p.type, p.session_present, p.code, p.props) == (CONNACK, True, 0, [])
    p = _parse(b"\x20\x0a\x00\x00\x07\x21\x00\x0a\x1c\x00\x01s")
    assert p.props == [(RECEIVE_MAXIMUM, 10), (SERVER_REFERENCE, "s")]
    assert p.prop(RECEIVE_MAXIMUM) == 10 and p.prop(REASON_STRING) is None
    assert _parse(b"\x20\x03\x00\x87\x00").code == 0x87


def test_parse_publish() -> None:
    p = _parse(b"\x30\x06\x00\x00\x03\x23\x00\x05")  # empty topic and a topic alias
    assert (p.type, p.topic, p.prop(TOPIC_ALIAS), p.payload) == (PUBLISH, "", 5, b"")
    p = _parse(b"\x3b\x0c\x00\x03a/b\x00\x0a\x03\x0b\x81\x01h")
    assert (p.topic, p.qos, p.dup, p.retain, p.packet_id) == ("a/b", 1, True, True, 10)
    assert p.all(SUBSCRIPTION_ID) == [129] and p.payload == b"h"
    p = _parse(b"\x30\x06\x00\x03a/bz", 4)
    assert (p.topic, p.qos, p.payload, p.props) == ("a/b", 0, b"z", [])
    assert split_publish(0x0B, b"\x00\x03a/b\x00\x0a\x03\x0b\x81\x01h", 5) == (
        b"a/b",
        b"h",
        1,
        True,
        10,
    )
    assert split_publish(0x04, b"\x00\x01t\x01\x02xy", 4) == (b"t", b"xy", 2, False, 0x0102)


def test_parse_acks_and_subacks() -> None:
    assert _parse(b"\x40\x02\x00\x07", 4).packet_id == 7
    p = _parse(b"\x62\x02\x00\x07")
    assert (p.type, p.packet_id, p.code) == (PUBREL, 7, 0)
    p = _parse(b"\x50\x08\x00\x07\x10\x04\x1f\x00\x01r")
    assert (p.code, p.prop(REASON_STRING)) == (0x10, "r")
    assert _parse(b"\x70\x03\x00\x07\x92").code == 0x92
    # MQTT 3.1.1 section 3.9.3, the payload example: granted QoS 0, 2 and a failure.
    p = _parse(b"\x90\x05\x00\x0a\x00\x02\x80", 4)
    assert (p.type, p.packet_id, p.codes) == (SUBACK, 10, [0, 2, 0x80])
    p = _parse(b"\x90\x0b\x00\x0a\x07\x26\x00\x01a\x00\x01b\x01")
    assert (p.codes, p.user_props) == ([1], [("a", "b")])
    assert _parse(b"\xb0\x02\x00\x0a", 4).codes == []
    p = _parse(b"\xb0\x05\x00\x0a\x00\x00\x11")
    assert (p.type, p.codes) == (UNSUBACK, [0x00, 0x11])


def test_parse_disconnect_auth_pingresp() -> None:
    assert _parse(b"\xd0\x00").type == PINGRESP
    assert _parse(b"\xe0\x00").code == 0
    p = _parse(b"\xe0\x09\x9c\x07\x1c\x00\x04host")
    assert (p.type, p.code, p.prop(SERVER_REFERENCE)) == (DISCONNECT, 0x9C, "host")
    p = _parse(b"\xf0\x06\x18\x04\x15\x00\x01m")
    assert (p.type, p.code, p.prop(AUTH_METHOD)) == (AUTH, 0x18, "m")


@pytest.mark.parametrize(
    ("raw", "version"),
    [
        (b"\x21\x02\x00\x00", 4),  # reserved flags on CONNACK (MQTT-2.1.3-1)
        (b"\x60\x02\x00\x01", 4),  # PUBREL without 0010
        (b"\x20\x02\x02\x00", 4),  # reserved connect acknowledge flag
        (b"\x20\x03\x00\x00\x00", 4),  # a 3.1.1 CONNACK is two bytes
        (b"\x36\x04\x00\x01t\x00", 4),  # QoS 3 (MQTT-3.3.1-4)
        (b"\x38\x03\x00\x01t", 4),  # DUP on QoS 0 (MQTT-3.3.1-2)
        (b"\x30\x03\x00\x01#", 4),  # wildcard in a delivered topic (MQTT-3.3.2-2)
        (b"\x30\x04\x00\x02\xc3\x28", 4),  # invalid UTF-8 (MQTT-1.5.4-1)
        (b"\x30\x03\x00\x01\x00", 4),  # U+0000 (MQTT-1.5.4-2)
        (b"\x30\x05\x00\x01t\x02\x7f", 5),  # unknown property
        (b"\x30\x05\x00\x01t\x05\x02", 5),  # property block past the end
        (b"\x40\x03\x00\x01\x00", 4),  # a 3.1.1 PUBACK is two bytes
        (b"\x40\x01\x00", 5),  # truncated packet id
        (b"\x90\x02\x00\x01", 4),  # SUBACK without a code
        (b"\xb0\x03\x00\x01\x00", 4),  # 3.1.1 UNSUBACK with a payload
        (b"\xd0\x01\x00", 5),  # PINGRESP with a body
        (b"\x10\x00", 5),  # CONNECT: a client's packet
        (b"\x82\x00", 5),  # SUBSCRIBE
        (b"\xc0\x00", 5),  # PINGREQ
    ],
)
def test_parse_rejects_what_a_server_may_not_send(raw: bytes, version: int) -> None:
    with pytest.raises(MalformedPacket):
        _parse(raw, version)


def test_reader_frames_byte_by_byte_and_keeps_a_partial_tail() -> None:
    stream = publish("a/b", b"z" * 300, qos=1, packet_id=9) + b"\x40\x02\x00\x09"
    reader = Reader()
    got = []
    for i in range(len(stream)):
        got += reader.frames(stream[i : i + 1])
        if i < 304:  # every strict prefix of the first frame is incomplete
            assert got == []
    assert [f[0] for f in got] == [PUBLISH, PUBACK]
    assert packet_id(got[1][2]) == 9 and reader.buffered == 0
    reader.feed(stream[:5])
    assert reader.next_frame() is None and reader.buffered == 5


@pytest.mark.parametrize("size", [0, 125, 126, 16_380, 16_381, 2_100_000])
def test_reader_across_length_sizes(size: int) -> None:
    # one-, two-, three- and four-byte remaining lengths, whole and cut in two at every header byte
    raw = publish("a/b", bytes(size), version=4, qos=1, packet_id=1)
    for cut in range(1, 7):
        reader = Reader()
        frames = reader.frames(raw[:cut]) + reader.frames(raw[cut:])
        assert frames == [(PUBLISH, 0x02, raw[len(raw) - size - 7 :])]


def test_reader_limits() -> None:
    with pytest.raises(MalformedPacket):
        Reader().frames(b"\x30\xff\xff\xff\xff\x01")
    with pytest.raises(MalformedPacket):
        Reader(max_size=100).frames(b"\x30\x65")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64), version=st.sampled_from([4, 5]))
def test_arbitrary_bytes_parse_or_raise_malformed(data: bytes, version: int) -> None:
    whole = Reader()
    try:
        frames = whole.frames(data)
    except MalformedPacket:
        return
    one_by_one = Reader()
    assert [f for i in range(len(data)) for f in one_by_one.frames(data[i : i + 1])] == frames
    stepped = Reader()
    stepped.feed(data)
    assert list(iter(stepped.next_frame, None)) == frames
    for frame in frames:
        with contextlib.suppress(MalformedPacket):  # nothing else: no IndexError, no UnicodeError
            assert isinstance(parse(*frame, version), Packet)


@settings(max_examples=200, deadline=None)
@given(
    topic=st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"), max_size=30
    ),
    payload=st.binary(max_size=300),
    qos=st.sampled_from([0, 1, 2]),
    retain=st.booleans(),
    pid=st.integers(min_value=1, max_value=65_535),
    version=st.sampled_from([4, 5]),
    expiry=st.none() | st.integers(min_value=0, max_value=2**32 - 1),
)
def test_publish_round_trip(
    topic: str, payload: bytes, qos: int, retain: bool, pid: int, version: int, expiry: int | None
) -> None:
    # The broker's PUBLISH has the client's layout, so the reader reads back what was built.
    props = [(MESSAGE_EXPIRY, expiry)] if expiry is not None and version == 5 else None
    raw = publish(
        topic, payload, version=version, qos=qos, retain=retain, packet_id=pid, props=props
    )
    p = _parse(raw, version)
    assert (p.topic, p.payload, p.qos, p.retain) == (topic, payload, qos, retain)
    assert p.packet_id == (pid if qos else 0) and p.props == (props or [])
    assert split_publish(p.flags, p.body, version) == (
        topic.encode(),
        payload,
        qos,
        retain,
        pid if qos else 0,
    )
