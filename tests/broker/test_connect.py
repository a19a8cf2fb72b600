"""CONNECT/CONNACK: protocol levels, client ids, credentials, keepalive, session takeover."""

from __future__ import annotations

import time

import pytest
from brokerproc import TARGET

from .clients import mcloudtt_only
from .mqttraw import (
    ASSIGNED_CLIENT_ID,
    CONNACK,
    DISCONNECT,
    PINGRESP,
    SERVER_KEEP_ALIVE,
    Will,
    connect,
    pingreq,
)

MOSQUITTO = TARGET == "mosquitto"


def refused(packets: list) -> bool:  # type: ignore[type-arg]
    """True when the broker closed without ever accepting the CONNECT."""
    return not any(p.type == CONNACK and p.code == 0 for p in packets)


@pytest.mark.parametrize("version", [4, 5])
def test_connect_accepted(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    ack = c.connect(uid, version=version)
    assert ack.code == 0
    assert not ack.session_present  # MQTT-3.2.2-2: clean start gives no session
    c.send(pingreq())
    assert c.expect(PINGRESP).type == PINGRESP
    c.disconnect()


@pytest.mark.skipif(MOSQUITTO, reason="Mosquitto still accepts MQTT 3.1 (MQIsdp, level 3)")
def test_mqtt31_level3_refused(mq, raw, uid):
    c = raw(mq.port, version=4)
    c.send(connect(uid, version=3))  # protocol name MQIsdp
    got = c.closed()
    # MQTT-3.1.2-2: CONNACK 0x01 (unacceptable protocol level), then close
    assert [(p.type, p.code) for p in got] == [(CONNACK, 0x01)]


@pytest.mark.parametrize("level", [0, 2, 3, 6, 255])
def test_unknown_protocol_level_refused(mq, raw, uid, level):
    c = raw(mq.port, version=4)
    c.send(connect(uid, version=level, proto_name=b"MQTT"))
    got = c.closed()
    assert len(got) == 1 and got[0].type == CONNACK
    # 3.1.1 CONNACK 0x01 (MQTT-3.1.2-2); a 5.0 server may answer 0x84 instead (MQTT-3.1.2-2, v5)
    assert got[0].code in (0x01, 0x84)


def test_wrong_protocol_name_not_accepted(mq, raw, uid):
    c = raw(mq.port, version=4)
    c.send(connect(uid, version=4, proto_name=b"MQTX"))
    assert refused(c.closed())  # MQTT-3.1.2-1


@pytest.mark.parametrize("version", [4, 5])
def test_reserved_connect_flag_closes(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.send(connect(uid, version=version, flags=0x03))  # bit 0 reserved
    assert refused(c.closed())  # MQTT-3.1.2-3


def test_will_qos_without_will_flag_closes(mq, raw, uid):
    c = raw(mq.port, version=4)
    c.send(connect(uid, version=4, flags=0x02 | 0x08))
    assert refused(c.closed())  # MQTT-3.1.2-11 (3.1.1)


def test_will_qos_3_closes(mq, raw, uid):
    c = raw(mq.port, version=4)
    c.send(connect(uid, version=4, will=Will("w", b"x", qos=3)))
    assert refused(c.closed())  # MQTT-3.1.2-14 (3.1.1)


@pytest.mark.parametrize("version", [4, 5])
def test_first_packet_must_be_connect(mq, raw, version):
    c = raw(mq.port, version=version)
    c.send(pingreq())
    got = c.closed()
    assert all(p.type != PINGRESP for p in got)  # MQTT-3.1.0-1


@pytest.mark.parametrize("version", [4, 5])
def test_second_connect_is_a_protocol_error(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    c.send(connect(uid, version=version))
    got = c.closed()  # MQTT-3.1.0-2
    assert all(p.type == DISCONNECT and p.code == 0x82 for p in got), got


# -- client identifiers ------------------------------------------------------------------------


def test_v5_empty_client_id_gets_assigned_id(mq, raw):
    ids = []
    for _ in range(2):
        c = raw(mq.port)
        ack = c.connect("")
        assert ack.code == 0
        assigned = ack.prop(ASSIGNED_CLIENT_ID)  # MQTT-3.2.2-16
        assert assigned
        ids.append(assigned)
    assert ids[0] != ids[1]  # MQTT-3.1.3-6: unique per server


def test_v5_assigned_id_session_is_usable(mq, raw, uid):
    c = raw(mq.port)
    c.connect("")
    c.subscribe((f"{uid}/x", 1))
    c.publish(f"{uid}/x", b"hello", qos=1)
    assert c.next_publish().payload == b"hello"


def test_v311_empty_client_id_with_clean_session_accepted(mq, raw, uid):
    c = raw(mq.port, version=4)
    ack = c.connect("", version=4, clean=True)
    assert ack.code == 0  # MQTT-3.1.3-6
    c.subscribe(f"{uid}/e")
    c.publish(f"{uid}/e", b"x")
    assert c.next_publish().payload == b"x"


def test_v311_empty_client_id_without_clean_session_refused(mq, raw):
    c = raw(mq.port, version=4)
    c.send(connect("", version=4, clean=False))
    got = c.closed()
    # MQTT-3.1.3-8: CONNACK 0x02 (identifier rejected), then close; MQTT-3.2.2-4: SP=0
    assert [(p.type, p.code, p.session_present) for p in got] == [(CONNACK, 0x02, False)]


@pytest.mark.parametrize("version", [4, 5])
def test_23_char_alphanumeric_client_id_accepted(mq, raw, version):
    c = raw(mq.port, version=version)
    cid = f"Az09{version}" + "x" * 18
    assert len(cid) == 23
    assert c.connect(cid, version=version).code == 0  # MQTT-3.1.3-5


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("cid", [b"a\xff\xfeb", b"a\x00b"], ids=["bad-utf8", "nul"])
def test_malformed_client_id_refused(mq, raw, version, cid):
    c = raw(mq.port, version=version)
    c.send(connect(cid, version=version))
    # MQTT-1.5.4-1, MQTT-1.5.4-2: a malformed string; a CONNACK, if any, carries an error
    assert refused(c.closed())


# -- credentials (the default hook allows everyone) --------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_username_and_password_accepted(mq, paho, uid, version):
    c = paho(mq.port, uid, version=version, username="device-7", password="s3cret")
    assert c.reason == 0
    assert c.subscribe(f"{uid}/auth", 1) == [1]
    c.publish(f"{uid}/auth", b"ok", qos=1)
    assert c.get().payload == b"ok"


def test_v311_password_without_username_refused(mq, raw, uid):
    c = raw(mq.port, version=4)
    c.send(connect(uid, version=4, password=b"x"))
    assert refused(c.closed())  # MQTT-3.1.2-22


def test_v5_password_without_username_accepted(mq, raw, uid):
    c = raw(mq.port)
    assert c.connect(uid, password=b"token").code == 0  # allowed since 5.0 (3.1.2.9)


# -- keepalive ---------------------------------------------------------------------------------

# Mosquitto checks keepalive on a coarse timer (a silent keepalive=1 client goes after ~5 s).
KEEPALIVE_SLACK = 5.0 if MOSQUITTO else 1.0


@pytest.mark.parametrize("version", [4, 5])
def test_silent_client_disconnected_after_one_and_a_half_keepalive(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version, keepalive=1)
    t0 = time.monotonic()
    got = c.closed(timeout=1.5 + KEEPALIVE_SLACK + 1)
    elapsed = time.monotonic() - t0
    # MQTT-3.1.2-24 (3.1.1) / MQTT-3.1.2-22 (5.0): closed within 1.5 x keepalive, not before
    assert 1.5 - 0.2 <= elapsed <= 1.5 + KEEPALIVE_SLACK
    assert all(p.type == DISCONNECT and p.code == 0x8D for p in got), got


def test_pinging_client_stays_connected(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid, keepalive=1)
    t_end = time.monotonic() + 2.0  # past 1.5 x keepalive
    pongs = 0
    while time.monotonic() < t_end:
        c.send(pingreq())
        c.expect(PINGRESP)  # MQTT-3.12.4-1
        pongs += 1
        time.sleep(0.5)  # pacing the pings over the keepalive is the point
    assert pongs >= 4
    c.disconnect()


@mcloudtt_only
def test_server_keep_alive_caps_client_value(shared_broker, raw, uid):
    b = shared_broker("--max-keepalive", "1")
    c = raw(b.port)
    ack = c.connect(uid, keepalive=60)
    assert ack.code == 0
    assert ack.prop(SERVER_KEEP_ALIVE) == 1  # MQTT-3.2.2-21
    t0 = time.monotonic()
    c.closed(timeout=4)  # MQTT-3.1.2-21: the server's value is the one enforced
    assert time.monotonic() - t0 <= 1.5 + KEEPALIVE_SLACK


@mcloudtt_only
def test_keepalive_within_maximum_is_kept(shared_broker, raw, uid):
    b = shared_broker("--max-keepalive", "1")
    c = raw(b.port)
    ack = c.connect(uid, keepalive=1)
    assert ack.prop(SERVER_KEEP_ALIVE, 1) == 1


@mcloudtt_only
def test_v311_keepalive_above_maximum_accepted(shared_broker, raw, uid):
    b = shared_broker("--max-keepalive", "1")
    c = raw(b.port, version=4)
    assert c.connect(uid, version=4, keepalive=60).code == 0  # 3.1.1 has no way to say otherwise
    c.send(pingreq())
    c.expect(PINGRESP)


# -- session takeover --------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_second_connection_with_same_id_takes_over(mq, raw, uid, version):
    old = raw(mq.port, version=version)
    old.connect(uid, version=version)
    new = raw(mq.port, version=version)
    assert new.connect(uid, version=version).code == 0
    got = old.closed()  # MQTT-3.1.4-3 (3.1.1: MQTT-3.1.4-2)
    if version == 4:
        assert got == []  # 3.1.1 has no server DISCONNECT
    elif MOSQUITTO:  # Mosquitto 2.0.11 closes without telling (allowed: 4.13)
        assert all(p.type == DISCONNECT and p.code == 0x8E for p in got), got
    else:  # our contract: 0x8E (Session taken over)
        assert [(p.type, p.code) for p in got] == [(DISCONNECT, 0x8E)]
    new.send(pingreq())
    new.expect(PINGRESP)


def test_takeover_across_protocol_versions(mq, raw, uid):
    old = raw(mq.port, version=4)
    old.connect(uid, version=4)
    new = raw(mq.port, version=5)
    assert new.connect(uid).code == 0
    assert all(p.type != CONNACK for p in old.closed())


@pytest.mark.parametrize("version", [4, 5])
def test_takeover_resumes_the_session(mq, raw, uid, version):
    kw = {"clean": False}
    if version == 5:
        kw["props"] = [(0x11, 60)]  # Session Expiry Interval
    old = raw(mq.port, version=version)
    old.connect(uid, version=version, **kw)
    old.subscribe((f"{uid}/s", 1))
    new = raw(mq.port, version=version)
    ack = new.connect(uid, version=version, **kw)
    assert ack.session_present  # MQTT-3.2.2-2
    old.closed()
    pub = raw(mq.port, version=version)
    pub.connect(uid + "p", version=version)
    pub.publish(f"{uid}/s", b"after takeover", qos=1)
    assert new.next_publish().payload == b"after takeover"
