"""Robustness: garbage, malformed and oversized packets, stalled and slow clients, many subscriptions.

After each abuse the broker must still serve a well-behaved client.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time

import pytest
from brokerproc import TARGET
from mcloudtt_chaos.procs import scrape

from .clients import mcloudtt_only
from .mqttraw import (
    CONNACK,
    DISCONNECT,
    PINGRESP,
    PUBACK,
    PUBLISH,
    SUBACK,
    RawClient,
    connect,
    packet,
    pingreq,
    publish,
    subscribe,
    utf8,
    varint,
)

MOSQUITTO = TARGET == "mosquitto"
VERSIONS = pytest.mark.parametrize("version", [4, 5])


def still_serving(port: int, uid: str) -> None:
    """A fresh client can connect, subscribe and get its own message back."""
    with RawClient(port) as c:
        assert c.connect(uid + "-ok").code == 0
        c.subscribe((f"{uid}/alive", 1))
        c.publish(f"{uid}/alive", b"yes", qos=1)
        assert c.next_publish().payload == b"yes"


# -- garbage before or instead of CONNECT --------------------------------------------------------

GARBAGE = {
    "ff": b"\xff" * 16,
    "zeros": b"\x00" * 16,
    "http": b"GET / HTTP/1.1\r\nHost: broker\r\n\r\n",
    "tls-hello": bytes.fromhex("160301") + b"\x00\x2a" + b"\x01" * 42,
    "random": random.Random(1883).randbytes(512),
    "bad-varint": b"\x10\xff\xff\xff\xff\x7f",
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_instead_of_connect_closes(mq, raw, uid, name):
    c = raw(mq.port)
    c.send(GARBAGE[name])
    got = c.closed()
    assert all(p.type != CONNACK or p.code != 0 for p in got)
    still_serving(mq.port, uid)


@VERSIONS
def test_garbage_after_connect_closes(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    c.send(b"\xff" * 64)  # AUTH with reserved flags set and an over-long remaining length
    got = c.closed()
    assert all(p.type == DISCONNECT and p.code in (0x81, 0x82) for p in got), got
    still_serving(mq.port, uid)


@VERSIONS
def test_remaining_length_over_four_bytes_closes(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    c.send(b"\x30\xff\xff\xff\xff\x01")  # 1.5.5: at most four bytes
    got = c.closed()
    assert all(p.type == DISCONNECT and p.code == 0x81 for p in got), got


@VERSIONS
@pytest.mark.parametrize("ptype", [0, 15])
def test_reserved_or_unexpected_packet_type_closes(mq, raw, uid, version, ptype):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    c.send(packet(ptype, 0, b"\x00"))  # 0 is reserved; AUTH without an auth method (or in 3.1.1)
    got = c.closed()
    assert all(p.type == DISCONNECT and p.code in (0x81, 0x82) for p in got), got


# -- protocol violations after CONNECT ------------------------------------------------------------


@VERSIONS
@pytest.mark.parametrize("topic", ["R/+", "R/#", "+", "R/a+b"])
def test_publish_to_wildcard_topic_closes(mq, raw, uid, version, topic):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    c.send(publish(topic.replace("R", uid), b"x", version=version, qos=1, packet_id=1))
    got = c.closed()  # MQTT-3.3.2-2
    if version == 4:
        assert got == []
    elif MOSQUITTO:
        assert [(p.type, p.code) for p in got] == [(DISCONNECT, 0x82)]  # Mosquitto's choice
    else:
        assert [(p.type, p.code) for p in got] == [(DISCONNECT, 0x90)]  # Topic Name invalid
    still_serving(mq.port, uid)


RESERVED_FLAG_CASES = {
    "pubrel-0": packet(6, 0x0, struct.pack("!H", 1)),  # MQTT-3.6.1-1
    "subscribe-0": packet(8, 0x0, struct.pack("!H", 1) + b"\x00" + utf8("a") + b"\x00"),
    "unsubscribe-0": packet(10, 0x0, struct.pack("!H", 1) + b"\x00" + utf8("a")),
    "pingreq-1": packet(12, 0x1, b""),
    "disconnect-1": packet(14, 0x1, b""),
}


@pytest.mark.parametrize("case", list(RESERVED_FLAG_CASES))
def test_v5_reserved_flags_get_malformed_disconnect(mq, raw, uid, case, request):
    if MOSQUITTO and case == "pingreq-1":
        request.applymarker(
            pytest.mark.xfail(
                strict=True, reason="Mosquitto 2.0.11 ignores reserved flags on PINGREQ"
            )
        )
    c = raw(mq.port)
    c.connect(uid)
    c.send(RESERVED_FLAG_CASES[case])
    got = c.closed()  # MQTT-2.1.3-1: a malformed packet; the connection must close
    if MOSQUITTO:  # closing without a DISCONNECT is also allowed (4.13)
        assert [(p.type, p.code) for p in got] in ([], [(DISCONNECT, 0x81)])
    else:  # our contract: tell the client why
        assert [(p.type, p.code) for p in got] == [(DISCONNECT, 0x81)]


@VERSIONS
@pytest.mark.parametrize(
    "topic", [b"a\xff\xfe", b"a\x00b", b"\xed\xa0\x80"], ids=["bad", "nul", "surrogate"]
)
def test_malformed_utf8_topic_closes(mq, raw, uid, version, topic):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    c.send(publish(topic, b"x", version=version))
    got = c.closed()  # MQTT-1.5.4-1, MQTT-1.5.4-2
    assert all(p.type == DISCONNECT and p.code in (0x81, 0x82) for p in got), got


@VERSIONS
def test_truncated_packet_body_closes(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    # remaining length 3 cannot hold the 2-byte length prefix plus the 5-byte topic it announces
    c.send(bytes([0x30, 3]) + struct.pack("!H", 5) + b"a")
    got = c.closed()
    assert all(p.type == DISCONNECT and p.code == 0x81 for p in got), got


# -- framing ---------------------------------------------------------------------------------------


@VERSIONS
def test_packets_split_byte_by_byte(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = (
        connect(uid, version=version)
        + subscribe(1, [(f"{uid}/bb", 1)], version=version)
        + publish(f"{uid}/bb", b"dribbled", version=version, qos=1, packet_id=2)
    )
    for i in range(len(stream)):
        c.send(stream[i : i + 1])
    types = []
    while len(types) < 4:
        p = c.recv()
        types.append(p.type)
        if p.type == PUBLISH:
            assert p.payload == b"dribbled"
    assert sorted(types) == sorted([CONNACK, SUBACK, PUBACK, PUBLISH])


@VERSIONS
def test_many_packets_in_one_write(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.send(
        connect(uid, version=version)
        + subscribe(1, [(f"{uid}/co", 0)], version=version)
        + b"".join(publish(f"{uid}/co", b"%d" % i, version=version) for i in range(50))
        + pingreq()
    )
    assert c.recv().type == CONNACK
    assert c.recv().type == SUBACK
    got = [c.recv() for _ in range(51)]
    assert [p.payload for p in got if p.type == PUBLISH] == [b"%d" % i for i in range(50)]
    assert [p.type for p in got if p.type != PUBLISH] == [PINGRESP]


# -- stalled, oversized, many ----------------------------------------------------------------------


@mcloudtt_only
def test_connect_that_never_completes_is_closed(broker_factory, raw, uid):
    # Mosquitto waits for ever here; ours closes after --connect-timeout (default 10 s)
    b = broker_factory("--connect-timeout", "1")
    silent = raw(b.port)  # connected, never sends a byte
    stalled = [raw(b.port) for _ in range(20)]
    for s in stalled:
        s.send(connect(uid)[:5])  # half a CONNECT, then silence
    t0 = time.monotonic()
    still_serving(b.port, uid)  # others unaffected meanwhile
    assert silent.closed(timeout=4) == []
    for s in stalled:
        got = s.closed(timeout=4)
        assert all(p.type != CONNACK for p in got)
    assert time.monotonic() - t0 <= 1 + 1.5
    still_serving(b.port, uid + "2")


@mcloudtt_only
@pytest.mark.parametrize("version", [4, 5])
def test_oversized_packet_refused_from_its_header(mq, raw, uid, version):
    broker = mq
    c = raw(broker.port, version=version)
    c.connect(uid, version=version)
    size = 5 * 1024 * 1024  # above the 4 MiB default
    c.send(bytes([0x30]) + varint(size) + utf8(f"{uid}/big"))  # header only: no need to wait
    got = c.closed(timeout=3)
    if version == 5:
        assert [(p.type, p.code) for p in got] == [(DISCONNECT, 0x95)]  # 3.2.2.3.6
    else:
        assert got == []
    still_serving(broker.port, uid)


def test_ten_thousand_subscriptions_from_one_client(broker, raw, uid):
    c = raw(broker.port)
    c.connect(uid)
    batches = [[(f"{uid}/s/{b}/{i}", 1) for i in range(100)] for b in range(100)]
    c.send(b"".join(subscribe(b + 1, batch) for b, batch in enumerate(batches)))
    for b in range(100):
        ack = c.expect(SUBACK, timeout=10)
        assert ack.packet_id == b + 1
        assert ack.codes == [1] * 100
    for b, i in [(0, 0), (57, 42), (99, 99)]:
        c.publish(f"{uid}/s/{b}/{i}", b"%d/%d" % (b, i), qos=1)
    assert [p.payload for p in c.publishes(3)] == [b"0/0", b"57/42", b"99/99"]
    if not MOSQUITTO:
        assert broker.metric("mcloudtt_subscriptions") == 10_000
    c.disconnect()
    if not MOSQUITTO:
        assert broker.metric("mcloudtt_subscriptions") == 0


def test_many_concurrent_connections(mq, uid):
    broker = mq
    n = 200

    async def one(i: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
        writer.write(connect(f"{uid}-{i}", version=5 if i % 2 else 4))
        head = await reader.readexactly(2)
        body = await reader.readexactly(head[1])
        writer.close()
        await writer.wait_closed()
        return body[1]  # the CONNACK code

    async def main() -> list[int]:
        async with asyncio.timeout(20):
            return await asyncio.gather(*(one(i) for i in range(n)))

    assert asyncio.run(main()) == [0] * n
    still_serving(broker.port, uid)


def _dropped_total(broker) -> float:  # type: ignore[no-untyped-def]
    """mcloudtt_messages_dropped_total summed over its reasons (queue_full, slow_consumer...)."""
    return scrape(broker.http_port).total("mcloudtt_messages_dropped_total")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(
    MOSQUITTO,
    reason="the fixture runs Mosquitto with max_queued_messages 0 "
    "(unbounded), so its memory grows with the flood by design",
)
def test_slow_subscriber_does_not_grow_memory_or_block_others(broker, raw, uid):
    stuck = raw(broker.port, rcvbuf=4096)  # never reads again after SUBACK
    stuck.connect(uid + "stuck")
    stuck.subscribe((f"{uid}/flood/#", 1))
    healthy = raw(broker.port)
    healthy.connect(uid + "healthy")
    healthy.subscribe((f"{uid}/probe", 1))
    base = _rss_mib(broker.proc.pid)

    pub = raw(broker.port)
    pub.connect(uid + "pub")
    blob = publish(f"{uid}/flood/x", b"x" * 1000) * 100
    pub.sock.settimeout(3)
    sent, paused = 0, False
    try:
        for _ in range(400):  # 40,000 QoS 0 messages, 40 MB
            pub.sock.sendall(blob)
            sent += 100
    except TimeoutError:
        paused = True  # the broker stopped reading the flooder: backpressure, also fine

    prober = raw(broker.port)
    prober.connect(uid + "prober")
    prober.publish(f"{uid}/probe", b"still here", qos=1)
    assert healthy.next_publish().payload == b"still here"
    growth = _rss_mib(broker.proc.pid) - base
    assert growth < 20, f"broker RSS grew {growth:.0f} MiB for {sent} messages to a stuck client"
    dropped = _dropped_total(broker)
    assert paused or dropped > 0, "neither dropped for the stuck client nor pushed back"
    still_serving(broker.port, uid)
