"""Immutable MQTT packets, one class per control packet type (MQTT 5.0 section 3).

The same classes serve 3.1.1 and 5.0: fields a version lacks keep their defaults (reason codes
0, empty properties) and the codec leaves them off the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from .properties import EMPTY_PROPERTIES, Properties


@dataclass(frozen=True, slots=True, kw_only=True)
class Will:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Connect:
    client_id: str
    protocol_level: int = 4
    protocol_name: str = "MQTT"
    clean_start: bool = True
    keep_alive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = EMPTY_PROPERTIES
    packet_type = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnAck:
    session_present: bool = False
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES
    packet_type = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = EMPTY_PROPERTIES
    packet_type = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class PubAck:
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES
    packet_type = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class PubRec:
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES
    packet_type = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class PubRel:
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES
    packet_type = 6


@dataclass(frozen=True, slots=True, kw_only=True)
class PubComp:
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES
    packet_type = 7


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionRequest:
    """One topic filter of a SUBSCRIBE with its options (MQTT 5.0 section 3.8.3.1)."""

    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    packet_id: int
    subscriptions: tuple[SubscriptionRequest, ...]
    properties: Properties = EMPTY_PROPERTIES
    packet_type = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class SubAck:
    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Properties = EMPTY_PROPERTIES
    packet_type = 9


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = EMPTY_PROPERTIES
    packet_type = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class UnsubAck:
    packet_id: int
    reason_codes: tuple[int, ...] = ()
    properties: Properties = EMPTY_PROPERTIES
    packet_type = 11


@dataclass(frozen=True, slots=True, kw_only=True)
class PingReq:
    packet_type = 12


@dataclass(frozen=True, slots=True, kw_only=True)
class PingResp:
    packet_type = 13


@dataclass(frozen=True, slots=True, kw_only=True)
class Disconnect:
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES
    packet_type = 14


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth:
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES
    packet_type = 15


Packet = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
    | Auth
)
