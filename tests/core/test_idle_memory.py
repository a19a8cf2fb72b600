"""What an idle subscribed connection costs the broker core, and the structures that made it cheap.

The memory check drives real cores through `Broker.connect` / `receive_data` (as `server.py` does)
with CONNECT + SUBSCRIBE from the client codec, and measures the Python heap each added
connection keeps (tracemalloc). Before the per-connection structures became lazy it was 3,266
bytes (empty deque, set and dicts per session and per trie level); then 1,304 (two empty ACL
caches, a one-entry dict for the one subscription, an empty output buffer, a `filter_refs`
entry per device filter); now 910. The shell's share is in `tests/transport/test_idle_memory.py`.
"""

from __future__ import annotations

import gc
import tracemalloc
from dataclasses import dataclass

import pytest
from mcloudtt_broker.auth.acl import AclFile
from mcloudtt_broker.core.broker import Broker, BrokerSettings
from mcloudtt_broker.core.ports import LocalBus
from mcloudtt_broker.core.session import NO_DECISIONS, Session
from mcloudtt_broker.core.stats import Stats
from mcloudtt_broker.core.trie import Subscription, SubscriptionTrie
from mcloudtt_mqttclient import MQTT_311, connect, subscribe, unsubscribe

# Fails the previous core (1,304 bytes measured the same way) with room for allocator noise.
MAX_CORE_BYTES_PER_IDLE_CONNECTION = 1_000


class _Link:
    __slots__ = ()

    def kick(self) -> None:
        pass

    def close(self) -> None:
        pass


def _device(broker: Broker, i: int) -> object:
    conn = broker.connect(_Link(), 0.0)
    conn.receive_data(
        connect(f"dev-{i}", version=MQTT_311, keepalive=600)
        + subscribe(1, [(f"devices/{i}/cmd", 1)], version=MQTT_311),
        0.0,
    )
    assert conn.take_output() == b"\x20\x02\x00\x00\x90\x03\x00\x01\x01"  # CONNACK, SUBACK
    return conn


def test_an_idle_subscribed_connection_costs_the_core_under_the_bound() -> None:
    broker = Broker(BrokerSettings(), clock=lambda: 0.0)
    held = [_device(broker, 100_000 + i) for i in range(200)]  # warm code paths and caches
    n = 4_000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held += [_device(broker, i) for i in range(n)]
        gc.collect()
        per_connection = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(broker.sessions) == n + 200
    assert per_connection <= MAX_CORE_BYTES_PER_IDLE_CONNECTION, per_connection


@dataclass(eq=False)
class _Sub:
    name: str
    online: bool = True

    def __hash__(self) -> int:
        return id(self)


def _sub(who: _Sub, topic_filter: str, qos: int = 0) -> Subscription[_Sub]:
    return Subscription(session=who, topic_filter=topic_filter, qos=qos)


def _matched(trie: SubscriptionTrie[_Sub], topic: str) -> dict[str, list[str]]:
    per_session, _ = trie.match(topic)
    return {s.name: sorted(x.topic_filter for x in subs) for s, subs in per_session}


def test_exact_filters_shared_by_sessions_replaced_and_removed() -> None:
    trie: SubscriptionTrie[_Sub] = SubscriptionTrie()
    a, b = _Sub("a"), _Sub("b")
    assert trie.add(_sub(a, "d/1/cmd"), "d/1/cmd") is False
    assert trie.add(_sub(a, "d/1/cmd", qos=1), "d/1/cmd") is True  # replaced, not added
    assert trie.count == 1
    assert trie.add(_sub(b, "d/1/cmd"), "d/1/cmd") is False
    assert _matched(trie, "d/1/cmd") == {"a": ["d/1/cmd"], "b": ["d/1/cmd"]}
    assert trie.remove(a, "d/1/cmd", None) is True
    assert trie.remove(a, "d/1/cmd", None) is False
    assert _matched(trie, "d/1/cmd") == {"b": ["d/1/cmd"]}
    assert trie.add(_sub(b, "d/1/cmd", qos=2), "d/1/cmd") is True
    per_session, _ = trie.match("d/1/cmd")
    assert [s.qos for _, subs in per_session for s in subs] == [2]
    assert trie.remove(a, "d/1/cmd", None) is False  # not a's any more
    assert trie.remove(b, "d/1/cmd", None) is True
    assert trie.count == 0
    assert _matched(trie, "d/1/cmd") == {}


def test_exact_and_wildcard_filters_of_one_session_both_match() -> None:
    trie: SubscriptionTrie[_Sub] = SubscriptionTrie()
    a = _Sub("a")
    trie.add(_sub(a, "d/1/cmd"), "d/1/cmd")
    trie.add(_sub(a, "d/+/cmd"), "d/+/cmd")
    trie.add(_sub(a, "$SYS/x"), "$SYS/x")
    trie.add(_sub(a, "#"), "#")
    # MQTT-3.3.4-2 lets the server send one copy per overlapping subscription, or one: the core
    # groups them per session, so both filters are reported for the one session.
    assert _matched(trie, "d/1/cmd") == {"a": ["#", "d/+/cmd", "d/1/cmd"]}
    # An exact filter matches a $-topic; '#' does not (MQTT-4.7.2-1).
    assert _matched(trie, "$SYS/x") == {"a": ["$SYS/x"]}
    assert _matched(trie, "d/2/cmd") == {"a": ["#", "d/+/cmd"]}


def test_one_subscription_is_kept_as_itself_and_a_second_makes_a_dict() -> None:
    session = Session("s", max_queued=10, stats=Stats(started_at=0.0))
    first = Subscription(session=session, topic_filter="d/1/cmd", qos=0)
    session.add_subscription(first)
    assert session.subs is first  # no dict for a device's one filter
    assert dict(session.subscriptions) == {"d/1/cmd": first}
    replaced = Subscription(session=session, topic_filter="d/1/cmd", qos=1)
    session.add_subscription(replaced)
    assert session.subs is replaced and session.subscription_count() == 1
    other = Subscription(session=session, topic_filter="d/+/all", qos=2)
    session.add_subscription(other)
    assert list(session.subscriptions) == ["d/1/cmd", "d/+/all"]  # in subscription order
    assert session.subscription("d/+/all") is other and session.subscription("x") is None
    with pytest.raises(TypeError):
        session.subscriptions["y"] = other  # type: ignore[index]  # writes go through methods
    assert session.remove_subscription("d/1/cmd") is replaced
    assert session.remove_subscription("d/1/cmd") is None
    assert session.remove_subscription("d/+/all") is other
    assert session.subs is None and not session.subscriptions


def test_acl_caches_are_shared_until_a_decision_and_shared_again_after_a_reload() -> None:
    broker = Broker(BrokerSettings(), clock=lambda: 0.0)
    _device(broker, 1)
    idle = broker.sessions["dev-1"]
    assert idle.acl_cache is NO_DECISIONS and idle.acl_read is NO_DECISIONS  # no authorizer
    broker.set_rules(None, AclFile.parse("pattern readwrite devices/%c/#\n"))
    conn = broker.connect(_Link(), 0.0)
    conn.receive_data(
        connect("dev-2", version=MQTT_311, keepalive=60)
        + subscribe(1, [("devices/dev-2/cmd", 0), ("other/x", 0)], version=MQTT_311),
        0.0,
    )
    assert conn.take_output().endswith(b"\x90\x04\x00\x01\x00\x80")  # SUBACK: allowed, denied
    deciding = broker.sessions["dev-2"]
    assert deciding.acl_cache == {
        ("subscribe", "devices/dev-2/cmd"): True,
        ("subscribe", "other/x"): False,
    }
    assert NO_DECISIONS == {}  # the shared one was never written
    assert idle.acl_cache is NO_DECISIONS
    broker.set_rules(None, AclFile.parse("topic read other/#\n"))
    assert deciding.acl_cache is NO_DECISIONS  # every decision dropped


class _Bus:
    """What the core announces to the cluster table (the rest as a single node)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def subscription_added(self, full_filter: str) -> None:
        self.events.append(("added", full_filter))

    def subscription_removed(self, full_filter: str) -> None:
        self.events.append(("removed", full_filter))

    def __getattr__(self, name: str) -> object:
        return getattr(LocalBus(), name)


def test_a_device_filter_is_announced_once_and_withdrawn_with_its_last_holder() -> None:
    bus = _Bus()
    broker = Broker(BrokerSettings(), clock=lambda: 0.0, bus=bus)  # type: ignore[arg-type]
    a, b = (broker.connect(_Link(), 0.0) for _ in range(2))
    for cid, conn in (("a", a), ("b", b)):
        conn.receive_data(
            connect(cid, version=MQTT_311, keepalive=60)
            + subscribe(1, [("d/1/cmd", 0), ("d/+/all", 0)], version=MQTT_311),
            0.0,
        )
    # The exact filter is counted by the trie's exact index, not in filter_refs.
    assert dict(broker.filter_refs) == {"d/+/all": 2}
    assert sorted(broker.local_filters()) == ["d/+/all", "d/1/cmd"]
    assert bus.events == [("added", "d/1/cmd"), ("added", "d/+/all")]
    a.receive_data(unsubscribe(2, ["d/1/cmd", "d/+/all"], version=MQTT_311), 0.0)
    assert len(bus.events) == 2  # b still holds both
    b.connection_lost(0.0)  # its session (clean, expiry 0) ends with it
    assert bus.events[2:] == [("removed", "d/1/cmd"), ("removed", "d/+/all")]
    assert broker.local_filters() == [] and not broker.filter_refs
