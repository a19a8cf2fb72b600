"""The core's side of the cluster (`core/ports.py`), driven in process with a virtual clock:
what the Redis bus relies on, without Redis or sockets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mcloudtt_broker.core.broker import Broker, BrokerSettings
from mcloudtt_broker.core.message import Message
from mcloudtt_broker.core.ports import ClusterBus, ClusterCore, LocalBus, Resume
from mcloudtt_broker.core.session import SessionSnapshot, SubscriptionRecord


class RecordingBus:
    """A `ClusterBus` that notes what the core tells it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.forwarded: list[tuple[str, Sequence[str], Mapping[str, list[str]]]] = []

    def forward(
        self, message: Message, targets: Sequence[str], groups: Mapping[str, list[str]]
    ) -> None:
        self.forwarded.append((message.topic, targets, groups))

    def subscription_added(self, full_filter: str) -> None:
        self.events.append(("added", full_filter))

    def subscription_removed(self, full_filter: str) -> None:
        self.events.append(("removed", full_filter))

    def session_changed(self, client_id: str) -> None:
        self.events.append(("changed", client_id))

    def delivery_completed(self, client_id: str) -> None:
        self.events.append(("completed", client_id))

    def release_after_store(self, client_id: str, packet_id: int) -> bool:
        return False

    def locate_session(self, client_id: str, clean_start: bool, resume: Resume) -> bool:
        return False


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[Broker, RecordingBus, Clock]:
    bus = RecordingBus()
    clock = Clock()
    broker = Broker(BrokerSettings(sys_interval=0), clock=clock, bus=bus)
    return broker, bus, clock


def snapshot(client_id: str = "dev-1", expiry: int = 30) -> SessionSnapshot:
    return SessionSnapshot(
        client_id=client_id,
        expiry_interval=expiry,
        subscriptions=(SubscriptionRecord(topic_filter="a/#", qos=1),),
    )


def test_the_broker_and_the_local_bus_fill_the_ports() -> None:
    broker, bus, _ = make()
    core: ClusterCore = broker
    port: ClusterBus = bus
    assert core.clock() == 1000.0 and port is bus
    # A single node has no session elsewhere: the CONNECT goes on at once.
    assert LocalBus().locate_session("x", False, lambda snapshot: None) is False


def test_an_adopted_session_is_offline_routes_queues_and_expires() -> None:
    broker, bus, clock = make()
    broker.adopt_session(snapshot(), clock())
    assert broker.has_session("dev-1")
    assert broker.persistent_sessions() == ["dev-1"]
    assert broker.local_filters() == ["a/#"]
    assert ("added", "a/#") in bus.events  # announced to the cluster table
    # Offline: what it misses is queued, and the stored copy carries it.
    broker.deliver_remote(Message("a/1", b"x", 1, False), plain=True, groups=())
    stored = broker.stored_session("dev-1")
    assert stored is not None
    assert [m.payload for m, *_ in stored.queue] == [b"x"]
    assert [s.topic_filter for s in stored.subscriptions] == ["a/#"]
    # Its expiry counts from the adoption (MQTT-3.1.2-23: kept while within the interval).
    clock.now += 29
    broker.tick(clock.now)
    assert broker.has_session("dev-1")
    clock.now += 2
    broker.tick(clock.now)
    assert not broker.has_session("dev-1")
    assert broker.stored_session("dev-1") is None
    assert ("removed", "a/#") in bus.events
    assert broker.local_filters() == []


def test_handover_gives_the_session_up() -> None:
    broker, _, clock = make()
    broker.adopt_session(snapshot(), clock())
    given = broker.handover("dev-1", clean_start=False, now=clock())
    assert given is not None and given.client_id == "dev-1"
    assert not broker.has_session("dev-1")
    assert broker.handover("dev-1", clean_start=False, now=clock()) is None


def test_a_session_that_ends_with_its_connection_is_not_stored() -> None:
    broker, _, clock = make()
    broker.adopt_session(snapshot("short", expiry=0), clock())
    assert broker.has_session("short")
    assert broker.stored_session("short") is None
    assert broker.persistent_sessions() == []


def test_load_retained_replaces_the_cluster_s_retained_but_keeps_sys() -> None:
    broker, _, _ = make()
    broker.publish(Message("keep", b"old", 0, True))
    broker.publish(Message("cleared", b"gone elsewhere", 0, True))
    broker.publish(Message("$SYS/broker/uptime", b"5", 0, True))
    broker.load_retained([Message("keep", b"new", 0, True), Message("added", b"a", 0, True)])
    assert sorted((m.topic, m.payload) for m in broker.retained_messages()) == [
        ("added", b"a"),
        ("keep", b"new"),
    ]
    # `$` topics are not the cluster's (MQTT-4.7.2-1): this broker's own $SYS stays.
    assert [m.payload for m in broker.retained.match("$SYS/#")] == [b"5"]


def test_the_cluster_table_counts_remote_filters() -> None:
    broker, bus, _ = make()
    broker.remote_subscribe("b", "x/+")
    broker.remote_subscribe("b", "$share/g/y")
    broker.remote_subscribe("c", "x/+")
    assert broker.remote_filter_count() == 3
    broker.publish(Message("x/1", b"p", 0, False))
    assert sorted(bus.forwarded[-1][1]) == ["b", "c"]
    broker.remote_forget("b")
    assert broker.remote_filter_count() == 1


def test_a_shared_message_for_a_group_whose_member_left_goes_to_a_member_elsewhere() -> None:
    """Issue 11 (rolling-restart): the origin chose us for a group whose member was handed to
    another broker meanwhile; the message goes on to a member broker in our table (the origin
    included), instead of to nobody."""
    broker, bus, _ = make()
    key = "$share/g/a/#"
    broker.remote_subscribe("b-origin", key)  # the member now sits on the origin
    message = Message("a/1", b"x", 1, False)
    orphaned = broker.deliver_remote(message, plain=False, groups=[key])
    assert list(orphaned) == [key]
    broker.replay_shared(message, orphaned, "")
    assert bus.forwarded == [("a/1", (), {"b-origin": [key]})]
    # With a member here it is delivered here, and nothing is passed on.
    broker.adopt_session(
        SessionSnapshot(
            client_id="m",
            expiry_interval=30,
            subscriptions=(SubscriptionRecord(topic_filter=key, qos=1),),
        ),
        1000.0,
    )
    assert not broker.deliver_remote(message, plain=False, groups=[key])
    assert broker.stored_session("m") is not None
    assert len(broker.stored_session("m").queue) == 1  # type: ignore[union-attr]


def test_a_live_hand_over_s_drain_goes_before_what_was_queued_meanwhile_unbounded() -> None:
    """Issue 11, the live hand-over: the new holder takes the session offline, queues what it
    publishes for it, then delivers what the drain found in the old holder's inbox: that goes
    before what was queued meanwhile (older per publisher), the queue's bound lifted while the
    client waits (what the old holder queued may have filled it) and then at least what it
    holds; a skipped session gets no copy of what its old holder delivered already."""
    broker = Broker(BrokerSettings(sys_interval=0, max_queued_messages=2), clock=Clock())
    broker.adopt_session(snapshot(), 1000.0)
    broker.bound_queue("dev-1", False)
    broker.deliver_remote(Message("a/1", b"from-snapshot", 1, False), plain=True, groups=())
    base = broker.queued("dev-1")
    for n in range(2):
        broker.deliver_remote(Message("a/1", b"new-%d" % n, 1, False), plain=True, groups=())
    since = broker.queued("dev-1")
    broker.replay_to(["dev-1"], Message("a/1", b"drained", 1, False), redelivered=False)
    broker.queue_behind("dev-1", base, since)
    broker.bound_queue("dev-1", True)
    broker.deliver_remote(Message("a/1", b"skipped", 1, False), True, (), skip={"dev-1"})
    stored = broker.stored_session("dev-1")
    assert stored is not None
    payloads = [m.payload for m, *_ in stored.queue]
    assert payloads == [b"from-snapshot", b"drained", b"new-0", b"new-1"]
    assert not [m for m, *_ in stored.queue if m.redelivered]  # the old holder never sent them
    broker.deliver_remote(Message("a/1", b"over", 1, False), plain=True, groups=())
    assert broker.queued("dev-1") == 4  # bounded again, at what it held
