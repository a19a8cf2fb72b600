"""What a broker sends: incremental framing, then a parser that checks the packet as an oracle.

`Reader` cuts a byte stream into frames `(type, flags, body)`; `feed` + `next_frame` take one at a
time, `frames(data)` all that are complete. `parse` turns a frame into a `Packet` and raises
`MalformedPacket` for anything a conforming server may not send (reserved bits, QoS 3, a
wildcard in a delivered topic, trailing bytes, invalid UTF-8, a client-only packet type).
`split_publish` and `packet_id` are the cheap reads for hot loops that only count and ack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .packets import (
    AUTH,
    CONNACK,
    DISCONNECT,
    MQTT_5,
    NAMES,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    UNSUBACK,
)
from .wire import USER_PROPERTY, Cursor, MalformedPacket, Property, PropertyValue, read_varint

Frame = tuple[int, int, bytes]

DEFAULT_MAX_SIZE = 1 << 24


class Reader:
    """Incremental framing of a byte stream; keeps only the bytes not yet returned as frames."""

    __slots__ = ("_buf", "_pos", "max_size")

    def __init__(self, *, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_size = max_size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned in a frame."""
        return len(self._buf) - self._pos

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes come."""
        buf = self._buf
        pos = self._pos
        header = read_varint(buf, pos + 1) if len(buf) - pos >= 2 else None
        if header is not None:
            length, start = header
            if length > self.max_size:
                raise MalformedPacket(f"packet of {length} bytes exceeds {self.max_size}")
            end = start + length
            if end <= len(buf):
                self._pos = end
                first = buf[pos]
                return first >> 4, first & 0x0F, bytes(buf[start:end])
        if pos:
            del buf[:pos]
            self._pos = 0
        return None

    def frames(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Feed `data` and return every frame now complete (`next_frame` in a loop, inlined)."""
        buf = self._buf
        buf += data
        pos = self._pos
        n = len(buf)
        out: list[Frame] = []
        while n - pos >= 2:
            length = buf[pos + 1]
            start = pos + 2
            if length >= 0x80:  # two bytes or more: 128 bytes to 16 KiB is common enough
                if n - pos >= 3 and buf[pos + 2] < 0x80:
                    length = (length & 0x7F) | (buf[pos + 2] << 7)
                    start = pos + 3
                else:
                    header = read_varint(buf, pos + 1)
                    if header is None:
                        break
                    length, start = header
            if length > self.max_size:
                raise MalformedPacket(f"packet of {length} bytes exceeds {self.max_size}")
            end = start + length
            if end > n:
                break
            first = buf[pos]
            out.append((first >> 4, first & 0x0F, bytes(buf[start:end])))
            pos = end
        if pos:
            del buf[:pos]
        self._pos = 0
        return out


def packet_id(body: bytes) -> int:
    """The packet id at the start of an acknowledgement's body."""
    return (body[0] << 8) | body[1]


def split_publish(flags: int, body: bytes, version: int) -> tuple[bytes, bytes, int, bool, int]:
    """(topic, payload, qos, retain, packet id or 0) of a PUBLISH, properties skipped."""
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")  # MQTT-3.3.1-4
    pos = 2 + ((body[0] << 8) | body[1])
    topic = body[2:pos]
    pid = 0
    if qos:
        pid = (body[pos] << 8) | body[pos + 1]
        pos += 2
    if version == MQTT_5:
        if body[pos] < 0x80:
            pos += 1 + body[pos]
        else:
            got = read_varint(body, pos)
            if got is None:
                raise MalformedPacket("PUBLISH ends inside its property length")
            pos = got[1] + got[0]
    if pos > len(body):
        raise MalformedPacket("PUBLISH shorter than its header")
    return topic, body[pos:], qos, bool(flags & 0x01), pid


@dataclass(frozen=True, kw_only=True, slots=True)
class Packet:
    """One packet from a broker; the fields its type lacks keep their defaults."""

    type: int
    flags: int
    body: bytes
    version: int
    code: int = 0  # CONNACK return or reason code, an ack's, DISCONNECT's or AUTH's reason code
    session_present: bool = False
    packet_id: int = 0
    topic: str = ""
    payload: bytes = b""
    qos: int = 0
    dup: bool = False
    retain: bool = False
    props: list[Property] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)  # SUBACK / UNSUBACK, one per filter

    @property
    def name(self) -> str:
        return NAMES.get(self.type, str(self.type))

    def prop(self, pid: int, default: PropertyValue | None = None) -> PropertyValue | None:
        """The first value of property `pid`."""
        return next((v for k, v in self.props if k == pid), default)

    def all(self, pid: int) -> list[PropertyValue]:
        """Every value of property `pid`, in wire order."""
        return [v for k, v in self.props if k == pid]

    @property
    def user_props(self) -> list[PropertyValue]:
        return self.all(USER_PROPERTY)

    def __repr__(self) -> str:
        extra = ""
        if self.type == PUBLISH:
            extra = (
                f" topic={self.topic!r} qos={self.qos} dup={self.dup} retain={self.retain}"
                f" id={self.packet_id} payload={self.payload[:40]!r}"
            )
        elif self.type in (CONNACK, DISCONNECT, AUTH, PUBACK, PUBREC, PUBREL, PUBCOMP):
            extra = f" code={self.code:#04x} id={self.packet_id}"
        elif self.type in (SUBACK, UNSUBACK):
            extra = f" id={self.packet_id} codes={[hex(c) for c in self.codes]}"
        return f"<{self.name}{extra} props={self.props}>"


def _reason_and_props(r: Cursor, v5: bool) -> tuple[int, list[Property]]:
    # 5.0: the reason code and the properties may each be left off (e.g. 3.4.2.1, 3.14.2.1).
    code = 0
    props: list[Property] = []
    if v5 and r.left():
        code = r.uint(1)
        if r.left():
            props = r.properties()
    return code, props


def parse(ptype: int, flags: int, body: bytes, version: int) -> Packet:
    """Decode and check one frame from a broker speaking protocol level `version`."""
    v5 = version == MQTT_5
    # MQTT-2.1.3-1: reserved flag bits are as listed; only PUBLISH uses them, PUBREL has 0010.
    if ptype != PUBLISH and flags != (0x02 if ptype == PUBREL else 0):
        raise MalformedPacket(f"reserved flags {flags:#06b} on a {NAMES.get(ptype, ptype)}")
    r = Cursor(body)
    code = pid = qos = 0
    session_present = False
    topic = ""
    payload = b""
    props: list[Property] = []
    codes: list[int] = []
    if ptype == CONNACK:
        ack_flags = r.uint(1)
        if ack_flags & 0xFE:
            raise MalformedPacket("reserved CONNACK flag bits set")  # MQTT-3.2.2-1 (5.0)
        session_present = bool(ack_flags)
        code = r.uint(1)
        if v5:
            props = r.properties()
    elif ptype == PUBLISH:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise MalformedPacket("PUBLISH with QoS 3")  # MQTT-3.3.1-4
        if qos == 0 and flags & 0x08:
            raise MalformedPacket("DUP set on a QoS 0 PUBLISH")  # MQTT-3.3.1-2
        topic = r.string()
        if "+" in topic or "#" in topic:
            raise MalformedPacket(f"wildcard in a delivered topic {topic!r}")  # MQTT-3.3.2-2
        if qos:
            pid = r.uint(2)
        if v5:
            props = r.properties()
        payload = r.take(r.left())
    elif ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        pid = r.uint(2)
        code, props = _reason_and_props(r, v5)
    elif ptype in (SUBACK, UNSUBACK):
        pid = r.uint(2)
        if v5:
            props = r.properties()
        codes = list(r.take(r.left()))
        if ptype == SUBACK and not codes:
            raise MalformedPacket("SUBACK without a return code")  # MQTT-3.8.4-5
        if ptype == UNSUBACK and not v5 and codes:
            raise MalformedPacket("a 3.1.1 UNSUBACK carries only a packet id")  # 3.1.1 3.11.1
    elif ptype in (DISCONNECT, AUTH):
        code, props = _reason_and_props(r, v5)
    elif ptype != PINGRESP:
        raise MalformedPacket(f"a server never sends packet type {ptype}")
    if r.left():
        raise MalformedPacket(f"{r.left()} bytes after the end of a {NAMES[ptype]}")
    return Packet(
        type=ptype,
        flags=flags,
        body=body,
        version=version,
        code=code,
        session_present=session_present,
        packet_id=pid,
        topic=topic,
        payload=payload,
        qos=qos,
        dup=bool(flags & 0x08) if ptype == PUBLISH else False,
        retain=bool(flags & 0x01) if ptype == PUBLISH else False,
        props=props,
        codes=codes,
    )
