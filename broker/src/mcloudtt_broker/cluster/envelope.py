"""The cluster envelope: one publish as it crosses Redis between brokers (and to taps).

Version 1, binary-safe, all integers big-endian (documented in docs/cluster-envelope.md):

    offset  size  field
    0       1     version (1)
    1       1     flags: bits 0-1 QoS, bit 2 retain
    2       8     received_at: Unix time in microseconds when the origin broker accepted it
    10      8     sequence: per origin broker, increasing; (origin, sequence) names the message
    18      1     n = length of origin (broker id, UTF-8)
    19      n     origin
    ..      2     m = length of client id (the publisher's ClientId, UTF-8; "" for the broker)
    ..      m     client id
    ..      2     t = length of topic (UTF-8)
    ..      t     topic
    ..      4     p = length of properties
    ..      p     MQTT 5.0 properties of the message, encoded as in a PUBLISH without the leading
                  length (payload format, message expiry remaining, content type, response topic,
                  correlation data, user properties)
    ..      rest  payload

Anything that does not parse raises `EnvelopeError`; receivers count and drop it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..mqtt.errors import MQTTError
from ..mqtt.properties import (
    EMPTY_PROPERTIES,
    PUBLISH,
    Properties,
    decode_property_body,
    encode_property_body,
)

ENVELOPE_VERSION = 1
_HEAD = struct.Struct(">BBQQB")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class EnvelopeError(ValueError):
    """Bytes on the cluster channel that are not a valid envelope."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    origin: str
    sequence: int
    received_at_us: int
    client_id: str
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = EMPTY_PROPERTIES


# A plain inbox record (records.py: length, flags 0x01, no groups) and the envelope head, as one.
_PLAIN_RECORD_HEAD = struct.Struct(">IBBBBQQB")


class EnvelopePacker:
    """Packs this broker's envelopes; the forwarding hot path.

    Keeps the parts that repeat (the origin, publishers' client ids) encoded, and builds a plain
    inbox record (`records.py`) in one step, without an intermediate envelope.
    """

    __slots__ = ("_clients", "_middles", "origin")

    def __init__(self, origin: bytes) -> None:
        if len(origin) > 255:
            raise ValueError("broker id longer than 255 bytes")
        self.origin = origin
        self._clients: dict[str, bytes] = {}  # client id -> its length-prefixed UTF-8
        # (client id, topic wire) -> origin, client id, topic and an empty properties length.
        self._middles: dict[tuple[str, bytes], bytes] = {}

    def _client_wire(self, client_id: str) -> bytes:
        wire = self._clients.get(client_id)
        if wire is None:
            raw = client_id.encode()
            wire = len(raw).to_bytes(2, "big") + raw
            if len(self._clients) >= 10_000:
                self._clients.clear()
            self._clients[client_id] = wire
        return wire

    def _middle(self, client_id: str, topic_wire: bytes, properties: Properties) -> bytes:
        """An envelope between its head and its payload: origin, client id, topic, properties."""
        props = b"" if properties is EMPTY_PROPERTIES else bytes(encode_property_body(properties))
        return b"".join(
            (
                self.origin,
                self._client_wire(client_id),
                topic_wire,
                len(props).to_bytes(4, "big"),
                props,
            )
        )

    def envelope(
        self,
        sequence: int,
        received_at_us: int,
        client_id: str,
        topic_wire: bytes,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties,
    ) -> bytes:
        head = _HEAD.pack(
            ENVELOPE_VERSION,
            qos | (0x04 if retain else 0),
            received_at_us,
            sequence,
            len(self.origin),
        )
        return b"".join((head, self._middle(client_id, topic_wire, properties), payload))

    def plain_record(
        self,
        sequence: int,
        received_at_us: int,
        client_id: str,
        topic_wire: bytes,
        payload: bytes,
        qos: int,
        properties: Properties,
    ) -> bytes:
        """The same bytes as `encode_record(envelope(...), True, ())` for a non-retained message."""
        if properties is EMPTY_PROPERTIES:
            # Everything between the head and the payload repeats per publisher and topic.
            key = (client_id, topic_wire)
            middle = self._middles.get(key)
            if middle is None:
                middle = self._middle(client_id, topic_wire, properties)
                if len(self._middles) >= 10_000:
                    self._middles.clear()
                self._middles[key] = middle
        else:
            middle = self._middle(client_id, topic_wire, properties)
        head = _PLAIN_RECORD_HEAD.pack(
            _HEAD.size + len(middle) + len(payload) + 2,
            0x01,
            0,
            ENVELOPE_VERSION,
            qos,
            received_at_us,
            sequence,
            len(self.origin),
        )
        return b"".join((head, middle, payload))


def encode_envelope(envelope: Envelope) -> bytes:
    topic = envelope.topic.encode()
    return EnvelopePacker(envelope.origin.encode()).envelope(
        envelope.sequence,
        envelope.received_at_us,
        envelope.client_id,
        len(topic).to_bytes(2, "big") + topic,
        envelope.payload,
        envelope.qos,
        envelope.retain,
        envelope.properties,
    )


# origin, sequence, received_at_us, client_id, topic, payload, qos, retain, properties
EnvelopeFields = tuple[str, int, int, str, str, bytes, int, bool, Properties]


class EnvelopeReader:
    """Reads envelopes; the receivers' hot path.

    The origin, client id and topic of an envelope repeat from message to message (one publisher,
    a few topics), so their bytes are decoded and checked once and remembered (bounded).
    """

    __slots__ = ("_names",)

    def __init__(self) -> None:
        self._names: dict[bytes, tuple[str, str, str]] = {}

    def read(self, data: bytes, pos: int, end: int) -> EnvelopeFields:
        """The fields of the envelope in data[pos:end]; raises `EnvelopeError`."""
        try:
            if end - pos < _HEAD.size:
                raise EnvelopeError("envelope shorter than its header")
            version, flags, received_at, sequence, origin_len = _HEAD.unpack_from(data, pos)
            if version != ENVELOPE_VERSION:
                raise EnvelopeError(f"unknown envelope version {version}")
            qos = flags & 0x03
            if qos == 3 or flags & 0xF8:
                raise EnvelopeError(f"invalid envelope flags 0x{flags:02x}")
            names_at = pos + _HEAD.size
            stop = names_at + origin_len
            if stop + 2 > end:
                raise EnvelopeError("envelope truncated")
            stop += 2 + _U16.unpack_from(data, stop)[0]  # past the client id
            if stop + 2 > end:
                raise EnvelopeError("envelope truncated")
            stop += 2 + _U16.unpack_from(data, stop)[0]  # past the topic
            if stop + 4 > end:
                raise EnvelopeError("envelope truncated")
            raw_names = data[names_at:stop]
            names = self._names.get(raw_names)
            if names is None:
                names = _decode_names(raw_names, origin_len)
                if len(self._names) >= 10_000:
                    self._names.clear()
                self._names[raw_names] = names
            (length,) = _U32.unpack_from(data, stop)
            start = stop + 4
            stop = start + length
            if stop > end:
                raise EnvelopeError("envelope truncated")
            props = decode_property_body(data, start, stop, PUBLISH) if length else EMPTY_PROPERTIES
            origin, client_id, topic = names
            return (
                origin,
                sequence,
                received_at,
                client_id,
                topic,
                data[stop:end],
                qos,
                bool(flags & 0x04),
                props,
            )
        except (UnicodeDecodeError, MQTTError, struct.error, IndexError) as error:
            raise EnvelopeError(f"malformed envelope: {error}") from None


def _decode_names(raw: bytes, origin_len: int) -> tuple[str, str, str]:
    """Origin, client id and topic from their bytes (lengths already checked by the caller)."""
    origin = raw[:origin_len].decode()
    pos = origin_len + 2
    stop = pos + int.from_bytes(raw[origin_len:pos], "big")
    client_id = raw[pos:stop].decode()
    topic = raw[stop + 2 :].decode()
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise EnvelopeError(f"invalid topic {topic!r}")
    return origin, client_id, topic


_READER = EnvelopeReader()


def unpack_envelope(data: bytes) -> EnvelopeFields:
    """The fields of an envelope, without building an `Envelope`; raises `EnvelopeError`."""
    return _READER.read(data, 0, len(data))


def decode_envelope(data: bytes) -> Envelope:
    origin, sequence, received_at, client_id, topic, payload, qos, retain, props = unpack_envelope(
        data
    )
    return Envelope(
        origin=origin,
        sequence=sequence,
        received_at_us=received_at,
        client_id=client_id,
        topic=topic,
        payload=bytes(payload),
        qos=qos,
        retain=retain,
        properties=props,
    )
