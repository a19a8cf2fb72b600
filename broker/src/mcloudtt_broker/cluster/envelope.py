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


def pack_envelope(
    origin: bytes,
    sequence: int,
    received_at_us: int,
    client_id: str,
    topic_wire: bytes,
    payload: bytes,
    qos: int,
    retain: bool,
    properties: Properties,
) -> bytes:
    """The envelope bytes from plain fields: the brokers' hot path.

    `origin` is the UTF-8 broker id; `topic_wire` the topic as MQTT puts it on the wire (two
    length bytes, then UTF-8), which is also its form in the envelope.
    """
    if len(origin) > 255:
        raise ValueError("broker id longer than 255 bytes")
    client = client_id.encode()
    props = b"" if properties is EMPTY_PROPERTIES else bytes(encode_property_body(properties))
    return b"".join(
        (
            _HEAD.pack(
                ENVELOPE_VERSION,
                qos | (0x04 if retain else 0),
                received_at_us,
                sequence,
                len(origin),
            ),
            origin,
            len(client).to_bytes(2, "big"),
            client,
            topic_wire,
            len(props).to_bytes(4, "big"),
            props,
            payload,
        )
    )


def encode_envelope(envelope: Envelope) -> bytes:
    topic = envelope.topic.encode()
    return pack_envelope(
        envelope.origin.encode(),
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


def unpack_envelope(data: bytes) -> EnvelopeFields:
    """The fields of an envelope, without building an `Envelope`; raises `EnvelopeError`."""
    try:
        if len(data) < _HEAD.size:
            raise EnvelopeError("envelope shorter than its header")
        version, flags, received_at, sequence, origin_len = _HEAD.unpack_from(data, 0)
        if version != ENVELOPE_VERSION:
            raise EnvelopeError(f"unknown envelope version {version}")
        qos = flags & 0x03
        if qos == 3 or flags & 0xF8:
            raise EnvelopeError(f"invalid envelope flags 0x{flags:02x}")
        pos = _HEAD.size
        end = len(data)
        origin = data[pos : pos + origin_len].decode()
        pos += origin_len
        client_len = int.from_bytes(data[pos : pos + 2], "big")
        pos += 2
        client_id = data[pos : pos + client_len].decode()
        pos += client_len
        topic_len = int.from_bytes(data[pos : pos + 2], "big")
        pos += 2
        topic = data[pos : pos + topic_len].decode()
        pos += topic_len
        props_len = int.from_bytes(data[pos : pos + 4], "big")
        pos += 4
        if pos > end or pos + props_len > end or len(origin) > origin_len or len(topic) > topic_len:
            raise EnvelopeError("envelope truncated")
        if props_len:
            props = decode_property_body(data, pos, pos + props_len, PUBLISH)
            pos += props_len
        else:
            props = EMPTY_PROPERTIES
        if not topic or "+" in topic or "#" in topic or "\x00" in topic:
            raise EnvelopeError(f"invalid topic {topic!r}")
        return (
            origin,
            sequence,
            received_at,
            client_id,
            topic,
            data[pos:],
            qos,
            bool(flags & 0x04),
            props,
        )
    except EnvelopeError:
        raise
    except (UnicodeDecodeError, MQTTError, struct.error, IndexError) as error:
        raise EnvelopeError(f"malformed envelope: {error}") from None


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
