"""MQTT over WebSocket (MQTT 5.0 section 6; RFC 6455), on h11 and wsproto.

`WebSocketProtocol` reads the HTTP Upgrade request with h11, lets wsproto check it (GET,
`Upgrade`/`Connection`, `Sec-WebSocket-Key`, version 13) and answers 101 with sub-protocol
`mqtt`, or an HTTP error and close. After that, wsproto turns frames into events: the payload
of every binary frame, complete or not, goes on to the `MQTTProtocol` as soon as it is read
(MQTT-6.0.0-2: the WebSocket carries a byte stream, a packet may span frames), so nothing is
reassembled here and the only buffer that grows with a packet is the MQTT decoder's, bounded by
the broker's maximum packet size. The MQTT protocol object writes through `_FramingTransport`,
which wraps its output into binary frames, so the MQTT connection code is the same for TCP and
WebSocket, backpressure included.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import h11
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.handshake import H11Handshake
from wsproto.typing import Headers
from wsproto.utilities import RemoteProtocolError

if TYPE_CHECKING:
    from .server import BrokerServer, MQTTProtocol

MAX_HANDSHAKE = 8192  # bytes of request line and headers; more is answered 431
SUBPROTOCOL = "mqtt"


class _FramingTransport:
    """What the MQTT protocol object sees: writes become binary WebSocket frames."""

    __slots__ = ("inner", "ws")

    def __init__(self, inner: asyncio.Transport, ws: Connection) -> None:
        self.inner = inner
        self.ws = ws

    def write(self, data: bytes | bytearray) -> None:
        if self.ws.state is ConnectionState.OPEN:
            self.inner.write(self.ws.send(BytesMessage(data=data)))

    def close(self) -> None:
        if self.ws.state is ConnectionState.OPEN and not self.inner.is_closing():
            self.inner.write(self.ws.send(CloseConnection(code=CloseReason.NORMAL_CLOSURE)))
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
    def __init__(self, server: BrokerServer, mqtt: MQTTProtocol) -> None:
        self.server = server
        self.mqtt = mqtt
        self.transport: asyncio.Transport | None = None
        self.http: h11.Connection | None = h11.Connection(
            h11.SERVER, max_incomplete_event_size=MAX_HANDSHAKE
        )
        self.request: h11.Request | None = None
        self.ws: Connection | None = None
        self.timer: asyncio.TimerHandle | None = None

    # asyncio callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # The MQTT connect timeout starts at the upgrade; a peer that never finishes the
        # handshake is closed after as long.
        self.timer = self.server.loop.call_later(
            self.server.settings.connect_timeout, transport.close
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.ws is not None:
            self.mqtt.connection_lost(exc)
        else:
            self.server.closed(self.mqtt)

    def pause_writing(self) -> None:
        if self.ws is not None:
            self.mqtt.pause_writing()

    def resume_writing(self) -> None:
        if self.ws is not None:
            self.mqtt.resume_writing()

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.ws is not None:
            self.ws.receive_data(data)
            self._events()
        elif self.http is not None:
            self.http.receive_data(data)
            self._handshake()

    # Opening handshake (RFC 6455 section 4.2) -----------------------------------------------
    def _handshake(self) -> None:
        http = self.http
        assert http is not None
        while True:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as error:  # malformed, or headers over MAX_HANDSHAKE
                self._reject(error.error_status_hint)
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                # RFC 6455 4.1: an HTTP/1.1 GET; wsproto checks the rest but assumes GET.
                if event.method != b"GET" or event.http_version != b"1.1":
                    self._reject(400)
                    return
                self.request = event
            elif isinstance(event, h11.Data):
                self._reject(400)  # an upgrade request has no body
                return
            elif isinstance(event, h11.EndOfMessage):  # what follows is WebSocket data
                break
        request = self.request
        assert request is not None
        handshake = H11Handshake(ConnectionType.SERVER)
        try:
            handshake.initiate_upgrade_connection(list(request.headers), request.target)
            offer = next(e for e in handshake.events() if isinstance(e, Request))
        except RemoteProtocolError as error:
            hint = error.event_hint
            if isinstance(hint, RejectConnection):
                self._reject(hint.status_code, hint.headers)  # a wrong version: 426, names 13
            else:
                self._reject(400)
            return
        except h11.ProtocolError:  # the request h11 parsed, h11 will not rebuild: still a 400
            self._reject(400)
            return
        if not _valid_key(offer.extra_headers):
            self._reject(400)
            return
        subprotocol = None
        if offer.subprotocols:
            # MQTT-6.0.0-3: the client offers "mqtt", and that is what the server selects
            # (MQTT-6.0.0-4); a client that offers none is served without the header.
            if SUBPROTOCOL not in offer.subprotocols:
                self._reject(400)
                return
            subprotocol = SUBPROTOCOL
        trailing, _ = http.trailing_data
        assert self.transport is not None
        self.transport.write(handshake.send(AcceptConnection(subprotocol=subprotocol)))
        ws = handshake.connection
        assert ws is not None
        self.ws, self.http, self.request = ws, None, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.mqtt.connection_made(_FramingTransport(self.transport, ws))  # type: ignore[arg-type]
        if trailing:  # frames sent before our 101 (RFC 6455 4.1 says wait; be lenient)
            ws.receive_data(trailing)
            self._events()

    def _reject(self, status: int, headers: Headers | None = None) -> None:
        assert self.transport is not None and self.http is not None
        response = h11.Response(
            status_code=status,
            reason=HTTPStatus(status).phrase.encode(),
            headers=[*(headers or ()), (b"Connection", b"close"), (b"Content-Length", b"0")],
        )
        with contextlib.suppress(h11.LocalProtocolError):  # h11 cannot answer: just close
            self.transport.write(self.http.send(response) or b"")
        self.transport.close()

    # Frames ---------------------------------------------------------------------------------
    def _events(self) -> None:
        ws = self.ws
        transport = self.transport
        assert ws is not None and transport is not None
        # Payloads of one read are passed on together: many tiny frames must not become as many
        # buffers in the MQTT decoder.
        chunks: list[bytes | bytearray] = []
        for event in ws.events():
            if isinstance(event, BytesMessage):
                chunks.append(event.data)
                continue
            if chunks:
                self._feed(chunks)
                chunks = []
                if transport.is_closing():  # the MQTT layer closed (a protocol error)
                    return
            if isinstance(event, Ping):
                transport.write(ws.send(event.response()))
            elif isinstance(event, TextMessage):
                self._close(ws, CloseConnection(code=CloseReason.UNSUPPORTED_DATA))  # MQTT-6.0.0-1
                return
            elif isinstance(event, CloseConnection):
                # The peer's close is echoed (RFC 6455 5.5.1); a framing error wsproto found
                # (unmasked, bad opcode, oversized control frame...) is sent with its code.
                remote = ws.state is ConnectionState.REMOTE_CLOSING
                self._close(ws, event.response() if remote else event)
                return
        if chunks:
            self._feed(chunks)

    def _feed(self, chunks: list[bytes | bytearray]) -> None:
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.mqtt.data_received(bytes(data))

    def _close(self, ws: Connection, event: Event) -> None:
        transport = self.transport
        assert transport is not None
        if ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            transport.write(ws.send(event))
        transport.close()


def _valid_key(headers: Headers) -> bool:
    # RFC 6455 4.2.1 (5): the key is 16 bytes in base64; wsproto only checks it is there.
    for name, value in headers:
        if name.lower() == b"sec-websocket-key":
            try:
                return len(base64.b64decode(value, validate=True)) == 16
            except binascii.Error:
                return False
    return False
