"""Wire primitives (MQTT 5.0 section 1.5) and 5.0 properties (section 2.2.2) as plain bytes.

Properties are kept as `(identifier, value)` pairs in wire order, so a test sees exactly what
the broker sent (repeated user properties, their order) and can send what it likes.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_VARINT = 268_435_455  # four bytes of seven bits (MQTT-1.5.5-1)

# Property identifiers (MQTT 5.0 section 2.2.2.2).
PAYLOAD_FORMAT = 0x01
MESSAGE_EXPIRY = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SUBSCRIPTION_ID = 0x0B
SESSION_EXPIRY = 0x11
ASSIGNED_CLIENT_ID = 0x12
SERVER_KEEP_ALIVE = 0x13
AUTH_METHOD = 0x15
AUTH_DATA = 0x16
REQUEST_PROBLEM_INFO = 0x17
WILL_DELAY = 0x18
REQUEST_RESPONSE_INFO = 0x19
RESPONSE_INFO = 0x1A
SERVER_REFERENCE = 0x1C
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23
MAXIMUM_QOS = 0x24
RETAIN_AVAILABLE = 0x25
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27
WILDCARD_SUB_AVAILABLE = 0x28
SUB_ID_AVAILABLE = 0x29
SHARED_SUB_AVAILABLE = 0x2A

# The data type of each property: a fixed width in bytes, or one of the named kinds.
_KINDS: dict[int, int | str] = {
    **dict.fromkeys((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A), 1),
    **dict.fromkeys((0x13, 0x21, 0x22, 0x23), 2),
    **dict.fromkeys((0x02, 0x11, 0x18, 0x27), 4),
    0x0B: "varint",
    **dict.fromkeys((0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F), "string"),
    **dict.fromkeys((0x09, 0x16), "binary"),
    0x26: "pair",
}

PropertyValue = int | str | bytes | tuple[str, str]
Property = tuple[int, PropertyValue]
Properties = Sequence[Property]

_ONE_BYTE = [bytes((n,)) for n in range(128)]


class MalformedPacket(ValueError):
    """The bytes are not a well-formed MQTT packet of a kind a broker may send."""


def varint(n: int) -> bytes:
    """A variable byte integer, least significant seven bits first (MQTT 5.0 section 1.5.5)."""
    if n < 0x80:
        if n < 0:
            raise ValueError(f"negative variable byte integer {n}")
        return _ONE_BYTE[n]
    if n > MAX_VARINT:
        raise ValueError(f"{n} does not fit a variable byte integer")
    groups = bytearray()
    while n >= 0x80:
        groups.append(0x80 | (n & 0x7F))
        n >>= 7
    groups.append(n)
    return bytes(groups)


def read_varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """(value, index after it), or None when `buf` ends inside the integer."""
    value = 0
    stop = min(pos + 4, len(buf))
    for i in range(pos, stop):
        byte = buf[i]
        value += (byte & 0x7F) << (7 * (i - pos))
        if byte < 0x80:
            return value, i + 1
    if stop - pos == 4:
        raise MalformedPacket("variable byte integer longer than four bytes")  # MQTT-1.5.5-1
    return None


def utf8(s: str | bytes) -> bytes:
    """A two-byte length and the bytes: a UTF-8 string (given as str) or binary data."""
    raw = s.encode() if isinstance(s, str) else s
    if len(raw) > 0xFFFF:
        raise ValueError(f"string of {len(raw)} bytes is longer than 65535")
    return len(raw).to_bytes(2, "big") + raw


def _property_value(pid: int, kind: int | str, value: PropertyValue) -> bytes:
    if kind == "pair":
        if isinstance(value, tuple):
            return utf8(value[0]) + utf8(value[1])
    elif kind in ("string", "binary"):
        if isinstance(value, str | bytes):
            return utf8(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        return varint(value) if kind == "varint" else value.to_bytes(int(kind), "big")
    raise TypeError(f"property {pid:#04x} takes a {kind}, not {value!r}")


def encode_properties(props: Properties | None) -> bytes:
    """A property block: its length, then each property's identifier and value, in order."""
    if not props:
        return b"\x00"
    block = bytearray()
    for pid, value in props:
        kind = _KINDS.get(pid)
        if kind is None:
            raise ValueError(f"unknown property {pid:#04x}")
        block += varint(pid)
        block += _property_value(pid, kind, value)
    return varint(len(block)) + block


class Cursor:
    """Reads fields off one packet body; running past its end is a malformed packet."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise MalformedPacket(f"packet ends inside a field: {self.data!r}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def uint(self, width: int) -> int:
        return int.from_bytes(self.take(width), "big")

    def varint(self) -> int:
        got = read_varint(self.data, self.pos)
        if got is None:
            raise MalformedPacket("packet ends inside a variable byte integer")
        value, self.pos = got
        return value

    def binary(self) -> bytes:
        return self.take(self.uint(2))

    def string(self) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedPacket(f"invalid UTF-8: {raw!r}") from None  # MQTT-1.5.4-1
        if "\x00" in text:
            raise MalformedPacket(f"U+0000 in a string: {raw!r}")  # MQTT-1.5.4-2
        return text

    def properties(self) -> list[Property]:
        end = self.varint() + self.pos
        if end > len(self.data):
            raise MalformedPacket("property block longer than the packet")
        out: list[Property] = []
        while self.pos < end:
            pid = self.varint()
            kind = _KINDS.get(pid)
            value: PropertyValue
            if kind is None:
                raise MalformedPacket(f"unknown property {pid:#04x}")
            if kind == "pair":
                value = (self.string(), self.string())
            elif kind == "string":
                value = self.string()
            elif kind == "binary":
                value = self.binary()
            elif kind == "varint":
                value = self.varint()
            else:
                value = self.uint(int(kind))
            out.append((pid, value))
        if self.pos != end:
            raise MalformedPacket("a property runs past its block")
        return out
