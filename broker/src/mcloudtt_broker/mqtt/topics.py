"""Topic names and topic filters (MQTT 5.0 section 4.7, shared subscriptions section 4.8.2)."""

from __future__ import annotations

SHARE_PREFIX = "$share/"


def is_valid_topic_filter(topic_filter: str) -> bool:
    if not topic_filter:
        return False  # MQTT-4.7.3-1
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            return False  # MQTT-4.7.1-2: '#' alone, and last
        if "+" in level and level != "+":
            return False  # MQTT-4.7.1-3: '+' occupies a whole level
    return True


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """Split `$share/{group}/{filter}` into (group, filter); (None, filter) for a plain filter.

    Raises ValueError for a malformed shared filter (MQTT-4.8.2-1, MQTT-4.8.2-2).
    """
    if not topic_filter.startswith(SHARE_PREFIX):
        return None, topic_filter
    group, sep, inner = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not sep or not group or not inner or "+" in group or "#" in group:
        raise ValueError(f"malformed shared subscription {topic_filter!r}")
    return group, inner
