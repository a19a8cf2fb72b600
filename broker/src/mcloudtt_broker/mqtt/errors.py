"""Errors raised by the codec and the session logic.

A `ProtocolError` carries the MQTT 5.0 reason code that the shell sends back (CONNACK before a
session exists, DISCONNECT after) before it closes the connection. On 3.1.1, which has no reason
codes after CONNECT, the connection is simply closed.
"""

from __future__ import annotations

from .reason_codes import ReasonCode


class MQTTError(Exception):
    """Base class of every error this package raises."""


class IncompletePacket(MQTTError):
    """More bytes are needed to decode the packet (raised inside the decoder only)."""


class ProtocolError(MQTTError):
    """The peer broke the protocol; `reason_code` says how (MQTT 5.0 table 2-6)."""

    def __init__(self, message: str, reason_code: ReasonCode = ReasonCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class MalformedPacket(ProtocolError):
    """The bytes cannot be parsed as the packet they claim to be (reason 0x81)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ReasonCode.MALFORMED_PACKET)


class PacketTooLarge(ProtocolError):
    """A packet exceeds the Maximum Packet Size we advertised (reason 0x95)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ReasonCode.PACKET_TOO_LARGE)
