"""MQTT source: a shared subscription at QoS 1 with a persistent session and manual PUBACKs.

A small MQTT 5.0 client on the broker's sans-IO codec (the adapter may use the broker's codec;
the broker never imports the adapter). Why not paho or aiomqtt: the adapter must send each PUBACK
only after the sink committed the message, in order (MQTT-4.6.0-2), and must stop reading the
socket when the pipeline is full; a client that owns its transport does both without a thread.

* CONNECT with Clean Start 0 and a Session Expiry Interval under a stable ClientId, so the broker
  keeps the subscription and queues QoS 1 messages while this adapter restarts.
* SUBSCRIBE `$share/{group}/{filter}` at QoS 1: replicas with the same group split the messages.
* PUBLISH -> Record(ack=(connection generation, packet id)); `ack()` writes the PUBACKs. Tokens
  from an older connection are dropped: the broker resends those messages (DUP) after reconnect.
* Reconnect with capped, jittered exponential backoff; PINGREQ every keepalive/2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import orjson
from mcloudtt_broker.backoff import Backoff
from mcloudtt_broker.mqtt import (
    MQTT_5,
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    MalformedPacket,
    MQTTError,
    SubAck,
    Subscribe,
    SubscriptionRequest,
    encode_bytes,
)
from mcloudtt_broker.mqtt.properties import EMPTY_PROPERTIES, Properties, decode_properties

from ..records import Record

if TYPE_CHECKING:
    from ..pipeline import Pipeline

log = logging.getLogger("mcloudtt.adapter.mqtt")

_PINGREQ = b"\xc0\x00"


def properties_json(props: Properties) -> str | None:
    """The message properties of a PUBLISH as a JSON object (None when there are none)."""
    if props is EMPTY_PROPERTIES:
        return None
    out: dict[str, Any] = {}
    if props.payload_format_indicator is not None:
        out["payload_format_indicator"] = props.payload_format_indicator
    if props.message_expiry_interval is not None:
        out["message_expiry_interval"] = props.message_expiry_interval
    if props.content_type is not None:
        out["content_type"] = props.content_type
    if props.response_topic is not None:
        out["response_topic"] = props.response_topic
    if props.correlation_data is not None:
        out["correlation_data_hex"] = props.correlation_data.hex()
    if props.user_properties:
        out["user_properties"] = [list(pair) for pair in props.user_properties]
    if props.subscription_identifiers:
        out["subscription_identifiers"] = list(props.subscription_identifiers)
    return orjson.dumps(out).decode() if out else None


class _Connection(asyncio.Protocol):
    def __init__(self, source: MqttSource, generation: int) -> None:
        self.source = source
        self.generation = generation
        self.decoder = Decoder(version=MQTT_5, max_packet_size=source.max_packet_size)
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[ConnAck] = asyncio.get_running_loop().create_future()
        self.suback: asyncio.Future[SubAck] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.last_pingresp = time.monotonic()
        self._partial: list[bytes] = []
        self._partial_len = 0
        self._need = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(f"connection lost: {exc}" if exc else "connection closed")
        for fut in (self.connack, self.suback):
            if not fut.done():
                fut.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        # PUBLISH frames are parsed inline (the hot path: topic, packet id, payload slice, and
        # the codec only for a non-empty property section); other packets go to the codec.
        if self._partial:
            self._partial.append(data)
            self._partial_len += len(data)
            if self._partial_len < self._need:
                return
            data = b"".join(self._partial)
            self._partial.clear()
            self._partial_len = 0
        source = self.source
        now_us = time.time_ns() // 1000
        records: list[Record] = []
        append = records.append
        generation = self.generation
        prefix = source.id_prefix
        broker_id = source.broker_id
        counter = source.counter
        pos = 0
        end = len(data)
        try:
            while pos < end:
                first = data[pos]
                if pos + 1 < end and data[pos + 1] < 0x80:
                    # Most IoT messages are small: a one-byte Remaining Length.
                    length = data[pos + 1]
                    i = pos + 2
                else:
                    i, length = self._remaining_length(data, pos, end)
                    if i < 0:
                        break
                stop = i + length
                if stop > end:
                    self._keep(data, pos, stop - pos)
                    break
                if first >> 4 == 3:
                    qos = (first >> 1) & 0x03
                    if stop - i < 3:
                        raise MalformedPacket("PUBLISH shorter than its fields")
                    j = i + 2 + ((data[i] << 8) | data[i + 1])
                    topic = data[i + 2 : j].decode()
                    packet_id = 0
                    if qos:
                        packet_id = (data[j] << 8) | data[j + 1]
                        j += 2
                    if j >= stop:
                        raise MalformedPacket("PUBLISH shorter than its fields")
                    if data[j] == 0:
                        props_json = None
                        j += 1
                    else:
                        props, j = decode_properties(data, j, stop, 3)
                        props_json = properties_json(props)
                    if j > stop or not topic:
                        raise MalformedPacket("PUBLISH shorter than its fields")
                    counter += 1
                    append(
                        Record(
                            source,
                            (generation, packet_id) if qos else None,
                            f"{prefix}{counter}",
                            topic,
                            data[j:stop],
                            qos,
                            bool(first & 0x01),
                            now_us,
                            broker_id,
                            None,
                            props_json,
                        )
                    )
                else:
                    self._control(first >> 4, first & 0x0F, data, i, stop)
                pos = stop
        except (MQTTError, UnicodeDecodeError, IndexError) as error:
            log.error("protocol error from broker: %s", error)
            if self.transport is not None:
                self.transport.close()
        source.counter = counter
        if records:
            source.pipeline_submit(records, end)

    def _remaining_length(self, data: bytes, pos: int, end: int) -> tuple[int, int]:
        """(start of the variable header, remaining length), or (-1, 0) for a partial header."""
        i = pos + 1
        length = 0
        shift = 0
        while True:
            if i >= end:
                self._keep(data, pos, end - pos + 1)
                return -1, 0
            byte = data[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return i, length
            shift += 7
            if shift > 21:
                raise MalformedPacket("remaining length longer than four bytes")  # MQTT-1.5.5-1

    def _keep(self, data: bytes, pos: int, need: int) -> None:
        """Hold a partial frame until `need` bytes of it have arrived."""
        rest = data[pos:]
        self._partial = [rest]
        self._partial_len = len(rest)
        self._need = need

    def _control(self, ptype: int, flags: int, data: bytes, start: int, stop: int) -> None:
        packet = self.decoder.decode_frame(ptype, flags, data, start, stop)
        if isinstance(packet, ConnAck):
            if not self.connack.done():
                self.connack.set_result(packet)
        elif isinstance(packet, SubAck):
            if not self.suback.done():
                self.suback.set_result(packet)
        elif ptype == 13:
            self.last_pingresp = time.monotonic()
        elif isinstance(packet, Disconnect):
            log.warning("broker disconnected us: reason 0x%02x", packet.reason_code)
            if self.transport is not None:
                self.transport.close()


class MqttSource:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        topic_filter: str = "#",
        group: str | None = "mcloudtt-adapter",
        qos: int = 1,
        session_expiry: int = 86_400,
        keepalive: int = 30,
        receive_maximum: int = 65_535,
        username: str | None = None,
        password: str | None = None,
        broker_id: str | None = None,
        max_packet_size: int = 256 * 1024 * 1024,
        backoff_cap: float = 10.0,
    ) -> None:
        if qos not in (0, 1):
            raise ValueError("the adapter subscribes at QoS 0 or 1")
        self.name = "mqtt"
        self.host = host
        self.port = port
        self.client_id = client_id
        self.subscription = f"$share/{group}/{topic_filter}" if group else topic_filter
        self.qos = qos
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.receive_maximum = receive_maximum
        self.username = username
        self.password = password
        self.broker_id = broker_id
        self.max_packet_size = max_packet_size
        self.backoff_cap = backoff_cap
        self.id_prefix = f"{client_id}/{os.urandom(4).hex()}/"
        self.counter = 0
        self.generation = 0
        self.pipeline: Pipeline | None = None
        self._conn: _Connection | None = None
        self._paused = False
        self._stopping = False
        self._closing = asyncio.Event()
        self._connected = False
        self.connects = 0

    # ------------------------------------------------------------ Source protocol

    def attach(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def pipeline_submit(self, records: list[Record], nbytes: int | None = None) -> None:
        assert self.pipeline is not None
        self.pipeline.submit(records, nbytes)

    @property
    def connected(self) -> bool:
        return self._connected

    def pause(self) -> None:
        self._paused = True
        conn = self._conn
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            conn.transport.pause_reading()

    def resume(self) -> None:
        self._paused = False
        if self._stopping:
            return
        conn = self._conn
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            conn.last_pingresp = time.monotonic()  # PINGRESPs waited unread while paused
            conn.transport.resume_reading()

    def stop_receiving(self) -> None:
        self._stopping = True
        self.pause()

    def ack(self, tokens: list[Any]) -> None:
        conn = self._conn
        if conn is None or conn.transport is None or conn.transport.is_closing():
            return
        generation = conn.generation
        out = bytearray()
        for gen, packet_id in tokens:
            if gen == generation:
                # PUBACK, reason Success, no properties: two bytes of body (MQTT 5.0 3.4.2.1).
                out += b"\x40\x02"
                out += packet_id.to_bytes(2, "big")
        if out:
            conn.transport.write(bytes(out))

    async def close(self) -> None:
        """Say goodbye with DISCONNECT 0x00: the session (and its queue) stays at the broker."""
        self._stopping = True
        self._closing.set()
        conn = self._conn
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            conn.transport.write(encode_bytes(Disconnect(), MQTT_5))
            conn.transport.close()
        self._connected = False

    # ------------------------------------------------------------ connection loop

    async def run(self) -> None:
        backoff = Backoff(base=0.2, cap=self.backoff_cap)
        while not self._stopping:
            try:
                await self._session()
                backoff.reset()
            except (OSError, ConnectionError, TimeoutError) as error:
                log.warning("mqtt %s:%d: %s", self.host, self.port, error)
            except MQTTError as error:
                log.warning("mqtt %s:%d: protocol error %s", self.host, self.port, error)
            self._connected = False
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), backoff.next())

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        self.generation += 1
        generation = self.generation
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(self, generation), self.host, self.port),
            10.0,
        )
        self._conn = conn
        assert conn.transport is not None
        connect = Connect(
            client_id=self.client_id,
            protocol_level=MQTT_5,
            clean_start=False,
            keep_alive=self.keepalive,
            username=self.username,
            password=self.password.encode() if self.password is not None else None,
            properties=Properties(
                session_expiry_interval=self.session_expiry,
                receive_maximum=self.receive_maximum,
                maximum_packet_size=self.max_packet_size,
            ),
        )
        conn.transport.write(encode_bytes(connect, MQTT_5))
        try:
            connack = await asyncio.wait_for(conn.connack, 10.0)
            if connack.reason_code >= 0x80:
                raise ConnectionError(f"CONNACK refused with reason 0x{connack.reason_code:02x}")
            sub = Subscribe(
                packet_id=1,
                subscriptions=(
                    # Retain As Published: the retain column shows the publisher's flag.
                    SubscriptionRequest(
                        topic_filter=self.subscription, qos=self.qos, retain_as_published=True
                    ),
                ),
            )
            conn.transport.write(encode_bytes(sub, MQTT_5))
            suback = await asyncio.wait_for(conn.suback, 10.0)
            if not suback.reason_codes or suback.reason_codes[0] >= 0x80:
                raise ConnectionError(
                    f"SUBSCRIBE {self.subscription!r} refused: {suback.reason_codes}"
                )
            self.connects += 1
            self._connected = True
            log.info(
                "mqtt %s:%d connected as %r (session present: %s), subscribed %r",
                self.host,
                self.port,
                self.client_id,
                connack.session_present,
                self.subscription,
            )
            if self._paused:
                conn.transport.pause_reading()
            await self._keepalive(conn)
        finally:
            if conn.transport is not None and not self._stopping:
                conn.transport.close()

    async def _keepalive(self, conn: _Connection) -> None:
        interval = max(1.0, self.keepalive / 2) if self.keepalive else None
        while not conn.closed.done():
            try:
                reason = await asyncio.wait_for(asyncio.shield(conn.closed), interval)
            except TimeoutError:
                if conn.transport is not None and not conn.transport.is_closing():
                    conn.transport.write(_PINGREQ)
                stale = time.monotonic() - conn.last_pingresp > 3 * interval + 1  # type: ignore[operator]
                if interval and not self._paused and stale:
                    raise ConnectionError("no PINGRESP: broker unresponsive") from None
                continue
            if not self._stopping:
                raise ConnectionError(reason)
