"""The few MQTT 3.1.1 packets the load generator needs, hand-encoded (sans-IO).

Theory of operation: encoders return `bytes` ready to write, so hot paths can pre-encode whole
blobs once and write them many times. `split_packets` cuts a byte buffer into complete frames and
reports how much it consumed; a partial frame at the end is left for the next read. The decoders
for the packet bodies are for set-up traffic and tests; the generator's hot loops in `clients`
read the same layout inline because a function call per message would cost more than the broker
work being measured.

Self-contained on purpose: the benchmark must not depend on the broker it measures.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

PROTOCOL_LEVEL_311 = 4


class ProtocolError(ValueError):
    """The bytes do not form an MQTT 3.1.1 packet this generator understands."""


def encode_remaining_length(n: int) -> bytes:
    # MQTT-2.2.3: at most four bytes, seven bits each, least significant group first.
    if not 0 <= n <= 268_435_455:
        raise ValueError(f"remaining length out of range: {n}")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_remaining_length(
    buf: bytes | bytearray | memoryview, pos: int
) -> tuple[int, int] | None:
    """(length, index after the length bytes), or None when the buffer ends inside the field."""
    mult = 1
    value = 0
    for i in range(pos, min(pos + 4, len(buf))):
        b = buf[i]
        value += (b & 0x7F) * mult
        if b < 0x80:
            return value, i + 1
        mult <<= 7
    if len(buf) - pos >= 4:
        raise ProtocolError("remaining length longer than four bytes")  # MQTT-2.2.3
    return None


def _string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return struct.pack("!H", len(raw)) + raw


def _frame(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_remaining_length(len(body)) + body


def connect(client_id: str, *, keepalive: int = 60, clean_session: bool = True) -> bytes:
    flags = 0x02 if clean_session else 0x00
    body = _string("MQTT") + bytes((PROTOCOL_LEVEL_311, flags)) + struct.pack("!H", keepalive)
    return _frame(CONNECT << 4, body + _string(client_id))


def connack(*, session_present: bool = False, return_code: int = 0) -> bytes:
    return _frame(CONNACK << 4, bytes((1 if session_present else 0, return_code)))


def publish(
    topic: str | bytes,
    payload: bytes,
    *,
    qos: int = 0,
    packet_id: int | None = None,
    retain: bool = False,
    dup: bool = False,
) -> bytes:
    if qos not in (0, 1, 2):
        raise ValueError(f"bad QoS {qos}")
    if (qos > 0) != (packet_id is not None):
        raise ValueError("a packet id goes with QoS 1 and 2 only")  # MQTT-2.3.1-5
    first = (PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    body = _string(topic)
    if packet_id is not None:
        body += struct.pack("!H", packet_id)
    return _frame(first, body + payload)


def puback(packet_id: int) -> bytes:
    return bytes((PUBACK << 4, 2)) + struct.pack("!H", packet_id)


def subscribe(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", packet_id)
    for topic_filter, qos in filters:
        body += _string(topic_filter) + bytes((qos,))
    return _frame((SUBSCRIBE << 4) | 0x02, body)  # MQTT-3.8.1-1: reserved flags 0010


def suback(packet_id: int, granted: list[int]) -> bytes:
    return _frame(SUBACK << 4, struct.pack("!H", packet_id) + bytes(granted))


def pingreq() -> bytes:
    return bytes((PINGREQ << 4, 0))


def pingresp() -> bytes:
    return bytes((PINGRESP << 4, 0))


def disconnect() -> bytes:
    return bytes((DISCONNECT << 4, 0))


@dataclass(frozen=True, kw_only=True)
class Packet:
    """One framed packet: type, the low nibble of the first byte, and the body after the length."""

    type: int
    flags: int
    body: bytes


def split_packets(buf: bytes | bytearray) -> tuple[list[Packet], int]:
    """Complete packets at the start of `buf`, and the number of bytes they take."""
    packets: list[Packet] = []
    pos = 0
    n = len(buf)
    while pos < n:
        rl = decode_remaining_length(buf, pos + 1)
        if rl is None:
            break
        length, start = rl
        end = start + length
        if end > n:
            break
        first = buf[pos]
        packets.append(Packet(type=first >> 4, flags=first & 0x0F, body=bytes(buf[start:end])))
        pos = end
    return packets, pos


@dataclass(frozen=True, kw_only=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    packet_id: int | None
    retain: bool
    dup: bool


def parse_publish(packet: Packet) -> Publish:
    if packet.type != PUBLISH:
        raise ProtocolError(f"not a PUBLISH: type {packet.type}")
    qos = (packet.flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")  # MQTT-3.3.1-4
    body = packet.body
    if len(body) < 2:
        raise ProtocolError("PUBLISH too short for its topic")
    tlen = struct.unpack_from("!H", body)[0]
    pos = 2 + tlen
    packet_id = None
    if qos:
        if len(body) < pos + 2:
            raise ProtocolError("PUBLISH too short for its packet id")
        packet_id = struct.unpack_from("!H", body, pos)[0]
        pos += 2
    if len(body) < pos:
        raise ProtocolError("PUBLISH too short for its topic")
    return Publish(
        topic=body[2 : 2 + tlen].decode(),
        payload=body[pos:],
        qos=qos,
        packet_id=packet_id,
        retain=bool(packet.flags & 1),
        dup=bool(packet.flags & 0x08),
    )


@dataclass(frozen=True, kw_only=True)
class Connect:
    client_id: str
    keepalive: int
    clean_session: bool
    protocol_level: int


def parse_connect(packet: Packet) -> Connect:
    body = packet.body
    if packet.type != CONNECT or len(body) < 10:
        raise ProtocolError("not a CONNECT")
    nlen = struct.unpack_from("!H", body)[0]
    pos = 2 + nlen
    level, flags = body[pos], body[pos + 1]
    keepalive = struct.unpack_from("!H", body, pos + 2)[0]
    pos += 4
    clen = struct.unpack_from("!H", body, pos)[0]
    return Connect(
        client_id=body[pos + 2 : pos + 2 + clen].decode(),
        keepalive=keepalive,
        clean_session=bool(flags & 0x02),
        protocol_level=level,
    )


def parse_connack(packet: Packet) -> tuple[bool, int]:
    """(session present, return code)."""
    if packet.type != CONNACK or len(packet.body) != 2:
        raise ProtocolError("not a CONNACK")
    return bool(packet.body[0] & 1), packet.body[1]


def parse_subscribe(packet: Packet) -> tuple[int, list[tuple[str, int]]]:
    body = packet.body
    if packet.type != SUBSCRIBE or len(body) < 2:
        raise ProtocolError("not a SUBSCRIBE")
    packet_id = struct.unpack_from("!H", body)[0]
    pos = 2
    filters = []
    while pos < len(body):
        flen = struct.unpack_from("!H", body, pos)[0]
        topic_filter = body[pos + 2 : pos + 2 + flen].decode()
        filters.append((topic_filter, body[pos + 2 + flen]))
        pos += 3 + flen
    return packet_id, filters


def parse_suback(packet: Packet) -> tuple[int, list[int]]:
    if packet.type != SUBACK or len(packet.body) < 3:
        raise ProtocolError("not a SUBACK")
    return struct.unpack_from("!H", packet.body)[0], list(packet.body[2:])


def parse_packet_id(packet: Packet) -> int:
    """The packet id of a PUBACK, PUBREC, PUBREL, PUBCOMP or UNSUBACK."""
    if len(packet.body) != 2:
        raise ProtocolError(f"type {packet.type} should carry exactly a packet id")
    return int(struct.unpack_from("!H", packet.body)[0])
