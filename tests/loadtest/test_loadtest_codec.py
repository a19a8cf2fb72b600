"""The load generator's own MQTT 3.1.1 encoder and decoder, and its inline stream parser."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcloudtt_loadtest import clients, mqtt


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
def test_remaining_length_boundaries(n: int, encoded: bytes) -> None:
    # The table of MQTT 3.1.1 section 2.2.3.
    assert mqtt.encode_remaining_length(n) == encoded
    assert mqtt.decode_remaining_length(b"\x30" + encoded, 1) == (n, 1 + len(encoded))


def test_remaining_length_limits() -> None:
    with pytest.raises(ValueError):
        mqtt.encode_remaining_length(268_435_456)
    with pytest.raises(mqtt.ProtocolError):
        mqtt.decode_remaining_length(b"\x30\xff\xff\xff\xff\x01", 1)
    assert mqtt.decode_remaining_length(b"\x30\xff\xff", 1) is None


def _one(data: bytes) -> mqtt.Packet:
    packets, used = mqtt.split_packets(data)
    assert used == len(data)
    assert len(packets) == 1
    return packets[0]


def test_connect_round_trip() -> None:
    raw = mqtt.connect("sensor-17", keepalive=600, clean_session=True)
    assert raw[:2] == b"\x10\x15"  # 10 bytes of variable header, 2 + 9 of client id
    c = mqtt.parse_connect(_one(raw))
    assert c == mqtt.Connect(
        client_id="sensor-17", keepalive=600, clean_session=True, protocol_level=4
    )
    assert not mqtt.parse_connect(_one(mqtt.connect("x", clean_session=False))).clean_session


def test_connack_round_trip() -> None:
    assert mqtt.connack() == b"\x20\x02\x00\x00"
    assert mqtt.parse_connack(_one(mqtt.connack(session_present=True, return_code=5))) == (True, 5)


@pytest.mark.parametrize(
    ("qos", "packet_id", "retain", "dup", "payload"),
    [
        (0, None, False, False, b"x" * 100),
        (1, 7, False, False, b""),
        (1, 65_535, True, True, bytes(range(256))),
        (2, 1, False, False, b"y" * 20_000),  # three-byte remaining length
    ],
)
def test_publish_round_trip(
    qos: int, packet_id: int | None, retain: bool, dup: bool, payload: bytes
) -> None:
    raw = mqtt.publish(
        "sensors/3/temp", payload, qos=qos, packet_id=packet_id, retain=retain, dup=dup
    )
    p = mqtt.parse_publish(_one(raw))
    assert p == mqtt.Publish(
        topic="sensors/3/temp",
        payload=payload,
        qos=qos,
        packet_id=packet_id,
        retain=retain,
        dup=dup,
    )


def test_publish_rejects_mismatched_packet_id() -> None:
    with pytest.raises(ValueError):
        mqtt.publish("t", b"", qos=0, packet_id=1)
    with pytest.raises(ValueError):
        mqtt.publish("t", b"", qos=1)


def test_publish_prefix_matches_encoder() -> None:
    prefix = clients._publish_prefix("sensors/0/temp", 1, 100)
    assert prefix + b"\x00\x05" + b"x" * 100 == mqtt.publish(
        "sensors/0/temp", b"x" * 100, qos=1, packet_id=5
    )


def test_subscribe_and_suback_round_trip() -> None:
    raw = mqtt.subscribe(42, [("sensors/+/temp", 1), ("devices/#", 0)])
    assert raw[0] == 0x82  # MQTT-3.8.1-1
    assert mqtt.parse_subscribe(_one(raw)) == (42, [("sensors/+/temp", 1), ("devices/#", 0)])
    assert mqtt.parse_suback(_one(mqtt.suback(42, [1, 0x80]))) == (42, [1, 0x80])


def test_small_packets() -> None:
    assert mqtt.parse_packet_id(_one(mqtt.puback(0x1234))) == 0x1234
    assert _one(mqtt.pingreq()).type == mqtt.PINGREQ
    assert _one(mqtt.pingresp()).type == mqtt.PINGRESP
    assert _one(mqtt.disconnect()) == mqtt.Packet(type=mqtt.DISCONNECT, flags=0, body=b"")


def test_every_strict_prefix_is_incomplete() -> None:
    raw = mqtt.publish("a/b", b"z" * 300, qos=1, packet_id=9)
    for cut in range(len(raw)):
        assert mqtt.split_packets(raw[:cut]) == ([], 0)


def test_split_packets_leaves_a_partial_tail() -> None:
    a = mqtt.puback(1)
    b = mqtt.publish("t", b"p", qos=1, packet_id=2)
    packets, used = mqtt.split_packets(a + b + b[:3])
    assert [p.type for p in packets] == [mqtt.PUBACK, mqtt.PUBLISH]
    assert used == len(a + b)


class _Sink:
    """Stands in for a transport: collects what the protocol writes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: Any) -> None:
        self.data += data

    def close(self) -> None:
        pass


def _feed(stream: bytes, cuts: list[int], *, ack: bool) -> tuple[int, int, bytes]:
    async def run() -> tuple[int, int, bytes]:
        sub = clients.Subscriber()
        sub.ack_publishes = ack
        sink = _Sink()
        sub.connection_made(sink)  # type: ignore[arg-type]
        pos = 0
        for cut in [*sorted(cuts), len(stream)]:
            if cut > pos:
                sub.data_received(stream[pos:cut])
                pos = cut
        return sub.publishes, sub.pubacks, bytes(sink.data)

    return asyncio.run(run())


_messages = st.lists(
    st.tuples(
        st.sampled_from(["sensors/1/temp", "sensors/22/temp", "a"]),
        st.sampled_from([0, 1, 2]),
        st.integers(min_value=1, max_value=65_535),
        st.sampled_from([0, 10, 100, 200]),  # 200: a two-byte remaining length
        st.booleans(),  # a PUBACK (to a publisher) in between
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(messages=_messages, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_stream_parser_counts_and_acks_whatever_the_chunking(
    messages: list[tuple[str, int, int, int, bool]], cuts: list[int]
) -> None:
    stream = b""
    publishes = 0
    pubacks = 0
    expected_acks = b""
    for topic, qos, pid, size, with_puback in messages:
        stream += mqtt.publish(topic, b"v" * size, qos=qos, packet_id=pid if qos else None)
        publishes += 1
        if qos == 1:
            expected_acks += mqtt.puback(pid)
        elif qos == 2:
            expected_acks += bytes((mqtt.PUBREC << 4, 2)) + pid.to_bytes(2, "big")
        if with_puback:
            stream += mqtt.puback(pid)
            pubacks += 1
    assert _feed(stream, [c % (len(stream) + 1) for c in cuts], ack=True) == (
        publishes,
        pubacks,
        expected_acks,
    )


def test_uniform_fast_path_acks_each_packet_id() -> None:
    pids = list(range(1, 301))
    stream = b"".join(mqtt.publish("sensors/0/temp", b"x" * 100, qos=1, packet_id=p) for p in pids)
    stream += mqtt.connack()  # something else after the run
    count, acks, written = _feed(stream, [], ack=True)
    assert (count, acks) == (300, 0)
    assert written == b"".join(mqtt.puback(p) for p in pids)
    # And a run of PUBACKs, as a publisher reads them.
    assert _feed(b"".join(mqtt.puback(p) for p in pids), [], ack=False)[:2] == (0, 300)


def test_qos2_delivery_gets_pubrec_then_pubcomp() -> None:
    pubrel = bytes(((mqtt.PUBREL << 4) | 0x02, 2, 0x01, 0x02))
    stream = mqtt.publish("t", b"x", qos=2, packet_id=0x0102) + pubrel
    assert _feed(stream, [], ack=True) == (1, 0, b"\x50\x02\x01\x02" + b"\x70\x02\x01\x02")


def test_latency_subscriber_reads_the_timestamp() -> None:
    async def run() -> list[int]:
        sub = clients.Subscriber(latency=True)
        sub.connection_made(_Sink())  # type: ignore[arg-type]
        payload = (1).to_bytes(8, "big") + b"p" * 92
        sub.data_received(mqtt.publish("sensors/0/temp", payload) * 3)
        return sub.latencies_ns

    lat = asyncio.run(run())
    assert len(lat) == 3
    assert all(v > 0 for v in lat)


def test_retained_packets_are_retained_qos1() -> None:
    packets = clients.retained_packets(3)
    parsed = [mqtt.parse_publish(_one(p)) for p in packets]
    assert [p.topic for p in parsed] == ["devices/0/state", "devices/1/state", "devices/2/state"]
    assert all(p.retain and p.qos == 1 and len(p.payload) == 100 for p in parsed)
