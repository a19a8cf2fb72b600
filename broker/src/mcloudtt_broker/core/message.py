"""An application message as it travels through the broker.

One PUBLISH from a client becomes one `Message`; every subscriber's PUBLISH is written from it.
The encoded topic and 5.0 properties are kept with the message, so a delivery is a few appends
to the subscriber's output buffer; the payload is never copied again.
"""

from __future__ import annotations

from ..mqtt.properties import EMPTY_PROPERTIES, Properties, encode_properties

# Topic names repeat (fan-in traffic): their wire form is kept, up to a bound.
_TOPIC_WIRES: dict[str, bytes] = {}
_TOPIC_WIRES_MAX = 10_000


class Message:
    __slots__ = (
        "_properties_wire",
        "expires_at",
        "origin",
        "payload",
        "properties",
        "qos",
        "retain",
        "topic",
        "topic_wire",
    )
    # A copy that may have reached its subscriber already (a dead broker's inbox replayed to
    # the sessions taken from it): sent with DUP 1 (MQTT-3.3.1-1), see `Redelivery`.
    redelivered = False

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
        # The topic as it goes on the wire (length-prefixed UTF-8), built once per topic name.
        wire = _TOPIC_WIRES.get(topic)
        if wire is None:
            raw = topic.encode()
            wire = len(raw).to_bytes(2, "big") + raw
            if len(_TOPIC_WIRES) >= _TOPIC_WIRES_MAX:
                _TOPIC_WIRES.clear()
            _TOPIC_WIRES[topic] = wire
        self.topic_wire = wire
        self.payload = payload
        self.qos = qos
        self.retain = retain
        # Forwarded properties: never Topic Alias or Subscription Identifiers (per delivery).
        self.properties = properties
        self._properties_wire: bytes | None = b"\x00" if properties is EMPTY_PROPERTIES else None
        # Monotonic deadline from Message Expiry Interval (MQTT-3.3.2-5), None when it never expires.
        self.expires_at = expires_at
        # ClientId of the publisher ("" for the broker itself); used for No Local (MQTT-3.8.3-3).
        self.origin = origin

    def __repr__(self) -> str:
        return f"Message({self.topic!r}, {len(self.payload)} bytes, qos={self.qos}, retain={self.retain})"

    def redelivery(self) -> Message:
        """This message as a possible re-delivery (`redelivered`, so its PUBLISH has DUP 1)."""
        return Redelivery(
            self.topic,
            self.payload,
            self.qos,
            self.retain,
            self.properties,
            expires_at=self.expires_at,
            origin=self.origin,
        )

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def remaining_expiry(self, now: float) -> int | None:
        if self.expires_at is None:
            return None
        return max(0, int(self.expires_at - now + 0.999))

    @property
    def properties_wire(self) -> bytes:
        """The 5.0 property section of a delivery that forwards `properties` unchanged."""
        wire = self._properties_wire
        if wire is None:
            out = bytearray()
            encode_properties(self.properties, out)
            wire = self._properties_wire = bytes(out)
        return wire


class Redelivery(Message):
    """A message the broker that died may have sent already: the adopter cannot know, so it
    says "this might be a re-delivery" (DUP 1); a client that saw it tells it by that flag."""

    __slots__ = ()
    redelivered = True
