"""Hand-built MQTT packets and a blocking raw-socket client for protocol-level tests.

Deliberately independent of the broker's own codec: a test that encoded with the broker's encoder
would share its bugs. Packets are built as bytes so a test can also build wrong ones.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

TIMEOUT = 5.0

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)
NAMES = {
    1: "CONNECT",
    2: "CONNACK",
    3: "PUBLISH",
    4: "PUBACK",
    5: "PUBREC",
    6: "PUBREL",
    7: "PUBCOMP",
    8: "SUBSCRIBE",
    9: "SUBACK",
    10: "UNSUBSCRIBE",
    11: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    14: "DISCONNECT",
    15: "AUTH",
}

# MQTT 5.0 property identifiers (section 2.2.2.2)
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

_BYTE_PROPS = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
_U16_PROPS = {0x13, 0x21, 0x22, 0x23}
_U32_PROPS = {0x02, 0x11, 0x18, 0x27}
_VARINT_PROPS = {0x0B}
_STR_PROPS = {0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F}
_BIN_PROPS = {0x09, 0x16}
_PAIR_PROPS = {0x26}

Props = Sequence[tuple[int, Any]]


# ---------------------------------------------------------------------------------------------
# encoding


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def encode_props(props: Props | None) -> bytes:
    out = bytearray()
    for pid, value in props or ():
        out += varint(pid)
        if pid in _BYTE_PROPS:
            out.append(value)
        elif pid in _U16_PROPS:
            out += struct.pack("!H", value)
        elif pid in _U32_PROPS:
            out += struct.pack("!I", value)
        elif pid in _VARINT_PROPS:
            out += varint(value)
        elif pid in _STR_PROPS or pid in _BIN_PROPS:
            out += utf8(value)
        elif pid in _PAIR_PROPS:
            out += utf8(value[0]) + utf8(value[1])
        else:
            raise ValueError(f"unknown property {pid:#x}")
    return varint(len(out)) + bytes(out)


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + varint(len(body)) + body


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    props: Props | None = None


def connect(
    client_id: str | bytes = "",
    *,
    version: int = 5,
    clean: bool = True,
    keepalive: int = 60,
    props: Props | None = None,
    will: Will | None = None,
    username: str | bytes | None = None,
    password: bytes | None = None,
    proto_name: bytes | None = None,
    flags: int | None = None,
) -> bytes:
    """A CONNECT packet; `flags` overrides the computed connect flags byte."""
    name = proto_name if proto_name is not None else (b"MQIsdp" if version == 3 else b"MQTT")
    f = 0
    if clean:
        f |= 0x02
    if will is not None:
        f |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if password is not None:
        f |= 0x40
    if username is not None:
        f |= 0x80
    body = (
        utf8(name) + bytes([version, f if flags is None else flags]) + struct.pack("!H", keepalive)
    )
    if version == 5:
        body += encode_props(props)
    body += utf8(client_id)
    if will is not None:
        if version == 5:
            body += encode_props(will.props)
        body += utf8(will.topic) + utf8(will.payload)
    if username is not None:
        body += utf8(username)
    if password is not None:
        body += utf8(password)
    return packet(CONNECT, 0, body)


def publish(
    topic: str | bytes,
    payload: bytes = b"",
    *,
    version: int = 5,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int | None = None,
    props: Props | None = None,
) -> bytes:
    flags = (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = utf8(topic)
    if qos:
        assert packet_id is not None, "QoS>0 needs a packet id"
        body += struct.pack("!H", packet_id)
    if version == 5:
        body += encode_props(props)
    return packet(PUBLISH, flags, body + payload)


def ack(
    ptype: int, packet_id: int, *, version: int = 5, code: int = 0, props: Props | None = None
) -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP (PUBREL gets its mandatory flags 0b0010)."""
    body = struct.pack("!H", packet_id)
    if version == 5 and (code or props):
        body += bytes([code]) + encode_props(props)
    return packet(ptype, 0x02 if ptype == PUBREL else 0, body)


def sub_opts(qos: int = 0, *, no_local: bool = False, rap: bool = False, rh: int = 0) -> int:
    return qos | (0x04 if no_local else 0) | (0x08 if rap else 0) | (rh << 4)


def subscribe(
    packet_id: int,
    filters: Iterable[tuple[str | bytes, int]],
    *,
    version: int = 5,
    props: Props | None = None,
    flags: int = 0x02,
) -> bytes:
    body = struct.pack("!H", packet_id)
    if version == 5:
        body += encode_props(props)
    for f, opts in filters:
        body += utf8(f) + bytes([opts])
    return packet(SUBSCRIBE, flags, body)


def unsubscribe(packet_id: int, filters: Iterable[str], *, version: int = 5) -> bytes:
    body = struct.pack("!H", packet_id)
    if version == 5:
        body += encode_props(None)
    for f in filters:
        body += utf8(f)
    return packet(UNSUBSCRIBE, 0x02, body)


def pingreq() -> bytes:
    return packet(PINGREQ, 0, b"")


def disconnect(code: int = 0, props: Props | None = None, *, version: int = 5) -> bytes:
    if version != 5 or (code == 0 and not props):
        return packet(DISCONNECT, 0, b"")
    return packet(DISCONNECT, 0, bytes([code]) + encode_props(props))


# ---------------------------------------------------------------------------------------------
# decoding


class Malformed(AssertionError):
    """The broker sent bytes that do not decode: a broker bug, reported as a test failure."""


@dataclass
class Packet:
    type: int
    flags: int
    body: bytes
    version: int
    code: int = 0
    session_present: bool = False
    packet_id: int = 0
    topic: str = ""
    payload: bytes = b""
    qos: int = 0
    dup: bool = False
    retain: bool = False
    props: list[tuple[int, Any]] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return NAMES.get(self.type, str(self.type))

    def prop(self, pid: int, default: Any = None) -> Any:
        for k, v in self.props:
            if k == pid:
                return v
        return default

    def all(self, pid: int) -> list[Any]:
        return [v for k, v in self.props if k == pid]

    @property
    def user_props(self) -> list[tuple[str, str]]:
        return self.all(USER_PROPERTY)

    def __repr__(self) -> str:
        extra = ""
        if self.type == PUBLISH:
            extra = f" topic={self.topic!r} qos={self.qos} dup={self.dup} retain={self.retain} id={self.packet_id} payload={self.payload[:40]!r}"
        elif self.type in (CONNACK, DISCONNECT, PUBACK, PUBREC, PUBREL, PUBCOMP):
            extra = f" code={self.code:#04x} id={self.packet_id}"
        elif self.type in (SUBACK, UNSUBACK):
            extra = f" id={self.packet_id} codes={[hex(c) for c in self.codes]}"
        return f"<{self.name}{extra} props={self.props}>"


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Malformed(f"truncated field in {self.data!r}")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("!H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("!I", self.take(4))[0])

    def varint(self) -> int:
        value = 0
        for shift in range(0, 28, 7):
            b = self.u8()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
        raise Malformed("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        raw = self.binary()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Malformed(f"invalid UTF-8 from broker: {raw!r}") from e

    def props(self) -> list[tuple[int, Any]]:
        end = self.varint() + self.pos
        out: list[tuple[int, Any]] = []
        while self.pos < end:
            pid = self.varint()
            if pid in _BYTE_PROPS:
                out.append((pid, self.u8()))
            elif pid in _U16_PROPS:
                out.append((pid, self.u16()))
            elif pid in _U32_PROPS:
                out.append((pid, self.u32()))
            elif pid in _VARINT_PROPS:
                out.append((pid, self.varint()))
            elif pid in _STR_PROPS:
                out.append((pid, self.string()))
            elif pid in _BIN_PROPS:
                out.append((pid, self.binary()))
            elif pid in _PAIR_PROPS:
                out.append((pid, (self.string(), self.string())))
            else:
                raise Malformed(f"unknown property id {pid:#x}")
        if self.pos != end:
            raise Malformed("property length mismatch")
        return out


def parse(ptype: int, flags: int, body: bytes, version: int) -> Packet:
    p = Packet(ptype, flags, body, version)
    r = _Reader(body)
    v5 = version == 5
    if ptype == CONNACK:
        p.session_present = bool(r.u8() & 0x01)
        p.code = r.u8()
        if v5 and r.left():
            p.props = r.props()
    elif ptype == PUBLISH:
        p.qos = (flags >> 1) & 0x03
        p.dup = bool(flags & 0x08)
        p.retain = bool(flags & 0x01)
        p.topic = r.string()
        if p.qos:
            p.packet_id = r.u16()
        if v5:
            p.props = r.props()
        p.payload = body[r.pos :]
    elif ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        p.packet_id = r.u16()
        if v5 and r.left():
            p.code = r.u8()
            if r.left():
                p.props = r.props()
    elif ptype in (SUBACK, UNSUBACK):
        p.packet_id = r.u16()
        if v5:
            p.props = r.props()
        p.codes = list(body[r.pos :])
    elif ptype in (DISCONNECT, AUTH):
        if r.left():
            p.code = r.u8()
            if r.left():
                p.props = r.props()
    elif ptype == PINGRESP:
        pass
    else:
        raise Malformed(f"a server never sends packet type {ptype}")
    return p


# ---------------------------------------------------------------------------------------------
# client


class Closed(AssertionError):
    """The broker closed the connection while a packet was expected."""


class RawClient:
    """One TCP connection speaking hand-built MQTT; every wait has a deadline.

    Incoming topic aliases are resolved (the raw value stays in the TOPIC_ALIAS property).
    """

    def __init__(
        self, port: int, *, version: int = 5, timeout: float = TIMEOUT, rcvbuf: int | None = None
    ) -> None:
        self.version = version
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(("127.0.0.1", port))
        except OSError:
            self.sock.close()
            raise
        self.buf = bytearray()
        self.eof = False
        self.aliases: dict[int, str] = {}
        self.pending: deque[Packet] = deque()  # deliveries that arrived while awaiting an ack
        self._next_id = 0
        self.connack: Packet | None = None

    # -- bytes ---------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no packet from the broker in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError("no packet from the broker in time") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            raise Closed("broker closed the connection")
        self.buf += chunk

    def _frame(self) -> tuple[int, int, bytes] | None:
        if len(self.buf) < 2:
            return None
        length, mult, i = 0, 1, 1
        while True:
            if i >= len(self.buf):
                return None
            b = self.buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
            if i > 4:
                raise Malformed("remaining length longer than 4 bytes")
        if len(self.buf) < i + length:
            return None
        first = self.buf[0]
        body = bytes(self.buf[i : i + length])
        del self.buf[: i + length]
        return first >> 4, first & 0x0F, body

    # -- packets -------------------------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> Packet:
        """The next packet, whatever it is; TimeoutError if none, Closed on EOF."""
        if self.pending:
            return self.pending.popleft()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            frame = self._frame()
            if frame is not None:
                p = parse(*frame, self.version)
                if p.type == PUBLISH and self.version == 5:
                    alias = p.prop(TOPIC_ALIAS)
                    if alias is not None:
                        if p.topic:
                            self.aliases[alias] = p.topic
                        else:
                            assert alias in self.aliases, f"broker used unknown topic alias {alias}"
                            p.topic = self.aliases[alias]
                return p
            if self.eof:
                raise Closed("broker closed the connection")
            self._fill(deadline)

    def expect(self, ptype: int, timeout: float | None = None) -> Packet:
        p = self.recv(timeout)
        assert p.type == ptype, f"expected {NAMES[ptype]}, got {p!r}"
        return p

    def _await(self, ptype: int) -> Packet:
        """Wait for an ack of `ptype`, keeping deliveries that overtake it for later."""
        deadline = time.monotonic() + self.timeout
        while True:
            p = self._recv_wire(max(0.0, deadline - time.monotonic()))
            if p.type == ptype:
                return p
            assert p.type in (PUBLISH, PUBREL), f"expected {NAMES[ptype]}, got {p!r}"
            self.pending.append(p)

    def _recv_wire(self, timeout: float) -> Packet:
        saved, self.pending = self.pending, deque()
        try:
            return self.recv(timeout)
        finally:
            self.pending = saved

    def next_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def connect(self, client_id: str | bytes = "", **kw: Any) -> Packet:
        kw.setdefault("version", self.version)
        self.send(connect(client_id, **kw))
        self.connack = self._await(CONNACK)
        return self.connack

    def subscribe(self, *filters: str | tuple[str, int], props: Props | None = None) -> Packet:
        pid = self.next_id()
        pairs = [(f, 0) if isinstance(f, str) else f for f in filters]
        self.send(subscribe(pid, pairs, version=self.version, props=props))
        p = self._await(SUBACK)
        assert p.packet_id == pid  # MQTT-3.8.4-2
        return p

    def unsubscribe(self, *filters: str) -> Packet:
        pid = self.next_id()
        self.send(unsubscribe(pid, filters, version=self.version))
        p = self._await(UNSUBACK)
        assert p.packet_id == pid  # MQTT-3.10.4-4
        return p

    def publish(
        self,
        topic: str,
        payload: bytes = b"",
        qos: int = 0,
        retain: bool = False,
        props: Props | None = None,
    ) -> Packet | None:
        """Publish and finish the QoS flow; returns the PUBACK or PUBCOMP (None for QoS 0)."""
        pid = self.next_id() if qos else None
        self.send(
            publish(
                topic,
                payload,
                version=self.version,
                qos=qos,
                retain=retain,
                packet_id=pid,
                props=props,
            )
        )
        if qos == 0:
            return None
        if qos == 1:
            p = self._await(PUBACK)
            assert p.packet_id == pid
            return p
        rec = self._await(PUBREC)
        assert rec.packet_id == pid
        self.send(ack(PUBREL, pid, version=self.version))  # type: ignore[arg-type]
        comp = self._await(PUBCOMP)
        assert comp.packet_id == pid
        return comp

    def next_publish(self, timeout: float | None = None, *, ack_it: bool = True) -> Packet:
        """The next PUBLISH; with ack_it, acknowledge it (PUBACK or PUBREC) and answer PUBRELs."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            p = self.recv(max(0.0, deadline - time.monotonic()))
            if p.type == PUBREL and ack_it:
                self.send(ack(PUBCOMP, p.packet_id, version=self.version))
                continue
            if p.type == PINGRESP:
                continue
            assert p.type == PUBLISH, f"expected PUBLISH, got {p!r}"
            if ack_it and p.qos == 1:
                self.send(ack(PUBACK, p.packet_id, version=self.version))
            elif ack_it and p.qos == 2:
                self.send(ack(PUBREC, p.packet_id, version=self.version))
            return p

    def publishes(self, n: int, timeout: float | None = None) -> list[Packet]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return [self.next_publish(max(0.0, deadline - time.monotonic())) for _ in range(n)]

    def until(
        self, topic: str, timeout: float | None = None, *, ack_it: bool = True
    ) -> list[Packet]:
        """Every PUBLISH received before the first one on `topic` (a marker), marker excluded.

        A broker handles one connection's packets in order and keeps order per topic and QoS;
        publish the marker at QoS 1 after QoS 1/2 traffic (Mosquitto lets a QoS 0 message
        overtake QoS>0 ones queued behind a full inflight window), at QoS 0 after QoS 0 traffic.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        got: list[Packet] = []
        while True:
            p = self.next_publish(max(0.0, deadline - time.monotonic()), ack_it=ack_it)
            if p.topic == topic:
                return got
            got.append(p)

    def closed(self, timeout: float | None = None) -> list[Packet]:
        """Wait until the broker closes the connection; the packets it sent before that."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        got: list[Packet] = []
        while True:
            try:
                got.append(self.recv(max(0.0, deadline - time.monotonic())))
            except Closed:
                return got
            except Malformed:
                # garbage after the broker decided to close counts as close for these tests
                return got

    def disconnect(self, code: int = 0, props: Props | None = None) -> None:
        """A normal DISCONNECT; the broker must then close the connection (MQTT-3.14.4-1)."""
        self.send(disconnect(code, props, version=self.version))
        left = self.closed()
        assert all(p.type != DISCONNECT for p in left), left
        self.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def disconnect_codes(packets: Iterable[Packet]) -> list[int]:
    return [p.code for p in packets if p.type == DISCONNECT]
