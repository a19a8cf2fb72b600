"""Shared subscriptions and retained messages across cores on the in-memory bus."""

from __future__ import annotations

from collections import Counter

from broker.mqttraw import MESSAGE_EXPIRY

from .harness import Client, Cluster


def _members(cluster: Cluster, placement: dict[str, str], share: str) -> dict[str, Client]:
    members = {}
    for name, core in placement.items():
        client = cluster.client(core)
        client.connect(name)
        client.subscribe((share, 1))
        members[name] = client
    return members


def test_each_message_goes_to_exactly_one_member_in_the_cluster() -> None:
    cluster = Cluster(("a", "b", "c"))
    members = _members(cluster, {"ma": "a", "mb": "b", "mc": "c"}, "$share/g/job/+")
    plain = cluster.client("b")
    plain.connect("plain")
    plain.subscribe(("job/+", 1))
    pub = cluster.client("a")
    pub.connect("pub")
    sent = [f"{n}".encode() for n in range(30)]
    for payload in sent:
        pub.publish("job/x", payload, qos=1)

    got = {name: client.payloads() for name, client in members.items()}
    everything = [p for payloads in got.values() for p in payloads]
    assert sorted(everything) == sorted(sent)  # each once, none lost (MQTT 5.0 4.8.2)
    # Round robin over the brokers that have members.
    assert {name: len(payloads) for name, payloads in got.items()} == {"ma": 10, "mb": 10, "mc": 10}
    assert plain.payloads() == sent  # a plain subscription still gets every message


def test_two_groups_each_get_every_message_once() -> None:
    cluster = Cluster(("a", "b", "c"))
    g1 = _members(cluster, {"x1": "a", "x2": "b"}, "$share/one/t")
    g2 = _members(cluster, {"y1": "b", "y2": "c"}, "$share/two/t")
    pub = cluster.client("c")
    pub.connect("pub")
    for n in range(10):
        pub.publish("t", str(n).encode(), qos=1)

    for group in (g1, g2):
        counts = Counter(p for client in group.values() for p in client.payloads())
        assert counts == Counter(str(n).encode() for n in range(10))


def test_members_on_one_core_share_that_core_s_turn() -> None:
    cluster = Cluster(("a", "b"))
    members = _members(cluster, {"b1": "b", "b2": "b", "a1": "a"}, "$share/g/t")
    pub = cluster.client("a")
    pub.connect("pub")
    for n in range(8):
        pub.publish("t", str(n).encode(), qos=1)
    got = {name: client.payloads() for name, client in members.items()}
    assert sorted(p for ps in got.values() for p in ps) == sorted(str(n).encode() for n in range(8))
    assert len(got["a1"]) == 4 and len(got["b1"]) + len(got["b2"]) == 4
    assert got["b1"] and got["b2"]


def test_a_group_member_that_leaves_gets_nothing_more() -> None:
    cluster = Cluster(("a", "b"))
    members = _members(cluster, {"ma": "a", "mb": "b"}, "$share/g/t")
    members["mb"].unsubscribe("$share/g/t")
    pub = cluster.client("a")
    pub.connect("pub")
    for n in range(4):
        pub.publish("t", str(n).encode(), qos=1)
    assert members["ma"].payloads() == [b"0", b"1", b"2", b"3"]
    assert members["mb"].payloads() == []
    assert cluster.deliveries_to("b") == []


def test_retained_message_reaches_a_later_subscriber_on_another_core() -> None:
    cluster = Cluster(("a", "b"))
    pub = cluster.client("a")
    pub.connect("pub")
    pub.publish("state/door", b"open", qos=1, retain=True)

    sub = cluster.client("b")
    sub.connect("sub")
    sub.subscribe(("state/#", 1))
    [got] = sub.publishes()
    assert (got.topic, got.payload) == ("state/door", b"open")
    assert got.retain  # MQTT-3.3.1-9: sent because of a new subscription
    assert got.qos == 1


def test_retained_message_is_replaced_then_deleted_on_every_core() -> None:
    cluster = Cluster(("a", "b", "c"))
    pub = cluster.client("a")
    pub.connect("pub")
    pub.publish("s", b"first", retain=True)
    pub.publish("s", b"second", retain=True)  # MQTT-3.3.1-5: replaces the first

    sub = cluster.client("b")
    sub.connect("sub")
    sub.subscribe("s")
    assert sub.payloads() == [b"second"]

    # From another core: an empty retained payload clears it everywhere (MQTT-3.3.1-6).
    eraser = cluster.client("c")
    eraser.connect("eraser")
    eraser.publish("s", b"", retain=True)
    # The live subscriber gets the empty message itself (MQTT-3.3.1-12: retain 0 when live).
    [live] = sub.publishes()
    assert (live.payload, live.retain) == (b"", False)
    for core in cluster.cores.values():
        assert len(core.retained) == 0
    late = cluster.client("b")
    late.connect("late")
    late.subscribe("s")
    assert late.publishes() == []


def test_retain_as_published_keeps_the_flag_across_cores() -> None:
    cluster = Cluster(("a", "b"))
    sub = cluster.client("b")
    sub.connect("sub")
    sub.subscribe(("plain", 0), ("rap", 0x08))  # MQTT-3.3.1-12/13
    pub = cluster.client("a")
    pub.connect("pub")
    pub.publish("plain", b"1", retain=True)
    pub.publish("rap", b"2", retain=True)
    assert [(p.topic, p.retain) for p in sub.publishes()] == [("plain", False), ("rap", True)]


def test_a_core_that_joins_later_gets_the_retained_messages() -> None:
    cluster = Cluster(("a",))
    pub = cluster.client("a")
    pub.connect("pub")
    pub.publish("r/1", b"one", retain=True)
    pub.publish("r/2", b"two", retain=True)
    pub.publish("r/2", b"", retain=True)

    cluster.add_core("b")
    sub = cluster.client("b")
    sub.connect("sub")
    sub.subscribe("r/#")
    assert [(p.topic, p.payload, p.retain) for p in sub.publishes()] == [("r/1", b"one", True)]


def test_an_expired_retained_message_is_not_sent_on_another_core() -> None:
    cluster = Cluster(("a", "b"))
    pub = cluster.client("a")
    pub.connect("pub")
    pub.publish("r/short", b"s", retain=True, props=[(MESSAGE_EXPIRY, 5)])
    pub.publish("r/long", b"l", retain=True, props=[(MESSAGE_EXPIRY, 50)])
    cluster.advance(6)

    sub = cluster.client("b")
    sub.connect("sub")
    sub.subscribe("r/#")
    [got] = sub.publishes()  # MQTT-3.3.2-5
    assert got.topic == "r/long"
    assert got.prop(MESSAGE_EXPIRY) == 44  # MQTT-3.3.2-6: what remains
