"""An application message as it travels through the broker, with a per-message encoding cache.

One PUBLISH from a client becomes one `Message`; every subscriber's PUBLISH is written from it.
The wire bytes of the common deliveries (no per-subscriber properties) are built once per
(version, QoS>0, retain) and reused for every subscriber, so fan-out costs a buffer append.
"""

from __future__ import annotations

from ..mqtt.codec import MQTT_5
from ..mqtt.primitives import encode_string, encode_varint
from ..mqtt.properties import EMPTY_PROPERTIES, Properties, encode_properties


class Message:
    __slots__ = (
        "_wire",
        "expires_at",
        "origin",
        "payload",
        "properties",
        "qos",
        "retain",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties = EMPTY_PROPERTIES,
        *,
        expires_at: float | None = None,
        origin: str = "",
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        # Forwarded properties: never Topic Alias or Subscription Identifiers (per delivery).
        self.properties = properties
        # Monotonic deadline from Message Expiry Interval (MQTT-3.3.2-5), None when it never expires.
        self.expires_at = expires_at
        # ClientId of the publisher ("" for the broker itself); used for No Local (MQTT-3.8.3-3).
        self.origin = origin
        self._wire: dict[int, tuple[bytes, bytes]] | None = None

    def __repr__(self) -> str:
        return f"Message({self.topic!r}, {len(self.payload)} bytes, qos={self.qos}, retain={self.retain})"

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def remaining_expiry(self, now: float) -> int | None:
        if self.expires_at is None:
            return None
        return max(0, int(self.expires_at - now + 0.999))

    def wire(self, version: int, qos: int, retain: bool) -> tuple[bytes, bytes]:
        """(head, tail) of a PUBLISH for this message; the packet id goes between them.

        Valid only for deliveries whose properties are exactly `self.properties` (no expiry
        countdown, no subscription ids, no topic alias).
        """
        key = (version << 3) | (qos << 1) | (1 if retain else 0)
        cache = self._wire
        if cache is None:
            cache = self._wire = {}
        else:
            hit = cache.get(key)
            if hit is not None:
                return hit
        body = bytearray()
        encode_string(self.topic, body)
        tail = bytearray()
        if version == MQTT_5:
            encode_properties(self.properties, tail)
        tail += self.payload
        length = len(body) + len(tail) + (2 if qos else 0)
        head = bytearray()
        head.append(0x30 | (qos << 1) | (1 if retain else 0))
        encode_varint(length, head)
        head += body
        entry = (bytes(head), bytes(tail))
        cache[key] = entry
        return entry
