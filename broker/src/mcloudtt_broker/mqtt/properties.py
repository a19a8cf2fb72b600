"""MQTT 5.0 properties (section 2.2.2): one immutable `Properties` value per packet.

Each property has an identifier, a wire type and the packet types it may appear in; a property in
the wrong packet, a repeated property that may appear once, or a value out of range is a protocol
error (MQTT-2.2.2-2 and the per-property rules of section 3).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .errors import IncompletePacket, MalformedPacket, ProtocolError
from .primitives import (
    decode_binary,
    decode_string,
    decode_varint,
    encode_binary,
    encode_string,
    encode_varint,
)
from .reason_codes import ReasonCode

# Packet type numbers (MQTT 5.0 table 2-1); WILL stands for the will properties inside CONNECT.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = (
    8,
    9,
    10,
    11,
    12,
    13,
    14,
    15,
)
WILL = 0

BYTE, U16, U32, VARINT, STRING, BINARY, PAIR = range(7)

_ACKS = frozenset({PUBACK, PUBREC, PUBREL, PUBCOMP})
_MESSAGE = frozenset({PUBLISH, WILL})

# identifier: (field name, wire type, packet types where it is allowed)
PROPERTY_TABLE: dict[int, tuple[str, int, frozenset[int]]] = {
    0x01: ("payload_format_indicator", BYTE, _MESSAGE),
    0x02: ("message_expiry_interval", U32, _MESSAGE),
    0x03: ("content_type", STRING, _MESSAGE),
    0x08: ("response_topic", STRING, _MESSAGE),
    0x09: ("correlation_data", BINARY, _MESSAGE),
    0x0B: ("subscription_identifiers", VARINT, frozenset({PUBLISH, SUBSCRIBE})),
    0x11: ("session_expiry_interval", U32, frozenset({CONNECT, CONNACK, DISCONNECT})),
    0x12: ("assigned_client_identifier", STRING, frozenset({CONNACK})),
    0x13: ("server_keep_alive", U16, frozenset({CONNACK})),
    0x15: ("authentication_method", STRING, frozenset({CONNECT, CONNACK, AUTH})),
    0x16: ("authentication_data", BINARY, frozenset({CONNECT, CONNACK, AUTH})),
    0x17: ("request_problem_information", BYTE, frozenset({CONNECT})),
    0x18: ("will_delay_interval", U32, frozenset({WILL})),
    0x19: ("request_response_information", BYTE, frozenset({CONNECT})),
    0x1A: ("response_information", STRING, frozenset({CONNACK})),
    0x1C: ("server_reference", STRING, frozenset({CONNACK, DISCONNECT})),
    0x1F: (
        "reason_string",
        STRING,
        frozenset({CONNACK, SUBACK, UNSUBACK, DISCONNECT, AUTH}) | _ACKS,
    ),
    0x21: ("receive_maximum", U16, frozenset({CONNECT, CONNACK})),
    0x22: ("topic_alias_maximum", U16, frozenset({CONNECT, CONNACK})),
    0x23: ("topic_alias", U16, frozenset({PUBLISH})),
    0x24: ("maximum_qos", BYTE, frozenset({CONNACK})),
    0x25: ("retain_available", BYTE, frozenset({CONNACK})),
    0x26: (
        "user_properties",
        PAIR,
        frozenset({CONNECT, CONNACK, SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH})
        | _ACKS
        | _MESSAGE,
    ),
    0x27: ("maximum_packet_size", U32, frozenset({CONNECT, CONNACK})),
    0x28: ("wildcard_subscription_available", BYTE, frozenset({CONNACK})),
    0x29: ("subscription_identifier_available", BYTE, frozenset({CONNACK})),
    0x2A: ("shared_subscription_available", BYTE, frozenset({CONNACK})),
}

# Properties whose byte value must be 0 or 1.
_BOOLEAN_BYTES = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
# Properties for which 0 is a protocol error: Subscription Identifier (5.0 sections 3.3.2.3.8,
# 3.8.2.1.2), Receive Maximum (3.1.2.11.3, 3.2.2.3.3), Maximum Packet Size (3.1.2.11.4,
# 3.2.2.3.6), Topic Alias (MQTT-3.3.2-8).
_NON_ZERO = frozenset({0x0B, 0x21, 0x23, 0x27})


@dataclass(frozen=True, slots=True, kw_only=True)
class Properties:
    """The MQTT 5.0 properties of one packet; `None` or empty means absent."""

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifier_available: int | None = None
    shared_subscription_available: int | None = None

    def replace(self, **changes: Any) -> Properties:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Properties(**values)

    def __bool__(self) -> bool:
        return self != EMPTY_PROPERTIES

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) not in (None, ())
        )
        return f"Properties({shown})"


EMPTY_PROPERTIES = Properties()

# Encoding order: by identifier, as in the table.
_ENCODE_ORDER: tuple[tuple[int, str, int], ...] = tuple(
    (pid, name, kind) for pid, (name, kind, _) in sorted(PROPERTY_TABLE.items())
)
_MULTI = frozenset({"subscription_identifiers", "user_properties"})


def decode_properties(
    data: memoryview | bytes, pos: int, end: int, packet_type: int
) -> tuple[Properties, int]:
    """Decode a property section starting at `pos`; returns the properties and the next offset."""
    length, pos = decode_varint(data, pos, end)
    if length == 0:
        return EMPTY_PROPERTIES, pos
    stop = pos + length
    if stop > end:
        raise MalformedPacket("property length runs past the end of the packet")
    return decode_property_body(data, pos, stop, packet_type), stop


def decode_property_body(
    data: memoryview | bytes, pos: int, stop: int, packet_type: int
) -> Properties:
    """Decode the properties in data[pos:stop] (a section without its length prefix)."""
    if pos == stop:
        return EMPTY_PROPERTIES
    values: dict[str, Any] = {}
    subscription_ids: list[int] = []
    user_properties: list[tuple[str, str]] = []
    while pos < stop:
        pid, pos = decode_varint(data, pos, stop)
        entry = PROPERTY_TABLE.get(pid)
        if entry is None:
            raise MalformedPacket(f"unknown property identifier 0x{pid:02x}")
        name, kind, allowed = entry
        if packet_type not in allowed:
            # 5.0 section 2.2.2.2: an identifier not valid for its packet type is a Malformed
            # Packet.
            raise MalformedPacket(f"property {name} is not allowed in this packet")
        value: Any
        try:
            if kind == BYTE:
                if pos + 1 > stop:
                    raise IncompletePacket
                value = data[pos]
                pos += 1
            elif kind == U16:
                if pos + 2 > stop:
                    raise IncompletePacket
                value = (data[pos] << 8) | data[pos + 1]
                pos += 2
            elif kind == U32:
                if pos + 4 > stop:
                    raise IncompletePacket
                value = int.from_bytes(data[pos : pos + 4], "big")
                pos += 4
            elif kind == VARINT:
                value, pos = decode_varint(data, pos, stop)
            elif kind == STRING:
                value, pos = decode_string(data, pos, stop)
            elif kind == BINARY:
                value, pos = decode_binary(data, pos, stop)
            else:
                key, pos = decode_string(data, pos, stop)
                val, pos = decode_string(data, pos, stop)
                value = (key, val)
        except IncompletePacket:
            raise MalformedPacket(f"property {name} runs past the property section") from None
        if pid in _BOOLEAN_BYTES and value > 1:
            raise ProtocolError(f"property {name} must be 0 or 1")
        if pid in _NON_ZERO and value == 0:
            if pid == 0x23:
                raise ProtocolError("topic alias 0", ReasonCode.TOPIC_ALIAS_INVALID)  # MQTT-3.3.2-8
            raise ProtocolError(f"property {name} must not be 0")
        if kind == PAIR:
            user_properties.append(value)
        elif pid == 0x0B:
            if value > 268_435_455:
                raise MalformedPacket("subscription identifier out of range")
            subscription_ids.append(value)
        else:
            if name in values:
                # 5.0 section 3, for each property but these two: "It is a Protocol Error to
                # include the ... more than once".
                raise ProtocolError(f"property {name} appears more than once")
            values[name] = value
    if pos != stop:
        raise MalformedPacket("property section length does not match its content")
    if subscription_ids:
        if packet_type == SUBSCRIBE and len(subscription_ids) > 1:
            raise ProtocolError("SUBSCRIBE carries more than one subscription identifier")
        values["subscription_identifiers"] = tuple(subscription_ids)
    if user_properties:
        values["user_properties"] = tuple(user_properties)
    return Properties(**values)


def encode_properties(props: Properties, out: bytearray) -> None:
    """Append a property section (length and properties) to `out`."""
    if props is EMPTY_PROPERTIES:
        out.append(0)
        return
    body = encode_property_body(props)
    encode_varint(len(body), out)
    out += body


def encode_property_body(props: Properties) -> bytearray:
    """The properties without the section's length prefix."""
    body = bytearray()
    for pid, name, kind in _ENCODE_ORDER:
        value = getattr(props, name)
        if name in _MULTI:
            for item in value:
                encode_varint(pid, body)
                if kind == PAIR:
                    encode_string(item[0], body)
                    encode_string(item[1], body)
                else:
                    encode_varint(item, body)
            continue
        if value is None:
            continue
        encode_varint(pid, body)
        if kind == BYTE:
            body.append(value)
        elif kind == U16:
            body += value.to_bytes(2, "big")
        elif kind == U32:
            body += value.to_bytes(4, "big")
        elif kind == VARINT:
            encode_varint(value, body)
        elif kind == STRING:
            encode_string(value, body)
        else:
            encode_binary(value, body)
    return body
