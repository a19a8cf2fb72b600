"""Codec: round trips of every packet type in both versions, partial frames, arbitrary bytes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcloudtt_broker.mqtt import (
    MQTT_5,
    MQTT_31,
    MQTT_311,
    Auth,
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    MalformedPacket,
    PacketTooLarge,
    PingReq,
    PingResp,
    Properties,
    ProtocolError,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    ReasonCode,
    SubAck,
    Subscribe,
    SubscriptionRequest,
    UnsubAck,
    Unsubscribe,
    UnsupportedProtocolVersion,
    Will,
    encode_bytes,
)

RICH = Properties(
    payload_format_indicator=1,
    message_expiry_interval=3600,
    content_type="application/json",
    response_topic="replies/1",
    correlation_data=b"\x00\x01corr",
    user_properties=(("k", "v"), ("k", "v2"), ("ü", "✓")),
)


def packets_for(version: int) -> list[object]:
    v5 = version == MQTT_5
    props = RICH if v5 else Properties()
    packets: list[object] = [
        Connect(client_id="dev-1", protocol_level=version, keep_alive=30),
        Connect(
            client_id="dev-2",
            protocol_level=version,
            clean_start=False,
            keep_alive=0,
            username="user",
            password=b"\x00secret\xff",
            will=Will(
                topic="devices/dev-2/status",
                payload=b"offline",
                qos=1,
                retain=True,
                properties=Properties(will_delay_interval=5, content_type="text/plain")
                if v5
                else Properties(),
            ),
            properties=Properties(
                session_expiry_interval=120,
                receive_maximum=10,
                maximum_packet_size=1000,
                topic_alias_maximum=5,
                request_problem_information=0,
                user_properties=(("a", "b"),),
            )
            if v5
            else Properties(),
        ),
        ConnAck(session_present=True, reason_code=0),
        ConnAck(
            reason_code=0x86 if v5 else 4,
            properties=Properties(
                assigned_client_identifier="auto-1", server_keep_alive=60, reason_string="bad"
            )
            if v5
            else Properties(),
        ),
        Publish(topic="a/b", payload=b"x"),
        Publish(topic="a/b", payload=b"", qos=1, packet_id=1, retain=True),
        Publish(
            topic="sensors/€/temp",
            payload=bytes(range(256)) * 5,
            qos=2,
            dup=True,
            packet_id=65535,
            properties=props,
        ),
        PubAck(packet_id=7),
        PubRec(packet_id=8),
        PubRel(packet_id=9),
        PubComp(packet_id=10),
        Subscribe(
            packet_id=11,
            subscriptions=(
                SubscriptionRequest(topic_filter="a/+/c", qos=1),
                SubscriptionRequest(topic_filter="#", qos=2),
            ),
        ),
        SubAck(packet_id=11, reason_codes=(1, 2, 0x80)),
        Unsubscribe(packet_id=12, topic_filters=("a/+/c", "#")),
        PingReq(),
        PingResp(),
        Disconnect(),
    ]
    if v5:
        packets += [
            PubAck(packet_id=7, reason_code=0x10),
            PubRec(packet_id=8, reason_code=0x80, properties=Properties(reason_string="no")),
            PubRel(packet_id=9, reason_code=0x92),
            PubComp(
                packet_id=10, reason_code=0, properties=Properties(user_properties=(("x", "y"),))
            ),
            Subscribe(
                packet_id=13,
                subscriptions=(
                    SubscriptionRequest(
                        topic_filter="$share/g/a/#",
                        qos=1,
                        retain_as_published=True,
                        retain_handling=2,
                    ),
                    SubscriptionRequest(topic_filter="x", no_local=True, retain_handling=1),
                ),
                properties=Properties(subscription_identifiers=(42,)),
            ),
            Publish(
                topic="",
                payload=b"p",
                qos=1,
                packet_id=3,
                properties=Properties(topic_alias=4, subscription_identifiers=(1, 268_435_455)),
            ),
            SubAck(
                packet_id=13, reason_codes=(1, 0x8F), properties=Properties(reason_string="why")
            ),
            UnsubAck(packet_id=12, reason_codes=(0, 0x11)),
            Disconnect(
                reason_code=0x04,
                properties=Properties(session_expiry_interval=0, reason_string="bye"),
            ),
            Auth(
                reason_code=0x18,
                properties=Properties(authentication_method="SCRAM", authentication_data=b"\x01"),
            ),
            Auth(),
        ]
    else:
        packets.append(UnsubAck(packet_id=12))
    return packets


def decoder_for(packet: object, version: int) -> Decoder:
    # A server-side decoder learns the version from CONNECT; for other packets we set it.
    return Decoder() if isinstance(packet, Connect) else Decoder(version=version)


CASES = [(v, p) for v in (MQTT_311, MQTT_5) for p in packets_for(v)]
IDS = [f"v{v}-{type(p).__name__}-{i}" for i, (v, p) in enumerate(CASES)]


@pytest.mark.parametrize(("version", "packet"), CASES, ids=IDS)
def test_round_trip(version: int, packet: object) -> None:
    wire = encode_bytes(packet, version)  # type: ignore[arg-type]
    decoder = decoder_for(packet, version)
    decoder.feed(wire)
    assert decoder.next_packet() == packet
    assert decoder.next_packet() is None
    assert decoder.buffered == 0


@pytest.mark.parametrize(("version", "packet"), CASES, ids=IDS)
def test_every_strict_prefix_is_incomplete(version: int, packet: object) -> None:
    wire = encode_bytes(packet, version)  # type: ignore[arg-type]
    for cut in range(len(wire)):
        decoder = decoder_for(packet, version)
        decoder.feed(wire[:cut])
        assert decoder.next_packet() is None, f"prefix of {cut} bytes decoded"


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_stream_of_all_packets_fed_byte_by_byte(version: int) -> None:
    packets = [p for p in packets_for(version) if not isinstance(p, Connect)]
    wire = b"".join(encode_bytes(p, version) for p in packets)  # type: ignore[arg-type]
    decoder = Decoder(version=version)
    decoded = []
    for index in range(len(wire)):
        decoder.feed(wire[index : index + 1])
        while (packet := decoder.next_packet()) is not None:
            decoded.append(packet)
    assert decoded == packets


def test_large_packet_in_many_chunks_is_reassembled() -> None:
    packet = Publish(topic="big", payload=b"\xab" * 3_000_000, qos=1, packet_id=1)
    wire = encode_bytes(packet, MQTT_311)
    decoder = Decoder(version=MQTT_311)
    for start in range(0, len(wire), 65_536):
        decoder.feed(wire[start : start + 65_536])
    assert decoder.next_packet() == packet


def test_oversized_packet_is_refused_from_its_header() -> None:
    decoder = Decoder(version=MQTT_5, max_packet_size=1024)
    wire = encode_bytes(Publish(topic="t", payload=b"x" * 2000), MQTT_5)
    decoder.feed(wire[:5])  # the header alone is enough to know
    with pytest.raises(PacketTooLarge) as caught:
        decoder.next_packet()
    assert caught.value.reason_code == ReasonCode.PACKET_TOO_LARGE


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"\x10\x0c\x00\x06MQIsdp\x04\x02\x00\x3c", None),  # MQIsdp is level 3 only
        (b"\x10\x0a\x00\x04MQTT\x03\x02\x00\x3c", None),  # MQTT at level 3
        (b"\x10\x0a\x00\x04MQTT\x06\x02\x00\x3c", None),  # unknown level
    ],
)
def test_unsupported_protocol_levels(wire: bytes, reason: None) -> None:
    decoder = Decoder()
    decoder.feed(wire)
    with pytest.raises(UnsupportedProtocolVersion):
        decoder.next_packet()


def test_mqtt31_connect_is_decoded_and_later_packets_read_as_311() -> None:
    connect = Connect(
        client_id="old-device",
        protocol_level=MQTT_31,
        protocol_name="MQIsdp",
        clean_start=False,
        will=Will(topic="w", payload=b"gone", qos=1),
    )
    wire = encode_bytes(connect, MQTT_31)
    assert wire[2:11] == b"\x00\x06MQIsdp\x03"
    decoder = Decoder()
    decoder.feed(wire)
    assert decoder.next_packet() == connect
    assert decoder.version == MQTT_31
    # A 3.1 SUBSCRIBE has no property section: read as 3.1.1.
    sub = Subscribe(packet_id=7, subscriptions=(SubscriptionRequest(topic_filter="a/#", qos=2),))
    decoder.feed(encode_bytes(sub, MQTT_311))
    assert decoder.next_packet() == sub


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
@pytest.mark.parametrize("packet_type", [3, 8, 10])
def test_packet_identifier_zero_is_malformed(version: int, packet_type: int) -> None:
    body = {
        3: b"\x00\x01t\x00\x00" + (b"\x00" if version == MQTT_5 else b""),  # QoS 1 PUBLISH
        8: b"\x00\x00" + (b"\x00" if version == MQTT_5 else b"") + b"\x00\x01t\x00",
        10: b"\x00\x00" + (b"\x00" if version == MQTT_5 else b"") + b"\x00\x01t",
    }[packet_type]
    first = {3: 0x32, 8: 0x82, 10: 0xA2}[packet_type]
    decoder = Decoder(version=version)
    decoder.feed(bytes([first, len(body)]) + body)
    with pytest.raises(MalformedPacket):  # MQTT-2.2.1-3 (3.1.1: MQTT-2.3.1-1)
        decoder.next_packet()


@pytest.mark.parametrize("packet_type", [8, 10])
def test_property_not_allowed_in_subscribe_or_unsubscribe_is_malformed(packet_type: int) -> None:
    # Message Expiry Interval (0x02) belongs to PUBLISH only (5.0 section 2.2.2.2).
    props = b"\x05\x02\x00\x00\x00\x05"
    body = b"\x00\x01" + props + b"\x00\x01t" + (b"\x00" if packet_type == 8 else b"")
    decoder = Decoder(version=MQTT_5)
    decoder.feed(bytes([0x82 if packet_type == 8 else 0xA2, len(body)]) + body)
    with pytest.raises(MalformedPacket) as caught:
        decoder.next_packet()
    assert caught.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize(
    ("version", "wire", "expected"),
    [
        (MQTT_311, b"\x32\x05\x00\x01a\x00\x00", ProtocolError),  # packet id 0
        (MQTT_311, b"\x36\x03\x00\x01a", MalformedPacket),  # QoS 3
        (MQTT_311, b"\x38\x03\x00\x01a", MalformedPacket),  # DUP on QoS 0
        (MQTT_311, b"\x80\x06\x00\x01\x00\x01a\x00", MalformedPacket),  # SUBSCRIBE flags 0000
        (
            MQTT_311,
            b"\x82\x06\x00\x01\x00\x01a\x04",
            MalformedPacket,
        ),  # reserved option bits in 3.1.1
        (MQTT_5, b"\x82\x07\x00\x01\x00\x00\x01a\x30", ProtocolError),  # Retain Handling 3
        (MQTT_311, b"\x82\x02\x00\x01", ProtocolError),  # no topic filter
        (MQTT_311, b"\x30\x03\x00\x02a", MalformedPacket),  # string longer than packet
        (MQTT_311, b"\x30\x05\x00\x02\xc3\x28x", MalformedPacket),  # invalid UTF-8
        (MQTT_311, b"\x30\x04\x00\x01\x00x", MalformedPacket),  # U+0000 in a topic
        (MQTT_311, b"\x30\xff\xff\xff\xff\x01", MalformedPacket),  # 5-byte remaining length
        (MQTT_311, b"\x00\x00", MalformedPacket),  # reserved type 0
        (MQTT_311, b"\xc0\x01\x00", MalformedPacket),  # PINGREQ with a body
        (MQTT_311, b"\xf0\x00", MalformedPacket),  # AUTH in 3.1.1
        (MQTT_5, b"\x30\x06\x00\x01a\x02\x7f\x00", MalformedPacket),  # unknown property 0x7f
        (MQTT_5, b"\x30\x07\x00\x01a\x02\x11\x00\x00", ProtocolError),  # session expiry in PUBLISH
        (MQTT_5, b"\x30\x08\x00\x01a\x04\x01\x01\x01\x01", ProtocolError),  # property twice
        (MQTT_5, b"\x30\x06\x00\x01a\x02\x01\x02", ProtocolError),  # payload format 2
        (MQTT_5, b"\x30\x07\x00\x01a\x03\x23\x00\x00", ProtocolError),  # topic alias 0
    ],
)
def test_malformed_packets_raise_with_reason(
    version: int, wire: bytes, expected: type[Exception]
) -> None:
    decoder = Decoder(version=version)
    decoder.feed(wire)
    with pytest.raises(expected) as caught:
        decoder.next_packet()
    assert isinstance(caught.value, ProtocolError)
    assert caught.value.reason_code >= 0x80


def test_first_packet_must_be_connect() -> None:
    decoder = Decoder()
    decoder.feed(b"\xc0\x00")
    with pytest.raises(ProtocolError):
        decoder.next_packet()


def test_second_connect_is_a_protocol_error() -> None:
    wire = encode_bytes(Connect(client_id="c"), MQTT_311)
    decoder = Decoder()
    decoder.feed(wire + wire)
    assert isinstance(decoder.next_packet(), Connect)
    with pytest.raises(ProtocolError):
        decoder.next_packet()


def _drain(decoder: Decoder) -> None:
    for _ in range(10_000):
        if decoder.next_packet() is None:
            return


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.binary(max_size=300), version=st.sampled_from([None, MQTT_311, MQTT_5]))
def test_arbitrary_bytes_decode_or_raise_protocol_error(data: bytes, version: int | None) -> None:
    whole = Decoder(version=version, max_packet_size=10_000)
    whole.feed(data)
    whole_result: object
    try:
        _drain(whole)
        whole_result = "ok"
    except ProtocolError as error:
        whole_result = type(error)
    # Byte by byte must reach the same verdict.
    bytewise = Decoder(version=version, max_packet_size=10_000)
    bytewise_result: object = "ok"
    try:
        for index in range(len(data)):
            bytewise.feed(data[index : index + 1])
            _drain(bytewise)
    except ProtocolError as error:
        bytewise_result = type(error)
    assert whole_result == bytewise_result


@settings(max_examples=200, deadline=None)
@given(
    topic=st.text(min_size=1, max_size=50).filter(lambda t: "\x00" not in t),
    payload=st.binary(max_size=500),
    qos=st.integers(0, 2),
    retain=st.booleans(),
    version=st.sampled_from([MQTT_311, MQTT_5]),
)
def test_publish_round_trip_property(
    topic: str, payload: bytes, qos: int, retain: bool, version: int
) -> None:
    packet = Publish(
        topic=topic, payload=payload, qos=qos, retain=retain, packet_id=5 if qos else None
    )
    decoder = Decoder(version=version)
    decoder.feed(encode_bytes(packet, version))
    assert decoder.next_packet() == packet
