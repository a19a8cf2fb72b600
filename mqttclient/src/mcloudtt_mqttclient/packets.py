"""Builders for the packets a client sends, each returning the whole frame as bytes.

`version` is the protocol level: 4 for MQTT 3.1.1, 5 for 5.0 (3 gives the 3.1 protocol name).
Values are encoded as given and not checked against the spec, so a test can build a wrong
packet on purpose (QoS 3, other reserved flags, a bad protocol name); what cannot be encoded at
all (a string over 65535 bytes, a QoS 1 PUBLISH without a packet id) raises ValueError.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import KW_ONLY, dataclass

from .wire import Properties, encode_properties, utf8, varint

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)
NAMES = {
    CONNECT: "CONNECT",
    CONNACK: "CONNACK",
    PUBLISH: "PUBLISH",
    PUBACK: "PUBACK",
    PUBREC: "PUBREC",
    PUBREL: "PUBREL",
    PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
    AUTH: "AUTH",
}

MQTT_311 = 4
MQTT_5 = 5

PINGREQ_BYTES = b"\xc0\x00"
DISCONNECT_BYTES = b"\xe0\x00"


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    """A frame: type and flags, the remaining length, the body (MQTT 5.0 section 2.1)."""
    return bytes(((ptype << 4) | flags,)) + varint(len(body)) + body


@dataclass(frozen=True)
class Will:
    """A will message for CONNECT: `Will(topic, payload, qos=1, ...)`."""

    topic: str | bytes
    payload: bytes = b""
    _: KW_ONLY
    qos: int = 0
    retain: bool = False
    props: Properties | None = None


def connect(
    client_id: str | bytes = "",
    *,
    version: int = MQTT_5,
    clean: bool = True,
    keepalive: int = 60,
    props: Properties | None = None,
    will: Will | None = None,
    username: str | bytes | None = None,
    password: bytes | None = None,
    proto_name: bytes | None = None,
    flags: int | None = None,
) -> bytes:
    """CONNECT (section 3.1); `flags` replaces the connect flags byte computed from the rest."""
    if flags is None:
        flags = (0x02 if clean else 0) | (0x40 if password is not None else 0)
        flags |= 0x80 if username is not None else 0
        if will is not None:
            flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)  # MQTT-3.1.2-9
    name = proto_name if proto_name is not None else (b"MQIsdp" if version == 3 else b"MQTT")
    parts = [utf8(name), bytes((version, flags)), keepalive.to_bytes(2, "big")]
    if version == MQTT_5:
        parts.append(encode_properties(props))
    parts.append(utf8(client_id))  # MQTT-3.1.3-1: payload order: id, will, username, password
    if will is not None:
        if version == MQTT_5:
            parts.append(encode_properties(will.props))
        parts += (utf8(will.topic), utf8(will.payload))
    if username is not None:
        parts.append(utf8(username))
    if password is not None:
        parts.append(utf8(password))
    return packet(CONNECT, 0, b"".join(parts))


def publish(
    topic: str | bytes,
    payload: bytes = b"",
    *,
    version: int = MQTT_5,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int | None = None,
    props: Properties | None = None,
) -> bytes:
    """PUBLISH (section 3.3); a packet id only with QoS > 0 (MQTT-2.2.1-2)."""
    head = utf8(topic)
    if qos:
        if packet_id is None:
            raise ValueError("a QoS 1 or 2 PUBLISH needs a packet id")
        head += packet_id.to_bytes(2, "big")
    if version == MQTT_5:
        head += encode_properties(props)
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    return bytes((first,)) + varint(len(head) + len(payload)) + head + payload


def set_dup(frame: bytes) -> bytes:
    """The same PUBLISH with DUP set, for a resend (MQTT-3.3.1-1)."""
    return bytes((frame[0] | 0x08,)) + frame[1:]


def ack(
    ptype: int,
    packet_id: int,
    *,
    version: int = MQTT_5,
    code: int = 0,
    props: Properties | None = None,
) -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP; PUBREL carries its flags 0010 (MQTT-3.6.1-1).

    In 5.0 a success code with no properties is left off (MQTT 5.0 section 3.4.2.1).
    """
    first = (ptype << 4) | (0x02 if ptype == PUBREL else 0)
    if version != MQTT_5 or not (code or props):
        return bytes((first, 2)) + packet_id.to_bytes(2, "big")  # the common case, kept cheap
    body = packet_id.to_bytes(2, "big") + bytes((code,)) + encode_properties(props)
    return bytes((first,)) + varint(len(body)) + body


def sub_opts(qos: int = 0, *, no_local: bool = False, rap: bool = False, rh: int = 0) -> int:
    """A 5.0 subscription options byte (section 3.8.3.1): QoS, No Local, Retain As Published,
    Retain Handling."""
    return qos | (0x04 if no_local else 0) | (0x08 if rap else 0) | (rh << 4)


def subscribe(
    packet_id: int,
    filters: Iterable[tuple[str | bytes, int]],
    *,
    version: int = MQTT_5,
    props: Properties | None = None,
    flags: int = 0x02,
) -> bytes:
    """SUBSCRIBE (section 3.8): (filter, options byte) pairs; flags 0010 (MQTT-3.8.1-1)."""
    parts = [packet_id.to_bytes(2, "big")]
    if version == MQTT_5:
        parts.append(encode_properties(props))
    for topic_filter, options in filters:
        parts += (utf8(topic_filter), bytes((options,)))
    return packet(SUBSCRIBE, flags, b"".join(parts))


def unsubscribe(
    packet_id: int,
    filters: Iterable[str | bytes],
    *,
    version: int = MQTT_5,
    props: Properties | None = None,
) -> bytes:
    """UNSUBSCRIBE (section 3.10), flags 0010 (MQTT-3.10.1-1)."""
    parts = [packet_id.to_bytes(2, "big")]
    if version == MQTT_5:
        parts.append(encode_properties(props))
    parts += (utf8(f) for f in filters)
    return packet(UNSUBSCRIBE, 0x02, b"".join(parts))


def pingreq() -> bytes:
    return PINGREQ_BYTES


def disconnect(code: int = 0, props: Properties | None = None, *, version: int = MQTT_5) -> bytes:
    """DISCONNECT; in 5.0 a normal disconnection with no properties is two bytes (3.14.2.1)."""
    if version != MQTT_5 or (code == 0 and not props):
        return DISCONNECT_BYTES
    return packet(DISCONNECT, 0, bytes((code,)) + encode_properties(props))


def auth(code: int = 0, props: Properties | None = None) -> bytes:
    """AUTH (5.0 only, section 3.15); success with no properties may be empty (3.15.2.1)."""
    if code == 0 and not props:
        return packet(AUTH, 0, b"")
    return packet(AUTH, 0, bytes((code,)) + encode_properties(props))
