"""Real time: the device model paced on an asyncio loop against real brokers, and a verifier.

Each simulated device is a `DeviceRunner`: it pulls timed actions from its `DeviceModel` (the
same generator the virtual-time model runs), schedules the next one with `loop.call_at` at
`t0 + t / speedup`, and performs it over its own MQTT connection (packets from the client codec
`mcloudtt_mqttclient`; one `asyncio.Protocol` per connection, no task per message). Devices are spread over
the given brokers by index and over worker processes (`--processes`) by index; every process
rebuilds the same fleet from the scenario and seed, so the split changes nothing about what
each device does.

Every data message carries the device's per-topic sequence number and the wall-clock time it
was written (`payloads.encode_message`). A verifying subscriber (one per run on the first
broker, or one per broker with `--verify local`) subscribes to every stream's filter and counts,
per topic, messages delivered, duplicated (a sequence number seen before) and reordered (lower
than one already seen), and the end-to-end latency. After the devices stop, it waits for the
stragglers (`--drain`), then `lost` = messages written by devices - distinct ones delivered.

A graceful disconnect publishes the retained "offline" status and waits for its acks before
DISCONNECT. A drop (churn or a regional outage) abandons the socket without FIN or RST, so the
broker notices only by its keepalive timeout or the device's next CONNECT (takeover) and then
publishes the will. QoS 1/2 messages not acknowledged on the dead connection are sent again after
the reconnect (with DUP when the session survived), as a real device would: duplicates are
possible and counted; QoS 0 messages have no such second chance (losses are counted per QoS).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import random
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import mcloudtt_mqttclient as mqtt
import numpy as np

from .device import CONNECT, DISCONNECT, DROP, PUBLISH, DeviceModel
from .fleet import Fleet, Outage
from .payloads import PayloadGenerator, encode_message, make_generator
from .scenario import Scenario, load_scenario, topic_filter

__all__ = ["RunConfig", "run", "run_async"]

MAX_BACKLOG = 1000  # messages a device buffers while its connection is down
CLOSE_TIMEOUT = 5.0  # seconds a graceful disconnect waits for outstanding acks


@dataclass(kw_only=True)
class RunConfig:
    scenario: str  # name or path (workers load it again)
    devices: int
    seconds: float
    brokers: list[tuple[str, int]]
    processes: int = 1
    protocol: int = 4
    speedup: float = 1.0
    ramp: float = 2.0  # real seconds over which the devices online at the start connect
    qos: int | None = None  # override every stream's QoS
    verify: str = "cluster"  # cluster | local | none
    drain: float = 5.0
    start_tod: float = 12 * 3600.0
    outages: list[tuple[str, float, float]] = field(
        default_factory=list
    )  # region, start, duration (model s)
    seed: int | None = None
    progress: Callable[[dict[str, Any]], None] | None = None


def apply_qos(scenario: Scenario, qos: int | None) -> Scenario:
    if qos is None:
        return scenario
    classes = tuple(
        replace(c, streams=tuple(replace(s, qos=qos) for s in c.streams)) for c in scenario.classes
    )
    return replace(scenario, classes=classes)


def build_fleet(cfg: RunConfig) -> Fleet:
    scenario = apply_qos(load_scenario(cfg.scenario), cfg.qos)
    if cfg.seed is not None:
        scenario = replace(scenario, seed=cfg.seed)
    extra = [Outage(scenario.region_index(r), s, s + d) for r, s, d in cfg.outages]
    return Fleet(
        scenario,
        cfg.devices,
        horizon=cfg.seconds * cfg.speedup,
        start_tod=cfg.start_tod,
        extra_outages=extra,
    )


# --- devices -------------------------------------------------------------------------------------


class Stats:
    __slots__ = (
        "connect_failures",
        "connected",
        "connects",
        "disconnects",
        "drops",
        "lost_connections",
        "published",
        "resent",
        "sent",
        "sent_by_qos",
        "status_sent",
        "unsent",
    )

    def __init__(self) -> None:
        self.published = 0  # data messages the model produced
        self.sent = 0  # data messages written to a socket (first time)
        self.sent_by_qos = [0, 0, 0]
        self.unsent = 0  # produced but never written (backlog overflow or left at the end)
        self.resent = 0
        self.status_sent = 0
        self.connects = 0
        self.connected = 0
        self.connect_failures = 0
        self.disconnects = 0
        self.drops = 0
        self.lost_connections = 0  # closed by the broker or the network, not by the model

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


class _DeviceProtocol(asyncio.Protocol):
    __slots__ = ("device", "reader", "transport")

    def __init__(self, device: DeviceRunner) -> None:
        self.device = device
        self.reader = mqtt.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are no asyncio.Transport
        self.device.on_transport(self)

    def data_received(self, data: bytes) -> None:
        try:
            for ptype, flags, body in self.reader.frames(data):
                self.device.on_packet(self, ptype, flags, body)
        except mqtt.MalformedPacket:
            assert self.transport is not None
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.device.on_lost(self)


class DeviceRunner:
    """One device: its model's actions performed over a real MQTT connection."""

    def __init__(self, driver: Driver, model: DeviceModel, broker: tuple[str, int]) -> None:
        self.driver = driver
        self.model = model
        self.ident = model.identity
        self.cls = model.cls
        self.broker = broker
        self.version = driver.version
        self.actions = model.actions(driver.horizon, ramp=driver.ramp_model)
        self.topics = [t.encode() for t in self.ident.topics]
        self.qos = [s.qos for s in self.cls.streams]
        self.retain = [s.retain for s in self.cls.streams]
        self.gens: list[PayloadGenerator] = [
            make_generator(
                s.payload,
                random.Random(
                    f"{model.fleet.scenario.seed}/{self.cls.name}/{self.ident.n}/payload/{i}"
                ),
                model.fleet.scenario.regions[self.ident.region],
            )
            for i, s in enumerate(self.cls.streams)
        ]
        self.status = self.ident.status_topic.encode() if self.ident.status_topic else None
        self.proto: _DeviceProtocol | None = None
        self.ready = False  # CONNACK received
        self.want_online = False
        self.connecting = False
        self.closing = False
        self.inflight: dict[int, list[Any]] = {}  # pid -> [packet, qos, stage, is_status]
        self.backlog: list[tuple[int, bytes, int]] = []  # (stream, packet-less message, seq)
        self.next_pid = 0
        self.pending: tuple[float, int, int, int, bool] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.ping: asyncio.TimerHandle | None = None
        self.close_timer: asyncio.TimerHandle | None = None
        self.last_write = 0.0
        self.backoff = 0.5
        self.written: list[int] = [0] * len(self.topics)  # per stream: messages written (once each)

    # -- the model's clock ------------------------------------------------------------------------

    def start(self) -> None:
        self._schedule_next()

    def _schedule_next(self) -> None:
        a = next(self.actions, None)
        self.pending = a
        if a is None:
            self.timer = None
            return
        d = self.driver
        self.timer = d.loop.call_at(d.t0 + a[0] / d.speedup, self._fire)

    def _fire(self) -> None:
        a = self.pending
        assert a is not None
        t, kind, s, seq, first = a
        if kind == PUBLISH:
            self._publish(s, seq, first, t)
        elif kind == CONNECT:
            self.want_online = True
            self._connect()
        elif kind == DISCONNECT:
            self.want_online = False
            self._disconnect()
        elif kind == DROP:
            self.want_online = False
            self._drop()
        self._schedule_next()

    # -- actions --------------------------------------------------------------------------------

    def _alloc_pid(self) -> int:
        for _ in range(65535):
            self.next_pid = self.next_pid % 65535 + 1
            if self.next_pid not in self.inflight:
                return self.next_pid
        raise RuntimeError("no free packet id")

    def _publish(self, s: int, seq: int, first: bool, t: float) -> None:
        stats = self.driver.stats
        stats.published += 1
        gen = self.gens[s]
        if first and hasattr(gen, "new_burst"):
            gen.new_burst()
        now = time.time()
        payload = encode_message(
            self.ident.client_id,
            seq,
            now,
            now + self.model.clock_error(t),
            gen.fields(t),
            gen.pad_to,
        )
        if self.ready and self.proto is not None and not self.closing:
            self._write_data(s, payload, seq)
        elif len(self.backlog) < MAX_BACKLOG:
            self.backlog.append((s, payload, seq))
        else:
            stats.unsent += 1

    def _write_data(self, s: int, payload: bytes, seq: int) -> None:
        qos = self.qos[s]
        pid = self._alloc_pid() if qos else 0
        packet = mqtt.publish(
            self.topics[s],
            payload,
            version=self.version,
            qos=qos,
            retain=self.retain[s],
            packet_id=pid,
        )
        if qos:
            self.inflight[pid] = [packet, qos, 0, False]
        self._write(packet)
        self.written[s] += 1
        stats = self.driver.stats
        stats.sent += 1
        stats.sent_by_qos[qos] += 1

    def _write(self, data: bytes) -> None:
        assert self.proto is not None and self.proto.transport is not None
        self.proto.transport.write(data)
        self.last_write = self.driver.loop.time()

    def _status_message(self, state: str) -> bytes:
        return json.dumps(
            {"state": state, "ts": round(time.time(), 3)}, separators=(",", ":")
        ).encode()

    def _connect(self) -> None:
        if self.proto is not None or self.connecting:
            return  # connected, or still closing: on_lost reconnects
        self.connecting = True
        host, port = self.broker
        self.driver.spawn(self._open(host, port))

    async def _open(self, host: str, port: int) -> None:
        loop = self.driver.loop
        try:
            await loop.create_connection(lambda: _DeviceProtocol(self), host, port)
        except OSError:
            self.connecting = False
            self.driver.stats.connect_failures += 1
            self._retry()

    def _retry(self) -> None:
        if not self.want_online or self.driver.stopping:
            return
        delay = self.backoff * random.uniform(0.5, 1.0)
        self.backoff = min(self.backoff * 2, 10.0)
        self.driver.loop.call_later(delay, self._connect)

    def on_transport(self, proto: _DeviceProtocol) -> None:
        self.proto = proto
        will = None
        if self.status is not None:
            will = mqtt.Will(self.status, self._status_message("offline"), qos=1, retain=True)
        assert proto.transport is not None
        proto.transport.write(
            mqtt.connect(
                self.ident.client_id,
                version=self.version,
                keepalive=self.cls.keepalive,
                clean=self.cls.clean_session,
                will=will,
            )
        )

    def on_packet(self, proto: _DeviceProtocol, ptype: int, flags: int, body: bytes) -> None:
        if proto is not self.proto:
            return
        if ptype == mqtt.PUBACK or ptype == mqtt.PUBCOMP:
            self.inflight.pop(mqtt.packet_id(body), None)
            if self.closing and not self.inflight:
                self._finish_close()
        elif ptype == mqtt.PUBREC:
            pid = mqtt.packet_id(body)
            entry = self.inflight.get(pid)
            if entry is not None:
                entry[2] = 1
                entry[0] = mqtt.ack(mqtt.PUBREL, pid, version=self.version)
            self._write(mqtt.ack(mqtt.PUBREL, pid, version=self.version))
        elif ptype == mqtt.CONNACK:
            connack = mqtt.parse(ptype, flags, body, self.version)
            if connack.code != 0:
                self.driver.stats.connect_failures += 1
                assert proto.transport is not None
                proto.transport.close()
                return
            self._on_connack(connack.session_present)
        elif ptype == mqtt.PUBLISH:  # a command on a subscribed topic
            _t, _p, qos, _r, pid = mqtt.split_publish(flags, body, self.version)
            if qos == 1:
                self._write(mqtt.ack(mqtt.PUBACK, pid, version=self.version))
            elif qos == 2:
                self._write(mqtt.ack(mqtt.PUBREC, pid, version=self.version))
        elif ptype == mqtt.PUBREL:
            self._write(mqtt.ack(mqtt.PUBCOMP, mqtt.packet_id(body), version=self.version))

    def _on_connack(self, session_present: bool) -> None:
        d = self.driver
        self.ready = True
        self.connecting = False
        self.backoff = 0.5
        d.stats.connects += 1
        d.stats.connected += 1
        if self.cls.subscriptions and not session_present:
            pid = self._alloc_pid()
            self._write(
                mqtt.subscribe(
                    pid, [(f, 1) for f in self.ident.subscriptions], version=self.version
                )
            )
        # unacknowledged messages of the previous connection first (MQTT-4.4.0-1), in order
        for entry in self.inflight.values():
            packet, _qos, stage, _status = entry
            if stage == 0 and session_present:
                packet = mqtt.set_dup(packet)
            self._write(packet)
            d.stats.resent += 1
        if self.status is not None:
            self._publish_status(self.status, "online")
        backlog, self.backlog = self.backlog, []
        for s, payload, seq in backlog:
            self._write_data(s, payload, seq)
        if self.cls.keepalive:
            self._arm_ping()
        if not self.want_online:  # the model went offline while we were connecting
            self._disconnect()

    def _publish_status(self, topic: bytes, state: str) -> None:
        """The retained status message at QoS 1, tracked in flight like data."""
        pid = self._alloc_pid()
        packet = mqtt.publish(
            topic,
            self._status_message(state),
            version=self.version,
            qos=1,
            retain=True,
            packet_id=pid,
        )
        self.inflight[pid] = [packet, 1, 0, True]
        self._write(packet)
        self.driver.stats.status_sent += 1

    def _arm_ping(self) -> None:
        interval = self.cls.keepalive / 2.0
        self.ping = self.driver.loop.call_later(interval, self._on_ping)

    def _on_ping(self) -> None:
        self.ping = None
        if not self.ready or self.proto is None:
            return
        if self.driver.loop.time() - self.last_write >= self.cls.keepalive / 2.0 - 0.01:
            self._write(mqtt.PINGREQ_BYTES)
        self._arm_ping()

    def _disconnect(self) -> None:
        """A graceful end of session: retained "offline", then DISCONNECT once acked."""
        if self.proto is None or self.closing:
            return
        if not self.ready:
            return  # CONNACK pending: _on_connack sees want_online False and comes back
        self.closing = True
        self.driver.stats.disconnects += 1
        if self.status is not None:
            self._publish_status(self.status, "offline")
        if not self.inflight:
            self._finish_close()
        else:
            self.close_timer = self.driver.loop.call_later(CLOSE_TIMEOUT, self._finish_close)

    def _finish_close(self) -> None:
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        proto = self.proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            return
        self._write(mqtt.disconnect(version=self.version))
        proto.transport.close()

    def _drop(self) -> None:
        """The device or its network dies: no DISCONNECT, no FIN or RST. The socket is abandoned
        (never read or written again) so the broker finds out as it would in the field, by its
        keepalive timeout or by this device's next CONNECT taking over, and then sends the will."""
        proto = self.proto
        if proto is None or proto.transport is None:
            return
        d = self.driver
        d.stats.drops += 1
        if self.ready:
            d.stats.connected -= 1
        proto.transport.pause_reading()
        d.zombies.add(proto)
        self.proto = None
        self.ready = False
        self.connecting = False
        self.closing = False
        self._cancel_timers()
        self.inflight = {pid: e for pid, e in self.inflight.items() if not e[3]}

    def _cancel_timers(self) -> None:
        if self.ping is not None:
            self.ping.cancel()
            self.ping = None
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None

    def on_lost(self, proto: _DeviceProtocol) -> None:
        if proto is not self.proto:
            self.driver.zombies.discard(proto)
            return
        stats = self.driver.stats
        if self.ready:
            stats.connected -= 1
        if not self.closing:
            stats.lost_connections += 1
        self.proto = None
        self.ready = False
        self.connecting = False
        self.closing = False
        self._cancel_timers()
        # a status message is stale after the connection it described: resend data only
        self.inflight = {pid: e for pid, e in self.inflight.items() if not e[3]}
        if self.driver.stopping:
            self.driver.device_closed()
            return
        if self.want_online:
            self._retry()

    def stop(self) -> bool:
        """End of run: a graceful disconnect; True when a connection remains to be closed."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.want_online = False
        self.driver.stats.unsent += len(self.backlog)
        self.backlog = []
        if self.proto is None:
            return False
        if self.ready:
            self._disconnect()
        else:
            assert self.proto.transport is not None
            self.proto.transport.close()
        return True


class Driver:
    """The devices of one process."""

    def __init__(self, cfg: RunConfig, fleet: Fleet, indices: range | list[int]) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.version = cfg.protocol
        self.speedup = cfg.speedup
        self.horizon = fleet.horizon
        self.ramp_model = cfg.ramp * cfg.speedup
        self.stats = Stats()
        self.stopping = False
        self.loop = asyncio.get_running_loop()
        self.t0 = 0.0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.devices = [
            DeviceRunner(self, DeviceModel(fleet, i), cfg.brokers[i % len(cfg.brokers)])
            for i in indices
        ]
        self._open = 0
        self._closed = asyncio.Event()
        self.zombies: set[_DeviceProtocol] = set()  # connections abandoned by a drop

    def spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def start(self, t0_wall: float) -> None:
        self.t0 = self.loop.time() + (t0_wall - time.time())
        for d in self.devices:
            d.start()

    async def run_until_end(self) -> None:
        end = self.t0 + self.horizon / self.speedup
        await asyncio.sleep(max(0.0, end - self.loop.time()))
        await self.stop()

    async def stop(self) -> None:
        self.stopping = True
        self._open = sum(1 for d in self.devices if d.stop())
        if self._open:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), CLOSE_TIMEOUT + 2.0)
        for d in self.devices:  # still open after the timeout: abort
            if d.proto is not None and d.proto.transport is not None:
                d.proto.transport.abort()
        for z in list(self.zombies):
            if z.transport is not None:
                z.transport.abort()
        self.zombies.clear()
        for t in list(self.tasks):
            t.cancel()

    def device_closed(self) -> None:
        self._open -= 1
        if self._open <= 0:
            self._closed.set()

    def written(self) -> dict[str, tuple[int, int]]:
        """Per topic: (messages written, QoS)."""
        out = {}
        for d in self.devices:
            for s, n in enumerate(d.written):
                if n:
                    out[d.ident.topics[s]] = (n, d.qos[s])
        return out


# --- verification --------------------------------------------------------------------------------


class _Track:
    __slots__ = ("dups", "max_seq", "reordered", "seen", "unique")

    def __init__(self) -> None:
        self.seen = bytearray(64)
        self.unique = 0
        self.dups = 0
        self.reordered = 0
        self.max_seq = -1


class Verifier(asyncio.Protocol):
    """A subscriber that checks sequence numbers and measures latency."""

    def __init__(
        self, broker: tuple[str, int], filters: list[tuple[str, int]], version: int, name: str
    ) -> None:
        self.broker = broker
        self.filters = filters
        self.version = version
        self.name = name
        self.reader = mqtt.Reader()
        self.transport: asyncio.Transport | None = None
        self.tracks: dict[bytes, _Track] = {}
        self.latencies = array("d")  # ms
        self.sent_times = array("d")  # when each of those was sent (wall clock)
        self.received = 0
        self.retained_ignored = 0
        self.malformed = 0
        self.last_rx = 0.0
        self.ready: asyncio.Future[None] | None = None
        self.lost_connection = False

    async def start(self, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()
        host, port = self.broker
        await loop.create_connection(lambda: self, host, port)
        await asyncio.wait_for(self.ready, timeout)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are no asyncio.Transport
        self.transport.write(  # type: ignore[union-attr]
            mqtt.connect(self.name, version=self.version, keepalive=0, clean=True)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_connection = True
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ConnectionError(f"verifier connection to {self.broker} lost"))

    def data_received(self, data: bytes) -> None:
        now = time.time()
        write = self.transport.write  # type: ignore[union-attr]
        version = self.version
        for ptype, flags, body in self.reader.frames(data):
            if ptype == mqtt.PUBLISH:
                topic, payload, qos, retain, pid = mqtt.split_publish(flags, body, version)
                if qos == 1:
                    write(mqtt.ack(mqtt.PUBACK, pid, version=version))
                elif qos == 2:
                    write(mqtt.ack(mqtt.PUBREC, pid, version=version))
                self._on_message(topic, payload, retain, now)
            elif ptype == mqtt.PUBREL:
                write(mqtt.ack(mqtt.PUBCOMP, mqtt.packet_id(body), version=version))
            elif ptype == mqtt.CONNACK:
                rc = mqtt.parse(ptype, flags, body, version).code
                if rc != 0:
                    assert self.ready is not None
                    self.ready.set_exception(
                        ConnectionError(f"verifier refused by {self.broker}: code {rc}")
                    )
                    return
                write(mqtt.subscribe(1, self.filters, version=version))
            elif ptype == mqtt.SUBACK:
                codes = mqtt.parse(ptype, flags, body, version).codes
                assert self.ready is not None
                if any(c >= 0x80 for c in codes):
                    self.ready.set_exception(
                        ConnectionError(f"subscription refused by {self.broker}: {codes}")
                    )
                elif not self.ready.done():
                    self.ready.set_result(None)

    def _on_message(self, topic: bytes, payload: bytes, retain: bool, now: float) -> None:
        if retain:  # a retained message replayed on subscribe (MQTT-3.3.1-8), not live traffic
            self.retained_ignored += 1
            return
        try:
            head = payload.split(b",", 2)
            seq = int(head[0][7:])  # {"seq":N
            sent = float(head[1][7:])  # "sent":T
        except (ValueError, IndexError):
            self.malformed += 1
            return
        self.received += 1
        self.last_rx = now
        self.latencies.append((now - sent) * 1000.0)
        self.sent_times.append(sent)
        tr = self.tracks.get(topic)
        if tr is None:
            tr = self.tracks[topic] = _Track()
        seen = tr.seen
        if seq >= len(seen):
            seen.extend(bytes(max(seq + 1, 2 * len(seen)) - len(seen)))
        if seen[seq]:
            tr.dups += 1
            return
        seen[seq] = 1
        tr.unique += 1
        if seq < tr.max_seq:
            tr.reordered += 1
        else:
            tr.max_seq = seq

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(mqtt.disconnect(version=self.version))
            self.transport.close()


def _percentiles(
    lat: array[float], sent: array[float], steady_from: float
) -> dict[str, float | None]:
    """Latency percentiles of every message, and p50/p99 of those sent after the connect ramp
    (`steady_from`, wall clock): a fleet's first connect storm says little about steady state."""
    keys = (
        "latency_p50_ms",
        "latency_p90_ms",
        "latency_p99_ms",
        "latency_max_ms",
        "latency_steady_p50_ms",
        "latency_steady_p99_ms",
    )
    if not lat:
        return dict.fromkeys(keys)
    a = np.frombuffer(lat, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    steady = a[np.frombuffer(sent, dtype=np.float64) >= steady_from]
    s50, s99 = np.percentile(steady, [50, 99]) if len(steady) else (math.nan, math.nan)
    values = (p50, p90, p99, a.max(), s50, s99)
    return {k: (round(float(v), 3) if v == v else None) for k, v in zip(keys, values, strict=True)}


# --- processes -----------------------------------------------------------------------------------


def _worker_main(cfg: RunConfig, index: int, count: int, conn: Any) -> None:
    """A worker process: the devices whose index % count == index."""
    try:
        import uvloop

        runner: Callable[..., Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(_worker(cfg, index, count, conn))


async def _worker(cfg: RunConfig, index: int, count: int, conn: Any) -> None:
    loop = asyncio.get_running_loop()
    fleet = build_fleet(cfg)
    driver = Driver(cfg, fleet, range(index, fleet.devices, count))
    conn.send(("ready", index))
    got: asyncio.Future[Any] = loop.create_future()

    def on_message() -> None:
        if not got.done():
            got.set_result(conn.recv())

    loop.add_reader(conn.fileno(), on_message)
    msg = await got
    loop.remove_reader(conn.fileno())
    if msg[0] != "start":
        return
    driver.start(msg[1])
    runner = loop.create_task(driver.run_until_end())
    while not runner.done():
        await asyncio.wait([runner], timeout=0.5)
        conn.send(("stats", index, driver.stats.as_dict()))
    await runner
    conn.send(("done", index, driver.stats.as_dict(), driver.written()))
    conn.close()


def _merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in parts:
        for k, v in p.items():
            if k == "sent_by_qos":
                prev = out.get(k, [0, 0, 0])
                out[k] = [a + b for a, b in zip(prev, v, strict=True)]
            else:
                out[k] = out.get(k, 0) + v
    return out


async def run_async(cfg: RunConfig) -> dict[str, Any]:
    """Drive the brokers for `cfg.seconds`, verify, and return the summary."""
    if cfg.devices < 1 or cfg.seconds <= 0 or not cfg.brokers:
        raise ValueError("need devices >= 1, seconds > 0 and at least one broker")
    loop = asyncio.get_running_loop()
    fleet = build_fleet(cfg)
    began = time.time()
    # verifier(s) first, so that nothing is published before they listen
    filters: dict[str, int] = {}
    for _c, _s, _cls, stream in fleet.streams():
        f = topic_filter(stream.topic)
        filters[f] = max(filters.get(f, 0), stream.qos)
    verifiers: list[Verifier] = []
    if cfg.verify != "none":
        targets = cfg.brokers if cfg.verify == "local" else cfg.brokers[:1]
        for k, b in enumerate(targets):
            v = Verifier(
                b, sorted(filters.items()), cfg.protocol, f"mcloudtt-sim-verify-{os.getpid()}-{k}"
            )
            await v.start()
            verifiers.append(v)

    processes = max(1, cfg.processes)
    stats_parts: dict[int, dict[str, Any]] = {}
    written: dict[str, tuple[int, int]] = {}
    procs: list[Any] = []
    conns: list[Any] = []
    local: Driver | None = None
    started = time.time()
    if processes == 1:
        local = Driver(cfg, fleet, range(fleet.devices))
        t0_wall = time.time() + 0.2
        local.start(t0_wall)
        task = loop.create_task(local.run_until_end())
    else:
        ctx = multiprocessing.get_context("spawn")
        wcfg = replace(cfg, progress=None)
        for w in range(processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_worker_main,
                args=(wcfg, w, processes, child),
                name=f"mcloudtt-sim-{w}",
                daemon=True,
            )
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        for w, c in enumerate(conns):  # wait for every worker to have built its devices
            try:
                if not await loop.run_in_executor(None, c.poll, 120):
                    raise EOFError
                c.recv()
            except (EOFError, OSError):
                for p in procs:
                    p.kill()
                raise RuntimeError(
                    f"worker process {w} did not start (its error is above)"
                ) from None
        t0_wall = time.time() + 0.3
        for c in conns:
            c.send(("start", t0_wall))
        done: set[int] = set()
        finished = loop.create_future()

        def on_readable(i: int) -> None:
            c = conns[i]
            try:
                while c.poll():
                    msg = c.recv()
                    if msg[0] == "stats":
                        stats_parts[msg[1]] = msg[2]
                    elif msg[0] == "done":
                        stats_parts[msg[1]] = msg[2]
                        written.update(msg[3])
                        done.add(msg[1])
            except (EOFError, OSError):
                loop.remove_reader(c.fileno())
                done.add(i)
            if len(done) == len(conns) and not finished.done():
                finished.set_result(None)

        for i, c in enumerate(conns):
            loop.add_reader(c.fileno(), on_readable, i)
        task = finished  # type: ignore[assignment]

    def snapshot() -> dict[str, Any]:
        st = (
            local.stats.as_dict() if local is not None else _merge_stats(list(stats_parts.values()))
        )
        lat = [x for v in verifiers for x in v.latencies[-2000:]]
        p = np.percentile(lat, [50, 99]) if lat else (math.nan, math.nan)
        return {
            "elapsed": time.time() - t0_wall,
            "seconds": cfg.seconds,
            "received": sum(v.received for v in verifiers),
            "p50": float(p[0]),
            "p99": float(p[1]),
            **st,
        }

    while not task.done():
        await asyncio.wait([task], timeout=0.5)
        if cfg.progress is not None:
            cfg.progress(snapshot())
    if local is not None:
        await task
        written = local.written()
        stats = local.stats.as_dict()
    else:
        for c in conns:
            with contextlib.suppress(Exception):
                loop.remove_reader(c.fileno())
        stats = _merge_stats(list(stats_parts.values()))
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    publish_done = time.time()

    # drain: wait for the last deliveries
    expected = sum(n for n, _q in written.values())
    if verifiers:
        deadline = time.time() + cfg.drain
        while time.time() < deadline:
            got = sum(t.unique for v in verifiers for t in v.tracks.values())
            if got >= expected:
                break
            idle = time.time() - max(v.last_rx for v in verifiers)
            if idle > max(1.0, cfg.drain / 2) and got:
                break
            await asyncio.sleep(0.05)
        if cfg.progress is not None:
            cfg.progress(snapshot())
        for v in verifiers:
            v.close()
    result = _result(cfg, fleet, verifiers, written, stats, t0_wall)
    result["publish_seconds"] = round(publish_done - started, 3)
    result["wall_seconds"] = round(time.time() - began, 3)
    return result


def _result(
    cfg: RunConfig,
    fleet: Fleet,
    verifiers: list[Verifier],
    written: dict[str, tuple[int, int]],
    stats: dict[str, Any],
    t0_wall: float,
) -> dict[str, Any]:
    tracks: dict[bytes, _Track] = {}
    if cfg.verify == "local":
        own = [set() for _ in cfg.brokers]  # type: list[set[bytes]]
        for i in range(fleet.devices):
            ident = fleet.identity(i)
            own[i % len(cfg.brokers)].update(t.encode() for t in ident.topics)
        for k, v in enumerate(verifiers):
            for topic, tr in v.tracks.items():
                if topic in own[k]:
                    tracks[topic] = tr
    else:
        for v in verifiers:
            tracks.update(v.tracks)
    delivered = duplicates = reordered = 0
    lost_by_qos = [0, 0, 0]
    for name, (n, qos) in written.items():
        track = tracks.get(name.encode())
        uniq = min(track.unique, n) if track else 0
        lost_by_qos[qos] += n - uniq
    for tr in tracks.values():
        delivered += tr.unique
        duplicates += tr.dups
        reordered += tr.reordered
    lat: array[float] = array("d")
    sent_at: array[float] = array("d")
    for v in verifiers:
        lat.extend(v.latencies)
        sent_at.extend(v.sent_times)
    sent = int(stats.get("sent", 0))
    out: dict[str, Any] = {
        "scenario": fleet.scenario.name,
        "seed": fleet.scenario.seed,
        "devices": fleet.devices,
        "seconds": cfg.seconds,
        "speedup": cfg.speedup,
        "model_seconds": fleet.horizon,
        "brokers": [f"{h}:{p}" for h, p in cfg.brokers],
        "processes": max(1, cfg.processes),
        "protocol": "5.0" if cfg.protocol == 5 else "3.1.1",
        "verify": cfg.verify,
        "sent": sent,
        "sent_by_qos": {str(q): n for q, n in enumerate(stats.get("sent_by_qos", [0, 0, 0]))},
        "delivered": delivered if verifiers else None,
        "lost": sum(lost_by_qos) if verifiers else None,
        "lost_by_qos": {str(q): n for q, n in enumerate(lost_by_qos)} if verifiers else None,
        "duplicates": duplicates if verifiers else None,
        "reordered": reordered if verifiers else None,
        "mean_sent_msg_s": round(sent / cfg.seconds, 2),
        "published_by_model": stats.get("published", 0),
        "unsent": stats.get("unsent", 0),
        "resent": stats.get("resent", 0),
        "status_sent": stats.get("status_sent", 0),
        "connects": stats.get("connects", 0),
        "connect_failures": stats.get("connect_failures", 0),
        "disconnects": stats.get("disconnects", 0),
        "drops": stats.get("drops", 0),
        "lost_connections": stats.get("lost_connections", 0),
        "retained_replayed": sum(v.retained_ignored for v in verifiers),
        "malformed": sum(v.malformed for v in verifiers),
        "topics": len(written),
        **_percentiles(lat, sent_at, t0_wall + cfg.ramp + 1.0),
    }
    return out


def run(cfg: RunConfig) -> dict[str, Any]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_async(cfg))
    result: dict[str, Any] = uvloop.run(run_async(cfg))
    return result


def default_processes(devices: int) -> int:
    """One process up to 2,000 devices; beyond, one per ~4,000 devices, at most one per core."""
    if devices <= 2000:
        return 1
    return max(1, min(os.cpu_count() or 1, math.ceil(devices / 4000)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the mcloudtt-sim console script")
