"""MQTT over WebSocket at the frame level (RFC 6455, MQTT 5.0 section 6), with wsproto as the peer.

The client side is wsproto's own (a third-party implementation), so these tests check the
broker's handshake and framing against it, and a paho subscriber over TCP checks that the MQTT
bytes carried in odd frame layouts arrived whole.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from broker.clients import PahoClient, wait_until
from broker.mqttraw import (
    CONNACK,
    DISCONNECT,
    PINGRESP,
    PUBACK,
    SUBACK,
    Packet,
    connect,
    parse,
    pingreq,
    publish,
    subscribe,
)
from brokerproc import BrokerProcess, free_port
from mcloudtt_mqttclient import Reader
from paho.mqtt.enums import CallbackAPIVersion
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

TIMEOUT = 5.0
MAX_PACKET = 16_384  # the broker's limit here, small so that a flood past it is quick
PACKET_TOO_LARGE = 0x95


class WsClient:
    """A blocking WebSocket client on wsproto; MQTT bytes received collect in `stream`."""

    def __init__(self, port: int, subprotocols: tuple[str, ...] = ("mqtt",)) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.stream = Reader()  # the MQTT byte stream the binary frames carry
        self.events: deque[Event] = deque()
        self.eof = False
        request = Request(host="127.0.0.1", target="/mqtt", subprotocols=list(subprotocols))
        self.sock.sendall(self.ws.send(request))
        accept = self.next_event()
        assert isinstance(accept, AcceptConnection), accept
        self.subprotocol = accept.subprotocol

    def close(self) -> None:
        self.sock.close()

    def send(self, event: Event) -> None:
        self.sock.sendall(self.ws.send(event))

    def send_binary(self, data: bytes, *, fin: bool = True) -> None:
        """One binary frame; `fin=False` leaves the message open, so the next is a continuation."""
        self.send(BytesMessage(data=data, message_finished=fin))

    def _read(self) -> None:
        try:
            data = self.sock.recv(65_536)
        except TimeoutError:
            raise AssertionError("nothing from the broker in time") from None
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, BytesMessage):
                self.stream.feed(event.data)
            else:
                self.events.append(event)

    def next_event(self) -> Event:
        """The next event other than binary data."""
        while not self.events:
            assert not self.eof, "connection closed"
            self._read()
        return self.events.popleft()

    def mqtt_packet(self, version: int = 5) -> Packet:
        """The next whole MQTT packet of the byte stream, whatever frames it came in."""
        while True:
            frame = self.stream.next_frame()
            if frame is not None:
                return parse(*frame, version)
            assert not self.eof, f"connection closed; {self.stream.buffered} bytes unparsed"
            self._read()

    def wait_closed(self) -> list[Event]:
        """Read to the end of the TCP stream; the events that came before it."""
        while not self.eof:
            self._read()
        got = list(self.events)
        self.events.clear()
        return got


def _close_codes(events: list[Event]) -> list[int]:
    return [int(e.code) for e in events if isinstance(e, CloseConnection)]


@pytest.fixture
def uid(request: pytest.FixtureRequest) -> str:
    return "w" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]


@pytest.fixture(scope="module")
def ws_broker() -> Iterator[tuple[BrokerProcess, int]]:
    ws_port = free_port()
    broker = BrokerProcess(
        "--ws-bind", f"127.0.0.1:{ws_port}", "--max-packet-size", str(MAX_PACKET)
    ).start()
    yield broker, ws_port
    assert broker.proc is not None and broker.proc.poll() is None, "broker died"
    broker.stop()


@pytest.fixture
def ws(ws_broker: tuple[BrokerProcess, int]) -> Iterator[Callable[..., WsClient]]:
    made: list[WsClient] = []

    def make(**kw: Any) -> WsClient:
        c = WsClient(ws_broker[1], **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def subscriber(ws_broker: tuple[BrokerProcess, int]) -> Iterator[Callable[[str], PahoClient]]:
    made: list[PahoClient] = []

    def make(topic: str) -> PahoClient:
        c = PahoClient(ws_broker[0].port, version=5)
        c.subscribe(topic, 1)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


# -- handshake ---------------------------------------------------------------------------------


def test_subprotocol_mqtt_selected(ws):
    # MQTT-6.0.0-3 / MQTT-6.0.0-4: "mqtt" offered, and "mqtt" is what the server selects
    assert ws(subprotocols=("mqttv3.1", "mqtt")).subprotocol == "mqtt"
    assert ws(subprotocols=()).subprotocol is None  # lenient: a client that offers none


def test_mqtt31_client_offering_mqttv31_is_served(ws, uid):
    # MQTT 3.1 over WebSocket predates the "mqtt" name: such clients offer "mqttv3.1" alone.
    c = ws(subprotocols=("mqttv3.1",))
    assert c.subprotocol == "mqttv3.1"
    c.send_binary(connect(uid, version=3))  # protocol name MQIsdp, level 3
    ack = c.mqtt_packet(version=3)
    assert (ack.type, ack.code) == (CONNACK, 0)
    c.send_binary(subscribe(1, [(f"{uid}/w", 1)], version=3))
    assert c.mqtt_packet(version=3).codes == [1]


def _http(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send a raw request; the status line and everything else up to the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(4096):  # the broker closes after its answer
            reply += chunk
    status, _, rest = reply.partition(b"\r\n")
    return status, rest


GOOD = {
    b"Host": b"127.0.0.1",
    b"Upgrade": b"websocket",
    b"Connection": b"Upgrade",
    b"Sec-WebSocket-Key": b"dGhlIHNhbXBsZSBub25jZQ==",  # RFC 6455 section 1.3's example
    b"Sec-WebSocket-Version": b"13",
    b"Sec-WebSocket-Protocol": b"mqtt",
}


def _request(method: bytes = b"GET", version: bytes = b"1.1", **changes: bytes | None) -> bytes:
    headers = dict(GOOD)
    for name, value in changes.items():
        key = name.replace("_", "-").encode()
        if value is None:
            del headers[key]
        else:
            headers[key] = value
    lines = [method + b" /mqtt HTTP/" + version] + [k + b": " + v for k, v in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_good_handshake_is_accepted(ws_broker):
    status, rest = _http(ws_broker[1], _request() + b"\x88\x82\x00\x00\x00\x00\x03\xe8")
    assert status == b"HTTP/1.1 101 Switching Protocols"
    # RFC 6455 section 1.3: the accept value for the example key
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in rest
    assert b"Sec-WebSocket-Protocol: mqtt\r\n" in rest  # MQTT-6.0.0-4
    # The close frame sent right behind the request was read, and answered (code 1000)
    assert rest.endswith(b"\r\n\r\n\x88\x02\x03\xe8")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(_request(Sec_WebSocket_Key=None), 400, id="no-key"),
        pytest.param(_request(Sec_WebSocket_Key=b"c2hvcnQ="), 400, id="key-not-16-bytes"),
        pytest.param(_request(Sec_WebSocket_Version=None), 400, id="no-version"),
        pytest.param(_request(Upgrade=None), 400, id="no-upgrade"),
        pytest.param(_request(Upgrade=b"h2c"), 400, id="upgrade-not-websocket"),
        pytest.param(_request(Connection=b"keep-alive"), 400, id="connection-not-upgrade"),
        pytest.param(_request(method=b"POST"), 400, id="post"),
        pytest.param(_request(version=b"1.0"), 400, id="http-1.0"),
        pytest.param(_request(Sec_WebSocket_Protocol=b"wamp"), 400, id="no-mqtt-subprotocol"),
        pytest.param(b"GARBAGE\r\n\r\n", 400, id="not-http"),
        # headers that never end: buffered up to a bound (8 KiB), then refused
        pytest.param(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000, 431, id="headers-too-large"),
    ],
)
def test_bad_handshake_is_refused_and_closed(ws_broker, request_bytes, status):
    line, _ = _http(ws_broker[1], request_bytes)  # returns only once the broker has closed
    assert line.startswith(b"HTTP/1.1 %d " % status), line


def test_unfinished_handshake_closed_after_the_connect_timeout():
    ws_port = free_port()
    broker = BrokerProcess("--ws-bind", f"127.0.0.1:{ws_port}", "--connect-timeout", "1").start()
    try:
        with socket.create_connection(("127.0.0.1", ws_port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")  # and then nothing
            t0 = time.monotonic()
            assert sock.recv(100) == b""  # closed, not answered
            assert 0.8 <= time.monotonic() - t0 <= 3.0
    finally:
        broker.stop()


def test_unsupported_version_answered_with_the_supported_one(ws_broker):
    # RFC 6455 4.2.2 / 4.4: an error status ("such as 426") and the versions served
    line, rest = _http(ws_broker[1], _request(Sec_WebSocket_Version=b"8"))
    assert line.startswith(b"HTTP/1.1 426 ")
    assert b"sec-websocket-version: 13\r\n" in rest.lower()


def test_rejection_seen_by_a_real_client(ws_broker):
    # wsproto's client, offering only a sub-protocol the broker does not speak
    sock = socket.create_connection(("127.0.0.1", ws_broker[1]), timeout=TIMEOUT)
    with sock:
        client = WSConnection(ConnectionType.CLIENT)
        sock.sendall(client.send(Request(host="127.0.0.1", target="/", subprotocols=["wamp"])))
        client.receive_data(sock.recv(4096))
        event = next(client.events())
        assert isinstance(event, RejectConnection) and event.status_code == 400


# -- the byte stream ---------------------------------------------------------------------------


def test_packets_split_over_frames_and_frames_holding_several(ws, subscriber, uid):
    watcher = subscriber(f"{uid}/#")
    c = ws()
    # CONNECT in three frames of one message: binary (no FIN), continuation, continuation (FIN)
    hello = connect(uid, version=5)
    c.send_binary(hello[:3], fin=False)
    c.send_binary(hello[3:7], fin=False)
    c.send_binary(hello[7:])
    assert c.mqtt_packet().type == CONNACK  # MQTT-6.0.0-2
    # A QoS 1 PUBLISH split inside its fixed header, over two separate messages
    first = publish(f"{uid}/a", b"A" * 300, qos=1, packet_id=1)
    c.send_binary(first[:2])
    c.send_binary(first[2:])
    # Two PUBLISHes and a PINGREQ in one frame, the last PUBLISH cut and ended by the next frame
    second = publish(f"{uid}/b", b"B", qos=1, packet_id=2)
    third = publish(f"{uid}/c", b"C" * 5000, qos=1, packet_id=3)
    c.send_binary(second + pingreq() + third[:100], fin=False)
    c.send_binary(third[100:])
    replies = [c.mqtt_packet() for _ in range(4)]
    assert [(p.type, p.packet_id) for p in replies] == [
        (PUBACK, 1),
        (PUBACK, 2),
        (PINGRESP, 0),
        (PUBACK, 3),
    ]
    got = {m.topic: m.payload for m in watcher.get_n(3)}
    assert got == {f"{uid}/a": b"A" * 300, f"{uid}/b": b"B", f"{uid}/c": b"C" * 5000}


def test_frame_split_over_tcp_reads(ws, subscriber, uid):
    watcher = subscriber(f"{uid}/#")
    c = ws()
    c.send_binary(connect(uid, version=5))
    assert c.mqtt_packet().type == CONNACK
    frame = c.ws.send(BytesMessage(data=publish(f"{uid}/t", b"z" * 2000, qos=1, packet_id=7)))
    for cut in (1, 3, 9, 700):  # inside the header, the mask, the payload
        c.sock.sendall(frame[:cut])
        frame = frame[cut:]
        time.sleep(0.05)  # so that the broker reads the frame in parts (not a wait for a state)
    c.sock.sendall(frame)
    assert (c.mqtt_packet().type, watcher.get().payload) == (PUBACK, b"z" * 2000)


# -- bounds ------------------------------------------------------------------------------------


def test_fragment_flood_past_the_packet_limit_closes(ws, ws_broker, uid):
    broker, ws_port = ws_broker
    errors = broker.metric("mcloudtt_protocol_errors_total")
    c = ws()
    c.send_binary(connect(uid, version=5))
    assert c.mqtt_packet().type == CONNACK
    # One fragmented message that never ends, carrying a PUBLISH bigger than the broker takes:
    # the old framing buffered every fragment, waiting for a FIN that never comes.
    c.send_binary(bytes([0x30, 0xFF, 0xFF, 0xFF, 0x7F]), fin=False)  # PUBLISH of 268 MB
    try:
        for _ in range(8 * MAX_PACKET // 1024):
            c.send_binary(b"\x00" * 1024, fin=False)
    except OSError:  # the broker has hung up already
        pass
    c.wait_closed()
    assert broker.metric("mcloudtt_protocol_errors_total") == errors + 1
    _assert_serves_a_new_client(ws_port, uid)


def test_frame_announcing_an_endless_payload_closes(ws, ws_broker, uid):
    # A single frame header that announces 2**62 bytes: the payload goes on to the MQTT
    # decoder as it comes, which refuses the packet it starts; nothing waits for the frame's end.
    c = ws()
    c.send_binary(connect(uid, version=5))
    assert c.mqtt_packet().type == CONNACK
    header = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 1 << 62) + b"\x00\x00\x00\x00"
    start = bytes([0x30, 0xFF, 0xFF, 0xFF, 0x7F])  # PUBLISH of 268 MB (a zero mask: as is)
    c.sock.sendall(header + start + b"\x00" * 4096)
    disconnect = c.mqtt_packet()
    # 5.0 section 3.1.2.11.4 / 4.13: DISCONNECT 0x95 Packet too large, then the close
    assert (disconnect.type, disconnect.code) == (DISCONNECT, PACKET_TOO_LARGE)
    c.wait_closed()
    _assert_serves_a_new_client(ws_broker[1], uid)


def test_packet_at_the_limit_in_tiny_fragments_is_delivered(ws, subscriber, uid):
    # Bounded is not refused: a packet just under the limit in 64-byte frames goes through.
    watcher = subscriber(f"{uid}/#")
    c = ws()
    c.send_binary(connect(uid, version=5))
    assert c.mqtt_packet().type == CONNACK
    packet = publish(f"{uid}/big", b"p" * (MAX_PACKET - 64), qos=1, packet_id=9)
    assert len(packet) <= MAX_PACKET
    for at in range(0, len(packet), 64):
        c.send_binary(packet[at : at + 64], fin=at + 64 >= len(packet))
    assert c.mqtt_packet().type == PUBACK
    assert watcher.get().payload == b"p" * (MAX_PACKET - 64)


def test_subscriber_not_reading_is_backpressured(ws, ws_broker, uid):
    # The WebSocket link passes the socket's backpressure on to the MQTT connection: a
    # subscriber that stops reading is congested, and its QoS 0 messages are dropped.
    broker, _ = ws_broker
    before = broker.metric("mcloudtt_messages_dropped_total", reason="slow_consumer")
    c = ws()
    c.send_binary(connect(uid, version=5))
    assert c.mqtt_packet().type == CONNACK
    c.send_binary(subscribe(1, [(f"{uid}/flood", 0)]))
    assert c.mqtt_packet().type == SUBACK
    pub = PahoClient(broker.port, uid + "p")
    try:
        for _ in range(4000):  # 32 MB, more than the sockets' buffers hold
            pub.publish(f"{uid}/flood", b"f" * 8000)
        wait_until(
            lambda: (
                broker.metric("mcloudtt_messages_dropped_total", reason="slow_consumer") > before
            ),
            what="QoS 0 drops for the congested subscriber",
        )
    finally:
        pub.stop()


def _assert_serves_a_new_client(ws_port: int, uid: str) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=uid + "new", transport="websockets")
    client.connect("127.0.0.1", ws_port)
    client.loop_start()
    try:
        wait_until(client.is_connected, what="a new WebSocket client to connect")
    finally:
        client.disconnect()
        client.loop_stop()


# -- control frames ----------------------------------------------------------------------------


def test_ping_answered_with_pong_of_the_same_payload(ws, uid):
    c = ws()
    c.send(Ping(payload=b"are you there?"))
    assert c.next_event() == Pong(payload=b"are you there?")  # RFC 6455 5.5.3
    # Also in the middle of a fragmented message (RFC 6455 5.4), which then carries on
    hello = connect(uid, version=5)
    c.send_binary(hello[:5], fin=False)
    c.send(Ping(payload=b"\x00\x01"))
    c.send_binary(hello[5:])
    assert c.next_event() == Pong(payload=b"\x00\x01")
    assert c.mqtt_packet().type == CONNACK


def test_close_handshake_answered(ws, uid):
    c = ws()
    c.send_binary(connect(uid, version=5))
    assert c.mqtt_packet().type == CONNACK
    c.send(CloseConnection(code=1000, reason="bye"))
    assert _close_codes(c.wait_closed()) == [1000]  # RFC 6455 5.5.1: echoed, then TCP closed


def test_text_frame_closes_the_connection(ws, uid):
    c = ws()
    c.send_binary(connect(uid, version=5))
    assert c.mqtt_packet().type == CONNACK
    c.send(TextMessage(data="\x30\x05\x00\x01t"))  # a PUBLISH, but as text
    assert _close_codes(c.wait_closed()) == [1003]  # MQTT-6.0.0-1


def test_unmasked_client_frame_closes_the_connection(ws):
    c = ws()
    c.sock.sendall(b"\x82\x02\xc0\x00")  # RFC 6455 5.1: a client masks every frame
    assert _close_codes(c.wait_closed()) == [1002]


def test_server_close_is_a_close_frame(ws, uid):
    # The broker ending the MQTT connection (a second CONNECT is a protocol error) sends its
    # DISCONNECT as binary data and then a WebSocket close frame.
    c = ws()
    c.send_binary(connect(uid, version=5))
    assert c.mqtt_packet().type == CONNACK
    c.send_binary(connect(uid, version=5))
    assert c.mqtt_packet().type == DISCONNECT
    assert _close_codes(c.wait_closed()) == [1000]
