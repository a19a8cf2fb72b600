"""Retained messages: a topic-keyed store with wildcard lookup (MQTT 5.0 section 3.3.1.3).

`RetainedStore` is the interface the core uses; `MemoryRetainedStore` keeps messages in a dict
and a level trie, so an exact filter is one dict lookup and a wildcard filter walks only the
branches that can match.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from .message import Message


class RetainedStore(Protocol):
    def set(self, message: Message) -> None: ...
    def delete(self, topic: str) -> None: ...
    def get(self, topic: str) -> Message | None: ...
    def match(self, topic_filter: str) -> Iterator[Message]: ...
    def __len__(self) -> int: ...


class _Level:
    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: dict[str, _Level] = {}
        self.message: Message | None = None


class MemoryRetainedStore:
    def __init__(self) -> None:
        self._by_topic: dict[str, Message] = {}
        self._root = _Level()

    def __len__(self) -> int:
        return len(self._by_topic)

    def get(self, topic: str) -> Message | None:
        return self._by_topic.get(topic)

    def set(self, message: Message) -> None:
        self._by_topic[message.topic] = message
        node = self._root
        for level in message.topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Level()
            node = child
        node.message = message

    def delete(self, topic: str) -> None:
        if self._by_topic.pop(topic, None) is None:
            return
        levels = topic.split("/")
        path = [self._root]
        for level in levels:
            path.append(path[-1].children[level])
        path[-1].message = None
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.message is None and not node.children:
                del path[depth - 1].children[levels[depth - 1]]
            else:
                break

    def match(self, topic_filter: str) -> Iterator[Message]:
        if "+" not in topic_filter and "#" not in topic_filter:
            hit = self._by_topic.get(topic_filter)
            if hit is not None:
                yield hit
            return
        levels = topic_filter.split("/")
        count = len(levels)
        stack = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            if index == count:
                if node.message is not None:
                    yield node.message
                continue
            level = levels[index]
            if level == "#":
                yield from self._subtree(node, skip_dollar=index == 0)
            elif level == "+":
                for name, child in node.children.items():
                    if index == 0 and name.startswith("$"):
                        continue  # MQTT-4.7.2-1
                    stack.append((child, index + 1))
            else:
                exact = node.children.get(level)
                if exact is not None:
                    stack.append((exact, index + 1))

    @staticmethod
    def _subtree(node: _Level, *, skip_dollar: bool) -> Iterator[Message]:
        # '#' matches the parent level too (MQTT 5.0 section 4.7.1.2).
        if node.message is not None:
            yield node.message
        stack = [
            child
            for name, child in node.children.items()
            if not (skip_dollar and name.startswith("$"))
        ]
        while stack:
            current = stack.pop()
            if current.message is not None:
                yield current.message
            stack.extend(current.children.values())
