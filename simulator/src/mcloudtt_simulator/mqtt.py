"""A small MQTT 3.1.1 / 5.0 client codec for many simulated devices in one process.

Only what devices and the verifying subscriber need: CONNECT (with a will), CONNACK, PUBLISH at
QoS 0/1/2 with its acknowledgements, SUBSCRIBE/SUBACK, PINGREQ/PINGRESP and DISCONNECT. No
properties are sent (an empty property block in 5.0); received properties are skipped.
Encoders return bytes; `PacketReader` turns a byte stream into (type, flags, body) triples and
never waits for more than one packet.
"""

from __future__ import annotations

import struct

__all__ = [
    "CONNACK",
    "CONNECT",
    "DISCONNECT",
    "PINGREQ",
    "PINGRESP",
    "PUBACK",
    "PUBCOMP",
    "PUBLISH",
    "PUBREC",
    "PUBREL",
    "SUBACK",
    "SUBSCRIBE",
    "PacketReader",
    "ProtocolError",
    "decode_connack",
    "decode_publish",
    "decode_suback",
    "encode_ack",
    "encode_connect",
    "encode_disconnect",
    "encode_publish",
    "encode_subscribe",
    "packet_id",
]

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

PINGREQ_BYTES = b"\xc0\x00"
MAX_REMAINING = 268_435_455  # MQTT-1.5.5: four bytes of variable byte integer


class ProtocolError(Exception):
    """The peer sent bytes that are not MQTT."""


def _varint(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING:
        raise ValueError(f"length {n} out of range")
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(b: bytes) -> bytes:
    if len(b) > 65535:
        raise ValueError("string longer than 65535 bytes")
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def encode_connect(
    client_id: str,
    *,
    keepalive: int = 60,
    clean: bool = True,
    will: tuple[bytes, bytes, int, bool] | None = None,
    version: int = 4,
) -> bytes:
    flags = 0x02 if clean else 0
    if will is not None:
        _topic, _payload, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
    body = bytearray(_str(b"MQTT") + bytes((version, flags)) + struct.pack("!H", keepalive))
    if version == 5:
        body += b"\x00"  # no properties
    body += _str(client_id.encode())
    if will is not None:
        if version == 5:
            body += b"\x00"  # no will properties
        body += _str(will[0]) + _str(will[1])
    return _packet(CONNECT << 4, bytes(body))


def encode_publish(
    topic: bytes,
    payload: bytes,
    *,
    qos: int = 0,
    retain: bool = False,
    pid: int = 0,
    dup: bool = False,
    version: int = 4,
) -> bytes:
    first = (PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    head = _str(topic)
    if qos:
        head += struct.pack("!H", pid)
    if version == 5:
        head += b"\x00"
    return bytes((first,)) + _varint(len(head) + len(payload)) + head + payload


def set_dup(packet: bytes) -> bytes:
    return bytes((packet[0] | 0x08,)) + packet[1:]


def encode_ack(ptype: int, pid: int) -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP (reason code omitted: success, in 5.0 too)."""
    return bytes(((ptype << 4) | (0x02 if ptype == PUBREL else 0), 2)) + struct.pack("!H", pid)


def encode_subscribe(pid: int, filters: list[tuple[str, int]], version: int = 4) -> bytes:
    body = bytearray(struct.pack("!H", pid))
    if version == 5:
        body += b"\x00"
    for f, qos in filters:
        body += _str(f.encode()) + bytes((qos,))
    return _packet((SUBSCRIBE << 4) | 0x02, bytes(body))


def encode_disconnect(version: int = 4) -> bytes:
    return b"\xe0\x00"


def _read_varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    for i in range(4):
        if pos + i >= len(buf):
            raise IndexError
        b = buf[pos + i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ProtocolError("malformed variable byte integer")


class PacketReader:
    """Incremental framing: `feed(data)` returns the complete packets received so far."""

    __slots__ = ("buf", "max_size")

    def __init__(self, max_size: int = 1 << 24) -> None:
        self.buf = bytearray()
        self.max_size = max_size

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self.buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            try:
                length, start = _read_varint(buf, pos + 1)
            except IndexError:
                break
            if length > self.max_size:
                raise ProtocolError(f"packet of {length} bytes exceeds {self.max_size}")
            end = start + length
            if end > n:
                break
            first = buf[pos]
            out.append((first >> 4, first & 0x0F, bytes(buf[start:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out


def packet_id(body: bytes) -> int:
    return (body[0] << 8) | body[1]


def _skip_properties(body: bytes, pos: int) -> int:
    length, pos = _read_varint(body, pos)
    return pos + length


def decode_connack(body: bytes, version: int = 4) -> tuple[bool, int]:
    """(session present, return / reason code)."""
    if len(body) < 2:
        raise ProtocolError("short CONNACK")
    return bool(body[0] & 1), body[1]


def decode_suback(body: bytes, version: int = 4) -> tuple[int, list[int]]:
    pid = packet_id(body)
    pos = 2
    if version == 5:
        pos = _skip_properties(body, pos)
    return pid, list(body[pos:])


def decode_publish(
    flags: int, body: bytes, version: int = 4
) -> tuple[bytes, bytes, int, bool, int]:
    """(topic, payload, qos, retain, packet id)."""
    qos = (flags >> 1) & 3
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    tlen = (body[0] << 8) | body[1]
    pos = 2 + tlen
    topic = body[2:pos]
    pid = 0
    if qos:
        pid = (body[pos] << 8) | body[pos + 1]
        pos += 2
    if version == 5:
        pos = _skip_properties(body, pos)
    return topic, body[pos:], qos, bool(flags & 1), pid
