"""Turn a message into a row: device id from the topic, JSON flattened, event time found.

Nothing is dropped: a payload that is not JSON, not UTF-8, or too large to flatten is still
stored whole in `payload` and classified in `payload_format`. Rules:

* Topic rules such as `devices/{device_id}/{metric}` name topic levels (`+` and a final `#` match
  without naming). The first rule that matches wins; `device_id` fills the column, `metric` names
  a bare numeric payload, other captures go to `attributes`.
* A JSON object is flattened with dotted paths (`{"a": {"b": 1}}` -> `a.b`); list items get their
  index (`a.0`). Numbers (not booleans) become `metrics`, everything else `attributes`.
* The first top-level time field (`ts`, `timestamp`, `time` by default) that parses as epoch
  seconds, milliseconds, microseconds or nanoseconds (told apart by magnitude) or as ISO 8601
  becomes `event_time`; otherwise the receive time is used.
* Top-level metadata fields (`seq`, and a time field not taken as the event time) go to
  `attributes`, never to `metrics`: they are not measurements.
* The first top-level device field (`device_id`, `device`, `dev`, `deviceId`) fills `device_id`
  when no topic rule did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from .records import Batch, Record

_MIN_US = 946_684_800_000_000  # 2000-01-01: earlier "times" are counters, not clocks
_MAX_US = 4_102_444_800_000_000  # 2100-01-01


@dataclass(frozen=True, slots=True)
class DecodeRules:
    topic_rules: tuple[str, ...] = ("devices/{device_id}/{metric}",)
    device_fields: tuple[str, ...] = ("device_id", "device", "dev", "deviceId")
    # `sent` first: the simulator's send time (its payloads declare it the event time); `ts`
    # is the device's own drifting clock.
    time_fields: tuple[str, ...] = ("sent", "ts", "timestamp", "time")
    ignore_fields: tuple[str, ...] = ()
    # Top-level numbers that describe the message, not the device: stored as attributes,
    # never charted or rolled up as measurements (a sequence number, a second clock).
    metadata_fields: tuple[str, ...] = ("seq", "ts", "sent", "timestamp", "time")
    max_flatten_bytes: int = 256 * 1024
    max_fields: int = 256  # metrics plus attributes per message; the rest stays in the payload
    extra: dict[str, Any] = field(default_factory=dict)


class TopicRule:
    """One `a/{name}/+/#` pattern, matched level by level."""

    __slots__ = ("levels", "multi", "pattern")

    def __init__(self, pattern: str) -> None:
        levels = pattern.split("/")
        self.pattern = pattern
        self.multi = levels[-1] == "#"
        if self.multi:
            levels = levels[:-1]
        if "#" in levels:
            raise ValueError(f"'#' must be the last level of topic rule {pattern!r}")
        parsed: list[tuple[int, str]] = []  # (0 literal | 1 capture | 2 any, text)
        for level in levels:
            if level == "+":
                parsed.append((2, ""))
            elif level.startswith("{") and level.endswith("}") and len(level) > 2:
                parsed.append((1, level[1:-1]))
            elif "{" in level or "}" in level or "+" in level:
                raise ValueError(f"bad level {level!r} in topic rule {pattern!r}")
            else:
                parsed.append((0, level))
        self.levels = tuple(parsed)

    def match(self, topic_levels: list[str]) -> dict[str, str] | None:
        n = len(self.levels)
        if len(topic_levels) < n or (not self.multi and len(topic_levels) != n):
            return None
        captures: dict[str, str] = {}
        for (kind, text), level in zip(self.levels, topic_levels, strict=False):
            if kind == 0:
                if level != text:
                    return None
            elif kind == 1:
                captures[text] = level
        return captures


def parse_time_us(value: Any) -> int | None:
    """Epoch s/ms/us/ns (by magnitude) or ISO 8601 text -> microseconds, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                return None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            delta = parsed - datetime(1970, 1, 1, tzinfo=UTC)
            us = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
            return us if _MIN_US <= us < _MAX_US else None
        value = number
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    size = abs(value)
    if size >= 1e17:
        us = int(value // 1000)
    elif size >= 1e14:
        us = int(value)
    elif size >= 1e11:
        us = int(value * 1000)
    else:
        us = round(value * 1_000_000)
    return us if _MIN_US <= us < _MAX_US else None


class PayloadDecoder:
    """Appends decoded records to a `Batch`. Topic lookups are cached (topics repeat)."""

    def __init__(self, rules: DecodeRules | None = None) -> None:
        self.rules = rules or DecodeRules()
        self._topic_rules = [TopicRule(p) for p in self.rules.topic_rules]
        self._topic_cache: dict[str, tuple[str | None, str, dict[str, str]]] = {}
        self._time_fields = self.rules.time_fields
        self._device_fields = self.rules.device_fields
        self._skip = frozenset(self.rules.ignore_fields)
        self._metadata = self.rules.metadata_fields
        self._max_flatten = self.rules.max_flatten_bytes
        self.bad_fields = 0

    def topic_info(self, topic: str) -> tuple[str | None, str, dict[str, str]]:
        """(device id, name for a bare value, extra captures) for a topic."""
        info = self._topic_cache.get(topic)
        if info is not None:
            return info
        levels = topic.split("/")
        device: str | None = None
        name = levels[-1] or "value"
        extra: dict[str, str] = {}
        for rule in self._topic_rules:
            captures = rule.match(levels)
            if captures is not None:
                device = captures.pop("device_id", "") or None
                name = captures.pop("metric", "") or name
                extra = captures
                break
        info = (device, name, extra)
        if len(self._topic_cache) >= 100_000:
            self._topic_cache.clear()
        self._topic_cache[topic] = info
        return info

    def append(self, batch: Batch, record: Record, ingest_us: int) -> None:
        payload = record.payload
        topic = record.topic
        info = self._topic_cache.get(topic)
        if info is None:
            info = self.topic_info(topic)
        device, bare_name, extra = info
        event_us: int | None = None
        attributes: dict[str, Any] | None = dict(extra) if extra else None
        names = batch.metric_names
        values = batch.metric_values
        size = len(payload)
        if not size:
            fmt = "empty"
        elif size > self._max_flatten:
            fmt = "json-unflattened" if _is_json(payload) else _text_or_binary(payload)
        else:
            try:
                doc = orjson.loads(payload)
            except orjson.JSONDecodeError:
                fmt = _text_or_binary(payload)
            else:
                fmt = "json"
                if type(doc) is dict:
                    if attributes is None:
                        attributes = {}
                    for key in self._time_fields:
                        if key in doc:
                            value = doc[key]
                            # Fast path: epoch seconds as a float, the common case.
                            if type(value) is float and 946_684_800.0 <= value < 4_102_444_800.0:
                                event_us = int(value * 1_000_000.0 + 0.5)
                            else:
                                event_us = parse_time_us(value)
                            if event_us is not None:
                                del doc[key]
                                break
                    for key in self._metadata:
                        if key in doc:
                            attributes[key] = doc.pop(key)
                    if device is None:
                        for key in self._device_fields:
                            candidate = doc.get(key)
                            if candidate is not None and type(candidate) in (str, int):
                                device = str(candidate)
                                del doc[key]
                                break
                    base = len(names)
                    skip = self._skip
                    limit = self.rules.max_fields
                    if not skip and len(doc) + len(attributes) <= limit:
                        # Fast path: a small flat object (nested values take the slow path).
                        for key, value in doc.items():
                            kind = type(value)
                            if kind is float:
                                names.append(key)
                                values.append(value)
                            elif kind is int:
                                names.append(key)
                                values.append(float(value))
                            elif kind is dict or kind is list:
                                if value:
                                    self._flatten(value, key + ".", names, values, attributes, base)
                                else:
                                    attributes[key] = value
                            else:
                                attributes[key] = value
                    else:
                        self._flatten(doc, "", names, values, attributes, base)
                elif type(doc) in (int, float):
                    number = float(doc)
                    if math.isfinite(number):
                        names.append(bare_name)
                        values.append(number)
                elif type(doc) is list:
                    if attributes is None:
                        attributes = {}
                    self._flatten(doc, "", names, values, attributes, len(names))
                else:
                    if attributes is None:
                        attributes = {}
                    attributes["value"] = doc
        received = record.received_at_us
        source = record.source
        batch.ingest_us = ingest_us
        batch.tuples.append(
            (
                record.message_id,
                received if event_us is None else event_us,
                received,
                record.broker_id,
                record.client_id,
                source.name if source is not None else "test",
                topic,
                device,
                record.qos,
                record.retain,
                payload,
                size,
                fmt,
                orjson.dumps(attributes).decode() if attributes else None,
                record.properties,
                len(names),
            )
        )
        batch.payload_bytes += size

    def _flatten(
        self,
        node: Any,
        prefix: str,
        names: list[str],
        values: list[float],
        attributes: dict[str, Any],
        base: int,
    ) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        skip = self._skip
        limit = self.rules.max_fields
        for key, value in items:
            path = f"{prefix}{key}"
            if path in skip:
                continue
            kind = type(value)
            if kind is float or kind is int:
                if len(attributes) + len(names) - base < limit:
                    names.append(path)
                    values.append(float(value))  # orjson gives finite numbers only
                else:
                    self.bad_fields += 1
            elif kind is dict or kind is list:
                if value:
                    self._flatten(value, path + ".", names, values, attributes, base)
                else:
                    attributes[path] = value
            elif len(attributes) + len(names) - base < limit:
                attributes[path] = value
            else:
                self.bad_fields += 1


def _text_or_binary(payload: bytes) -> str:
    try:
        payload.decode()
    except UnicodeDecodeError:
        return "binary"
    return "text"


def _is_json(payload: bytes) -> bool:
    head = payload[:64].lstrip()[:1]
    if head not in (b"{", b"["):
        return False
    try:
        orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return True
