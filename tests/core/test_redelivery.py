"""Issue 11: a dead broker's inbox replayed to the sessions adopted from it. The dead broker may
have sent a replayed message just before it died (its PUBACK lost with it), so the adopter sends
it with DUP 1 (MQTT-3.3.1-1: "might be re-delivery"), also after the session moved on to another
broker in a snapshot; what is published afterwards goes out without DUP."""

from __future__ import annotations

from broker.mqttraw import SESSION_EXPIRY
from mcloudtt_broker.cluster.session_snapshot import decode_snapshot, encode_snapshot
from mcloudtt_broker.core.message import Message

from .harness import Cluster


def _adopted_session(cluster: Cluster) -> None:
    """A persistent session of "dev" subscribed to dev/t, offline on core "a" (as adopted)."""
    dev = cluster.client("a", version=5)
    dev.connect("dev", clean=False, props=[(SESSION_EXPIRY, 600)])
    dev.subscribe(("dev/t", 1))
    dev.drop()


def test_a_replayed_message_goes_out_with_dup_and_a_new_one_without() -> None:
    cluster = Cluster(("a",))
    _adopted_session(cluster)
    core = cluster.cores["a"]
    core.replay_to(["dev"], Message("dev/t", b"replayed", 1, False))
    pub = cluster.client("a")
    pub.connect("pub")
    pub.publish("dev/t", b"new", qos=1)
    back = cluster.client("a", version=5)
    ack = back.connect("dev", clean=False, props=[(SESSION_EXPIRY, 600)])
    assert ack.session_present
    got = back.publishes()
    assert [(p.payload, p.dup) for p in got] == [(b"replayed", True), (b"new", False)]


def test_a_replayed_message_keeps_dup_in_a_session_snapshot() -> None:
    cluster = Cluster(("a",))
    _adopted_session(cluster)
    core = cluster.cores["a"]
    core.replay_to(["dev"], Message("dev/t", b"replayed", 1, False))
    pub = cluster.client("a")
    pub.connect("pub")
    pub.publish("dev/t", b"new", qos=1)
    snapshot = core.stored_session("dev")
    assert snapshot is not None
    moved = decode_snapshot(encode_snapshot(snapshot, "a", cluster.clock()), cluster.clock)
    assert [(m.payload, m.redelivered) for m, *_ in moved.queue] == [
        (b"replayed", True),
        (b"new", False),
    ]
