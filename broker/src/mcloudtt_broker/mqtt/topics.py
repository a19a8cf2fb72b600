"""Topic names and topic filters (MQTT 5.0 section 4.7, shared subscriptions section 4.8.2)."""

from __future__ import annotations

from .errors import ProtocolError
from .reason_codes import ReasonCode

SHARE_PREFIX = "$share/"


def is_valid_topic_name(topic: str) -> bool:
    # MQTT-4.7.3-1: at least one character; MQTT-3.3.2-2: no wildcard characters.
    return bool(topic) and "+" not in topic and "#" not in topic


def check_topic_name(topic: str) -> None:
    if not is_valid_topic_name(topic):
        raise ProtocolError(f"invalid topic name {topic!r}", ReasonCode.TOPIC_NAME_INVALID)


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


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches `topic_filter` (a reference implementation for retained lookup)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # MQTT-4.7.2-1
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for index, level in enumerate(f_levels):
        if level == "#":
            return True
        if index >= len(t_levels):
            return False
        if level != "+" and level != t_levels[index]:
            return False
    return len(f_levels) == len(t_levels)
