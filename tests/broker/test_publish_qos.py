"""PUBLISH at QoS 0/1/2 in both directions: ack flows, QoS downgrade, order, flow control, resend."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest
from brokerproc import TARGET

from .mqttraw import (
    DISCONNECT,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RECEIVE_MAXIMUM,
    SESSION_EXPIRY,
    ack,
    publish,
)

VERSIONS = pytest.mark.parametrize("version", [4, 5])


def persistent(version: int) -> dict:  # type: ignore[type-arg]
    """CONNECT keywords for a session that outlives the connection."""
    kw: dict = {"clean": False, "version": version}  # type: ignore[type-arg]
    if version == 5:
        kw["props"] = [(SESSION_EXPIRY, 300)]
    return kw


@VERSIONS
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_full_ack_flow_both_directions(mq, raw, uid, version, qos):
    sub = raw(mq.port, version=version)
    sub.connect(uid + "s", version=version)
    assert sub.subscribe((f"{uid}/q", 2)).codes == [2]
    pub = raw(mq.port, version=version)
    pub.connect(uid + "p", version=version)

    # publisher side: PUBACK (QoS 1) or PUBREC/PUBREL/PUBCOMP (QoS 2) with the same packet id
    pub.send(publish(f"{uid}/q", b"m", version=version, qos=qos, packet_id=77 if qos else None))
    if qos == 1:
        a = pub.expect(PUBACK)
        assert (a.packet_id, a.code) == (77, 0)  # MQTT-4.3.2-4
    elif qos == 2:
        rec = pub.expect(PUBREC)
        assert (rec.packet_id, rec.code) == (77, 0)  # MQTT-4.3.3-8
        pub.send(ack(PUBREL, 77, version=version))
        comp = pub.expect(PUBCOMP)
        assert (comp.packet_id, comp.code) == (77, 0)  # MQTT-4.3.3-11

    # subscriber side: the broker runs the same flow toward the subscriber
    p = sub.recv()
    assert (p.type, p.topic, p.payload, p.qos, p.dup) == (PUBLISH, f"{uid}/q", b"m", qos, False)
    if qos == 0:
        assert p.packet_id == 0
    else:
        assert p.packet_id != 0  # MQTT-2.3.1-1
    if qos == 1:
        sub.send(ack(PUBACK, p.packet_id, version=version))
    elif qos == 2:
        sub.send(ack(PUBREC, p.packet_id, version=version))
        rel = sub.expect(PUBREL)
        assert rel.packet_id == p.packet_id and rel.flags == 0x02  # MQTT-3.6.1-1
        sub.send(ack(PUBCOMP, p.packet_id, version=version))
    # exactly once: nothing else arrives before a marker
    pub.publish(f"{uid}/q", b"marker")
    assert sub.next_publish().payload == b"marker"


@VERSIONS
def test_delivered_qos_is_min_of_publish_and_granted(mq, paho, uid, version):
    sub = paho(mq.port, uid + "s", version=version)
    for granted in range(3):
        assert sub.subscribe(f"{uid}/g{granted}", granted) == [granted]
    pub = paho(mq.port, uid + "p", version=version)
    for pub_qos in range(3):
        for granted in range(3):
            pub.publish(f"{uid}/g{granted}", f"{pub_qos}{granted}", qos=pub_qos)
            m = sub.get()
            assert m.topic == f"{uid}/g{granted}"
            # MQTT-3.8.4-6 (3.1.1) / MQTT-3.8.4-8 (5.0): delivered at min(publish, granted)
            assert m.qos == min(pub_qos, granted), m.payload


@VERSIONS
def test_qos2_resent_publish_before_pubrel_delivered_once(mq, raw, uid, version):
    sub = raw(mq.port, version=version)
    sub.connect(uid + "s", version=version)
    sub.subscribe((f"{uid}/x", 2))
    pub = raw(mq.port, version=version)
    pub.connect(uid + "p", version=version)
    pub.send(publish(f"{uid}/x", b"once", version=version, qos=2, packet_id=9))
    assert pub.expect(PUBREC).packet_id == 9
    pub.send(publish(f"{uid}/x", b"once", version=version, qos=2, packet_id=9, dup=True))
    assert pub.expect(PUBREC).packet_id == 9  # 4.3.3: acknowledged again, not delivered twice
    pub.send(ack(PUBREL, 9, version=version))
    assert pub.expect(PUBCOMP).packet_id == 9
    pub.publish(f"{uid}/x", b"marker", qos=1)
    got = [p.payload for p in sub.publishes(2)]
    assert got == [b"once", b"marker"]


@VERSIONS
def test_pipelined_qos1_acked_in_order(mq, raw, uid, version):
    sub = raw(mq.port, version=version)
    sub.connect(uid + "s", version=version)
    sub.subscribe((f"{uid}/o", 1))
    pub = raw(mq.port, version=version)
    pub.connect(uid + "p", version=version)
    n = 200
    pub.send(
        b"".join(
            publish(f"{uid}/o", b"%d" % i, version=version, qos=1, packet_id=i + 1)
            for i in range(n)
        )
    )
    # MQTT-4.6.0-2: PUBACKs in the order the PUBLISHes were received
    assert [pub.expect(PUBACK).packet_id for _ in range(n)] == list(range(1, n + 1))
    assert [p.payload for p in sub.publishes(n)] == [b"%d" % i for i in range(n)]


@VERSIONS
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_order_per_topic_kept(mq, paho, uid, version, qos):
    sub = paho(mq.port, uid + "s", version=version)
    sub.subscribe(f"{uid}/ord", 2)
    pub = paho(mq.port, uid + "p", version=version)
    n = 300
    infos = [pub.publish(f"{uid}/ord", b"%d" % i, qos=qos, wait=False) for i in range(n)]
    for info in infos:
        info.wait_for_publish(5)
    got = [int(m.payload) for m in sub.get_n(n)]
    assert got == list(range(n))  # MQTT-4.6.0-6: an ordered topic


@VERSIONS
def test_unknown_pubrel_answered(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    c.send(ack(PUBREL, 4242, version=version))
    comp = c.expect(PUBCOMP)
    assert comp.packet_id == 4242
    if version == 5:
        assert comp.code in (0x00, 0x92)  # 0x92 Packet Identifier not found


@VERSIONS
def test_packet_ids_distinct_while_in_flight(mq, raw, uid, version):
    sub = raw(mq.port, version=version)
    sub.connect(uid + "s", version=version)
    sub.subscribe((f"{uid}/ids", 1))
    pub = raw(mq.port, version=version)
    pub.connect(uid + "p", version=version)
    for i in range(10):
        pub.publish(f"{uid}/ids", b"%d" % i, qos=1)
    got = [sub.next_publish(ack_it=False) for _ in range(10)]
    ids = [p.packet_id for p in got]
    assert 0 not in ids and len(set(ids)) == 10  # MQTT-2.3.1-1, MQTT-2.3.1-2


@VERSIONS
def test_large_payload_round_trip(mq, raw, uid, version):
    sub = raw(mq.port, version=version)
    sub.connect(uid + "s", version=version)
    sub.subscribe((f"{uid}/big", 1))
    pub = raw(mq.port, version=version)
    pub.connect(uid + "p", version=version)
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    pub.publish(f"{uid}/big", payload, qos=1)
    assert sub.next_publish().payload == payload


@VERSIONS
def test_empty_payload_delivered(mq, raw, uid, version):
    sub = raw(mq.port, version=version)
    sub.connect(uid + "s", version=version)
    sub.subscribe((f"{uid}/empty", 1))
    sub.publish(f"{uid}/empty", b"", qos=1)
    p = sub.next_publish()
    assert (p.topic, p.payload) == (f"{uid}/empty", b"")


# -- malformed publishes -------------------------------------------------------------------------


@VERSIONS
def test_qos3_publish_closes_connection(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    c.send(publish(f"{uid}/q3", b"x", version=version, qos=3, packet_id=1))
    got = c.closed()  # MQTT-3.3.1-4
    assert all(p.type == DISCONNECT and p.code == 0x81 for p in got), got


@VERSIONS
def test_qos1_publish_with_packet_id_zero_closes_connection(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    c.send(publish(f"{uid}/z", b"x", version=version, qos=1, packet_id=0))
    got = c.closed()  # MQTT-2.3.1-1
    assert all(p.type == DISCONNECT and p.code in (0x81, 0x82) for p in got), got


# -- flow control (5.0 Receive Maximum) ---------------------------------------------------------


@pytest.mark.xfail(
    TARGET == "mosquitto",
    strict=True,
    reason="Mosquitto 2.0.11 sends two more after the first PUBACK (3 in flight, limit 2)",
)
def test_receive_maximum_bounds_unacked_qos1(mq, raw, uid):
    sub = raw(mq.port)
    sub.connect(uid + "s", props=[(RECEIVE_MAXIMUM, 2)])
    sub.subscribe((f"{uid}/rm", 1))
    pub = raw(mq.port)
    pub.connect(uid + "p")
    for i in range(6):
        pub.publish(f"{uid}/rm", b"%d" % i, qos=1)
    window = [sub.next_publish(ack_it=False) for _ in range(2)]
    # MQTT-3.3.4-9: no more than Receive Maximum unacknowledged QoS>0 PUBLISHes
    with pytest.raises(TimeoutError):
        sub.recv(timeout=0.5)
    got = list(window)
    while len(got) < 6:
        sub.send(ack(PUBACK, window.pop(0).packet_id))
        nxt = sub.next_publish(ack_it=False)
        window.append(nxt)
        got.append(nxt)
        if len(got) < 6:
            with pytest.raises(TimeoutError):
                sub.recv(timeout=0.2)  # one ack frees exactly one slot
    assert [p.payload for p in got] == [b"%d" % i for i in range(6)]


def test_receive_maximum_counts_qos2_until_pubcomp(mq, raw, uid):
    sub = raw(mq.port)
    sub.connect(uid + "s", props=[(RECEIVE_MAXIMUM, 1)])
    sub.subscribe((f"{uid}/rm2", 2))
    pub = raw(mq.port)
    pub.connect(uid + "p")
    pub.publish(f"{uid}/rm2", b"a", qos=2)
    pub.publish(f"{uid}/rm2", b"b", qos=2)
    p1 = sub.next_publish(ack_it=False)
    assert p1.payload == b"a"
    sub.send(ack(PUBREC, p1.packet_id))
    assert sub.expect(PUBREL).packet_id == p1.packet_id
    with pytest.raises(TimeoutError):
        sub.recv(timeout=0.5)  # the send quota returns only with PUBCOMP (4.9)
    sub.send(ack(PUBCOMP, p1.packet_id))
    assert sub.next_publish().payload == b"b"


# -- resend on reconnect --------------------------------------------------------------------------


@VERSIONS
def test_unacked_qos1_resent_with_dup_on_reconnect(mq, raw, uid, version):
    sub = raw(mq.port, version=version)
    sub.connect(uid + "s", **persistent(version))
    sub.subscribe((f"{uid}/r", 1))
    pub = raw(mq.port, version=version)
    pub.connect(uid + "p", version=version)
    pub.publish(f"{uid}/r", b"again", qos=1)
    first = sub.next_publish(ack_it=False)
    assert not first.dup
    sub.close()  # gone without PUBACK

    sub2 = raw(mq.port, version=version)
    assert sub2.connect(uid + "s", **persistent(version)).session_present
    again = sub2.next_publish(ack_it=False)
    # MQTT-4.4.0-1: resent with the original packet id; MQTT-3.3.1-1: DUP set on a resend
    assert (again.payload, again.packet_id, again.qos, again.dup) == (
        b"again",
        first.packet_id,
        1,
        True,
    )
    sub2.send(ack(PUBACK, again.packet_id, version=version))
    pub.publish(f"{uid}/r", b"marker", qos=1)
    assert sub2.next_publish().payload == b"marker"  # acked once: not resent again


@VERSIONS
def test_qos2_unreceived_publish_resent_with_dup(mq, raw, uid, version):
    sub = raw(mq.port, version=version)
    sub.connect(uid + "s", **persistent(version))
    sub.subscribe((f"{uid}/r2", 2))
    pub = raw(mq.port, version=version)
    pub.connect(uid + "p", version=version)
    pub.publish(f"{uid}/r2", b"two", qos=2)
    first = sub.next_publish(ack_it=False)
    sub.close()  # no PUBREC

    sub2 = raw(mq.port, version=version)
    sub2.connect(uid + "s", **persistent(version))
    again = sub2.next_publish(ack_it=False)
    assert (again.payload, again.packet_id, again.qos, again.dup) == (
        b"two",
        first.packet_id,
        2,
        True,
    )


@VERSIONS
def test_qos2_pubrel_resent_on_reconnect(mq, raw, uid, version):
    sub = raw(mq.port, version=version)
    sub.connect(uid + "s", **persistent(version))
    sub.subscribe((f"{uid}/rel", 2))
    pub = raw(mq.port, version=version)
    pub.connect(uid + "p", version=version)
    pub.publish(f"{uid}/rel", b"m", qos=2)
    p = sub.next_publish(ack_it=False)
    sub.send(ack(PUBREC, p.packet_id, version=version))
    assert sub.expect(PUBREL).packet_id == p.packet_id
    sub.close()  # no PUBCOMP

    sub2 = raw(mq.port, version=version)
    sub2.connect(uid + "s", **persistent(version))
    rel = sub2.recv()
    assert (rel.type, rel.packet_id) == (PUBREL, p.packet_id)  # MQTT-4.4.0-1: PUBREL, not PUBLISH
    sub2.send(ack(PUBCOMP, rel.packet_id, version=version))
    pub.publish(f"{uid}/rel", b"marker", qos=2)
    assert sub2.next_publish().payload == b"marker"  # the message itself was not resent


@VERSIONS
def test_inbound_qos2_state_survives_publisher_reconnect(mq, raw, uid, version):
    sub = raw(mq.port, version=version)
    sub.connect(uid + "s", version=version)
    sub.subscribe((f"{uid}/in", 2))
    pub = raw(mq.port, version=version)
    pub.connect(uid + "p", **persistent(version))
    pub.send(publish(f"{uid}/in", b"exactly-once", version=version, qos=2, packet_id=5))
    pub.expect(PUBREC)
    pub.close()
    pub2 = raw(mq.port, version=version)
    assert pub2.connect(uid + "p", **persistent(version)).session_present
    pub2.send(ack(PUBREL, 5, version=version))
    comp = pub2.expect(PUBCOMP)
    assert (comp.packet_id, comp.code) == (5, 0)
    pub2.publish(f"{uid}/in", b"marker", qos=2)
    assert [p.payload for p in sub.publishes(2)] == [b"exactly-once", b"marker"]


# -- aiomqtt, both protocol versions ---------------------------------------------------------------


@pytest.mark.parametrize("protocol", [aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5])
def test_aiomqtt_round_trip_all_qos(mq, uid, protocol):
    async def main() -> list[tuple[str, bytes, int]]:
        async with (
            aiomqtt.Client("127.0.0.1", mq.port, identifier=uid + "s", protocol=protocol) as sub,
            aiomqtt.Client("127.0.0.1", mq.port, identifier=uid + "p", protocol=protocol) as pub,
        ):
            await sub.subscribe(f"{uid}/a/#", qos=2)
            for q in range(3):
                await pub.publish(f"{uid}/a/{q}", b"q%d" % q, qos=q)
            got = []
            async with asyncio.timeout(5):
                async for m in sub.messages:
                    got.append((m.topic.value, m.payload, m.qos))
                    if len(got) == 3:
                        break
            return got

    got = asyncio.run(main())
    assert got == [(f"{uid}/a/{q}", b"q%d" % q, q) for q in range(3)]
