"""Subscription matching: a topic trie with `+`, `#`, `$`-topics and shared groups.

`match(topic)` walks the levels of a topic once and returns the matching subscriptions grouped
per session, plus the matching shared groups. Results are cached per topic name (fan-in traffic
repeats topics) and the cache is dropped on any subscription change.

Filters without wildcards (an IoT fleet's `devices/<id>/cmd`, one per device) are not put in the
trie: they sit in one flat dict keyed by the filter, looked up once per match. A trie path per
device would cost two nodes, a dict per level and the level strings: about half a kilobyte per
idle subscribed connection.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar


class Subscriber(Hashable, Protocol):
    """Who holds subscriptions: a local session, or (in the cluster table) a remote broker."""

    @property
    def online(self) -> bool: ...


S = TypeVar("S", bound=Subscriber)


@dataclass(slots=True, eq=False)
class Subscription(Generic[S]):
    """One subscription of one session (MQTT 5.0 section 3.8.3.1 options)."""

    session: S
    topic_filter: str  # as subscribed, including any $share/{group}/ prefix
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    identifier: int | None = None
    share_group: str | None = None


@dataclass(slots=True, eq=False)
class SharedGroup(Generic[S]):
    """The members of one `$share/{name}/{filter}`; each message goes to one of them."""

    name: str
    topic_filter: str
    members: dict[S, Subscription[S]] = field(default_factory=dict)
    turn: int = 0

    @property
    def key(self) -> str:
        """The full shared filter, `$share/{name}/{filter}`, which names the group cluster-wide."""
        return f"$share/{self.name}/{self.topic_filter}"

    def pick(self) -> Subscription[S] | None:
        """Round robin over members, preferring ones that are connected right now."""
        members = list(self.members.values())
        if not members:
            return None
        count = len(members)
        for step in range(count):
            candidate = members[(self.turn + step) % count]
            if candidate.session.online:
                self.turn = (self.turn + step + 1) % count
                return candidate
        self.turn = (self.turn + 1) % count
        return members[self.turn % count]


# One shared empty dict stands for "none yet" in every node: a filter like `devices/<id>/cmd`
# makes two nodes per device, and three empty dicts each cost 192 bytes a node. Reads (the match
# hot path) see an ordinary empty dict; `SubscriptionTrie.add` and `_node` give a node its own
# dict before the first insert, so this one is never written to.
_NONE: dict[Any, Any] = {}


class _Node(Generic[S]):
    __slots__ = ("children", "groups", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] = _NONE
        self.subscribers: dict[S, Subscription[S]] = _NONE
        self.groups: dict[str, SharedGroup[S]] = _NONE

    def empty(self) -> bool:
        return not (self.children or self.subscribers or self.groups)


def _exact(topic_filter: str) -> bool:
    return "+" not in topic_filter and "#" not in topic_filter


def in_exact_index(topic_filter: str, share_group: str | None) -> bool:
    """Whether a subscription sits in the exact index (`exact_holders` counts its holders)."""
    return share_group is None and _exact(topic_filter)


class SubscriptionTrie(Generic[S]):
    def __init__(self, *, cache_size: int = 65_536) -> None:
        self._root: _Node[S] = _Node()
        # Per topic: each subscriber's matching subscriptions (usually one), and shared groups.
        self._cache: dict[
            str, tuple[list[tuple[S, list[Subscription[S]]]], list[SharedGroup[S]]]
        ] = {}
        self._cache_size = cache_size
        # Filters without wildcards, non-shared: filter -> its one subscription (the usual case:
        # a device's own topic), or subscriber -> subscription when several sessions share it.
        self._exact: dict[str, Subscription[S] | dict[S, Subscription[S]]] = {}
        self.count = 0

    def exact_holders(self, topic_filter: str) -> int:
        """How many subscribers hold a filter of the exact index (no wildcard, not shared)."""
        held = self._exact.get(topic_filter)
        return 0 if held is None else len(held) if isinstance(held, dict) else 1

    def exact_filters(self) -> list[str]:
        return list(self._exact)

    def _node(self, topic_filter: str, create: bool) -> _Node[S] | None:
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                if not create:
                    return None
                if node.children is _NONE:
                    node.children = {}
                child = node.children[level] = _Node()
            node = child
        return node

    def add(self, sub: Subscription[S], inner_filter: str) -> bool:
        """Insert or replace `sub`; returns True when the session already had this filter."""
        self._cache.clear()
        if sub.share_group is None and _exact(inner_filter):
            held = self._exact.get(inner_filter)
            if held is None:
                self._exact[inner_filter] = sub
                existed = False
            elif isinstance(held, dict):
                existed = sub.session in held
                held[sub.session] = sub
            elif held.session == sub.session:
                self._exact[inner_filter] = sub
                existed = True
            else:
                self._exact[inner_filter] = {held.session: held, sub.session: sub}
                existed = False
            if not existed:
                self.count += 1
            return existed
        node = self._node(inner_filter, create=True)
        assert node is not None
        if sub.share_group is None:
            existed = sub.session in node.subscribers
            if node.subscribers is _NONE:
                node.subscribers = {}
            node.subscribers[sub.session] = sub
        else:
            group = node.groups.get(sub.share_group)
            if group is None:
                if node.groups is _NONE:
                    node.groups = {}
                group = node.groups[sub.share_group] = SharedGroup(sub.share_group, inner_filter)
            existed = sub.session in group.members
            group.members[sub.session] = sub
        if not existed:
            self.count += 1
        return existed

    def remove(self, session: S, inner_filter: str, share_group: str | None) -> bool:
        if share_group is None and _exact(inner_filter):
            held = self._exact.get(inner_filter)
            if held is None:
                return False
            if isinstance(held, dict):
                if held.pop(session, None) is None:
                    return False
                if len(held) == 1:
                    (self._exact[inner_filter],) = held.values()
            elif held.session == session:
                del self._exact[inner_filter]
            else:
                return False
            self.count -= 1
            self._cache.clear()
            return True
        levels = inner_filter.split("/")
        path = [self._root]
        node = self._root
        for level in levels:
            child = node.children.get(level)
            if child is None:
                return False
            path.append(child)
            node = child
        if share_group is None:
            removed = node.subscribers.pop(session, None) is not None
        else:
            group = node.groups.get(share_group)
            removed = group is not None and group.members.pop(session, None) is not None
            if group is not None and not group.members:
                del node.groups[share_group]
        if removed:
            self.count -= 1
            self._cache.clear()
            # Prune empty branches so churn does not leave the trie growing.
            for depth in range(len(levels), 0, -1):
                if path[depth].empty():
                    del path[depth - 1].children[levels[depth - 1]]
                else:
                    break
        return removed

    def match(
        self, topic: str
    ) -> tuple[list[tuple[S, list[Subscription[S]]]], list[SharedGroup[S]]]:
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        per_session: dict[S, list[Subscription[S]]] = {}
        groups: list[SharedGroup[S]] = []

        def collect(node: _Node[S]) -> None:
            for session, sub in node.subscribers.items():
                found = per_session.get(session)
                if found is None:
                    per_session[session] = [sub]
                else:
                    found.append(sub)
            if node.groups:
                groups.extend(node.groups.values())

        levels = topic.split("/")
        count = len(levels)
        dollar = topic.startswith("$")
        stack = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            children = node.children
            if index == count:
                collect(node)
                # "a/#" matches "a" too: '#' includes the parent level (MQTT 5.0 section 4.7.1.2).
                multi = children.get("#")
                if multi is not None:
                    collect(multi)
                continue
            if not (dollar and index == 0):  # MQTT-4.7.2-1: no leading wildcard for $-topics
                multi = children.get("#")
                if multi is not None:
                    collect(multi)
                single = children.get("+")
                if single is not None:
                    stack.append((single, index + 1))
            exact = children.get(levels[index])
            if exact is not None:
                stack.append((exact, index + 1))
        held = self._exact.get(topic)
        if held is not None:
            pairs = held.items() if isinstance(held, dict) else ((held.session, held),)
            for session, sub in pairs:
                found = per_session.get(session)
                if found is None:
                    per_session[session] = [sub]
                else:
                    found.append(sub)
        result = (list(per_session.items()), groups)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[topic] = result
        return result

    def group(self, inner_filter: str, name: str) -> SharedGroup[S] | None:
        node = self._node(inner_filter, create=False)
        return None if node is None else node.groups.get(name)
