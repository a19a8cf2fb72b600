"""MQTT over WebSocket (MQTT 5.0 section 6; RFC 6455): the handshake and binary framing.

`WebSocketProtocol` answers the HTTP Upgrade (sub-protocol `mqtt`), then unwraps client frames
into the byte stream an `MQTTProtocol` expects and wraps what it writes into binary frames,
through a small transport adapter, so the MQTT connection code is the same for TCP and WS.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import BrokerServer, MQTTProtocol

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HANDSHAKE = 8192
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes | bytearray) -> bytes:
    """A server frame: FIN set, never masked (RFC 6455 section 5.1)."""
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, length)
    elif length < 65_536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, length)
    return head + bytes(payload)


class _FramingTransport:
    """What the MQTT protocol object sees: writes become binary WebSocket frames."""

    def __init__(self, inner: asyncio.Transport) -> None:
        self.inner = inner

    def write(self, data: bytes | bytearray) -> None:
        self.inner.write(frame(OP_BINARY, data))

    def close(self) -> None:
        if not self.inner.is_closing():
            self.inner.write(frame(OP_CLOSE, struct.pack("!H", 1000)))
            self.inner.close()

    def abort(self) -> None:
        self.inner.abort()

    def is_closing(self) -> bool:
        return self.inner.is_closing()

    def pause_reading(self) -> None:
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.inner.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)


class WebSocketProtocol(asyncio.Protocol):
    def __init__(self, server: BrokerServer, mqtt: MQTTProtocol, max_frame: int) -> None:
        self.server = server
        self.mqtt = mqtt
        self.max_frame = max_frame
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.fragments = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upgraded:
            self.mqtt.connection_lost(exc)
        else:
            self.server.closed(self.mqtt)

    def pause_writing(self) -> None:
        if self.upgraded:
            self.mqtt.pause_writing()

    def resume_writing(self) -> None:
        if self.upgraded:
            self.mqtt.resume_writing()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            self._handshake()
            if not self.upgraded:
                return
        self._frames()

    def _reject(self, status: str) -> None:
        assert self.transport is not None
        self.transport.write(
            f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".encode()
        )
        self.transport.close()

    def _handshake(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HANDSHAKE:
                self._reject("431 Request Header Fields Too Large")
            return
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[: end + 4]
        lines = head.split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        key = headers.get("sec-websocket-key")
        if (
            not lines[0].startswith("GET ")
            or headers.get("upgrade", "").lower() != "websocket"
            or not key
        ):
            self._reject("400 Bad Request")
            return
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        offered = [
            p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()
        ]
        response = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n"
        )
        if offered:
            if "mqtt" not in offered:
                self._reject("400 Bad Request")  # MQTT-6.0.0-3: the sub-protocol is "mqtt"
                return
            response += "Sec-WebSocket-Protocol: mqtt\r\n"
        assert self.transport is not None
        self.transport.write((response + "\r\n").encode())
        self.upgraded = True
        self.mqtt.connection_made(_FramingTransport(self.transport))  # type: ignore[arg-type]

    def _frames(self) -> None:
        buffer = self.buffer
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            opcode = first & 0x0F
            masked = second & 0x80
            length = second & 0x7F
            pos = 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length = struct.unpack_from("!H", buffer, 2)[0]
                pos = 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length = struct.unpack_from("!Q", buffer, 2)[0]
                pos = 10
            if not masked or length > self.max_frame:
                self._close(1002 if not masked else 1009)  # RFC 6455 5.1: clients mask
                return
            if len(buffer) < pos + 4 + length:
                return
            mask = buffer[pos : pos + 4]
            pos += 4
            payload = _unmask(bytes(buffer[pos : pos + length]), bytes(mask))
            del buffer[: pos + length]
            if opcode in (OP_BINARY, OP_CONTINUATION):
                self.fragments += payload
                if first & 0x80:  # FIN: MQTT bytes may span frames (MQTT-6.0.0-2)
                    data, self.fragments = bytes(self.fragments), bytearray()
                    self.mqtt.data_received(data)
            elif opcode == OP_PING:
                assert self.transport is not None
                self.transport.write(frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self._close(1000)
                return
            elif opcode == OP_TEXT:
                self._close(1003)  # MQTT-6.0.0-1: binary frames only
                return

    def _close(self, code: int) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(frame(OP_CLOSE, struct.pack("!H", code)))
            self.transport.close()


def _unmask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    # XOR with the repeated 4-byte key, as one big integer operation.
    key = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        len(payload), "little"
    )
