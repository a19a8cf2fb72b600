"""Broker cores in one process: a fake clock, fake connections and an in-memory cluster bus.

The cores are driven through the same entry points the asyncio shell (`server.py`) uses:
`Broker.connect(link, now)` per accepted socket, `ServerConnection.receive_data(data, now)` per
chunk, `take_output()` when the link is kicked, `connection_lost(now)` when the socket ends and
`Broker.tick(now)` every TICK seconds. Time moves only when a test calls `advance`.

Test clients build and read packets with the independent client codec (via `tests/broker/mqttraw.py`),
not with the broker's, so that a codec bug cannot hide itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from broker.mqttraw import (
    CONNACK,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    UNSUBACK,
    Packet,
    Props,
)
from mcloudtt_broker.core.broker import Broker, BrokerSettings
from mcloudtt_broker.core.connection import CLOSED, ServerConnection
from mcloudtt_broker.core.memory_bus import MemoryBus, MemoryHub
from mcloudtt_mqttclient import Reader

from broker import mqttraw as raw

TICK = 0.25  # as often as server.py's _tick_forever calls Broker.tick


class FakeClock:
    """Monotonic time that stands still until the test moves it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class Cluster:
    """Cores named by broker id on one `MemoryHub`, sharing one `FakeClock`."""

    def __init__(
        self,
        broker_ids: Sequence[str] = ("a", "b"),
        *,
        clock: FakeClock | None = None,
        synchronous: bool = False,
        auto_pump: bool = True,
        **settings: Any,
    ) -> None:
        self.clock = clock or FakeClock()
        self.hub = MemoryHub(clock=self.clock, synchronous=synchronous)
        # After every client input the hub runs its queue, as the Redis bus flushes once per
        # loop iteration; with auto_pump=False a test decides when cluster traffic moves.
        self.auto_pump = auto_pump
        self.settings = settings
        self.cores: dict[str, Broker] = {}
        self.clients: list[Client] = []
        for broker_id in broker_ids:
            self.add_core(broker_id)

    def add_core(self, broker_id: str) -> Broker:
        # No $SYS by default: its retained statistics would cross the bus in every test.
        options: dict[str, Any] = {"sys_interval": 0, "sys_root": f"$SYS/brokers/{broker_id}"}
        settings = BrokerSettings(broker_id=broker_id, **{**options, **self.settings})
        bus = self.hub.bus(broker_id)
        core = Broker(settings, clock=self.clock, bus=bus)
        bus.attach(core)
        self.cores[broker_id] = core
        return core

    def bus(self, broker_id: str) -> MemoryBus:
        return self.hub.buses[broker_id]

    def client(self, broker_id: str, *, version: int = 5) -> Client:
        client = Client(self, self.cores[broker_id], version)
        self.clients.append(client)
        return client

    def pump(self) -> None:
        self.hub.pump()
        for client in self.clients:
            client.collect()

    def tick(self) -> None:
        for core in self.cores.values():
            core.tick(self.clock())
        self.pump()

    def advance(self, seconds: float, *, step: float = TICK) -> None:
        """Let `seconds` pass, ticking every core every `step` seconds as the shell does."""
        steps = max(1, math.ceil(seconds / step - 1e-9))
        for i in range(steps):
            self.clock.advance(min(step, seconds - i * step))
            self.tick()

    def deliveries_to(self, broker_id: str) -> list[str]:
        """Topics the hub delivered to `broker_id` (copies that crossed the bus)."""
        return [d.topic for d in self.hub.log if d.dest == broker_id]


class Client:
    """One client connection to one core: the shell's `Link`, and an MQTT client on top."""

    def __init__(self, cluster: Cluster, core: Broker, version: int) -> None:
        self.cluster = cluster
        self.core = core
        self.version = version
        self.kicks = 0
        self.closed = False
        self.reader = Reader()
        self.inbox: list[Packet] = []
        self._next_id = 0
        self.conn: ServerConnection = core.connect(self, cluster.clock())

    # Link ----------------------------------------------------------------------------------
    def kick(self) -> None:
        self.kicks += 1

    def close(self) -> None:
        self.closed = True

    # bytes ---------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.conn.receive_data(data, self.cluster.clock())
        if self.cluster.auto_pump:
            self.cluster.pump()
        else:
            self.collect()

    def collect(self) -> None:
        """Take what the core wrote for this client (what `MQTTProtocol.flush` does)."""
        data = self.conn.take_output() if self.conn.out else b""
        for frame in self.reader.frames(data):
            self.inbox.append(raw.parse(*frame, self.version))

    def drop(self) -> None:
        """The network connection ends without DISCONNECT (the shell's `connection_lost`)."""
        self.conn.connection_lost(self.cluster.clock())
        self.closed = True
        self.cluster.pump()

    @property
    def open(self) -> bool:
        return self.conn.state != CLOSED

    # packets -------------------------------------------------------------------------------
    def take(self, ptype: int | None = None) -> list[Packet]:
        """Packets received so far (of `ptype` only, if given), removed from the inbox."""
        self.collect()
        taken: list[Packet] = []
        kept: list[Packet] = []
        for p in self.inbox:
            (taken if ptype is None or p.type == ptype else kept).append(p)
        self.inbox = kept
        return taken

    def expect(self, ptype: int) -> Packet:
        packets = self.take(ptype)
        assert len(packets) == 1, f"expected one {raw.NAMES[ptype]}, got {packets}"
        return packets[0]

    def next_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def connect(self, client_id: str, **kw: Any) -> Packet:
        kw.setdefault("version", self.version)
        self.send(raw.connect(client_id, **kw))
        if not self.cluster.auto_pump:
            self.cluster.pump()  # CONNACK waits for the hub to locate the session
        return self.expect(CONNACK)

    def subscribe(self, *filters: str | tuple[str, int], props: Props | None = None) -> Packet:
        pid = self.next_id()
        pairs = [(f, 0) if isinstance(f, str) else f for f in filters]
        self.send(raw.subscribe(pid, pairs, version=self.version, props=props))
        ack = self.expect(SUBACK)
        assert ack.packet_id == pid
        return ack

    def unsubscribe(self, *filters: str) -> Packet:
        pid = self.next_id()
        self.send(raw.unsubscribe(pid, filters, version=self.version))
        return self.expect(UNSUBACK)

    def publish(
        self,
        topic: str,
        payload: bytes = b"",
        *,
        qos: int = 0,
        retain: bool = False,
        props: Props | None = None,
    ) -> None:
        """Publish and complete the flow (PUBACK, or PUBREC/PUBREL/PUBCOMP)."""
        pid = self.next_id() if qos else None
        self.send(
            raw.publish(
                topic,
                payload,
                version=self.version,
                qos=qos,
                retain=retain,
                packet_id=pid,
                props=props,
            )
        )
        if qos == 1:
            assert self.expect(PUBACK).packet_id == pid
        elif qos == 2:
            assert pid is not None and self.expect(PUBREC).packet_id == pid
            self.send(raw.ack(PUBREL, pid, version=self.version))
            assert self.expect(PUBCOMP).packet_id == pid

    def publishes(self, *, ack: bool = True) -> list[Packet]:
        """PUBLISH packets received so far; QoS 1/2 ones acknowledged (QoS 2 to PUBCOMP)."""
        got = self.take(PUBLISH)
        if ack:
            for p in got:
                self.ack(p)
        return got

    def ack(self, p: Packet) -> None:
        if p.qos == 1:
            self.send(raw.ack(PUBACK, p.packet_id, version=self.version))
        elif p.qos == 2:
            self.send(raw.ack(PUBREC, p.packet_id, version=self.version))
            rel = self.expect(PUBREL)
            assert rel.packet_id == p.packet_id
            self.send(raw.ack(PUBCOMP, p.packet_id, version=self.version))

    def payloads(self) -> list[bytes]:
        return [p.payload for p in self.publishes()]

    def pingreq(self) -> None:
        self.send(raw.pingreq())

    def disconnect(self, code: int = 0, props: Props | None = None) -> None:
        self.send(raw.disconnect(code, props, version=self.version))


def topics(packets: Iterable[Packet]) -> list[str]:
    return [p.topic for p in packets]
