"""Issue 16: session state on takeover, the client's Maximum Packet Size, wrong acknowledgements,
malformed 5.0 SUBSCRIBE/UNSUBSCRIBE, and MQTT 3.1 (MQIsdp) clients."""

from __future__ import annotations

import queue
import ssl
import struct
import subprocess
import time

import paho.mqtt.client as mqtt
import pytest
from brokerproc import TARGET, free_port, wait_for_port
from paho.mqtt.enums import CallbackAPIVersion

from .clients import mcloudtt_only
from .mqttraw import (
    CONNACK,
    DISCONNECT,
    MAXIMUM_PACKET_SIZE,
    MESSAGE_EXPIRY,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    REASON_STRING,
    SESSION_EXPIRY,
    UNSUBSCRIBE,
    USER_PROPERTY,
    WILL_DELAY,
    Props,
    Will,
    ack,
    encode_props,
    packet,
    pingreq,
    publish,
    sub_opts,
    subscribe,
    unsubscribe,
    utf8,
)
from .mqttraw import (
    connect as connect_packet,
)
from .takeovers import TAKEOVER_FIELDS, TAKEOVERS, TAKEOVERS_31, session_kw

MOSQUITTO = TARGET == "mosquitto"


def alive(c) -> None:  # type: ignore[no-untyped-def]
    c.send(pingreq())
    c.expect(PINGRESP)


# -- session state after a takeover ------------------------------------------------------------


@pytest.mark.parametrize(TAKEOVER_FIELDS, TAKEOVERS + TAKEOVERS_31)
def test_takeover_keeps_only_a_session_meant_to_last(
    mq, raw, uid, version, old_clean, old_exp, new_clean, new_exp, present
):
    if version == 3 and MOSQUITTO:
        pytest.skip("compares with our 3.1 CONNACK")
    old = raw(mq.port, version=version)
    assert old.connect(uid, version=version, **session_kw(version, old_clean, old_exp)).code == 0
    old.subscribe((f"{uid}/s", 1))
    new = raw(mq.port, version=version)
    ack_ = new.connect(uid, version=version, **session_kw(version, new_clean, new_exp))
    assert ack_.code == 0
    old.closed()
    # 3.1 has no session-present flag (the byte is reserved): always 0 on the wire.
    kept = present if present is not None else not old_clean
    assert ack_.session_present == (present is True)  # MQTT-3.2.2-2/3; MQTT-3.1.2-6 (3.1.1)
    new.subscribe((f"{uid}/m", 1))
    pub = raw(mq.port, version=4)
    pub.connect(uid + "p", version=4)
    pub.publish(f"{uid}/s", b"after takeover", qos=1)
    pub.publish(f"{uid}/m", b"marker", qos=1)
    got = [p.payload for p in new.until(f"{uid}/m")]
    assert got == ([b"after takeover"] if kept else []), got  # the subscription came along


@pytest.mark.parametrize("version", [4, 5])
def test_paho_clean_session_taken_over_by_persistent_one_gets_a_fresh_session(
    mq, paho, uid, version
):
    expiry = {"session_expiry": 60} if version == 5 else {}
    old = paho(mq.port, uid, version=version, clean=True)
    assert old.subscribe(f"{uid}/s", 1) == [1]
    new = paho(mq.port, uid, version=version, clean=False, **expiry)
    assert not new.session_present  # the old session ended with its connection
    assert new.subscribe(f"{uid}/m", 1) == [1]
    new.publish(f"{uid}/s", b"not for the old subscription", qos=1)
    new.publish(f"{uid}/m", b"marker", qos=1)
    assert [m.payload for m in new.until(f"{uid}/m")] == []
    again = paho(mq.port, uid, version=version, clean=False, **expiry)
    assert again.session_present  # and this one, made persistent, does continue


# Will rules on takeover (see Broker._kick): published unless the session continues.
WILL_CASES = [
    pytest.param(5, 60, 30, False, False, id="5-delay-session-continues-not-published"),
    pytest.param(5, 0, 30, False, True, id="5-delay-session-expiry0-published"),
    pytest.param(5, 60, 30, True, True, id="5-delay-new-clean-start-published"),
    pytest.param(5, 60, 0, False, True, id="5-no-delay-published"),
    pytest.param(4, 0, 0, False, True, id="311-published"),
    pytest.param(3, 0, 0, False, True, id="31-published"),
]


@mcloudtt_only
@pytest.mark.parametrize(("version", "expiry", "delay", "new_clean", "published"), WILL_CASES)
def test_will_on_takeover(mq, raw, uid, version, expiry, delay, new_clean, published):
    watcher = raw(mq.port)
    watcher.connect(uid + "w")
    watcher.subscribe((f"{uid}/will", 1), (f"{uid}/m", 1))
    will = Will(f"{uid}/will", b"gone", qos=1, props=[(WILL_DELAY, delay)] if delay else None)
    old = raw(mq.port, version=version)
    old.connect(uid, version=version, will=will, **session_kw(version, False, expiry))
    new = raw(mq.port, version=version)
    assert new.connect(uid, version=version, **session_kw(version, new_clean, expiry)).code == 0
    old.closed()
    watcher.publish(f"{uid}/m", b"marker", qos=1)  # the takeover has happened by now
    got = [p.payload for p in watcher.until(f"{uid}/m", timeout=3)]
    assert got == ([b"gone"] if published else []), got


# -- the client's Maximum Packet Size ------------------------------------------------------------


def limited(raw, port, limit, client_id, **kw):  # type: ignore[no-untyped-def]
    c = raw(port)
    c.send(connect_packet(client_id, props=[(MAXIMUM_PACKET_SIZE, limit)], **kw))
    return c


def wire_size(p) -> int:  # type: ignore[no-untyped-def]
    n = len(p.body)
    return 1 + (1 if n < 128 else 2) + n


@pytest.mark.skipif(MOSQUITTO, reason="Mosquitto sends a CONNACK over the client's limit")
def test_maximum_packet_size_2_closes_without_connack(mq, raw, uid):
    c = limited(raw, mq.port, 2, uid)
    assert c.closed() == []  # even the smallest CONNACK is 5 bytes (MQTT-3.1.2-24)
    ok = raw(mq.port)
    assert ok.connect(uid).code == 0


@mcloudtt_only
def test_maximum_packet_size_20_sends_what_fits_and_nothing_larger(mq, raw, uid):
    c = limited(raw, mq.port, 20, uid)
    connack = c.expect(CONNACK)
    assert connack.code == 0 and wire_size(connack) <= 20  # MQTT-3.1.2-24
    topic = uid[1:8]  # short enough: a QoS 1 PUBLISH has 7 bytes besides topic and payload
    suback = c.subscribe((topic, 1))
    assert suback.codes == [1] and wire_size(suback) <= 20
    alive(c)
    pub = raw(mq.port)
    pub.connect(uid + "p")
    pub.publish(topic, b"twenty", qos=1)  # exactly 20 bytes: fits
    pub.publish(topic, b"twenty1", qos=1)  # 21 bytes: dropped (MQTT-3.1.2-25)
    pub.publish(topic, b"end", qos=1)
    got = c.publishes(2)
    assert [p.payload for p in got] == [b"twenty", b"end"]
    assert wire_size(got[0]) == 20
    # A SUBACK of 16 codes is 21 bytes: it cannot be sent, and the exchange cannot go on.
    c.send(subscribe(9, [(f"{uid}/{i}", 0) for i in range(16)]))
    assert c.closed() == []
    assert mq.metric("mcloudtt_oversized_closes_total") >= 1


@mcloudtt_only
def test_maximum_packet_size_drops_the_reason_string_first(mq, raw, uid):
    roomy = limited(raw, mq.port, 1000, uid + "r")
    roomy.expect(CONNACK)
    roomy.send(publish(f"{uid}/+", b"x"))
    got = roomy.closed()
    assert [(p.type, p.code) for p in got] == [(DISCONNECT, 0x90)]
    assert got[0].prop(REASON_STRING)  # room for it: sent
    tight = limited(raw, mq.port, 20, uid + "t")
    tight.expect(CONNACK)
    tight.send(publish(f"{uid}/+", b"x"))
    got = tight.closed()
    # MQTT-3.14.2-3: the DISCONNECT goes, without the reason string that would not fit
    assert [(p.type, p.code, p.props) for p in got] == [(DISCONNECT, 0x90, [])]


@mcloudtt_only
def test_maximum_packet_size_20_too_small_for_an_assigned_client_id(mq, raw):
    c = limited(raw, mq.port, 20, "")
    # The Assigned Client Identifier must be in the CONNACK (MQTT-3.1.3-7), and does not fit.
    assert c.closed() == []


@mcloudtt_only
def test_paho_maximum_packet_size(mq, paho, uid):
    sub = paho(mq.port, uid, connect_props={"MaximumPacketSize": 20})
    topic = uid[1:8]
    assert sub.subscribe(topic, 1) == [1]
    pub = paho(mq.port, uid + "p")
    pub.publish(topic, b"twenty", qos=1)  # a 20-byte PUBLISH
    pub.publish(topic, b"twenty1", qos=1)  # 21 bytes: never sent to sub
    pub.publish(topic, b"end", qos=1)
    assert [m.payload for m in sub.get_n(2)] == [b"twenty", b"end"]


# -- wrong acknowledgements ------------------------------------------------------------------------


def wrong_acks(b, kind: str) -> float:  # type: ignore[no-untyped-def]
    return b.metric("mcloudtt_wrong_acks_total", kind=kind)


def expect_protocol_close(c, version: int) -> None:  # type: ignore[no-untyped-def]
    got = c.closed()
    if version == 5:
        assert [(p.type, p.code) for p in got] == [(DISCONNECT, 0x82)], got  # 5.0 section 4.13
    else:
        assert got == [], got  # MQTT-4.8.0-1: close the connection


def delivered(raw, b, uid, version, qos):  # type: ignore[no-untyped-def]
    """A subscriber holding one unacknowledged delivery at `qos`; returns it and the PUBLISH."""
    c = raw(b.port, version=version)
    c.connect(uid, version=version)
    c.subscribe((f"{uid}/d", qos))
    pub = raw(b.port)
    pub.connect(uid + "p")
    pub.publish(f"{uid}/d", b"m", qos=qos)
    return c, c.next_publish(ack_it=False)


@mcloudtt_only
@pytest.mark.parametrize("version", [3, 4, 5])
@pytest.mark.parametrize(
    "case", ["puback-unknown", "pubcomp-unknown", "pubrec-for-qos1", "puback-for-qos2"]
)
def test_wrong_acknowledgement_closes_and_is_counted(mq, raw, uid, version, case):
    kind = case.replace("-", "_")
    before = wrong_acks(mq, kind)
    if case == "puback-unknown":
        c = raw(mq.port, version=version)
        c.connect(uid, version=version)
        c.send(ack(PUBACK, 4242, version=version))
    elif case == "pubcomp-unknown":
        c = raw(mq.port, version=version)
        c.connect(uid, version=version)
        c.send(ack(PUBCOMP, 4242, version=version))
    elif case == "pubrec-for-qos1":
        c, p = delivered(raw, mq, uid, version, 1)
        c.send(ack(PUBREC, p.packet_id, version=version))
    else:
        c, p = delivered(raw, mq, uid, version, 2)
        c.send(ack(PUBACK, p.packet_id, version=version))
    expect_protocol_close(c, version)
    assert wrong_acks(mq, kind) == before + 1


@mcloudtt_only
@pytest.mark.parametrize("version", [4, 5])
def test_pubcomp_before_pubrec_is_wrong(mq, raw, uid, version):
    before = wrong_acks(mq, "pubcomp_unknown")
    c, p = delivered(raw, mq, uid, version, 2)
    c.send(ack(PUBCOMP, p.packet_id, version=version))  # no PUBREL was sent for it yet
    expect_protocol_close(c, version)
    assert wrong_acks(mq, "pubcomp_unknown") == before + 1


@pytest.mark.parametrize("version", [4, 5])
def test_pubrec_and_pubrel_for_unknown_ids_get_their_answer(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    c.send(ack(PUBREC, 4243, version=version))
    rel = c.expect(PUBREL)
    c.send(ack(PUBREL, 4244, version=version))
    comp = c.expect(PUBCOMP)
    assert (rel.packet_id, comp.packet_id) == (4243, 4244)
    if version == 5 and not MOSQUITTO:  # Mosquitto 2.0.11 answers 0x00
        assert (rel.code, comp.code) == (0x92, 0x92)  # Packet Identifier not found
    alive(c)


@pytest.mark.parametrize("version", [4, 5])
def test_duplicates_after_a_reconnect_are_accepted(mq, raw, uid, version):
    kw = session_kw(version, False, 60)
    c = raw(mq.port, version=version)
    c.connect(uid, version=version, **kw)
    c.subscribe((f"{uid}/q1", 1), (f"{uid}/q2", 2))
    pub = raw(mq.port)
    pub.connect(uid + "p")
    pub.publish(f"{uid}/q1", b"one", qos=1)
    pub.publish(f"{uid}/q2", b"two", qos=2)
    first = [c.next_publish(ack_it=False) for _ in range(2)]
    by_qos = {p.qos: p for p in first}
    c.send(ack(PUBREC, by_qos[2].packet_id, version=version))
    assert c.expect(PUBREL).packet_id == by_qos[2].packet_id
    c.close()  # gone before PUBACK and PUBCOMP
    again = raw(mq.port, version=version)
    assert again.connect(uid, version=version, **kw).session_present
    resent = again.recv()
    rel = again.recv()
    assert (resent.type, resent.dup, resent.packet_id) == (3, True, by_qos[1].packet_id)
    assert (rel.type, rel.packet_id) == (PUBREL, by_qos[2].packet_id)  # MQTT-4.4.0-1
    again.send(ack(PUBREC, by_qos[2].packet_id, version=version))  # a repeated PUBREC
    assert again.expect(PUBREL).packet_id == by_qos[2].packet_id
    again.send(ack(PUBACK, by_qos[1].packet_id, version=version))
    again.send(ack(PUBCOMP, by_qos[2].packet_id, version=version))
    alive(again)


# -- malformed SUBSCRIBE / UNSUBSCRIBE in 5.0 ---------------------------------------------------


def unsubscribe_with(packet_id: int, filters: list[str], props: Props) -> bytes:
    body = struct.pack("!H", packet_id) + encode_props(props)
    for f in filters:
        body += utf8(f)
    return packet(UNSUBSCRIBE, 0x02, body)


MALFORMED = {
    "sub-property-not-allowed": lambda u: subscribe(
        1, [(f"{u}/a", 0)], props=[(MESSAGE_EXPIRY, 5)]
    ),
    "sub-empty-filter": lambda u: subscribe(1, [(f"{u}/ok", 0), ("", 0)]),
    "sub-hash-not-last": lambda u: subscribe(1, [(f"{u}/ok", 0), (f"{u}/#/x", 0)]),
    "sub-plus-in-level": lambda u: subscribe(1, [(f"{u}/a+", 0)]),
    "sub-bad-share-name": lambda u: subscribe(1, [(f"$share/g+/{u}/a", 0)]),
    "sub-packet-id-0": lambda u: subscribe(0, [(f"{u}/a", 0)]),
    "unsub-property-not-allowed": lambda u: unsubscribe_with(1, [f"{u}/a"], [(MESSAGE_EXPIRY, 5)]),
    "unsub-empty-filter": lambda u: unsubscribe(1, [""]),
    "unsub-hash-not-last": lambda u: unsubscribe(1, [f"{u}/#/x"]),
    "unsub-packet-id-0": lambda u: unsubscribe(0, [f"{u}/a"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_v5_malformed_subscribe_and_unsubscribe(mq, raw, uid, case):
    c = raw(mq.port)
    c.connect(uid)
    c.send(MALFORMED[case](uid))
    got = c.closed()
    # 5.0 section 2.2.2.2 (a property not allowed), MQTT-4.7.3-1, MQTT-4.7.1-1, MQTT-4.7.1-2,
    # MQTT-4.8.2-2, MQTT-2.2.1-3: Malformed Packet, not a SUBACK 0x8F
    assert [(p.type, p.code) for p in got] == [(DISCONNECT, 0x81)], got


@mcloudtt_only
def test_v5_malformed_subscribe_makes_no_subscription(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid, clean=False, props=[(SESSION_EXPIRY, 60)])
    c.send(subscribe(1, [(f"{uid}/ok", 1), (f"{uid}/#/x", 0)]))
    c.closed()
    again = raw(mq.port)
    assert again.connect(uid, clean=False, props=[(SESSION_EXPIRY, 60)]).session_present
    pub = raw(mq.port)
    pub.connect(uid + "p")
    again.subscribe((f"{uid}/m", 1))
    pub.publish(f"{uid}/ok", b"no", qos=1)
    pub.publish(f"{uid}/m", b"marker", qos=1)
    assert again.until(f"{uid}/m") == []  # the valid filter beside the bad one was not taken


@mcloudtt_only
@pytest.mark.parametrize("case", ["retain-handling-3", "no-filters"])
def test_v5_protocol_errors_in_subscribe_follow_the_spec(mq, raw, uid, case):
    c = raw(mq.port)
    c.connect(uid)
    if case == "no-filters":
        c.send(subscribe(1, []))
    else:
        c.send(subscribe(1, [(f"{uid}/a", sub_opts(0, rh=3))]))
    got = c.closed()
    # 5.0 section 3.8.3 / 3.8.3.1 name both a Protocol Error (Mosquitto answers 0x81)
    assert [(p.type, p.code) for p in got] == [(DISCONNECT, 0x82)], got


def test_v5_user_properties_in_subscribe_are_allowed(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid)
    assert c.subscribe((f"{uid}/a", 1), props=[(USER_PROPERTY, ("k", "v"))]).codes == [1]


# -- MQTT 3.1 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mqtt31_client_publishes_and_subscribes(mq, raw, uid, qos):
    c = raw(mq.port, version=3)
    ack_ = c.connect(uid, version=3)  # protocol name MQIsdp, level 3
    assert (ack_.code, ack_.body[0]) == (0, 0)
    sub = c.subscribe((f"{uid}/x", qos))
    assert sub.codes == [qos]
    c.publish(f"{uid}/x", b"from 3.1", qos=qos)
    got = c.next_publish()
    assert (got.payload, got.qos) == (b"from 3.1", qos)
    v5 = raw(mq.port)
    v5.connect(uid + "5")
    v5.subscribe((f"{uid}/x", 2))
    c.publish(f"{uid}/x", b"to 5.0", qos=qos)
    assert v5.next_publish().payload == b"to 5.0"
    assert c.next_publish().payload == b"to 5.0"


@mcloudtt_only
def test_mqtt31_has_no_session_present_flag(mq, raw, uid):
    c = raw(mq.port, version=3)
    c.connect(uid, version=3, clean=False)
    c.subscribe((f"{uid}/s", 1))
    c.close()
    again = raw(mq.port, version=3)
    ack_ = again.connect(uid, version=3, clean=False)
    assert ack_.body == b"\x00\x00"  # the flags byte is reserved in 3.1
    pub = raw(mq.port)
    pub.connect(uid + "p")
    pub.publish(f"{uid}/s", b"kept", qos=1)
    assert again.next_publish().payload == b"kept"  # the session was resumed all the same


def test_mqtt31_will(mq, raw, uid):
    w = raw(mq.port)
    w.connect(uid + "w")
    w.subscribe((f"{uid}/will", 1))
    c = raw(mq.port, version=3)
    c.connect(uid, version=3, will=Will(f"{uid}/will", b"3.1 gone", qos=1))
    c.close()  # no DISCONNECT: the will is published
    assert w.next_publish().payload == b"3.1 gone"


@pytest.mark.skipif(MOSQUITTO, reason="Mosquitto 2.0.11 lets 3.1 client ids be longer")
@pytest.mark.parametrize("client_id", ["x" * 24, ""])
def test_mqtt31_client_id_outside_1_to_23_refused(mq, raw, client_id):
    c = raw(mq.port, version=3)
    c.send(connect_packet(client_id, version=3))
    got = c.closed()
    assert [(p.type, p.code) for p in got] == [(CONNACK, 0x02)]  # identifier rejected


def test_mqtt31_client_id_of_23_accepted(mq, raw, uid):
    c = raw(mq.port, version=3)
    assert c.connect((uid * 3)[:23], version=3).code == 0


@mcloudtt_only
def test_mqtt31_invalid_filter_closes(mq, raw, uid):
    c = raw(mq.port, version=3)
    c.connect(uid, version=3)
    c.send(subscribe(1, [(f"{uid}/#/x", 0)], version=3))
    assert c.closed() == []  # 3.1 SUBACK has no failure code


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_mqttv31(mq, paho, uid, qos):
    c = paho(mq.port, uid, version=3, will=(f"{uid}/will", b"paho 3.1 gone", 1, False))
    assert c.reason == 0
    assert c.subscribe(f"{uid}/p", qos) == [qos]
    c.publish(f"{uid}/p", b"paho 3.1", qos=qos)
    got = c.get()
    assert (got.payload, got.qos) == (b"paho 3.1", qos)
    w = paho(mq.port, uid + "w")
    w.subscribe(f"{uid}/will", 1)
    c.kill()
    assert w.get().payload == b"paho 3.1 gone"


@mcloudtt_only
def test_paho_mqttv31_on_every_listener(broker_factory, tmp_path, uid):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    # fmt: off
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )
    # fmt: on
    ws_port, tls_port = free_port(), free_port()
    b = broker_factory(
        "--ws-bind", f"127.0.0.1:{ws_port}", "--tls-bind", f"127.0.0.1:{tls_port}",
        "--tls-cert", str(cert), "--tls-key", str(key),
    )  # fmt: skip
    wait_for_port(ws_port)
    wait_for_port(tls_port)
    for name, port, transport, tls in [
        ("tcp", b.port, "tcp", False),
        ("ws", ws_port, "websockets", False),
        ("tls", tls_port, "tcp", True),
    ]:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{uid}{name}",
            protocol=mqtt.MQTTv31,
            transport=transport,  # type: ignore[arg-type]
        )
        if tls:
            client.tls_set(ca_certs=str(cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        got: queue.Queue[bytes] = queue.Queue()
        client.on_message = lambda c, u, m, got=got: got.put(m.payload)
        client.connect("127.0.0.1", port)
        client.loop_start()
        try:
            info = client.subscribe(f"{uid}/{name}", qos=1)
            assert info[0] == mqtt.MQTT_ERR_SUCCESS
            deadline = time.monotonic() + 5
            while not client.is_connected() and time.monotonic() < deadline:
                time.sleep(0.01)
            client.publish(f"{uid}/{name}", b"3.1 over " + name.encode(), qos=1)
            assert got.get(timeout=5) == b"3.1 over " + name.encode(), name
        finally:
            client.disconnect()
            client.loop_stop()
