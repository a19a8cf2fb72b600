"""The load generator's inline stream parser and pre-encoded packets, built on the client codec."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcloudtt_loadtest import clients
from mcloudtt_mqttclient import MQTT_311, PUBACK, PUBREC, PUBREL, Reader, ack, parse, subscribe
from mcloudtt_mqttclient import publish as build_publish


def publish(topic: str, payload: bytes, *, qos: int = 0, packet_id: int | None = None) -> bytes:
    return build_publish(topic, payload, version=MQTT_311, qos=qos, packet_id=packet_id)


def puback(pid: int) -> bytes:
    return ack(PUBACK, pid, version=MQTT_311)


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("size", [0, 100, 200, 20_000])  # one-, two- and three-byte lengths
def test_publish_prefix_matches_encoder(qos: int, size: int) -> None:
    prefix = clients._publish_prefix("sensors/0/temp", qos, size)
    pid = b"\x00\x05" if qos else b""
    assert prefix + pid + b"x" * size == publish(
        "sensors/0/temp", b"x" * size, qos=qos, packet_id=5 if qos else None
    )


def test_ack_heads() -> None:
    assert puback(7) == clients._PUBACK_HEAD + b"\x00\x07"
    assert ack(PUBREC, 7, version=MQTT_311) == clients._PUBREC_HEAD + b"\x00\x07"


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
        stream += publish(topic, b"v" * size, qos=qos, packet_id=pid if qos else None)
        publishes += 1
        if qos == 1:
            expected_acks += puback(pid)
        elif qos == 2:
            expected_acks += ack(PUBREC, pid, version=MQTT_311)
        if with_puback:
            stream += puback(pid)
            pubacks += 1
    assert _feed(stream, [c % (len(stream) + 1) for c in cuts], ack=True) == (
        publishes,
        pubacks,
        expected_acks,
    )


def test_uniform_fast_path_acks_each_packet_id() -> None:
    pids = list(range(1, 301))
    stream = b"".join(publish("sensors/0/temp", b"x" * 100, qos=1, packet_id=p) for p in pids)
    stream += b"\x20\x02\x00\x00"  # a CONNACK: something else after the run
    count, acks, written = _feed(stream, [], ack=True)
    assert (count, acks) == (300, 0)
    assert written == b"".join(puback(p) for p in pids)
    # And a run of PUBACKs, as a publisher reads them.
    assert _feed(b"".join(puback(p) for p in pids), [], ack=False)[:2] == (0, 300)


def test_qos2_delivery_gets_pubrec_then_pubcomp() -> None:
    pubrel = ack(PUBREL, 0x0102, version=MQTT_311)
    stream = publish("t", b"x", qos=2, packet_id=0x0102) + pubrel
    assert _feed(stream, [], ack=True) == (1, 0, b"\x50\x02\x01\x02" + b"\x70\x02\x01\x02")


def test_latency_subscriber_reads_the_timestamp() -> None:
    async def run() -> list[int]:
        sub = clients.Subscriber(latency=True)
        sub.connection_made(_Sink())  # type: ignore[arg-type]
        payload = (1).to_bytes(8, "big") + b"p" * 92
        sub.data_received(publish("sensors/0/temp", payload) * 3)
        return sub.latencies_ns

    lat = asyncio.run(run())
    assert len(lat) == 3
    assert all(v > 0 for v in lat)


def test_retained_packets_are_retained_qos1() -> None:
    packets = clients.retained_packets(3)
    parsed = [parse(*Reader().frames(p)[0], MQTT_311) for p in packets]
    assert [p.topic for p in parsed] == ["devices/0/state", "devices/1/state", "devices/2/state"]
    assert all(p.retain and p.qos == 1 and len(p.payload) == 100 for p in parsed)


def test_control_packets_resolve_connack_and_suback() -> None:
    async def run() -> tuple[int, list[int], bytes]:
        sub = clients.Subscriber()
        sink = _Sink()
        sub.connection_made(sink)  # type: ignore[arg-type]
        granted = sub.subscribe([("devices/+/cmd", 1)])
        sub.data_received(b"\x20\x02\x00\x00" + b"\x90\x03\x00\x01\x01")
        return await sub.connack, await granted, bytes(sink.data)

    code, granted, written = asyncio.run(run())
    assert (code, granted) == (0, [1])
    assert written == subscribe(1, [("devices/+/cmd", 1)], version=MQTT_311)
