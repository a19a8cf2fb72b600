"""What an idle subscribed connection costs the broker core, and the structures that made it cheap.

The memory check drives real cores through `Broker.connect` / `receive_data` (as `server.py` does)
with CONNECT + SUBSCRIBE from the client codec, and measures the Python heap each added
connection keeps (tracemalloc). Before the per-connection structures became lazy it was 3,266
bytes (empty deque, set and dicts per session and per trie level); now about 1,100.
"""

from __future__ import annotations

import gc
import tracemalloc
from dataclasses import dataclass

from mcloudtt_broker.core.broker import Broker, BrokerSettings
from mcloudtt_broker.core.trie import Subscription, SubscriptionTrie
from mcloudtt_mqttclient import MQTT_311, connect, subscribe

# Fails the old core (3,266 bytes measured the same way) with room for allocator noise.
MAX_CORE_BYTES_PER_IDLE_CONNECTION = 1_600


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
