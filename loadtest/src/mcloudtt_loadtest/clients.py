"""Raw `asyncio.Protocol` MQTT clients for the generator: no task per packet, pre-encoded writes.

One `Flow` holds the in-flight account of a fan-in: messages sent by the publishers minus those
the subscriber has received (minus those declared lost). Publishers write only while at most
`limit` messages are in flight, so each broker is measured at the rate it sustains rather than at
the rate its queues grow. Writing is driven by callbacks (subscriber reads, PUBACKs, resumed
transports), round-robin over the publishers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

from mcloudtt_mqttclient import (
    CONNACK,
    DISCONNECT_BYTES,
    MQTT_311,
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    SUBACK,
    ack,
    connect,
    packet_id,
    parse,
    publish,
    read_varint,
    subscribe,
)

QOS0_BLOB_PACKETS = 256
QOS1_WINDOW = 64
INFLIGHT_LIMIT = 2_000
PAYLOAD_SIZE = 100
# QoS 1 packet ids cycle through this many values; far more than a window, so an id comes round
# again only long after its PUBACK (MQTT-2.3.1-3 lets it be reused then).
_PID_CYCLE = 1024

# An acknowledgement is its first two bytes and the packet id: the hot loop copies the id after.
_PUBACK_HEAD = ack(PUBACK, 0, version=MQTT_311)[:2]
_PUBREC_HEAD = ack(PUBREC, 0, version=MQTT_311)[:2]


class BaseClient(asyncio.Protocol):
    """Frames the byte stream; counts PUBLISH and PUBACK packets inline, the rest via `_control`."""

    ack_publishes = True  # answer QoS 1 deliveries with PUBACK, QoS 2 with PUBREC
    record_latency = False  # read a send timestamp (ns, 8 bytes) at the start of each payload

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.connect_packet = b""
        self._buf = bytearray()
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[int] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._next_pid = 0
        self.paused = False
        self.publishes = 0  # PUBLISH packets received
        self.pubacks = 0  # PUBACK packets received
        self.latencies_ns: list[int] = []

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        if self.connect_packet:
            transport.write(self.connect_packet)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        futures: list[asyncio.Future[Any]] = [self.connack, *self._subacks.values()]
        for fut in futures:
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed by the broker"))
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.on_writable()

    def data_received(self, data: bytes) -> None:  # the hot path
        if self._buf:
            self._buf += data
            view: bytes | bytearray = self._buf
        else:
            view = data
        n = len(view)
        i = 0
        pubs = 0
        acks = 0
        out: bytearray | None = bytearray() if self.ack_publishes else None
        now = time.perf_counter_ns() if self.record_latency else 0
        if n >= 8 and not self.record_latency:
            i, pubs, acks = self._uniform_run(view, out)
        lat = self.latencies_ns
        while i + 1 < n:
            first = view[i]
            b = view[i + 1]
            if b < 0x80:
                start = i + 2
                end = start + b
            else:
                rl = read_varint(view, i + 1)
                if rl is None:
                    break
                start = rl[1]
                end = start + rl[0]
            if end > n:
                break
            kind = first >> 4
            if kind == 3:
                pubs += 1
                pos = start + 2 + ((view[start] << 8) | view[start + 1])
                if first & 0x06:  # QoS 1 or 2: a packet id follows the topic
                    if out is not None:
                        out += _PUBACK_HEAD if first & 0x02 else _PUBREC_HEAD
                        out += view[pos : pos + 2]
                    pos += 2
                if self.record_latency:
                    lat.append(now - int.from_bytes(view[pos : pos + 8], "big"))
            elif kind == 4:
                acks += 1
            else:
                if out and self.transport is not None:  # keep the replies in order
                    self.transport.write(out)
                    out = bytearray()
                self._control(kind, first & 0x0F, bytes(view[start:end]))
            i = end
        if view is self._buf:
            del self._buf[:i]
        elif i < n:
            self._buf = bytearray(view[i:])
        if out and self.transport is not None:
            self.transport.write(out)
        if pubs:
            self.publishes += pubs
            self.on_publishes(pubs)
        if acks:
            self.pubacks += acks
            self.on_pubacks(acks)

    @staticmethod
    def _uniform_run(view: bytes | bytearray, out: bytearray | None) -> tuple[int, int, int]:
        """Consume a leading run of identical-length PUBLISH or PUBACK packets with C-level
        slicing: (bytes consumed, publishes, pubacks).

        Exact, not a guess: the frame at 0 is `L = 2 + r` bytes long; if every `L`-th byte
        repeats its first byte and one-byte length `r`, each of those frames starts where the
        previous one ends, by induction.
        """
        first = view[0]
        r = view[1]
        kind = first >> 4
        if r >= 0x80 or kind not in (3, 4):
            return 0, 0, 0
        step = r + 2
        k = len(view) // step
        end = k * step
        if k < 2 or view[0:end:step].count(first) != k or view[1:end:step].count(r) != k:
            return 0, 0, 0
        if kind == 4:
            return end, 0, k
        if first & 0x06:
            # QoS 1/2: the packet id follows the topic, at one offset if all topics are as long.
            if view[2:end:step].count(view[2]) != k or view[3:end:step].count(view[3]) != k:
                return 0, 0, 0
            at = 4 + ((view[2] << 8) | view[3])
            if at + 2 > step:
                return 0, 0, 0
            if out is not None:
                acks = bytearray(4 * k)
                acks[0::4] = (b"\x40" if first & 0x02 else b"\x50") * k
                acks[1::4] = b"\x02" * k
                acks[2::4] = view[at:end:step]
                acks[3::4] = view[at + 1 : end : step]
                out += acks
        return end, k, 0

    # -- hooks

    def on_publishes(self, n: int) -> None:
        pass

    def on_pubacks(self, n: int) -> None:
        pass

    def on_writable(self) -> None:
        pass

    def _control(self, kind: int, flags: int, body: bytes) -> None:
        if kind == CONNACK and not self.connack.done():
            self.connack.set_result(parse(kind, flags, body, MQTT_311).code)
        elif kind == SUBACK:
            suback = parse(kind, flags, body, MQTT_311)
            fut = self._subacks.pop(suback.packet_id, None)
            if fut is not None and not fut.done():
                fut.set_result(suback.codes)
        elif kind == PUBREL and self.transport is not None:
            self.transport.write(ack(PUBCOMP, packet_id(body), version=MQTT_311))  # MQTT-4.3.3
        # PINGRESP and the rest: nothing to do for a load generator.

    # -- commands

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def subscribe(self, filters: list[tuple[str, int]]) -> asyncio.Future[list[int]]:
        self._next_pid = self._next_pid % 0xFFFF + 1
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._subacks[self._next_pid] = fut
        self.write(subscribe(self._next_pid, filters, version=MQTT_311))
        return fut

    def close(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.write(DISCONNECT_BYTES)
            self.transport.close()


async def open_client(
    factory: Callable[[], BaseClient],
    port: int,
    client_id: str,
    *,
    host: str = "127.0.0.1",
    keepalive: int = 60,
    timeout: float = 30.0,
) -> BaseClient:
    """A TCP connection with CONNECT sent and CONNACK (accepted) received."""
    loop = asyncio.get_running_loop()
    packet = connect(client_id, version=MQTT_311, keepalive=keepalive)

    def make() -> BaseClient:
        client = factory()
        client.connect_packet = packet  # written from connection_made: no extra loop turn
        return client

    transport: asyncio.Transport | None = None
    try:
        async with asyncio.timeout(timeout):
            transport, client = await loop.create_connection(make, host, port)
            code = await client.connack
    except BaseException as e:
        if transport is not None:
            transport.abort()
        if isinstance(e, TimeoutError):
            raise TimeoutError(f"{client_id}: no CONNACK within {timeout:g} s") from None
        raise
    if code != 0:
        transport.abort()
        raise ConnectionError(f"{client_id}: CONNACK return code {code}")
    return client


async def close_all(clients: Iterable[BaseClient], *, wait: float = 2.0) -> None:
    pending = []
    for c in clients:
        c.close()
        pending.append(c.closed)
    if pending:
        await asyncio.wait(pending, timeout=wait)


async def open_many(
    n: int,
    make: Callable[[int], Any],
    *,
    concurrency: int,
    deadline: float | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[list[Any], list[BaseException]]:
    """Run `make(i)` for i in range(n), `concurrency` at a time, until done or `deadline`
    (loop time). Returns what completed (in completion order) and the errors met."""
    done: list[Any] = []
    errors: list[BaseException] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            try:
                done.append(await make(i))
            except (TimeoutError, OSError, ConnectionError) as e:
                errors.append(e)
                if len(errors) > max(10, n // 100):
                    return
            if on_progress is not None:
                on_progress(len(done))

    loop = asyncio.get_running_loop()
    workers = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, n))]
    timeout = None if deadline is None else max(0.0, deadline - loop.time())
    _, pending = await asyncio.wait(workers, timeout=timeout)
    for w in pending:
        w.cancel()
    if pending:
        await asyncio.wait(pending)
    for w in workers:
        if not w.cancelled() and w.exception() is not None:
            raise w.exception()  # type: ignore[misc]
    return done, errors


# -- fan-in


class Flow:
    """In-flight account shared by the publishers and the subscriber of one fan-in."""

    def __init__(self, limit: int = INFLIGHT_LIMIT, *, stall_timeout: float = 2.0) -> None:
        self.limit = limit
        self.stall_timeout = stall_timeout
        self.sent = 0
        self.received = 0
        self.lost = 0
        self.running = False
        self.publishers: list[Publisher] = []
        self._rr = 0
        self.blocked = False
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def inflight(self) -> int:
        return self.sent - self.received - self.lost

    def start(self) -> None:
        self.running = True
        self._watchdog = asyncio.ensure_future(self._watch())
        self.pump()

    async def stop(self) -> None:
        self.running = False
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog

    def on_received(self, n: int) -> None:
        self.received += n
        if self.blocked and self.running and self.inflight <= self.limit:
            self.pump()

    def send(self, publisher: Publisher) -> None:
        """Let one publisher refill (its PUBACKs came, its transport drained)."""
        if not self.running:
            return
        if self.inflight > self.limit:
            self.blocked = True
            return
        self.sent += publisher.send_unit()

    def pump(self) -> None:
        """Write round-robin, one unit per publisher per turn, until the in-flight account
        closes the gate (`blocked`: the subscriber's reads reopen it) or no one can write."""
        pubs = self.publishers
        k = len(pubs)
        self.blocked = False
        while self.running:
            wrote = False
            for j in range(k):
                if self.inflight > self.limit:
                    self.blocked = True
                    return
                sent = pubs[(self._rr + j) % k].send_unit()
                if sent:
                    self.sent += sent
                    wrote = True
            self._rr = (self._rr + 1) % max(k, 1)
            if not wrote:
                return

    async def _watch(self) -> None:
        """Messages a broker dropped would hold the publishers back for ever: after a stall
        with nothing received, count what is in flight as lost and go on."""
        last = self.received
        since = time.monotonic()
        while self.running:
            await asyncio.sleep(0.1)
            if self.received != last or self.inflight <= 0:
                last = self.received
                since = time.monotonic()
            elif time.monotonic() - since > self.stall_timeout:
                self.lost += self.inflight
                since = time.monotonic()
                self.pump()


class Subscriber(BaseClient):
    def __init__(self, flow: Flow | None = None, *, latency: bool = False) -> None:
        super().__init__()
        self.flow = flow
        self.record_latency = latency

    def on_publishes(self, n: int) -> None:
        if self.flow is not None:
            self.flow.on_received(n)


class Publisher(BaseClient):
    def send_unit(self) -> int:
        raise NotImplementedError


def _publish_prefix(topic: str, qos: int, payload_size: int) -> bytes:
    """First byte, remaining length and topic of a PUBLISH whose payload is `payload_size` bytes:
    what comes before the packet id (QoS 1) or the payload (QoS 0)."""
    whole = publish(
        topic, bytes(payload_size), version=MQTT_311, qos=qos, packet_id=0 if qos else None
    )
    return whole[: len(whole) - payload_size - (2 if qos else 0)]


class QoS0Publisher(Publisher):
    """Writes one pre-encoded blob of `QOS0_BLOB_PACKETS` PUBLISH packets per unit."""

    def __init__(self, flow: Flow, topic: str, *, payload_size: int = PAYLOAD_SIZE) -> None:
        super().__init__()
        self.flow = flow
        packet = publish(topic, b"x" * payload_size, version=MQTT_311)
        self.blob = packet * QOS0_BLOB_PACKETS

    def send_unit(self) -> int:
        if self.paused or self.transport is None:
            return 0
        self.transport.write(self.blob)
        return QOS0_BLOB_PACKETS

    def on_writable(self) -> None:
        self.flow.send(self)


class QoS1Publisher(Publisher):
    """Keeps up to `window` PUBLISH packets unacknowledged; PUBACKs open the window again."""

    def __init__(
        self, flow: Flow, topic: str, *, window: int = QOS1_WINDOW, payload_size: int = PAYLOAD_SIZE
    ) -> None:
        super().__init__()
        self.flow = flow
        self.window = window
        prefix = _publish_prefix(topic, 1, payload_size)
        payload = b"x" * payload_size
        self.packets = [
            prefix + pid.to_bytes(2, "big") + payload for pid in range(1, _PID_CYCLE + 1)
        ]
        self._next = 0
        self.sent = 0

    @property
    def unacked(self) -> int:
        return self.sent - self.pubacks

    def send_unit(self) -> int:
        k = self.window - self.unacked
        if k <= 0 or self.paused or self.transport is None:
            return 0
        start = self._next
        stop = start + k
        if stop <= _PID_CYCLE:
            chunk = self.packets[start:stop]
        else:
            chunk = self.packets[start:] + self.packets[: stop - _PID_CYCLE]
        self._next = stop % _PID_CYCLE
        self.transport.write(b"".join(chunk))
        self.sent += k
        return k

    def on_pubacks(self, n: int) -> None:
        self.flow.send(self)

    def on_writable(self) -> None:
        self.flow.send(self)


class RetainedLoader(BaseClient):
    """Publishes a list of QoS 1 packets with a sliding window; `done` resolves at the last PUBACK."""

    def __init__(self, packets: list[bytes], *, window: int = QOS1_WINDOW) -> None:
        super().__init__()
        self.packets = packets
        self.window = window
        self.sent = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        self._fill()

    def _fill(self) -> None:
        k = min(self.window - (self.sent - self.pubacks), len(self.packets) - self.sent)
        if k > 0 and not self.paused:
            self.write(b"".join(self.packets[self.sent : self.sent + k]))
            self.sent += k

    def on_pubacks(self, n: int) -> None:
        if self.pubacks >= len(self.packets):
            if not self.done.done():
                self.done.set_result(None)
        else:
            self._fill()

    def on_writable(self) -> None:
        self._fill()


def retained_packets(n: int, *, payload_size: int = PAYLOAD_SIZE) -> list[bytes]:
    payload = b"r" * payload_size
    return [
        publish(
            f"devices/{i}/state",
            payload,
            version=MQTT_311,
            qos=1,
            packet_id=i % _PID_CYCLE + 1,
            retain=True,
        )
        for i in range(n)
    ]


class PacedPublisher(BaseClient):
    """QoS 0 at a fixed rate; each payload starts with its send time (perf_counter_ns)."""

    def __init__(self, topic: str, *, payload_size: int = PAYLOAD_SIZE) -> None:
        super().__init__()
        self.prefix = _publish_prefix(topic, 0, payload_size)
        self.pad = b"p" * (payload_size - 8)
        self.sent = 0

    async def run(self, rate: float, until: float) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / rate
        next_at = loop.time()
        while loop.time() < until and self.transport is not None:
            self.transport.write(self.prefix + time.perf_counter_ns().to_bytes(8, "big") + self.pad)
            self.sent += 1
            next_at += interval
            delay = next_at - loop.time()
            if delay < -0.05:  # fell far behind (a stall): keep the pace, drop the backlog
                next_at = loop.time()
                delay = 0.0
            await asyncio.sleep(max(delay, 0.0))
