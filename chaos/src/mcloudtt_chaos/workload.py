"""The workload that runs during every fault and writes every operation to the history.

Theory of operation. Every client is a real third-party MQTT client (paho-mqtt 2.x) driven by
its own thread: the thread connects, runs paho's `loop()` and, for a publisher, publishes on its
schedule from the same thread, so that a publish and the PUBACK that answers it are never raced.
The thread also owns reconnecting, because paho's own reconnect goes back to the same host: a
client that loses its broker waits a jittered, growing delay and connects to the *next* broker
(devices behind a load balancer), with the same client id and without a clean start.

What each client writes (see `history`): `Connect` once its CONNECT is on the wire, `ConnAck`
(session present), `Subscribed` per SUBACK, `Sent`/`Acked` per publish and PUBACK/PUBCOMP,
`Delivered` per PUBLISH received (which broker, DUP, retain, shared group), `Disconnect`
(normal only when the client itself sent DISCONNECT) and `WillPublished` as a watcher saw it.
`t` is `time.monotonic()` everywhere; writes are serialised by one lock.

Who runs (`WorkloadSpec`): QoS 1, QoS 2 and QoS 0 publishers, each on its own topic
`<prefix>/data/<publisher>`, on the first half of the brokers; persistent subscribers (3.1.1
with clean session off, 5.0 with a long session expiry) to `<prefix>/data/#` on the other
brokers; a `$share` group whose members sit on different brokers; will clients that connect
with a will on `<prefix>/will/<client>` and end each connection either with DISCONNECT or by
the workload shutting their socket (abnormal: the will is due, MQTT-3.1.2-8); will watchers
subscribed to `<prefix>/will/#`; and a few retained messages on `<prefix>/retained/<i>`,
published once at start.

Honest rates: a publisher sends at `rate / publishers` per second on a fixed schedule (no
catching up after a stall), only while connected, and skips its turn while `window` of its
messages are unacknowledged, so a fault never builds an unbounded backlog; skipped turns are
counted (`counters_json()["throttled"]`). On a new connection paho resends what is still
unacknowledged; the workload writes those as `Sent(dup=True)` on the new broker.

Snapshots (`snapshot`): retained messages as each broker serves them, read with a fresh clean
client per broker subscribed to `#` (retain flag set, MQTT-3.3.1-6); the subscription table from
the broker's `/metrics` as one row, the number of distinct filters the broker routes for the
whole cluster (its own plus every peer's, `mcloudtt_cluster_local_filters` +
`mcloudtt_cluster_remote_filters`): equal on every broker once the filter tables converged. The
brokers expose no per-client subscription table, so this is a count, not a row-by-row compare.

A scenario uses it so::

    with HistoryWriter(path) as writer, Workload(backend.endpoints(), writer, spec) as load:
        load.start()                      # subscribers first, then retained, then publishers
        time.sleep(warmup)
        load.fault_start("broker-kill", "b1"); backend.kill_broker("b1"); load.fault_end(...)
        time.sleep(seconds)
        load.stop_publishing()
        drained = load.drain(30.0)        # False: something acknowledged never arrived
        load.snapshot()                   # after healing: retained + filter count per broker
    report = checker.check(read_history(path))

`clients_on(broker)` says who a fault would hit, `drop(name)` cuts one client without
DISCONNECT, `hold_reconnects(s)` keeps clients that lose their broker away for a while,
`counters_json()` and `publish_rate_series()` feed progress displays.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import random
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .backend import Endpoint
from .history import (
    Acked,
    ConnAck,
    Connect,
    Delivered,
    Disconnect,
    FaultEnd,
    FaultStart,
    Record,
    Sent,
    Snapshot,
    Subscribed,
    WillPublished,
    decode_payload,
    encode_payload,
)
from .procs import scrape

# A publisher behind its schedule by less than this catches up, at most MAX_BURST at a time.
CATCH_UP_S = 0.2
MAX_BURST = 8


class RecordSink(Protocol):
    def write(self, record: Record) -> None: ...


@dataclass(frozen=True, kw_only=True)
class WorkloadSpec:
    """What runs; the caller decides for how long (between `start` and `stop_publishing`)."""

    rate: float = 200.0  # publishes per second, all publishers together (an equal share each)
    qos1_publishers: int = 2
    qos2_publishers: int = 2
    qos0_publishers: int = 1  # its losses are counted, not judged
    subscribers_v311: int = 1  # persistent sessions (clean session off)
    subscribers_v5: int = 1  # persistent sessions (session expiry `session_expiry`)
    shared_members: int = 2  # members of one `$share/<shared_group>/...` group
    shared_group: str = "chaos"
    will_clients: int = 2
    will_watchers: int = 1
    retained_topics: int = 3
    seed: int = 0  # each client's generator (hold times, backoff jitter) is seeded from it
    topic_prefix: str = "chaos"
    client_prefix: str | None = None  # None: a fresh one per run (no stale sessions)
    session_expiry: int = 3600  # seconds, MQTT 5 sessions
    keepalive: int = 5
    window: int = 100  # unacknowledged messages a publisher allows itself
    payload_size: int = 0
    connect_timeout: float = 5.0  # no CONNACK by then: drop the connection, try elsewhere
    backoff_base: float = 0.05
    backoff_cap: float = 2.0
    will_hold_s: tuple[float, float] = (0.5, 1.5)  # how long a will client stays connected
    reconnect: str = "next"  # after a loss: "next" broker in turn, or "random" other one


class _Backoff:
    """Capped doubling delay, each drawn from [ceiling / 2, ceiling] (the broker's own
    `Backoff` is not a dependency of the chaos package): clients that lost the same broker do
    not return in step, and each still waits a little."""

    def __init__(self, base: float, cap: float, rng: random.Random) -> None:
        self.base, self.cap, self.rng = base, cap, rng
        self.ceiling = base

    def next(self) -> float:
        top = self.ceiling
        self.ceiling = min(self.cap, top * 2)
        return self.rng.uniform(top / 2, top)

    def reset(self) -> None:
        self.ceiling = self.base


@dataclass
class Counters:
    sent: int = 0
    acked: int = 0
    delivered: int = 0
    throttled: int = 0
    connects: int = 0
    disconnects: int = 0
    wills: int = 0


def _rc_value(rc: ReasonCode | int) -> int:
    return rc.value if isinstance(rc, ReasonCode) else int(rc)


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


class _Client:
    """One MQTT client and the thread that drives it."""

    # How long paho's loop() may block: how late `tick` can run (a publisher's pacing).
    loop_timeout = 0.05

    def __init__(
        self,
        workload: Workload,
        name: str,
        home: int,
        *,
        protocol: int = 4,
        persistent: bool = True,
    ) -> None:
        self.w = workload
        self.name = name
        self.home = home
        self.protocol = protocol
        self.persistent = persistent
        self.conn = 0
        self.broker = ""
        self.broker_index = home
        self.connected = threading.Event()
        self.ever_connected = False
        self.subscribed = threading.Event()
        self.stopping = threading.Event()
        self._drop_requested = threading.Event()  # set by other threads, acted on by ours
        self._ended = True  # the current connection's Disconnect is written
        self._closing_normally = False
        self.rng = random.Random(f"{workload.spec.seed}/{name}")
        self.backoff = _Backoff(workload.spec.backoff_base, workload.spec.backoff_cap, self.rng)
        version = paho.MQTTv5 if protocol == 5 else paho.MQTTv311
        kwargs: dict[str, Any] = {}
        if protocol != 5:
            kwargs["clean_session"] = not persistent
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=name, protocol=version, **kwargs
        )
        # A broker behind a black hole must not hold the thread in connect() for minutes.
        self.client.connect_timeout = workload.spec.connect_timeout
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.thread = threading.Thread(target=self._run, name=f"workload-{name}", daemon=True)
        self._sub_mids: dict[int, tuple[str, str | None]] = {}
        self.first_suback: float | None = None

    # ---------------------------------------------------------------- what subclasses add
    def filters(self) -> list[tuple[str, str | None]]:
        """(filter, shared group) pairs to subscribe to when the session is new."""
        return []

    def before_connect(self) -> None:
        """Set up the next connection (a will carries its connection number)."""

    def tick(self, now: float) -> None:
        """Work between two `loop()` calls while connected."""

    def on_connected(self, session_present: bool) -> None:
        pass

    def handle_message(self, message: paho.MQTTMessage, now: float) -> None:
        pass

    def handle_published(self, mid: int, reason: int, now: float) -> None:
        pass

    # ---------------------------------------------------------------- the thread
    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            if not self._connect():
                self.stopping.wait(self.backoff.next())
                continue
            deadline = time.monotonic() + self.w.spec.connect_timeout
            while not self.stopping.is_set():
                rc = self.client.loop(timeout=self.loop_timeout)
                now = time.monotonic()
                if rc != paho.MQTT_ERR_SUCCESS:
                    break
                if self._drop_requested.is_set():
                    self._drop_requested.clear()
                    self._drop("dropped on request")
                elif self.connected.is_set():
                    self.tick(now)
                elif now > deadline:  # a broker that takes TCP but never answers CONNECT
                    self._drop("no CONNACK")
                    break
            if self.stopping.is_set():
                break  # `_finish` ends the connection with DISCONNECT
            self.connected.clear()
            self._lost("connection lost")
            delay = max(self.backoff.next(), self.w.reconnect_hold - time.monotonic())
            self.stopping.wait(delay)
            self._next_broker()
        self._finish()

    def request_drop(self) -> None:
        """End the current connection abnormally (socket shut, no DISCONNECT), from any
        thread: the client's own thread does it and then reconnects as after any loss."""
        self._drop_requested.set()

    def _next_broker(self) -> None:
        """Where to try next: devices behind a load balancer land on any broker."""
        n = len(self.w.endpoints)
        if self.w.spec.reconnect == "random" and n > 1:
            self.broker_index = self.rng.choice([i for i in range(n) if i != self.broker_index])
        else:
            self.broker_index = (self.broker_index + 1) % n

    def _connect(self) -> bool:
        endpoint = self.w.endpoints[self.broker_index]
        self.before_connect()
        clean = not self.persistent or not self.ever_connected
        props = None
        kwargs: dict[str, Any] = {}
        if self.protocol == 5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if self.persistent:
                props.SessionExpiryInterval = self.w.spec.session_expiry
            kwargs["clean_start"] = clean
            kwargs["properties"] = props
        try:
            self.client.connect(
                endpoint.host, endpoint.mqtt_port, keepalive=self.w.spec.keepalive, **kwargs
            )
        except OSError:  # refused, unreachable, timed out: the next broker
            self._next_broker()
            return False
        self.conn += 1
        self.broker = endpoint.name
        self._ended = False
        self._closing_normally = False
        self._record_connection(
            Connect,
            broker=self.broker,
            clean_start=clean if self.protocol == 5 else not self.persistent,
            protocol=self.protocol,
            will_topic=self.will_topic(),
        )
        return True

    def _record_connection(
        self, record: type[Connect | ConnAck | Disconnect], **fields: Any
    ) -> None:
        """A record of this client's current connection: now, its name and number filled in."""
        self.w.record(record(t=time.monotonic(), client=self.name, conn=self.conn, **fields))

    def will_topic(self) -> str | None:
        return None

    def _drop(self, reason: str) -> None:
        """End the connection abnormally: the socket shut, no DISCONNECT (a will is due)."""
        self._lost(reason)
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                # paho types it as a SocketLike; on TCP it is a socket.socket.
                sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
        # paho notices the dead socket in its next loop() and calls on_disconnect.

    def _lost(self, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        self.connected.clear()
        self._record_connection(Disconnect, normal=False, reason=reason)

    def _finish(self) -> None:
        if not self._ended:
            if self.connected.is_set():
                self.disconnect_normally()
            else:  # stopped while waiting for a CONNACK
                self._lost("stopped before CONNACK")
        self.connected.clear()

    def disconnect_normally(self) -> None:
        self._ended = True
        self._closing_normally = True
        self._record_connection(Disconnect, normal=True, reason="DISCONNECT")
        self.client.disconnect()
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            if self.client.loop(timeout=0.01) != paho.MQTT_ERR_SUCCESS:
                break
        self.connected.clear()

    # ---------------------------------------------------------------- paho callbacks
    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        rc = _rc_value(reason)
        present = bool(getattr(flags, "session_present", False))
        self._record_connection(
            ConnAck, broker=self.broker, session_present=present, reason_code=rc
        )
        if rc != 0:
            return  # the broker closes the connection after a refusing CONNACK
        self.backoff.reset()
        self.ever_connected = True
        if not present:
            for topic_filter, group in self.filters():
                wire = f"$share/{group}/{topic_filter}" if group else topic_filter
                _, mid = self.client.subscribe(wire, qos=2)
                if mid is not None:
                    self._sub_mids[mid] = (topic_filter, group)
            if not self.filters():
                self.subscribed.set()
        else:
            self.subscribed.set()
        self.on_connected(present)
        self.connected.set()

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, codes: list[ReasonCode], props: Any
    ) -> None:
        now = time.monotonic()
        wanted = self._sub_mids.pop(mid, None)
        if wanted is None:
            return
        topic_filter, group = wanted
        for code in codes:
            value = _rc_value(code)
            if value < 0x80:
                if self.first_suback is None:
                    self.first_suback = now
                self.w.record(
                    Subscribed(t=now, client=self.name, filter=topic_filter, qos=value, group=group)
                )
        if not self._sub_mids:
            self.subscribed.set()

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if not self._closing_normally:
            self._lost(f"lost: {reason}")

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self.handle_message(message, time.monotonic())

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        self.handle_published(mid, _rc_value(reason), time.monotonic())


class _Subscriber(_Client):
    def __init__(
        self, workload: Workload, name: str, home: int, *, protocol: int, group: str | None = None
    ) -> None:
        super().__init__(workload, name, home, protocol=protocol)
        self.group = group

    def filters(self) -> list[tuple[str, str | None]]:
        return [(f"{self.w.spec.topic_prefix}/data/#", self.group)]

    def handle_message(self, message: paho.MQTTMessage, now: float) -> None:
        try:
            publisher, seq, _ = decode_payload(bytes(message.payload))
        except (ValueError, KeyError, TypeError):
            return
        self.w.note_received(self, publisher, seq)
        self.w.record(
            Delivered(
                t=now,
                subscriber=self.name,
                broker=self.broker,
                topic=message.topic,
                qos=message.qos,
                publisher=publisher,
                seq=seq,
                dup=bool(message.dup),
                retain=bool(message.retain),
                group=self.group,
            )
        )


class _Watcher(_Client):
    def __init__(self, workload: Workload, name: str, home: int) -> None:
        super().__init__(workload, name, home, protocol=4)
        self.seen: set[tuple[str, int]] = set()

    def filters(self) -> list[tuple[str, str | None]]:
        return [(f"{self.w.spec.topic_prefix}/will/#", None)]

    def handle_message(self, message: paho.MQTTMessage, now: float) -> None:
        try:
            data = json.loads(message.payload)
            client, conn = str(data["c"]), int(data["n"])
        except (ValueError, KeyError, TypeError):
            return
        self.seen.add((client, conn))
        self.w.record(
            WillPublished(
                t=now,
                watcher=self.name,
                client=client,
                conn=conn,
                broker=self.broker,
                watcher_conn=self.conn,
                dup=bool(message.dup),
            )
        )


class _WillClient(_Client):
    """Connects with a will, holds the connection a while, then ends it one way or the other."""

    loop_timeout = 0.02

    def __init__(self, workload: Workload, name: str, home: int, index: int) -> None:
        super().__init__(workload, name, home, protocol=4, persistent=False)
        self.index = index
        self.cycle = 0
        self.end_at = 0.0
        self.cycling = True
        self.abnormal: set[int] = set()  # accepted connections that ended without DISCONNECT
        self.accepted = 0  # the last connection the broker CONNACKed

    def will_topic(self) -> str | None:
        return f"{self.w.spec.topic_prefix}/will/{self.name}"

    def before_connect(self) -> None:
        payload = json.dumps({"c": self.name, "n": self.conn + 1}).encode()
        self.client.will_set(f"{self.w.spec.topic_prefix}/will/{self.name}", payload, qos=1)

    def on_connected(self, session_present: bool) -> None:
        self.end_at = time.monotonic() + self.rng.uniform(*self.w.spec.will_hold_s)
        self.accepted = self.conn

    def _lost(self, reason: str) -> None:
        # Killed by the workload or by a fault: its will is due (MQTT-3.1.2-8), if the broker
        # had accepted the connection.
        if not self._ended and self.accepted == self.conn:
            self.abnormal.add(self.conn)
        super()._lost(reason)

    def tick(self, now: float) -> None:
        if not self.cycling or now < self.end_at:
            return
        self.cycle += 1
        # Alternate, so a short run has both kinds; the offset varies which comes first.
        if (self.cycle + self.index) % 2:
            self._drop("socket closed by the workload")
        else:
            self.disconnect_normally()
            self.client.loop(timeout=0.01)  # paho's loop ends the connection: on_disconnect


class _Publisher(_Client):
    loop_timeout = 0.005

    def __init__(self, workload: Workload, name: str, home: int, qos: int, interval: float) -> None:
        super().__init__(workload, name, home, protocol=4)
        self.qos = qos
        self.topic = f"{workload.spec.topic_prefix}/data/{name}"
        self.interval = interval
        self.seq = 0
        self.next_at = 0.0
        self.publishing = threading.Event()
        self.publishing.set()
        self.pending: dict[int, int] = {}  # mid -> seq, not yet acknowledged
        self.sent_at: dict[int, float] = {}
        self.client.max_inflight_messages_set(workload.spec.window)
        self.client.max_queued_messages_set(0)

    def on_connected(self, session_present: bool) -> None:
        # paho resends every unacknowledged message on a new connection (QoS 1 with DUP,
        # MQTT-4.4.0-1): write them down as sent again, on this broker.
        now = time.monotonic()
        for seq in sorted(self.pending.values()):
            self.w.record(
                Sent(
                    t=now,
                    publisher=self.name,
                    topic=self.topic,
                    qos=self.qos,
                    seq=seq,
                    broker=self.broker,
                    dup=True,
                )
            )
        self.next_at = max(self.next_at, now)

    def tick(self, now: float) -> None:
        # A fixed schedule, kept up with across the jitter of the loop (a few turns at once),
        # but never caught up after a stall: a burst would not be the rate asked for.
        if now - self.next_at > CATCH_UP_S:
            self.next_at = now
        for _ in range(MAX_BURST):
            if not self.publishing.is_set() or now < self.next_at:
                return
            self.next_at += self.interval
            if len(self.pending) >= self.w.spec.window:
                self.w.count_throttled()
                continue
            self._publish_next(now)

    def _publish_next(self, now: float) -> None:
        self.seq += 1
        payload = encode_payload(self.name, self.seq, now, size=self.w.spec.payload_size)
        info = self.client.publish(self.topic, payload, qos=self.qos)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            self.seq -= 1
            return
        if self.qos > 0:  # QoS 0 has no acknowledgement to wait for
            self.pending[info.mid] = self.seq
            self.sent_at[self.seq] = now
        self.w.record(
            Sent(
                t=now,
                publisher=self.name,
                topic=self.topic,
                qos=self.qos,
                seq=self.seq,
                broker=self.broker,
            )
        )

    def handle_published(self, mid: int, reason: int, now: float) -> None:
        seq = self.pending.pop(mid, None)
        if seq is None:
            return
        if reason < 0x80:
            self.w.note_acked(self.name, seq, self.sent_at.get(seq, now))
        self.sent_at.pop(seq, None)
        self.w.record(Acked(t=now, publisher=self.name, seq=seq, reason_code=reason))


class Workload:
    """Start it, tell it about faults, stop publishing, drain, snapshot, stop."""

    def __init__(
        self, endpoints: Sequence[Endpoint], writer: RecordSink, spec: WorkloadSpec | None = None
    ) -> None:
        if not endpoints:
            raise ValueError("the workload needs at least one broker")
        self.endpoints = list(endpoints)
        self.writer = writer
        self.spec = spec or WorkloadSpec()
        self.counters = Counters()
        self.sent_times: list[float] = []
        self.ack_times: list[float] = []
        self.delivery_times: list[float] = []
        self._lock = threading.Lock()
        self._track = threading.Lock()
        self._received: dict[str, set[tuple[str, int]]] = defaultdict(set)
        self._awaited: dict[str, set[tuple[str, int]]] = defaultdict(set)
        self.group_party = f"$share/{self.spec.shared_group}"
        self.started_at: float | None = None
        # Clients that lose their broker do not reconnect before this time (a scenario that
        # wants them back only after the dead broker's presence expired).
        self.reconnect_hold = 0.0
        prefix = self.spec.client_prefix
        if prefix is None:
            prefix = f"w{self.spec.seed}-{random.Random().getrandbits(24):06x}-"
        self.prefix = prefix
        n = len(self.endpoints)
        # Publishers on the first half of the brokers, subscribers on the others, so that most
        # messages cross the cluster; with one broker everything shares it.
        pub_homes = list(range(max(1, (n + 1) // 2))) if n > 1 else [0]
        sub_homes = [i for i in range(n) if i not in pub_homes] or pub_homes
        spread = sub_homes + pub_homes
        levels = [
            *[1] * self.spec.qos1_publishers,
            *[2] * self.spec.qos2_publishers,
            *[0] * self.spec.qos0_publishers,
        ]
        interval = len(levels) / self.spec.rate if self.spec.rate > 0 else float("inf")
        self.publishers: list[_Publisher] = []
        numbers = Counter[int]()
        for i, qos in enumerate(levels):
            name = f"{prefix}pub-q{qos}-{numbers[qos]}"
            numbers[qos] += 1
            home = pub_homes[i % len(pub_homes)]
            self.publishers.append(_Publisher(self, name, home, qos, interval))
        self.subscribers: list[_Subscriber] = []
        homes = itertools.cycle(sub_homes)
        for i in range(self.spec.subscribers_v311):
            self.subscribers.append(
                _Subscriber(self, f"{prefix}sub311-{i}", next(homes), protocol=4)
            )
        for i in range(self.spec.subscribers_v5):
            self.subscribers.append(_Subscriber(self, f"{prefix}sub5-{i}", next(homes), protocol=5))
        self.shared: list[_Subscriber] = [
            _Subscriber(
                self,
                f"{prefix}shared-{i}",
                spread[i % len(spread)],
                protocol=5 if i % 2 else 4,
                group=self.spec.shared_group,
            )
            for i in range(self.spec.shared_members)
        ]
        self.watchers = [
            _Watcher(self, f"{prefix}watch-{i}", sub_homes[i % len(sub_homes)])
            for i in range(self.spec.will_watchers)
        ]
        self.will_clients = [
            _WillClient(self, f"{prefix}will-{i}", pub_homes[i % len(pub_homes)], i)
            for i in range(self.spec.will_clients)
        ]
        self.retained: dict[str, str] = {}  # topic -> digest of what was set

    # ---------------------------------------------------------------- the history
    def record(self, record: Record) -> None:
        """Write one record (from any client thread) and count it for the report."""
        with self._lock:
            self.writer.write(record)
            c = self.counters
            if isinstance(record, Sent):
                if not record.dup:
                    c.sent += 1
                    self.sent_times.append(record.t)
            elif isinstance(record, Acked):
                c.acked += 1
                self.ack_times.append(record.t)
            elif isinstance(record, Delivered):
                c.delivered += 1
                self.delivery_times.append(record.t)
            elif isinstance(record, Connect):
                c.connects += 1
            elif isinstance(record, Disconnect):
                c.disconnects += 1
            elif isinstance(record, WillPublished):
                c.wills += 1

    def count_throttled(self) -> None:
        with self._lock:
            self.counters.throttled += 1

    @property
    def clients(self) -> list[_Client]:
        return [
            *self.watchers,
            *self.subscribers,
            *self.shared,
            *self.will_clients,
            *self.publishers,
        ]

    def clients_on(self, broker: str) -> list[str]:
        """The clients connected to `broker` now (a fault's target: who holds sessions)."""
        return [c.name for c in self.clients if c.connected.is_set() and c.broker == broker]

    def client(self, name: str) -> _Client:
        return next(c for c in self.clients if c.name == name)

    def drop(self, name: str) -> None:
        """Cut one client's connection without DISCONNECT (it reconnects elsewhere)."""
        self.client(name).request_drop()

    def placement(self) -> dict[str, str]:
        """Each client's current (or last) broker."""
        return {c.name: c.broker or self.endpoints[c.home].name for c in self.clients}

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 15.0) -> None:
        """Subscribers and watchers first (until every SUBACK), then the retained messages, then
        the will clients and publishers."""
        self.started_at = time.monotonic()
        try:
            listeners = [*self.watchers, *self.subscribers, *self.shared]
            for c in listeners:
                c.start()
            deadline = time.monotonic() + timeout
            for c in listeners:
                if not c.subscribed.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{c.name} not subscribed within {timeout} s")
            self._set_retained(timeout)
            for c in [*self.will_clients, *self.publishers]:
                c.start()
            for c in self.publishers:
                if not c.connected.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{c.name} not connected within {timeout} s")
        except BaseException:
            self.stop()  # no client thread left behind
            raise

    def _set_retained(self, timeout: float) -> None:
        """Publish the retained messages (QoS 1, retain) from a short-lived client, on the
        first broker that takes the connection, and write them down like any publish."""
        if not self.spec.retained_topics:
            return
        name = f"{self.prefix}retainer"
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name)
        client.connect_timeout = self.spec.connect_timeout
        acks: list[tuple[int, float, int]] = []  # (mid, when, reason), from paho's thread

        def on_publish(c: Any, u: Any, mid: int, reason: ReasonCode, p: Any) -> None:
            acks.append((mid, time.monotonic(), _rc_value(reason)))

        client.on_publish = on_publish
        endpoint = self._connect_any(client)
        client.loop_start()
        try:
            seq_of: dict[int, int] = {}
            for i in range(self.spec.retained_topics):
                topic = f"{self.spec.topic_prefix}/retained/{i}"
                now = time.monotonic()
                payload = encode_payload(name, i + 1, now)
                sent = Sent(
                    t=now,
                    publisher=name,
                    topic=topic,
                    qos=1,
                    seq=i + 1,
                    broker=endpoint.name,
                    retain=True,
                )
                self.record(sent)
                seq_of[client.publish(topic, payload, qos=1, retain=True).mid] = i + 1
                self.retained[topic] = _digest(payload)
            end = time.monotonic() + timeout
            while len(acks) < len(seq_of) and time.monotonic() < end:
                time.sleep(0.01)
            for mid, when, reason in list(acks):
                if mid in seq_of:
                    self.record(Acked(t=when, publisher=name, seq=seq_of[mid], reason_code=reason))
        finally:
            client.disconnect()
            client.loop_stop()

    def _connect_any(self, client: paho.Client) -> Endpoint:
        error: OSError | None = None
        for endpoint in self.endpoints:
            try:
                client.connect(endpoint.host, endpoint.mqtt_port, keepalive=self.spec.keepalive)
                return endpoint
            except OSError as failed:
                error = failed
        raise ConnectionError(f"no broker took the connection: {error}")

    def hold_reconnects(self, seconds: float) -> None:
        """Clients that lose their connection from now on wait `seconds` before they
        reconnect (instead of their short backoff); `hold_reconnects(0)` lifts it."""
        self.reconnect_hold = time.monotonic() + seconds if seconds > 0 else 0.0

    def fault_start(self, name: str, target: str = "") -> None:
        self.record(FaultStart(t=time.monotonic(), fault=name, target=target))

    def fault_end(self, name: str, target: str = "") -> None:
        self.record(FaultEnd(t=time.monotonic(), fault=name, target=target))

    def stop_publishing(self) -> None:
        """No new publishes and no new will cycles; retransmissions and deliveries go on."""
        for p in self.publishers:
            p.publishing.clear()
        for c in self.will_clients:
            c.cycling = False

    # ---------------------------------------------------------------- what is still due
    def _parties(self) -> list[tuple[str, float]]:
        """Who expects every acknowledged message sent after its first SUBACK: each plain
        subscriber, and the shared group as one (any member may take a message)."""
        out = [(s.name, s.first_suback) for s in self.subscribers if s.first_suback is not None]
        members = [s.first_suback for s in self.shared if s.first_suback is not None]
        if members:
            out.append((self.group_party, min(members)))
        return out

    def note_acked(self, publisher: str, seq: int, sent_at: float) -> None:
        key = (publisher, seq)
        with self._track:
            for party, since in self._parties():
                if since < sent_at and key not in self._received[party]:
                    self._awaited[party].add(key)

    def note_received(self, subscriber: _Subscriber, publisher: str, seq: int) -> None:
        party = self.group_party if subscriber.group else subscriber.name
        key = (publisher, seq)
        with self._track:
            self._received[party].add(key)
            self._awaited[party].discard(key)

    def awaited(self) -> dict[str, int]:
        """Acknowledged messages each subscriber (the group as one) has not received yet."""
        with self._track:
            return {party: len(keys) for party, keys in self._awaited.items() if keys}

    def _undelivered(self) -> int:
        """Acknowledged QoS 1/2 messages still awaited, unacknowledged ones, unseen wills."""
        missing = sum(self.awaited().values())
        missing += sum(len(p.pending) for p in self.publishers)
        for c in self.will_clients:
            for conn in list(c.abnormal):
                for w in self.watchers:
                    if (c.name, conn) not in w.seen:
                        missing += 1
        return missing

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every subscriber received everything its publishers had acknowledged (and
        every publisher's window is empty, every due will seen); False at `timeout`."""
        end = time.monotonic() + timeout
        while True:
            if self._undelivered() == 0 and all(
                c.connected.is_set() for c in [*self.subscribers, *self.shared, *self.watchers]
            ):
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.05)

    def snapshot(
        self, endpoints: Sequence[Endpoint] | None = None, *, settle: float = 0.5
    ) -> list[Snapshot]:
        """Write what each broker serves: its retained messages and its filter count."""
        out: list[Snapshot] = []
        chosen = list(endpoints if endpoints is not None else self.endpoints)
        # Every filter count is read before any retained-message reader subscribes to `#`:
        # a reader's filter still counted while its DISCONNECT is processed (or announced to
        # the other brokers) would make the tables differ by the reader, not by the brokers.
        counts = {endpoint.name: self._filter_rows(endpoint) for endpoint in chosen}
        for endpoint in chosen:
            retained = _read_retained(endpoint, settle=settle, timeout=self.spec.connect_timeout)
            snap = Snapshot(
                t=time.monotonic(),
                broker=endpoint.name,
                retained=retained,
                subscriptions=counts[endpoint.name],
            )
            self.record(snap)
            out.append(snap)
        return out

    @staticmethod
    def _filter_rows(endpoint: Endpoint) -> tuple[tuple[str, str, int], ...]:
        rows: tuple[tuple[str, str, int], ...] = ()
        try:
            metrics = scrape(endpoint.http_port, host=endpoint.host)
        except (OSError, ValueError):
            metrics = None
        names = {name for name, _ in metrics} if metrics is not None else set()
        if metrics is not None and "mcloudtt_cluster_local_filters" in names:
            total = metrics.value("mcloudtt_cluster_local_filters") + metrics.value(
                "mcloudtt_cluster_remote_filters"
            )
            rows = (("cluster", "distinct-filters", int(total)),)
        return rows

    def stop(self, timeout: float = 5.0) -> None:
        """Every client ends with DISCONNECT (will clients first: no will is due)."""
        self.stop_publishing()
        for group in (
            self.will_clients,
            self.publishers,
            [*self.subscribers, *self.shared, *self.watchers],
        ):
            for c in group:
                c.stopping.set()
            for c in group:
                if c.thread.is_alive():
                    c.thread.join(timeout)

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- for the report
    def counters_json(self) -> dict[str, int]:
        c = self.counters
        return {
            "sent": c.sent,
            "acked": c.acked,
            "delivered": c.delivered,
            "unacked": sum(len(p.pending) for p in self.publishers),
            "throttled": c.throttled,
            "connects": c.connects,
            "disconnects": c.disconnects,
            "wills": c.wills,
            "awaited": sum(self.awaited().values()),
        }

    def publish_rate_series(self, bin_s: float = 0.5) -> dict[str, list[float]]:
        """Publish, acknowledgement and delivery rates (per second) in bins from `start`."""
        origin = self.started_at or 0.0
        series = {
            "sent": self.sent_times,
            "acked": self.ack_times,
            "delivered": self.delivery_times,
        }
        last = max((ts[-1] for ts in series.values() if ts), default=origin)
        bins = int((last - origin) / bin_s) + 1
        out: dict[str, list[float]] = {"t": [origin + i * bin_s for i in range(bins)]}
        for key, times in series.items():
            counts = [0.0] * bins
            for t in list(times):
                i = int((t - origin) / bin_s)
                if 0 <= i < bins:
                    counts[i] += 1 / bin_s
            out[key] = counts
        return out


def _read_retained(endpoint: Endpoint, *, settle: float, timeout: float) -> dict[str, str]:
    """The retained messages a fresh clean client gets from `#` on this broker."""
    got: dict[str, str] = {}
    subscribed = threading.Event()
    last = [time.monotonic()]

    def on_connect(c: paho.Client, u: Any, f: Any, rc: ReasonCode, p: Any) -> None:
        c.subscribe("#", qos=0)

    def on_subscribe(c: Any, u: Any, mid: int, codes: Any, p: Any) -> None:
        last[0] = time.monotonic()
        subscribed.set()

    def on_message(c: Any, u: Any, message: paho.MQTTMessage) -> None:
        if message.retain:  # MQTT-3.3.1-9: only a stored message carries the flag here
            got[message.topic] = _digest(bytes(message.payload))
            last[0] = time.monotonic()

    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"snapshot-{random.Random().getrandbits(32):08x}"
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(endpoint.host, endpoint.mqtt_port, keepalive=10)
    except OSError:
        return got
    client.loop_start()
    try:
        if subscribed.wait(timeout):
            end = time.monotonic() + timeout
            while time.monotonic() - last[0] < settle and time.monotonic() < end:
                time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    return got
