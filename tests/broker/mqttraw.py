"""A blocking raw-socket MQTT client for protocol-level tests, on the independent client

The packets come from `mcloudtt_mqttclient`, which shares no code with the broker's codec: a test
that encoded with the broker's encoder would share its bugs. Packets are built as bytes so a test
can also build wrong ones; what the broker sends is parsed and checked by the same
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import mcloudtt_mqttclient as codec
from mcloudtt_mqttclient import *  # noqa: F403  (the codec's builders and constants, for the tests)
from mcloudtt_mqttclient import Properties as Props
from mcloudtt_mqttclient import encode_properties as encode_props  # noqa: F401

TIMEOUT = 5.0


class Malformed(AssertionError):
    """The broker sent bytes that do not decode: a broker bug, reported as a test failure."""


def _parse(ptype: int, flags: int, body: bytes, version: int) -> codec.Packet:
    try:
        return codec.parse(ptype, flags, body, version)
    except codec.MalformedPacket as e:
        raise Malformed(str(e)) from e


parse = _parse  # the codec's parse, with a broker's malformed packet as a test failure


# ---------------------------------------------------------------------------------------------
# client


class Closed(AssertionError):
    """The broker closed the connection while a packet was expected."""


class RawClient:
    """One TCP connection speaking hand-built MQTT; every wait has a deadline.

    Incoming topic aliases are resolved (the raw value stays in the TOPIC_ALIAS property).
    """

    def __init__(
        self,
        port: int,
        *,
        version: int = 5,
        timeout: float = TIMEOUT,
        rcvbuf: int | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        """`sock`: an already connected socket (a TLS one, say) instead of connecting to `port`."""
        self.version = version
        self.timeout = timeout
        if sock is not None:
            self.sock = sock
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if rcvbuf is not None:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(("127.0.0.1", port))
            except OSError:
                self.sock.close()
                raise
        self.reader = codec.Reader(max_size=codec.MAX_VARINT)
        self.eof = False
        self.aliases: dict[int, str] = {}
        self.pending: deque[codec.Packet] = deque()  # deliveries that arrived while awaiting an ack
        self._next_id = 0
        self.connack: codec.Packet | None = None

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
        self.reader.feed(chunk)

    def _frame(self) -> codec.Frame | None:
        try:
            return self.reader.next_frame()
        except codec.MalformedPacket as e:
            raise Malformed(str(e)) from e

    # -- packets -------------------------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> codec.Packet:
        """The next packet, whatever it is; TimeoutError if none, Closed on EOF."""
        if self.pending:
            return self.pending.popleft()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            frame = self._frame()
            if frame is not None:
                p = _parse(*frame, self.version)
                if p.type == codec.PUBLISH and self.version == 5:
                    alias = p.prop(codec.TOPIC_ALIAS)
                    if isinstance(alias, int):
                        if p.topic:
                            self.aliases[alias] = p.topic
                        else:
                            assert alias in self.aliases, f"broker used unknown topic alias {alias}"
                            p = dataclasses.replace(p, topic=self.aliases[alias])
                return p
            if self.eof:
                raise Closed("broker closed the connection")
            self._fill(deadline)

    def expect(self, ptype: int, timeout: float | None = None) -> codec.Packet:
        p = self.recv(timeout)
        assert p.type == ptype, f"expected {codec.NAMES[ptype]}, got {p!r}"
        return p

    def _await(self, ptype: int) -> codec.Packet:
        """Wait for an ack of `ptype`, keeping deliveries that overtake it for later."""
        deadline = time.monotonic() + self.timeout
        while True:
            p = self._recv_wire(max(0.0, deadline - time.monotonic()))
            if p.type == ptype:
                return p
            assert p.type in (codec.PUBLISH, codec.PUBREL), (
                f"expected {codec.NAMES[ptype]}, got {p!r}"
            )
            self.pending.append(p)

    def _recv_wire(self, timeout: float) -> codec.Packet:
        saved, self.pending = self.pending, deque()
        try:
            return self.recv(timeout)
        finally:
            self.pending = saved

    def next_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def connect(self, client_id: str | bytes = "", **kw: Any) -> codec.Packet:
        kw.setdefault("version", self.version)
        self.send(codec.connect(client_id, **kw))
        self.connack = self._await(codec.CONNACK)
        return self.connack

    def subscribe(
        self, *filters: str | tuple[str, int], props: Props | None = None
    ) -> codec.Packet:
        pid = self.next_id()
        pairs = [(f, 0) if isinstance(f, str) else f for f in filters]
        self.send(codec.subscribe(pid, pairs, version=self.version, props=props))
        p = self._await(codec.SUBACK)
        assert p.packet_id == pid  # MQTT-3.8.4-2
        return p

    def unsubscribe(self, *filters: str) -> codec.Packet:
        pid = self.next_id()
        self.send(codec.unsubscribe(pid, filters, version=self.version))
        p = self._await(codec.UNSUBACK)
        assert p.packet_id == pid  # MQTT-3.10.4-4
        return p

    def publish(
        self,
        topic: str,
        payload: bytes = b"",
        qos: int = 0,
        retain: bool = False,
        props: Props | None = None,
    ) -> codec.Packet | None:
        """Publish and finish the QoS flow; returns the PUBACK or PUBCOMP (None for QoS 0)."""
        pid = self.next_id() if qos else None
        self.send(
            codec.publish(
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
            p = self._await(codec.PUBACK)
            assert p.packet_id == pid
            return p
        rec = self._await(codec.PUBREC)
        assert rec.packet_id == pid
        self.send(codec.ack(codec.PUBREL, rec.packet_id, version=self.version))
        comp = self._await(codec.PUBCOMP)
        assert comp.packet_id == pid
        return comp

    def next_publish(self, timeout: float | None = None, *, ack_it: bool = True) -> codec.Packet:
        """The next PUBLISH; with ack_it, acknowledge it (PUBACK or PUBREC) and answer PUBRELs."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            p = self.recv(max(0.0, deadline - time.monotonic()))
            if p.type == codec.PUBREL and ack_it:
                self.send(codec.ack(codec.PUBCOMP, p.packet_id, version=self.version))
                continue
            if p.type == codec.PINGRESP:
                continue
            assert p.type == codec.PUBLISH, f"expected PUBLISH, got {p!r}"
            if ack_it and p.qos == 1:
                self.send(codec.ack(codec.PUBACK, p.packet_id, version=self.version))
            elif ack_it and p.qos == 2:
                self.send(codec.ack(codec.PUBREC, p.packet_id, version=self.version))
            return p

    def publishes(self, n: int, timeout: float | None = None) -> list[codec.Packet]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return [self.next_publish(max(0.0, deadline - time.monotonic())) for _ in range(n)]

    def until(
        self, topic: str, timeout: float | None = None, *, ack_it: bool = True
    ) -> list[codec.Packet]:
        """Every PUBLISH received before the first one on `topic` (a marker), marker excluded.

        A broker handles one connection's packets in order and keeps order per topic and QoS;
        publish the marker at QoS 1 after QoS 1/2 traffic (Mosquitto lets a QoS 0 message
        overtake QoS>0 ones queued behind a full inflight window), at QoS 0 after QoS 0 traffic.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        got: list[codec.Packet] = []
        while True:
            p = self.next_publish(max(0.0, deadline - time.monotonic()), ack_it=ack_it)
            if p.topic == topic:
                return got
            got.append(p)

    def closed(self, timeout: float | None = None) -> list[codec.Packet]:
        """Wait until the broker closes the connection; the packets it sent before that."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        got: list[codec.Packet] = []
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
        self.send(codec.disconnect(code, props, version=self.version))
        left = self.closed()
        assert all(p.type != codec.DISCONNECT for p in left), left
        self.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def disconnect_codes(packets: Iterable[codec.Packet]) -> list[int]:
    return [p.code for p in packets if p.type == codec.DISCONNECT]
