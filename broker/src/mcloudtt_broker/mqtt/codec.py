"""Encode packets to bytes and decode a byte stream into packets, for MQTT 3.1.1 and 5.0.

Theory of operation: `Decoder.feed(data)` takes bytes as they arrive; `Decoder.next_packet()`
returns the next whole packet, or None while a frame is still partial. Malformed input raises a
`ProtocolError` carrying the reason code for the reply. The protocol version is learned from the
CONNECT packet (or set by the caller, e.g. a client decoding a server's stream) and decides how
every later packet is read. `encode(packet, version, out)` appends the wire form to a bytearray.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import IncompletePacket, MalformedPacket, PacketTooLarge, ProtocolError
from .packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    SubscriptionRequest,
    UnsubAck,
    Unsubscribe,
    Will,
)
from .primitives import (
    MAX_VARINT,
    decode_binary,
    decode_string,
    decode_u16,
    encode_binary,
    encode_string,
    encode_varint,
)
from .properties import (
    EMPTY_PROPERTIES,
    WILL,
    Properties,
    decode_properties,
    encode_properties,
)
from .reason_codes import ReasonCode

MQTT_31 = 3  # MQTT 3.1 (protocol name MQIsdp): read and written as 3.1.1
MQTT_311 = 4
MQTT_5 = 5

Buffer = memoryview | bytes

_PINGREQ = PingReq()
_PINGRESP = PingResp()

# Fixed-header flags each packet type must carry (MQTT-2.1.3-1); PUBLISH has its own rules.
_REQUIRED_FLAGS = {
    1: 0,
    2: 0,
    4: 0,
    5: 0,
    6: 2,
    7: 0,
    8: 2,
    9: 0,
    10: 2,
    11: 0,
    12: 0,
    13: 0,
    14: 0,
    15: 0,
}


class UnsupportedProtocolVersion(ProtocolError):
    """CONNECT names a protocol level we do not speak; answered with a 3.1.1-style CONNACK 0x01."""

    def __init__(self, level: int) -> None:
        super().__init__(
            f"unsupported protocol level {level}", ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
        )
        self.level = level


# --------------------------------------------------------------------------------------------
# Decoding


def _packet_id(data: Buffer, pos: int, end: int) -> tuple[int, int]:
    pid, pos = decode_u16(data, pos, end)
    if pid == 0:
        raise MalformedPacket("packet identifier 0")  # MQTT-2.2.1-3 (3.1.1: MQTT-2.3.1-1)
    return pid, pos


def _decode_connect(flags: int, data: Buffer, pos: int, end: int, version: int) -> Connect:
    name, pos = decode_string(data, pos, end)
    if pos >= end:
        raise IncompletePacket
    level = data[pos]
    pos += 1
    if name == "MQIsdp":
        if level != MQTT_31:
            raise UnsupportedProtocolVersion(level)  # MQTT 3.1 is MQIsdp at level 3 only
    elif name != "MQTT":
        raise UnsupportedProtocolVersion(level)  # MQTT-3.1.2-1
    elif level not in (MQTT_311, MQTT_5):
        raise UnsupportedProtocolVersion(level)  # MQTT-3.1.2-2
    if pos + 3 > end:
        raise IncompletePacket
    cflags = data[pos]
    keep_alive = (data[pos + 1] << 8) | data[pos + 2]
    pos += 3
    if cflags & 0x01:
        raise MalformedPacket("CONNECT reserved flag set")  # MQTT-3.1.2-3
    clean_start = bool(cflags & 0x02)
    will_flag = bool(cflags & 0x04)
    will_qos = (cflags >> 3) & 0x03
    will_retain = bool(cflags & 0x20)
    has_password = bool(cflags & 0x40)
    has_username = bool(cflags & 0x80)
    if will_qos == 3:
        raise MalformedPacket("will QoS 3")  # MQTT-3.1.2-14
    if not will_flag and (will_qos or will_retain):
        raise MalformedPacket("will QoS or retain set without a will")  # MQTT-3.1.2-11/13/15
    if level != MQTT_5 and has_password and not has_username:
        raise MalformedPacket("password without user name")  # MQTT-3.1.2-22
    props = EMPTY_PROPERTIES
    if level == MQTT_5:
        props, pos = decode_properties(data, pos, end, 1)
    client_id, pos = decode_string(data, pos, end)
    will = None
    if will_flag:
        will_props = EMPTY_PROPERTIES
        if level == MQTT_5:
            will_props, pos = decode_properties(data, pos, end, WILL)
        will_topic, pos = decode_string(data, pos, end)
        will_payload, pos = decode_binary(data, pos, end)
        will = Will(
            topic=will_topic,
            payload=will_payload,
            qos=will_qos,
            retain=will_retain,
            properties=will_props,
        )
    username = None
    password = None
    if has_username:
        username, pos = decode_string(data, pos, end)
    if has_password:
        password, pos = decode_binary(data, pos, end)
    if pos != end:
        raise MalformedPacket("CONNECT has bytes after its payload")
    return Connect(
        client_id=client_id,
        protocol_level=level,
        protocol_name=name,
        clean_start=clean_start,
        keep_alive=keep_alive,
        username=username,
        password=password,
        will=will,
        properties=props,
    )


def _decode_connack(flags: int, data: Buffer, pos: int, end: int, version: int) -> ConnAck:
    if pos + 2 > end:
        raise IncompletePacket
    ack_flags = data[pos]
    if ack_flags & 0xFE:
        raise MalformedPacket("CONNACK reserved flags set")
    code = data[pos + 1]
    pos += 2
    props = EMPTY_PROPERTIES
    if version == MQTT_5:
        props, pos = decode_properties(data, pos, end, 2)
    if pos != end:
        raise MalformedPacket("CONNACK too long")
    return ConnAck(session_present=bool(ack_flags & 1), reason_code=code, properties=props)


def decode_publish_header(
    flags: int, data: Buffer, pos: int, end: int, version: int
) -> tuple[str, int | None, Properties, int]:
    """Topic, packet id and properties of a PUBLISH; returns them and where the payload starts.

    The broker's hot path calls this on the frame from `Decoder.next_frame()` and slices the
    payload itself, so no `Publish` object is built for a message that is only forwarded.
    """
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")  # MQTT-3.3.1-4
    if flags & 0x08 and not qos:
        raise MalformedPacket("DUP set on a QoS 0 PUBLISH")  # MQTT-3.3.1-2
    try:
        topic, pos = decode_string(data, pos, end)
        packet_id = None
        if qos:
            packet_id, pos = _packet_id(data, pos, end)
        props = EMPTY_PROPERTIES
        if version == MQTT_5:
            props, pos = decode_properties(data, pos, end, 3)
    except IncompletePacket:
        raise MalformedPacket("PUBLISH shorter than its fields") from None
    return topic, packet_id, props, pos


def _decode_publish(flags: int, data: Buffer, pos: int, end: int, version: int) -> Publish:
    topic, packet_id, props, pos = decode_publish_header(flags, data, pos, end, version)
    return Publish(
        topic=topic,
        payload=bytes(data[pos:end]),
        qos=(flags >> 1) & 0x03,
        retain=bool(flags & 0x01),
        dup=bool(flags & 0x08),
        packet_id=packet_id,
        properties=props,
    )


def _ack_decoder(cls: Any, packet_type: int) -> Callable[[int, Buffer, int, int, int], Any]:
    def decode(flags: int, data: Buffer, pos: int, end: int, version: int) -> Any:
        pid, pos = _packet_id(data, pos, end)
        code = 0
        props = EMPTY_PROPERTIES
        if version == MQTT_5:
            if pos < end:
                code = data[pos]
                pos += 1
            if pos < end:
                props, pos = decode_properties(data, pos, end, packet_type)
        if pos != end:
            raise MalformedPacket(f"{cls.__name__} too long")
        return cls(packet_id=pid, reason_code=code, properties=props)

    return decode


def _id_and_properties(
    data: Buffer, pos: int, end: int, version: int, packet_type: int
) -> tuple[int, Properties, int]:
    """The packet identifier, then (5.0) the properties: how SUBSCRIBE and its kin begin."""
    pid, pos = _packet_id(data, pos, end)
    props = EMPTY_PROPERTIES
    if version == MQTT_5:
        props, pos = decode_properties(data, pos, end, packet_type)
    return pid, props, pos


def _decode_subscribe(flags: int, data: Buffer, pos: int, end: int, version: int) -> Subscribe:
    pid, props, pos = _id_and_properties(data, pos, end, version, 8)
    subs = []
    while pos < end:
        topic_filter, pos = decode_string(data, pos, end)
        if pos >= end:
            raise IncompletePacket
        options = data[pos]
        pos += 1
        qos = options & 0x03
        if qos == 3:
            raise MalformedPacket("subscription QoS 3")  # MQTT-3-8.3-4
        if version == MQTT_5:
            if options & 0xC0:
                raise MalformedPacket("SUBSCRIBE reserved option bits set")  # MQTT-3.8.3-5
            retain_handling = (options >> 4) & 0x03
            if retain_handling == 3:
                # 5.0 section 3.8.3.1 names this a Protocol Error (0x82); Mosquitto answers
                # 0x81, we follow the specification.
                raise ProtocolError("Retain Handling 3")
            subs.append(
                SubscriptionRequest(
                    topic_filter=topic_filter,
                    qos=qos,
                    no_local=bool(options & 0x04),
                    retain_as_published=bool(options & 0x08),
                    retain_handling=retain_handling,
                )
            )
        else:
            if options & 0xFC:
                raise MalformedPacket("SUBSCRIBE reserved option bits set")  # MQTT-3.8.3-4
            subs.append(SubscriptionRequest(topic_filter=topic_filter, qos=qos))
    if not subs:
        # MQTT-3.8.3-2 (3.1.1: MQTT-3.8.3-3); 5.0 section 3.8.3 names it a Protocol Error
        # (0x82), where Mosquitto answers 0x81: we follow the specification.
        raise ProtocolError("SUBSCRIBE without a topic filter")
    return Subscribe(packet_id=pid, subscriptions=tuple(subs), properties=props)


def _decode_suback(flags: int, data: Buffer, pos: int, end: int, version: int) -> SubAck:
    pid, props, pos = _id_and_properties(data, pos, end, version, 9)
    return SubAck(packet_id=pid, reason_codes=tuple(data[pos:end]), properties=props)


def _decode_unsubscribe(flags: int, data: Buffer, pos: int, end: int, version: int) -> Unsubscribe:
    pid, props, pos = _id_and_properties(data, pos, end, version, 10)
    filters = []
    while pos < end:
        topic_filter, pos = decode_string(data, pos, end)
        filters.append(topic_filter)
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without a topic filter")  # MQTT-3.10.3-2
    return Unsubscribe(packet_id=pid, topic_filters=tuple(filters), properties=props)


def _decode_unsuback(flags: int, data: Buffer, pos: int, end: int, version: int) -> UnsubAck:
    pid, pos = _packet_id(data, pos, end)
    if version != MQTT_5:
        if pos != end:
            raise MalformedPacket("UNSUBACK too long")
        return UnsubAck(packet_id=pid)
    props, pos = decode_properties(data, pos, end, 11)
    return UnsubAck(packet_id=pid, reason_codes=tuple(data[pos:end]), properties=props)


def _decode_empty(packet: Any) -> Callable[[int, Buffer, int, int, int], Any]:
    def decode(flags: int, data: Buffer, pos: int, end: int, version: int) -> Any:
        if pos != end:
            raise MalformedPacket(f"{type(packet).__name__} must have no body")
        return packet

    return decode


def _reason_and_properties(
    cls: Any, packet_type: int
) -> Callable[[int, Buffer, int, int, int], Any]:
    def decode(flags: int, data: Buffer, pos: int, end: int, version: int) -> Any:
        if version != MQTT_5:
            if packet_type == 15:
                raise MalformedPacket("AUTH is not an MQTT 3.1.1 packet")
            if pos != end:
                raise MalformedPacket("DISCONNECT must have no body in MQTT 3.1.1")
            return cls()
        code = 0
        props = EMPTY_PROPERTIES
        if pos < end:
            code = data[pos]
            pos += 1
        if pos < end:
            props, pos = decode_properties(data, pos, end, packet_type)
        if pos != end:
            raise MalformedPacket(f"{cls.__name__} too long")
        return cls(reason_code=code, properties=props)

    return decode


_DECODERS: dict[int, Callable[[int, Buffer, int, int, int], Any]] = {
    1: _decode_connect,
    2: _decode_connack,
    3: _decode_publish,
    4: _ack_decoder(PubAck, 4),
    5: _ack_decoder(PubRec, 5),
    6: _ack_decoder(PubRel, 6),
    7: _ack_decoder(PubComp, 7),
    8: _decode_subscribe,
    9: _decode_suback,
    10: _decode_unsubscribe,
    11: _decode_unsuback,
    12: _decode_empty(_PINGREQ),
    13: _decode_empty(_PINGRESP),
    14: _reason_and_properties(Disconnect, 14),
    15: _reason_and_properties(Auth, 15),
}


class Decoder:
    """Incremental decoder: `feed()` bytes, then call `next_packet()` until it returns None."""

    __slots__ = (
        "_data",
        "_pos",
        "_tail",
        "_tail_len",
        "max_packet_size",
        "requested_level",
        "version",
    )

    def __init__(
        self, *, version: int | None = None, max_packet_size: int = MAX_VARINT + 5
    ) -> None:
        self._data = b""
        self._pos = 0
        self._tail: list[bytes] | None = None  # made on the first split packet
        self._tail_len = 0
        self.max_packet_size = max_packet_size
        # None until CONNECT is decoded: the first packet must be CONNECT then (MQTT-3.1.0-1).
        self.version = version
        self.requested_level = version

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos >= len(self._data) and not self._tail:
            self._data = bytes(data)
            self._pos = 0
        else:
            chunk = bytes(data)
            if self._tail is None:
                self._tail = [chunk]
            else:
                self._tail.append(chunk)
            self._tail_len += len(chunk)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._data) - self._pos + self._tail_len

    def _merge(self) -> None:
        head = self._data[self._pos :] if self._pos else self._data
        assert self._tail is not None
        self._data = b"".join([head, *self._tail])
        self._pos = 0
        self._tail = None
        self._tail_len = 0

    def next_frame(self) -> tuple[int, int, bytes, int, int] | None:
        """The next whole frame as (type, flags, buffer, body start, body end), or None.

        Checks the fixed header (size, reserved flags, CONNECT first); the body is decoded by
        `decode_frame` or, for PUBLISH on the hot path, by `decode_publish_header`.
        """
        while True:
            data = self._data
            pos = self._pos
            end = len(data)
            if self.version is None and pos < end and data[pos] >> 4 != 1:
                # MQTT-3.1.0-1: known from the first byte, no need to wait for the frame.
                raise ProtocolError("the first packet must be CONNECT")
            # Fixed header: type and flags, then the remaining length (MQTT 5.0 section 2.1).
            i = pos + 1
            length = 0
            shift = 0
            header_complete = False
            while i < end:
                byte = data[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    header_complete = True
                    break
                shift += 7
                if shift > 21:
                    raise MalformedPacket("remaining length longer than four bytes")  # MQTT-1.5.5-1
            if not header_complete:
                if self._tail:
                    self._merge()
                    continue
                if pos == end and end:
                    # All decoded: an idle connection need not keep its last chunk alive.
                    self._data = b""
                    self._pos = 0
                return None
            total = i - pos + length
            if total > self.max_packet_size:
                raise PacketTooLarge(f"packet of {total} bytes exceeds {self.max_packet_size}")
            if end - pos < total:
                if self._tail and end - pos + self._tail_len >= total:
                    self._merge()
                    continue
                return None
            break
        first = data[pos]
        packet_type = first >> 4
        flags = first & 0x0F
        stop = i + length
        self._pos = stop
        if packet_type != 3:
            if self.version is None and packet_type != 1:
                raise ProtocolError("the first packet must be CONNECT")  # MQTT-3.1.0-1
            if packet_type == 0:
                raise MalformedPacket("reserved packet type 0")
            if _REQUIRED_FLAGS[packet_type] != flags:
                raise MalformedPacket(f"invalid fixed-header flags for packet type {packet_type}")
        elif self.version is None:
            raise ProtocolError("the first packet must be CONNECT")
        return packet_type, flags, data, i, stop

    def decode_frame(
        self, packet_type: int, flags: int, data: bytes, start: int, stop: int
    ) -> Packet:
        version = self.version or MQTT_311
        try:
            if packet_type == 1:
                if self.version is not None:
                    raise ProtocolError("second CONNECT")  # MQTT-3.1.0-2
                if data[start : start + 6] == b"\x00\x04MQTT" and stop > start + 6:
                    # Known before the rest is checked, so an error can be answered in kind.
                    self.requested_level = data[start + 6]
                packet = _decode_connect(flags, data, start, stop, version)
                self.version = packet.protocol_level
                return packet
            decoded: Packet = _DECODERS[packet_type](flags, data, start, stop, version)
            return decoded
        except IncompletePacket:
            raise MalformedPacket("packet shorter than its fields") from None

    def next_packet(self) -> Packet | None:
        frame = self.next_frame()
        if frame is None:
            return None
        return self.decode_frame(*frame)


# --------------------------------------------------------------------------------------------
# Encoding


def _frame(first: int, body: bytearray | bytes, out: bytearray) -> None:
    out.append(first)
    encode_varint(len(body), out)
    out += body


def encode(packet: Packet, version: int, out: bytearray) -> None:
    """Append the wire form of `packet` for protocol `version` (4 or 5) to `out`."""
    v5 = version == MQTT_5
    body = bytearray()
    if isinstance(packet, Publish):
        if packet.qos and not packet.packet_id:
            raise ValueError("QoS > 0 PUBLISH needs a packet identifier")
        first = 0x30 | (packet.qos << 1) | (0x08 if packet.dup else 0) | (1 if packet.retain else 0)
        encode_string(packet.topic, body)
        if packet.qos:
            body += packet.packet_id.to_bytes(2, "big")  # type: ignore[union-attr]
        if v5:
            encode_properties(packet.properties, body)
        body += packet.payload
        _frame(first, body, out)
    elif isinstance(packet, (PubAck, PubRec, PubRel, PubComp)):
        body += packet.packet_id.to_bytes(2, "big")
        if v5 and (packet.reason_code or packet.properties is not EMPTY_PROPERTIES):
            body.append(packet.reason_code)
            if packet.properties is not EMPTY_PROPERTIES:
                encode_properties(packet.properties, body)
        _frame((packet.packet_type << 4) | (2 if isinstance(packet, PubRel) else 0), body, out)
    elif isinstance(packet, Connect):
        encode_string(packet.protocol_name, body)
        body.append(packet.protocol_level)
        will = packet.will
        cflags = 0x02 if packet.clean_start else 0
        if will is not None:
            cflags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        if packet.password is not None:
            cflags |= 0x40
        if packet.username is not None:
            cflags |= 0x80
        body.append(cflags)
        body += packet.keep_alive.to_bytes(2, "big")
        if v5:
            encode_properties(packet.properties, body)
        encode_string(packet.client_id, body)
        if will is not None:
            if v5:
                encode_properties(will.properties, body)
            encode_string(will.topic, body)
            encode_binary(will.payload, body)
        if packet.username is not None:
            encode_string(packet.username, body)
        if packet.password is not None:
            encode_binary(packet.password, body)
        _frame(0x10, body, out)
    elif isinstance(packet, ConnAck):
        body.append(1 if packet.session_present else 0)
        body.append(packet.reason_code)
        if v5:
            encode_properties(packet.properties, body)
        _frame(0x20, body, out)
    elif isinstance(packet, Subscribe):
        body += packet.packet_id.to_bytes(2, "big")
        if v5:
            encode_properties(packet.properties, body)
        for sub in packet.subscriptions:
            encode_string(sub.topic_filter, body)
            options = sub.qos
            if v5:
                options |= (
                    (0x04 if sub.no_local else 0)
                    | (0x08 if sub.retain_as_published else 0)
                    | (sub.retain_handling << 4)
                )
            body.append(options)
        _frame(0x82, body, out)
    elif isinstance(packet, SubAck):
        body += packet.packet_id.to_bytes(2, "big")
        if v5:
            encode_properties(packet.properties, body)
        body += bytes(packet.reason_codes)
        _frame(0x90, body, out)
    elif isinstance(packet, Unsubscribe):
        body += packet.packet_id.to_bytes(2, "big")
        if v5:
            encode_properties(packet.properties, body)
        for topic_filter in packet.topic_filters:
            encode_string(topic_filter, body)
        _frame(0xA2, body, out)
    elif isinstance(packet, UnsubAck):
        body += packet.packet_id.to_bytes(2, "big")
        if v5:
            encode_properties(packet.properties, body)
            body += bytes(packet.reason_codes)
        _frame(0xB0, body, out)
    elif isinstance(packet, PingReq):
        out += b"\xc0\x00"
    elif isinstance(packet, PingResp):
        out += b"\xd0\x00"
    elif isinstance(packet, (Disconnect, Auth)):
        if v5 and (packet.reason_code or packet.properties is not EMPTY_PROPERTIES):
            body.append(packet.reason_code)
            if packet.properties is not EMPTY_PROPERTIES:
                encode_properties(packet.properties, body)
        elif isinstance(packet, Auth) and not v5:
            raise ValueError("AUTH does not exist in MQTT 3.1.1")
        _frame(0xE0 if isinstance(packet, Disconnect) else 0xF0, body, out)
    else:  # pragma: no cover - exhaustive over Packet
        raise TypeError(f"not a packet: {packet!r}")


def encode_bytes(packet: Packet, version: int) -> bytes:
    out = bytearray()
    encode(packet, version, out)
    return bytes(out)
