"""Publishes across cores on the in-memory bus: QoS, wildcards, no echo, the cluster table."""

from __future__ import annotations

import pytest
from broker.mqttraw import DISCONNECT, PUBLISH, PUBREL

from .harness import Cluster, topics


@pytest.mark.parametrize("sub_qos", [0, 1, 2])
@pytest.mark.parametrize("pub_qos", [0, 1, 2])
def test_publish_on_one_core_reaches_a_subscriber_on_another(pub_qos: int, sub_qos: int) -> None:
    cluster = Cluster(("a", "b"))
    sub = cluster.client("b")
    sub.connect("sub")
    sub.subscribe(("t/x", sub_qos))
    pub = cluster.client("a")
    pub.connect("pub")
    pub.publish("t/x", b"m", qos=pub_qos)

    [got] = sub.publishes()  # QoS 1 and 2 flows completed by the subscriber
    assert (got.topic, got.payload) == ("t/x", b"m")
    assert got.qos == min(pub_qos, sub_qos)  # MQTT-3.8.4-8: granted QoS caps the delivery
    assert not got.dup and not got.retain
    assert cluster.cores["b"].sessions["sub"].inflight == {}  # every flow ended
    assert sub.take() == []  # no second copy, no stray PUBREL
    assert cluster.deliveries_to("b") == ["t/x"]


def test_qos2_delivery_waits_for_pubcomp_and_pubrel_is_resent_after_reconnect() -> None:
    cluster = Cluster(("a", "b"))
    sub = cluster.client("b")
    sub.connect("sub", clean=False, props=[(0x11, 60)])
    sub.subscribe(("t", 2))
    pub = cluster.client("a")
    pub.connect("pub")
    pub.publish("t", b"once", qos=2)
    [got] = sub.publishes(ack=False)
    sub.send(b"\x50\x02" + got.packet_id.to_bytes(2, "big"))  # PUBREC only
    assert sub.expect(PUBREL).packet_id == got.packet_id
    sub.drop()

    again = cluster.client("b")
    assert again.connect("sub", clean=False).session_present
    # MQTT-4.4.0-1: the PUBREL is sent again, the PUBLISH is not.
    assert again.expect(PUBREL).packet_id == got.packet_id
    assert again.take(PUBLISH) == []


def test_wildcards_route_to_the_cores_that_match_only() -> None:
    cluster = Cluster(("a", "b", "c"))
    b = cluster.client("b")
    b.connect("b")
    b.subscribe(("sport/+/score", 1), ("sport/#", 1))
    c = cluster.client("c")
    c.connect("c")
    c.subscribe(("other/#", 1))
    pub = cluster.client("a")
    pub.connect("pub")

    pub.publish("sport/tennis/score", b"1", qos=1)
    pub.publish("sport", b"2", qos=1)  # '#' also matches the parent level (MQTT 5.0 4.7.1.2)
    pub.publish("sport/tennis/player1", b"3", qos=1)
    pub.publish("sportx", b"4", qos=1)  # matches nothing anywhere
    pub.publish("other/x/y", b"5", qos=1)

    # Overlapping subscriptions on one client: one copy (MQTT-3.3.4-2).
    assert b.payloads() == [b"1", b"2", b"3"]
    assert c.payloads() == [b"5"]
    assert cluster.deliveries_to("b") == ["sport/tennis/score", "sport", "sport/tennis/player1"]
    assert cluster.deliveries_to("c") == ["other/x/y"]
    assert cluster.hub.stats["forwarded"] == 4  # "sportx" never left core a


def test_no_echo_and_no_traffic_to_a_core_without_a_match() -> None:
    cluster = Cluster(("a", "b", "c"))
    local = cluster.client("a")
    local.connect("local")
    local.subscribe(("t", 1))
    remote = cluster.client("b")
    remote.connect("remote")
    remote.subscribe(("t", 1))
    pub = cluster.client("a")
    pub.connect("pub")
    for n in range(3):
        pub.publish("t", str(n).encode(), qos=1)

    assert local.payloads() == [b"0", b"1", b"2"]
    assert remote.payloads() == [b"0", b"1", b"2"]
    # Each publish crossed the bus once, to b: nothing came back to a, nothing went to c.
    assert cluster.deliveries_to("b") == ["t"] * 3
    assert cluster.deliveries_to("a") == []
    assert cluster.deliveries_to("c") == []

    pub.publish("only/local", b"x")
    assert cluster.hub.stats["forwarded"] == 3

    # A retained publish goes to every other core, still not back to its origin.
    pub.publish("t", b"kept", qos=1, retain=True)
    assert local.payloads() == [b"kept"]
    assert remote.payloads() == [b"kept"]
    assert sorted(d.dest for d in cluster.hub.log[3:]) == ["b", "c"]


def test_unsubscribe_and_session_end_leave_the_cluster_table() -> None:
    cluster = Cluster(("a", "b"))
    sub = cluster.client("b")
    sub.connect("sub")
    sub.subscribe(("t/+", 0), ("u", 0))
    assert cluster.cores["a"].peers["b"].filters == {"t/+", "u"}

    sub.unsubscribe("t/+")
    assert cluster.cores["a"].peers["b"].filters == {"u"}
    pub = cluster.client("a")
    pub.connect("pub")
    pub.publish("t/1", b"x")
    assert cluster.hub.stats["forwarded"] == 0

    sub.disconnect()  # clean session: it ends with the connection
    assert cluster.cores["a"].peers["b"].filters == set()
    pub.publish("u", b"x")
    assert cluster.hub.stats["forwarded"] == 0


def test_a_core_that_joins_later_learns_the_table_and_announces_its_filters() -> None:
    cluster = Cluster(("a",))
    early = cluster.client("a")
    early.connect("early")
    early.subscribe(("t", 1))
    cluster.add_core("b")
    assert cluster.cores["b"].peers["a"].filters == {"t"}

    late = cluster.client("b")
    late.connect("late")
    late.subscribe(("t", 1))
    pub = cluster.client("b")
    pub.connect("pub")
    pub.publish("t", b"x", qos=1)
    assert early.payloads() == [b"x"]
    assert late.payloads() == [b"x"]


def test_a_core_that_leaves_is_dropped_from_the_table() -> None:
    cluster = Cluster(("a", "b"))
    sub = cluster.client("b")
    sub.connect("sub")
    sub.subscribe("t")
    cluster.hub.leave("b")
    assert "b" not in cluster.cores["a"].peers
    pub = cluster.client("a")
    pub.connect("pub")
    pub.publish("t", b"x")
    assert cluster.hub.stats["forwarded"] == 0


def test_cluster_traffic_moves_only_when_the_hub_is_pumped() -> None:
    cluster = Cluster(("a", "b"), auto_pump=False)
    sub = cluster.client("b")
    sub.connect("sub")
    sub.subscribe(("t", 1))
    pub = cluster.client("a")
    pub.connect("pub")
    pub.publish("t", b"1", qos=1)
    pub.publish("t", b"2", qos=1)
    assert cluster.hub.pending() == 2
    assert sub.publishes() == []
    cluster.pump()
    assert sub.payloads() == [b"1", b"2"]  # in the order they were published


def test_synchronous_hub_delivers_inside_forward() -> None:
    cluster = Cluster(("a", "b"), synchronous=True, auto_pump=False)
    sub = cluster.client("b")
    sub.connect("sub")
    sub.subscribe("t")
    pub = cluster.client("a")
    pub.connect("pub")
    pub.publish("t", b"now")
    assert cluster.hub.pending() == 0
    assert topics(sub.publishes()) == ["t"]


def test_connect_on_another_core_takes_the_session_over() -> None:
    cluster = Cluster(("a", "b"))
    first = cluster.client("a")
    first.connect("roamer", clean=False, props=[(0x11, 300)])
    first.subscribe(("t", 1))
    first.drop()
    pub = cluster.client("a")
    pub.connect("pub")
    pub.publish("t", b"while away", qos=1)  # queued in the session on a

    second = cluster.client("b")
    assert second.connect("roamer", clean=False).session_present
    assert second.payloads() == [b"while away"]
    assert "roamer" not in cluster.cores["a"].sessions
    # The subscription moved with the session: a now routes to b.
    assert cluster.cores["a"].peers["b"].filters == {"t"}
    pub.publish("t", b"after", qos=1)
    assert second.payloads() == [b"after"]


def test_connect_on_another_core_closes_the_old_connection() -> None:
    cluster = Cluster(("a", "b"))
    first = cluster.client("a")
    first.connect("dup")
    second = cluster.client("b")
    assert not second.connect("dup").session_present
    assert not first.open
    assert first.expect(DISCONNECT).code == 0x8E  # MQTT-3.1.4-3: Session taken over
