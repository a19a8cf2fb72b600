"""SUBSCRIBE/UNSUBSCRIBE: wildcards, $-topics, invalid filters, overlaps, v5 options, sharing."""

from __future__ import annotations

import pytest
from brokerproc import TARGET, BrokerProcess

from .mqttraw import (
    DISCONNECT,
    SUBACK,
    SUBSCRIPTION_ID,
    sub_opts,
    subscribe,
    unsubscribe,
)

MOSQUITTO = TARGET == "mosquitto"
VERSIONS = pytest.mark.parametrize("version", [4, 5])

# (filter, topics it must match) under a per-test root R; TOPICS is everything published
TOPICS = [
    "R/sport",
    "R/sport/",
    "R/sport/tennis",
    "R/Sport/tennis",
    "R/sport/tennis/player1",
    "R/sport/tennis/player1/ranking",
    "R/sport/tennis/player1/score/wimbledon",
    "R/a/b/c",
    "R/a//c",
    "R/a/b/d/c",
    "/R/x",
    "Rx/sport",
]
MATCHES = {
    "R/sport/tennis/player1/#": [
        "R/sport/tennis/player1",
        "R/sport/tennis/player1/ranking",
        "R/sport/tennis/player1/score/wimbledon",
    ],
    "R/sport/#": [  # 4.7.1.2: '#' also matches the parent level
        "R/sport",
        "R/sport/",
        "R/sport/tennis",
        "R/sport/tennis/player1",
        "R/sport/tennis/player1/ranking",
        "R/sport/tennis/player1/score/wimbledon",
    ],
    "R/sport/tennis/+": ["R/sport/tennis/player1"],
    "R/sport/+": ["R/sport/", "R/sport/tennis"],  # '+' matches an empty level, not no level
    "R/+": ["R/sport"],
    "R/a/+/c": ["R/a/b/c", "R/a//c"],
    "R/+/tennis/#": [
        "R/sport/tennis",
        "R/Sport/tennis",
        "R/sport/tennis/player1",
        "R/sport/tennis/player1/ranking",
        "R/sport/tennis/player1/score/wimbledon",
    ],
    "R/sport/tennis": ["R/sport/tennis"],  # case-sensitive (4.7.3)
    "+/R/x": ["/R/x"],
    "R/#": [t for t in TOPICS if t.startswith("R/")],
}


@VERSIONS
def test_wildcard_matching(mq, raw, uid, version):
    def r(s: str) -> str:
        return s.replace("R", uid)

    subs = {}
    for f in MATCHES:
        c = raw(mq.port, version=version)
        c.connect(f"{uid}{len(subs)}", version=version)
        assert c.subscribe((r(f), 1), (r("R/~marker"), 1)).codes == [1, 1]
        subs[f] = c
    pub = raw(mq.port, version=version)
    pub.connect(uid + "p", version=version)
    for t in TOPICS:
        pub.publish(r(t), t.encode(), qos=1)
    pub.publish(r("R/~marker"), b"", qos=1)
    for f, c in subs.items():
        got = [p.payload.decode() for p in c.until(r("R/~marker"))]
        assert got == MATCHES[f], f"filter {f}"


@pytest.fixture
def sys_broker(shared_broker) -> BrokerProcess:  # type: ignore[no-untyped-def]
    if MOSQUITTO:
        return shared_broker()  # publishes its retained $SYS tree at start
    return shared_broker("--sys-interval", "1")


def test_leading_wildcards_do_not_match_dollar_topics(sys_broker, raw, uid):
    watcher = raw(sys_broker.port)
    watcher.connect(uid + "w")
    watcher.subscribe("$SYS/#")
    first = watcher.next_publish()
    assert first.topic.startswith("$SYS/")  # a $SYS tree exists to be (not) matched

    c = raw(sys_broker.port)
    c.connect(uid)
    c.subscribe("#", "+/broker/#", "+/+/uptime", (f"{uid}/m", 1))
    if not MOSQUITTO:
        # let at least one live $SYS round go out after the subscription (--sys-interval 1)
        while watcher.next_publish(timeout=3).retain:
            pass
    c.publish(f"{uid}/m", b"marker", qos=1)
    got = c.until(f"{uid}/m")
    assert [p.topic for p in got if p.topic.startswith("$")] == []  # MQTT-4.7.2-1


# -- invalid and malformed SUBSCRIBE ------------------------------------------------------------

INVALID_FILTERS = ["R/#/b", "R#", "R/b+", "+R", "#/R", ""]


@VERSIONS
@pytest.mark.parametrize("bad", INVALID_FILTERS)
def test_invalid_filter_refused(mq, raw, uid, version, bad):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    c.send(subscribe(1, [(f"{uid}/ok", 1), (bad.replace("R", uid), 1)], version=version))
    if version == 5:
        # 5.0: a filter against MQTT-4.7.1-1, MQTT-4.7.1-2 or MQTT-4.7.3-1 is a Malformed
        # Packet (0x81), not a SUBACK 0x8F (which is for filters well formed but not allowed)
        got = c.closed()
        assert [(p.type, p.code) for p in got] == [(DISCONNECT, 0x81)], got
    elif MOSQUITTO:
        # Mosquitto treats a bad filter as a malformed packet and closes: also within the spec
        # (3.1.1 section 4.8)
        assert c.closed(timeout=1) == []
    else:
        # 3.1.1 (MQTT-4.7.1-2, MQTT-4.7.1-3, MQTT-4.7.3-1): Failure 0x80, the valid filter
        # beside it is still granted (MQTT-3.8.4-5)
        got = c.recv()
        assert got.type == SUBACK
        assert got.codes == [1, 0x80]


@VERSIONS
@pytest.mark.parametrize(
    "case",
    ["no-filters", "reserved-header-flags", "qos-3", "reserved-option-bits"],
)
def test_malformed_subscribe_closes(mq, raw, uid, version, case):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    if case == "no-filters":
        data = subscribe(1, [], version=version)  # MQTT-3.8.3-3 (3.1.1), MQTT-3.8.3-2 (5.0)
    elif case == "reserved-header-flags":
        data = subscribe(1, [(f"{uid}/a", 0)], version=version, flags=0)  # MQTT-3.8.1-1
    elif case == "qos-3":
        data = subscribe(1, [(f"{uid}/a", 3)], version=version)  # MQTT-3-8.3-4
    else:
        data = subscribe(1, [(f"{uid}/a", 0xC0)], version=version)  # MQTT-3.8.3-5
    c.send(data)
    got = c.closed()
    assert all(p.type == DISCONNECT and p.code in (0x81, 0x82) for p in got), got


def test_retain_handling_3_is_malformed(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid)
    c.send(subscribe(1, [(f"{uid}/a", 3 << 4)]))
    got = c.closed()  # 3.8.3.1: Retain Handling 3 is a protocol error
    assert all(p.type == DISCONNECT and p.code in (0x81, 0x82) for p in got), got


def test_subscription_identifier_zero_is_an_error(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid)
    c.send(subscribe(1, [(f"{uid}/a", 0)], props=[(SUBSCRIPTION_ID, 0)]))
    got = c.closed()  # 3.8.2.1.2
    assert all(p.type == DISCONNECT and p.code in (0x81, 0x82) for p in got), got


@VERSIONS
def test_suback_codes_in_request_order(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    ack = c.subscribe((f"{uid}/2", 2), (f"{uid}/0", 0), (f"{uid}/1", 1))
    assert ack.codes == [2, 0, 1]  # MQTT-3.8.4-5, MQTT-3.9.3-1


# -- overlapping subscriptions ---------------------------------------------------------------------


@VERSIONS
def test_overlapping_subscriptions_deliver_max_qos(mq, raw, uid, version, request):
    if MOSQUITTO and version == 4:
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="Mosquitto 2.0.11 sends 3.1.1 clients one copy at the QoS of the "
                "exact-match subscription (0), not the maximum (2)",
            )
        )
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    c.subscribe((f"{uid}/a/+", 1), (f"{uid}/#", 2), (f"{uid}/a/b", 0))
    pub = raw(mq.port, version=version)
    pub.connect(uid + "p", version=version)
    pub.publish(f"{uid}/a/b", b"x", qos=2)
    pub.publish(f"{uid}/m", b"marker", qos=1)
    copies = c.until(f"{uid}/m")
    # MQTT-3.3.5-1 (3.1.1) / MQTT-3.3.4-2 (5.0): at least one copy at the maximum QoS;
    # further copies, one per matching subscription, are allowed
    assert 1 <= len(copies) <= 3
    assert all(p.payload == b"x" for p in copies)
    assert max(p.qos for p in copies) == 2


def test_overlapping_subscriptions_carry_all_identifiers(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid)
    for i, (f, q) in enumerate([(f"{uid}/a/+", 1), (f"{uid}/#", 2), (f"{uid}/a/b", 0)], 1):
        c.subscribe((f, q), props=[(SUBSCRIPTION_ID, i)])
    c.subscribe((f"{uid}/m", 1))
    c.publish(f"{uid}/a/b", b"x", qos=2)
    c.publish(f"{uid}/m", b"marker", qos=1)
    copies = c.until(f"{uid}/m")
    ids = [i for p in copies for i in p.all(SUBSCRIPTION_ID)]
    # MQTT-3.3.4-3/-4/-5: each copy names its subscription(s); together they name all three
    assert sorted(ids) == [1, 2, 3]
    assert max(p.qos for p in copies) == 2


@VERSIONS
def test_resubscribe_replaces_the_subscription(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    c.subscribe((f"{uid}/x", 0))
    c.subscribe((f"{uid}/x", 2))  # MQTT-3.8.4-3: replaces, does not add
    c.subscribe((f"{uid}/m", 1))
    c.publish(f"{uid}/x", b"once", qos=2)
    c.publish(f"{uid}/m", b"marker", qos=1)
    copies = c.until(f"{uid}/m")
    assert [(p.payload, p.qos) for p in copies] == [(b"once", 2)]


# -- 5.0 subscription options ---------------------------------------------------------------------


def test_no_local(mq, raw, uid):
    me = raw(mq.port)
    me.connect(uid)
    me.subscribe((f"{uid}/chat", sub_opts(1, no_local=True)), (f"{uid}/m", 1))
    other = raw(mq.port)
    other.connect(uid + "o")
    other.subscribe((f"{uid}/chat", 1))
    me.publish(f"{uid}/chat", b"mine", qos=1)
    me.publish(f"{uid}/m", b"marker", qos=1)
    assert me.until(f"{uid}/m") == []  # MQTT-3.8.3-3
    assert other.next_publish().payload == b"mine"
    other.publish(f"{uid}/chat", b"theirs", qos=1)
    assert me.next_publish().payload == b"theirs"


@pytest.mark.xfail(MOSQUITTO, strict=True, reason="Mosquitto 2.0.11 grants No Local on $share")
def test_no_local_on_shared_subscription_is_a_protocol_error(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid)
    c.send(subscribe(1, [(f"$share/g/{uid}/a", sub_opts(1, no_local=True))]))
    got = c.closed(timeout=2)  # MQTT-3.8.3-4
    assert all(p.type == DISCONNECT and p.code == 0x82 for p in got), got


def test_subscription_identifier_delivered_and_updated(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid)
    c.subscribe((f"{uid}/id/+", 1), props=[(SUBSCRIPTION_ID, 268435455)])  # the largest allowed
    c.subscribe((f"{uid}/plain", 1))
    c.publish(f"{uid}/id/x", b"a", qos=1)
    assert c.next_publish().all(SUBSCRIPTION_ID) == [268435455]  # MQTT-3.3.4-3
    c.publish(f"{uid}/plain", b"b", qos=1)
    assert c.next_publish().all(SUBSCRIPTION_ID) == []  # none for a subscription without one
    c.subscribe((f"{uid}/id/+", 1), props=[(SUBSCRIPTION_ID, 7)])  # replaces the identifier
    c.publish(f"{uid}/id/x", b"c", qos=1)
    assert c.next_publish().all(SUBSCRIPTION_ID) == [7]


# -- shared subscriptions -------------------------------------------------------------------------


def test_shared_subscription_delivers_each_message_to_one_member(mq, raw, uid):
    members = []
    for i in range(3):
        m = raw(mq.port)
        m.connect(f"{uid}m{i}")
        assert m.subscribe((f"$share/g1/{uid}/s/#", 1), (f"{uid}/m", 1)).codes == [1, 1]
        members.append(m)
    other_group = raw(mq.port)
    other_group.connect(uid + "g2")
    other_group.subscribe((f"$share/g2/{uid}/s/+", 1), (f"{uid}/m", 1))
    plain = raw(mq.port)
    plain.connect(uid + "plain")
    plain.subscribe((f"{uid}/s/#", 1), (f"{uid}/m", 1))

    pub = raw(mq.port)
    pub.connect(uid + "p")
    n = 30
    for i in range(n):
        pub.publish(f"{uid}/s/{i % 4}", b"%d" % i, qos=1)
    pub.publish(f"{uid}/m", b"marker", qos=1)
    per_member = [[int(p.payload) for p in m.until(f"{uid}/m")] for m in members]
    everything = sorted(x for got in per_member for x in got)
    assert everything == list(range(n))  # 4.8.2: each message to exactly one member of g1
    assert [int(p.payload) for p in other_group.until(f"{uid}/m")] == list(range(n))
    assert [int(p.payload) for p in plain.until(f"{uid}/m")] == list(range(n))


def test_shared_subscription_unsubscribe(mq, raw, uid):
    a = raw(mq.port)
    a.connect(uid + "a")
    a.subscribe((f"$share/g/{uid}/u", 1), (f"{uid}/m", 1))
    b = raw(mq.port)
    b.connect(uid + "b")
    b.subscribe((f"$share/g/{uid}/u", 1))
    assert a.unsubscribe(f"$share/g/{uid}/u").codes == [0]
    for i in range(5):
        b.publish(f"{uid}/u", b"%d" % i, qos=1)
    assert [p.payload for p in b.publishes(5)] == [b"%d" % i for i in range(5)]
    b.publish(f"{uid}/m", b"marker", qos=1)
    assert a.until(f"{uid}/m") == []


@pytest.mark.parametrize("bad", ["$share//R/x", "$share/g+/R/x", "$share/g#/R/x"])
def test_invalid_share_name_refused(mq, raw, uid, bad, request):
    if MOSQUITTO and bad.startswith("$share//"):
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="Mosquitto 2.0.11 grants an empty ShareName")
        )
    c = raw(mq.port)
    c.connect(uid)
    c.send(subscribe(1, [(f"{uid}/ok", 1), (bad.replace("R", uid), 1)]))
    got = c.recv()
    # MQTT-4.8.2-1 (ShareName at least one character), MQTT-4.8.2-2 (no wildcards in it)
    if got.type == SUBACK:
        assert got.codes[0] == 1 and got.codes[1] >= 0x80
    else:
        assert (got.type, got.code) in ((DISCONNECT, 0x81), (DISCONNECT, 0x82), (DISCONNECT, 0x8F))


# -- UNSUBSCRIBE ---------------------------------------------------------------------------------


@VERSIONS
def test_unsubscribe_stops_delivery(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    c.subscribe((f"{uid}/u/+", 1), (f"{uid}/m", 1))
    ack = c.unsubscribe(f"{uid}/u/+")
    if version == 5:
        assert ack.codes == [0x00]  # 3.11.3: Success
    else:
        assert len(ack.body) == 2  # 3.1.1 UNSUBACK: packet id only
    c.publish(f"{uid}/u/x", b"late", qos=1)
    c.publish(f"{uid}/m", b"marker", qos=1)
    assert c.until(f"{uid}/m") == []  # MQTT-3.10.4-2


def test_v5_unsuback_reason_codes(mq, raw, uid):
    c = raw(mq.port)
    c.connect(uid)
    c.subscribe(f"{uid}/a", f"{uid}/b/+")
    # 0x11: no subscription existed; MQTT-3.10.4-1: filters compared character by character
    ack = c.unsubscribe(f"{uid}/a", f"{uid}/nope", f"{uid}/b/x", f"{uid}/b/+")
    assert ack.codes == [0x00, 0x11, 0x11, 0x00]  # MQTT-3.11.3-1: one per filter, in order


@VERSIONS
def test_unsubscribe_wildcard_needs_exact_filter(mq, raw, uid, version):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    c.subscribe((f"{uid}/w/+", 1))
    c.unsubscribe(f"{uid}/w/x")  # not the same filter: the subscription stays
    c.publish(f"{uid}/w/x", b"still", qos=1)
    assert c.next_publish().payload == b"still"


@VERSIONS
@pytest.mark.parametrize("case", ["no-filters", "reserved-header-flags"])
def test_malformed_unsubscribe_closes(mq, raw, uid, version, case):
    c = raw(mq.port, version=version)
    c.connect(uid, version=version)
    data = unsubscribe(1, [] if case == "no-filters" else [f"{uid}/a"], version=version)
    if case == "reserved-header-flags":
        data = bytes([0xA0]) + data[1:]  # MQTT-3.10.1-1
    c.send(data)  # MQTT-3.10.3-2 for the empty one
    got = c.closed()
    assert all(p.type == DISCONNECT and p.code in (0x81, 0x82) for p in got), got


@VERSIONS
def test_paho_subscribe_unsubscribe(mq, paho, uid, version):
    c = paho(mq.port, uid, version=version)
    assert c.subscribe(f"{uid}/p/#", 1) == [1]
    c.publish(f"{uid}/p/1", b"in", qos=1)
    assert c.get().payload == b"in"
    c.unsubscribe(f"{uid}/p/#")
    c.subscribe(f"{uid}/m", 1)
    c.publish(f"{uid}/p/1", b"out", qos=1)
    c.publish(f"{uid}/m", b"marker", qos=1)
    assert c.until(f"{uid}/m") == []
