"""MQTT load users for locust, on gevent sockets and the project's client codec.

    locust -f loadtest/locustfile.py --headless -u 1000 -r 200 -t 60s --host mqtt://127.0.0.1:1883
    locust -f loadtest/locustfile.py --scenario fan-out --hosts mqtt://a:1883,mqtt://b:1883 ...
    locust -f loadtest/locustfile.py,loadtest/saturation.py --scenario fan-in --headless ...

Why not `locust.contrib.mqtt.MqttUser`: it runs paho with a thread per user, reports CONNECT
with a response time of 0 and does not record received messages at all. Here each user is one
gevent socket and one reader greenlet speaking MQTT through `mcloudtt_mqttclient` (builders and
an incremental reader, no I/O of its own), so a process holds thousands of users and every
operation is a locust request event:

    CONNECT    time to CONNACK; a refusal fails with its reason code ("CONNACK 0x87")
    SUBSCRIBE  time to SUBACK; a refused filter fails with its code
    PUBLISH    QoS 0: time to hand the packet to the socket; QoS 1: to PUBACK; QoS 2: to PUBCOMP
    RECV       one entry per subscription; the response time is the end-to-end latency (the
               publisher's clock, time.time_ns, travels in the payload: same host or synced
               clocks); a message lost is a failure of that entry, a duplicate a failure of
               "RECV duplicate"

Payloads start with a 32-byte header: publisher id (16 bytes), sequence number and send time in
ns (8 bytes each, big-endian). `SequenceTracker` turns the sequence numbers seen by one
subscription (or one shared-subscription group) into loss, duplicates and reordering; a gap is
reported as lost only after `--loss-grace` seconds (a late message is then "reordered"), and
whatever is still missing when the test stops is lost. The first message of each publisher sets
its baseline: a subscriber that joins late does not count what came before it.

Scenarios (`--scenario NAME`, or `--tags NAME`): see SCENARIOS below. `--mqtt-summary FILE`
writes the MQTT counters (published, received, lost, duplicates, ...) as JSON, summed over workers.

Never import asyncio code (the broker, the chaos toolkit) into this file: locust monkey-patches
the process for gevent.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import struct
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import gevent
import mcloudtt_mqttclient as mq
from gevent.event import AsyncResult
from locust import User, events, tag, task
from locust.runners import WorkerRunner

log = logging.getLogger("mqtt-locust")

HEADER = struct.Struct(">16sQQ")  # publisher id, sequence number, send time (ns)

# Counters of this process (summed over workers on the master, see report_to_master).
COUNTERS: Counter[str] = Counter()
_REPORTED: Counter[str] = Counter()


# ---------------------------------------------------------------- loss and duplicate detection


class SequenceTracker:
    """Loss, duplicates and reordering from per-publisher sequence numbers, for one stream.

    `seen(pub, seq, now)` returns "ok", "duplicate" or "reordered"; gaps wait in `missing` and
    `expire(now)` returns those older than `grace` seconds (lost). `flush()` gives up on all.
    """

    __slots__ = ("grace", "highest", "missing")

    def __init__(self, grace: float = 2.0) -> None:
        self.grace = grace
        self.highest: dict[bytes, int] = {}
        self.missing: dict[tuple[bytes, int], float] = {}

    def seen(self, pub: bytes, seq: int, now: float) -> str:
        top = self.highest.get(pub)
        if top is None or seq == top + 1:
            self.highest[pub] = seq
            return "ok"
        if seq > top:
            for gap in range(top + 1, seq):
                self.missing[(pub, gap)] = now
            self.highest[pub] = seq
            return "ok"
        if self.missing.pop((pub, seq), None) is not None:
            return "reordered"
        return "duplicate"

    def expire(self, now: float) -> list[tuple[bytes, int]]:
        lost = [key for key, since in self.missing.items() if now - since >= self.grace]
        for key in lost:
            del self.missing[key]
        return lost

    def flush(self) -> list[tuple[bytes, int]]:
        lost = list(self.missing)
        self.missing.clear()
        return lost


def stamp(pub: bytes, seq: int, size: int) -> bytes:
    """A payload of `size` bytes (at least the header) carrying pub, seq and the send time."""
    head = HEADER.pack(pub, seq, time.time_ns())
    return head + b"x" * (size - len(head)) if size > len(head) else head


class MessageLost(Exception):
    pass


class DuplicateMessage(Exception):
    pass


class MqttError(Exception):
    pass


# ---------------------------------------------------------------- a gevent MQTT connection


def parse_host(url: str) -> tuple[str, int]:
    """mqtt://HOST:PORT, tcp://HOST:PORT or HOST[:PORT] (1883 by default)."""
    if "://" not in url:
        url = "mqtt://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp"):
        raise ValueError(f"{url}: only mqtt:// (plain TCP) is supported")
    if not parts.hostname:
        raise ValueError(f"{url}: no host")
    return parts.hostname, parts.port or 1883


def fire(
    request_type: str,
    name: str,
    started: float,
    length: int = 0,
    exception: Exception | None = None,
    response_time: float | None = None,
) -> None:
    events.request.fire(
        request_type=request_type,
        name=name,
        response_time=(time.perf_counter() - started) * 1000
        if response_time is None
        else response_time,
        response_length=length,
        exception=exception,
        context={},
    )


class Connection:
    """One MQTT connection on a gevent socket: a reader greenlet, acks matched by packet id.

    Inbound PUBLISH goes to `on_message(topic, payload, qos)`; QoS 1 is acked at once, QoS 2
    with PUBREC/PUBCOMP (delivered once, at the PUBLISH: method A of MQTT 5.0 4.3.3).
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        version: int,
        keepalive: int,
        timeout: float,
        on_message: Callable[[bytes, bytes, int], None] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.client_id = client_id
        self.version = version
        self.keepalive = keepalive
        self.timeout = timeout
        self.on_message = on_message
        self.sock: socket.socket | None = None
        self.connected = False
        self._pending: dict[int, AsyncResult] = {}
        self._connack: AsyncResult | None = None
        self._ids = itertools.cycle(range(1, 65536))
        self._inbound_qos2: set[int] = set()
        self._greenlets: list[gevent.Greenlet] = []
        self._last_sent = time.monotonic()

    # --- operations, each reported as one request

    def connect(self, name: str, *, clean: bool = True, session_expiry: int = 0) -> bool:
        started = time.perf_counter()
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(None)
            self._connack = AsyncResult()
            self._greenlets = [gevent.spawn(self._read_loop), gevent.spawn(self._ping_loop)]
            props = [(mq.SESSION_EXPIRY, session_expiry)] if session_expiry else None
            self._send(
                mq.connect(
                    self.client_id,
                    version=self.version,
                    clean=clean,
                    keepalive=self.keepalive,
                    props=props if self.version == mq.MQTT_5 else None,
                )
            )
            code = self._connack.get(timeout=self.timeout)
        except gevent.Timeout:
            fire("CONNECT", name, started, exception=MqttError("CONNACK timeout"))
            self.close()
            return False
        except OSError as error:
            fire("CONNECT", name, started, exception=MqttError(type(error).__name__))
            self.close()
            return False
        if code:
            fire("CONNECT", name, started, exception=MqttError(f"CONNACK {code:#04x}"))
            self.close()
            return False
        self.connected = True
        fire("CONNECT", name, started)
        COUNTERS["connects"] += 1
        return True

    def subscribe(self, name: str, filters: list[tuple[str, int]]) -> bool:
        started = time.perf_counter()
        pid = next(self._ids)
        result = self._pending[pid] = AsyncResult()
        try:
            self._send(mq.subscribe(pid, filters, version=self.version))
            codes: list[int] = result.get(timeout=self.timeout)
        except (gevent.Timeout, OSError) as error:
            self._pending.pop(pid, None)
            fire("SUBSCRIBE", name, started, exception=MqttError(f"SUBACK {error!r}"))
            return False
        refused = [c for c in codes if c >= 0x80]
        if refused:
            fire("SUBSCRIBE", name, started, exception=MqttError(f"SUBACK {refused[0]:#04x}"))
            return False
        fire("SUBSCRIBE", name, started)
        return True

    def publish(
        self, name: str, topic: str, payload: bytes, qos: int, *, retain: bool = False
    ) -> bool:
        started = time.perf_counter()
        pid = next(self._ids) if qos else None
        result = None
        if pid is not None:
            result = self._pending[pid] = AsyncResult()
        try:
            self._send(
                mq.publish(
                    topic, payload, version=self.version, qos=qos, retain=retain, packet_id=pid
                )
            )
            if result is not None:
                code = result.get(timeout=self.timeout)
                if code >= 0x80:
                    raise MqttError(f"{'PUBACK' if qos == 1 else 'PUBREC'} {code:#04x}")
        except (gevent.Timeout, OSError, MqttError) as error:
            if pid is not None:
                self._pending.pop(pid, None)
            what = "ack timeout" if isinstance(error, gevent.Timeout) else str(error) or repr(error)
            fire("PUBLISH", name, started, len(payload), MqttError(what))
            return False
        fire("PUBLISH", name, started, len(payload))
        COUNTERS[f"published_qos{qos}"] += 1
        return True

    def disconnect(self) -> None:
        if self.sock is not None and self.connected:
            self.connected = False  # the broker's close that follows is not a drop
            with contextlib.suppress(OSError, MqttError):
                self._send(mq.disconnect(version=self.version))
        self.close()

    def close(self) -> None:
        self.connected = False
        current = gevent.getcurrent()
        for g in self._greenlets:
            if g is not current:
                g.kill(block=False)
        self._greenlets = []
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        for result in self._pending.values():
            result.set_exception(MqttError("connection closed"))
        self._pending.clear()

    # --- the wire

    def _send(self, data: bytes) -> None:
        if self.sock is None:
            raise MqttError("not connected")
        self.sock.sendall(data)
        self._last_sent = time.monotonic()

    def _ping_loop(self) -> None:
        # MQTT-3.1.2-23: the client sends something within each keep-alive period.
        while self.keepalive:
            gevent.sleep(self.keepalive / 2)
            if time.monotonic() - self._last_sent >= self.keepalive / 2:
                with contextlib.suppress(OSError, MqttError):
                    self._send(mq.PINGREQ_BYTES)

    def _read_loop(self) -> None:
        reader = mq.Reader()
        sock = self.sock
        assert sock is not None
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                for ptype, flags, body in reader.frames(data):
                    self._dispatch(ptype, flags, body)
        except (OSError, mq.MalformedPacket) as error:
            log.debug("%s: reader stopped: %r", self.client_id, error)
        if self._connack is not None and not self._connack.ready():
            self._connack.set_exception(OSError("closed before CONNACK"))
        if self.connected:
            COUNTERS["dropped_connections"] += 1
        self.close()

    def _dispatch(self, ptype: int, flags: int, body: bytes) -> None:
        if ptype == mq.PUBLISH:
            topic, payload, qos, _retain, pid = mq.split_publish(flags, body, self.version)
            if qos == 1:
                self._send(mq.ack(mq.PUBACK, pid, version=self.version))
            elif qos == 2:
                self._send(mq.ack(mq.PUBREC, pid, version=self.version))
                if pid in self._inbound_qos2:
                    return  # a resend before PUBREL: already delivered (MQTT-4.3.3-10)
                self._inbound_qos2.add(pid)
            if self.on_message is not None:
                self.on_message(topic, payload, qos)
            return
        if ptype == mq.PUBREL:
            pid = mq.packet_id(body)
            self._inbound_qos2.discard(pid)
            self._send(mq.ack(mq.PUBCOMP, pid, version=self.version))
            return
        packet = mq.parse(ptype, flags, body, self.version)
        if ptype == mq.CONNACK and self._connack is not None:
            self._connack.set(packet.code)
        elif ptype in (mq.PUBACK, mq.PUBCOMP, mq.SUBACK, mq.UNSUBACK):
            result = self._pending.pop(packet.packet_id, None)
            if result is not None:
                result.set(packet.codes if ptype in (mq.SUBACK, mq.UNSUBACK) else packet.code)
        elif ptype == mq.PUBREC:
            if packet.code >= 0x80:
                result = self._pending.pop(packet.packet_id, None)
                if result is not None:
                    result.set(packet.code)
            else:
                self._send(mq.ack(mq.PUBREL, packet.packet_id, version=self.version))
        elif ptype == mq.DISCONNECT:
            log.info("%s: DISCONNECT from the broker, reason %#04x", self.client_id, packet.code)


# ---------------------------------------------------------------- users

_INDEX = itertools.count()
_SHARED_TRACKERS: dict[str, SequenceTracker] = {}
_SHARED_LIVE: Counter[str] = Counter()
_RUN = uuid.uuid4().hex[:8]  # keeps client ids unique across processes and runs


def _options(environment: Any) -> Any:
    return environment.parsed_options


def _hosts(environment: Any) -> list[tuple[str, int]]:
    opts = _options(environment)
    spec = (opts.hosts if opts is not None else "") or environment.host or "mqtt://127.0.0.1:1883"
    return [parse_host(h.strip()) for h in spec.split(",") if h.strip()]


class MqttUser(User):
    """Base: one connection to one of the brokers (round-robin over --hosts, or --host)."""

    abstract = True
    role = "user"
    # Cross-broker: consumers count from the first broker, publishers from the second, so that
    # what is published on one node is received on another.
    host_offset = 0
    _task_started = 0.0  # set by each task: pace() counts the interval from there

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.opts = _options(environment)
        self.index = next(_INDEX)
        self.client_id = f"lc-{_RUN}-{os.getpid()}-{self.role}-{self.index}"
        self.pub_id = uuid.uuid4().hex[:16].encode()
        self.seq = 0
        hosts = _hosts(environment)
        self.broker = hosts[(self.index + self.host_offset) % len(hosts)]
        self.conn: Connection | None = None

    def make_connection(
        self, on_message: Callable[[bytes, bytes, int], None] | None = None
    ) -> Connection:
        return Connection(
            *self.broker,
            self.client_id,
            version=int(self.opts.mqtt_version),
            keepalive=int(self.opts.keepalive),
            timeout=float(self.opts.mqtt_timeout),
            on_message=on_message,
        )

    def open(self, on_message: Callable[[bytes, bytes, int], None] | None = None) -> bool:
        self.conn = self.make_connection(on_message)
        return self.conn.connect(self.role)

    def on_stop(self) -> None:
        if self.conn is not None:
            self.conn.disconnect()

    def next_payload(self) -> bytes:
        self.seq += 1
        skip = int(self.opts.skip_every)
        if skip and self.seq % skip == 0:
            self.seq += 1  # --skip-every: a number never sent, as if the broker had dropped it
        return stamp(self.pub_id, self.seq, int(self.opts.payload_size))

    def pace(self) -> float:
        """Seconds to wait so that each task starts every --interval seconds."""
        return max(0.0, float(self.opts.interval) - (time.monotonic() - self._task_started))

    def wait_time(self) -> float:
        return self.pace()

    def reconnect_if_dropped(self) -> bool:
        if self.conn is not None and self.conn.connected:
            return True
        gevent.sleep(0.5)  # not a tight loop while a broker is down
        return self.open()


class Subscriber(MqttUser):
    """Subscribes on start; every message it gets is a RECV request with its e2e latency."""

    abstract = True
    role = "consumer"

    def topic_filter(self) -> str:
        return "telemetry/+"

    def tracker(self) -> SequenceTracker:
        return SequenceTracker(float(self.opts.loss_grace))

    def entry_name(self) -> str:
        """The name of its RECV entry in the statistics."""
        return self.topic_filter()

    def on_start(self) -> None:
        self._tracker = self.tracker()
        self.entry = self.entry_name()
        self._expirer = gevent.spawn(self._expire_loop)
        if self.open(self.receive):
            self.subscribe()

    def subscribe(self) -> None:
        assert self.conn is not None
        self.conn.subscribe(self.entry, [(self.topic_filter(), int(self.opts.sub_qos))])

    def reconnect_if_dropped(self) -> bool:
        # A clean session: the subscription is gone with the connection; make it again.
        if self.conn is not None and self.conn.connected:
            return True
        gevent.sleep(0.5)
        if not self.open(self.receive):
            return False
        self.subscribe()
        return True

    def receive(self, topic: bytes, payload: bytes, qos: int) -> None:
        now_ns = time.time_ns()
        if len(payload) < HEADER.size:
            fire("RECV", self.entry, 0, len(payload), response_time=0)
            COUNTERS["received"] += 1
            return
        pub, seq, sent = HEADER.unpack_from(payload)
        verdict = self._tracker.seen(pub, seq, time.monotonic())
        if verdict == "duplicate":
            COUNTERS["duplicates"] += 1
            fire(
                "RECV",
                "duplicate",
                0,
                len(payload),
                DuplicateMessage(f"seq {seq} again"),
                response_time=(now_ns - sent) / 1e6,
            )
            return
        if verdict == "reordered":
            COUNTERS["reordered"] += 1
        COUNTERS["received"] += 1
        fire("RECV", self.entry, 0, len(payload), response_time=(now_ns - sent) / 1e6)

    def _report_lost(self, lost: list[tuple[bytes, int]]) -> None:
        for pub, seq in lost:
            COUNTERS["lost"] += 1
            fire(
                "RECV",
                self.entry,
                0,
                exception=MessageLost(f"publisher {pub.decode()} seq {seq}"),
                response_time=0,
            )

    def _expire_loop(self) -> None:
        while True:
            gevent.sleep(0.5)
            self._report_lost(self._tracker.expire(time.monotonic()))

    def on_stop(self) -> None:
        self._expirer.kill(block=False)
        self._report_lost(self._tracker.flush())
        super().on_stop()

    @task
    def hold(self) -> None:
        self._task_started = time.monotonic()
        self.reconnect_if_dropped()

    def wait_time(self) -> float:
        return 1.0


class Publisher(MqttUser):
    """Publishes one stamped message every --interval seconds at its QoS."""

    abstract = True
    role = "device"
    host_offset = 1

    def qos(self) -> int:
        mix = [int(q) for q in str(self.opts.qos_mix).split(",")] if self.opts.qos_mix else []
        return mix[self.index % len(mix)] if mix else int(self.opts.qos)

    def topic(self) -> str:
        return f"telemetry/{self.client_id}"

    def on_start(self) -> None:
        self._qos = self.qos()
        self.open()

    def publish_once(self, *, retain: bool = False, topic: str | None = None) -> None:
        if not self.reconnect_if_dropped():
            return
        assert self.conn is not None
        self.conn.publish(
            f"{self.role} qos{self._qos}",
            topic or self.topic(),
            self.next_payload(),
            self._qos,
            retain=retain,
        )


# --- the scenarios' users. Each task carries the tags of the scenarios it serves, so that
# `--tags fan-in` picks a scenario as well as `--scenario fan-in` does.


class Device(Publisher):
    """Telemetry: one topic per device."""

    @tag("fan-in", "shared", "cross-broker", "qos-mix")
    @task
    def send(self) -> None:
        self._task_started = time.monotonic()
        self.publish_once()


class Consumer(Subscriber):
    """Reads every device's telemetry (`telemetry/+`)."""

    @tag("fan-in", "cross-broker", "qos-mix")
    @task
    def hold(self) -> None:
        super().hold()


class SharedConsumer(Subscriber):
    """One of a shared-subscription group on the telemetry: the group sees each message once.

    The group is per locust process (one tracker for the group), so that loss is judged right
    when consumers run on several workers: each process's group receives every message."""

    role = "shared"

    def topic_filter(self) -> str:
        return f"$share/{self.opts.share_group}-{socket.gethostname()}-{os.getpid()}/telemetry/+"

    def tracker(self) -> SequenceTracker:
        key = self.topic_filter()
        if key not in _SHARED_TRACKERS:
            _SHARED_TRACKERS[key] = SequenceTracker(float(self.opts.loss_grace))
        return _SHARED_TRACKERS[key]

    def on_start(self) -> None:
        _SHARED_LIVE[self.topic_filter()] += 1
        super().on_start()

    def entry_name(self) -> str:
        return "$share/telemetry/+"

    def on_stop(self) -> None:
        # Only the last of the group gives up on what is missing (the others may still get it).
        self._expirer.kill(block=False)
        key = self.topic_filter()
        _SHARED_LIVE[key] -= 1
        if _SHARED_LIVE[key] <= 0:
            self._report_lost(self._tracker.flush())
        MqttUser.on_stop(self)

    @tag("shared")
    @task
    def hold(self) -> None:
        Subscriber.hold(self)


class Commander(Publisher):
    """Command fan-out: one publisher on `commands/all`."""

    role = "commander"
    host_offset = 0

    def topic(self) -> str:
        return "commands/all"

    @tag("fan-out")
    @task
    def send(self) -> None:
        self._task_started = time.monotonic()
        self.publish_once()


class CommandSubscriber(Subscriber):
    """Every device subscribes to the commands."""

    role = "cmd-sub"
    host_offset = 1

    def topic_filter(self) -> str:
        return "commands/all"

    @tag("fan-out")
    @task
    def hold(self) -> None:
        super().hold()


class StormDevice(MqttUser):
    """Connect storm: connect (at the spawn rate), subscribe to its own command topic, stay."""

    role = "storm"

    def on_start(self) -> None:
        if self.open():
            assert self.conn is not None
            self.conn.subscribe("devices/+/cmd", [(f"devices/{self.client_id}/cmd", 1)])

    @tag("connect-storm")
    @task
    def hold(self) -> None:
        self._task_started = time.monotonic()
        if self.conn is None or not self.conn.connected:
            self.on_start()

    def wait_time(self) -> float:
        return 1.0


class Reconnector(MqttUser):
    """Reconnect storm: disconnect and connect again every --interval seconds, with a
    persistent session (MQTT 5 session expiry) so that the broker resumes it each time."""

    role = "reconnect"

    def on_start(self) -> None:
        self.conn = self.make_connection()
        self.conn.connect(self.role, clean=False, session_expiry=300)

    @tag("reconnect-storm")
    @task
    def reconnect(self) -> None:
        self._task_started = time.monotonic()
        if self.conn is not None:
            self.conn.disconnect()
        self.conn = self.make_connection()
        self.conn.connect(self.role, clean=False, session_expiry=300)


class RetainedSeeder(MqttUser):
    """Retained-heavy subscribe: publishes --retained retained messages once, then idles."""

    role = "seeder"

    def on_start(self) -> None:
        if not self.open():
            return
        assert self.conn is not None
        for i in range(int(self.opts.retained)):
            self.conn.publish("retained seed", f"retained/{i}", self.next_payload(), 1, retain=True)

    @tag("retained")
    @task
    def hold(self) -> None:
        self._task_started = time.monotonic()

    def wait_time(self) -> float:
        return 1.0


class RetainedSubscriber(MqttUser):
    """Subscribes to `retained/#` again and again; "RETAINED all" is the time until every
    retained message has arrived (a failure when they do not all come within --mqtt-timeout)."""

    role = "retained-sub"

    def topic_filter(self) -> str:
        return "retained/#"

    def on_start(self) -> None:
        self.entry = self.topic_filter()
        self._got: set[bytes] = set()

    def receive(self, topic: bytes, payload: bytes, qos: int) -> None:
        self._got.add(topic)
        COUNTERS["received"] += 1
        fire("RECV", self.entry, 0, len(payload), response_time=0)

    @tag("retained")
    @task
    def resubscribe(self) -> None:
        self._task_started = time.monotonic()
        want = int(self.opts.retained)
        self._got = set()
        self.conn = self.make_connection(self.receive)
        if not self.conn.connect(self.role):
            return
        started = time.perf_counter()
        if self.conn.subscribe(self.entry, [(self.entry, 1)]):
            deadline = time.monotonic() + float(self.opts.mqtt_timeout)
            while len(self._got) < want and time.monotonic() < deadline:
                gevent.sleep(0.01)
            missing = want - len(self._got)
            fire(
                "RETAINED",
                "all",
                started,
                exception=MessageLost(f"{missing} retained missing") if missing > 0 else None,
            )
        self.conn.disconnect()

    def wait_time(self) -> float:
        return self.pace()


# scenario -> {user class: ("fixed", n option) or ("weight", n)}
SCENARIOS: dict[str, dict[type[User], tuple[str, str | int]]] = {
    "fan-in": {Device: ("weight", 1), Consumer: ("fixed", "consumers")},
    "fan-out": {Commander: ("fixed", 1), CommandSubscriber: ("weight", 1)},
    "connect-storm": {StormDevice: ("weight", 1)},
    "reconnect-storm": {Reconnector: ("weight", 1)},
    "retained": {RetainedSeeder: ("fixed", 1), RetainedSubscriber: ("weight", 1)},
    "shared": {Device: ("weight", 1), SharedConsumer: ("fixed", "consumers")},
    "cross-broker": {Device: ("weight", 1), Consumer: ("fixed", "consumers")},
    "qos-mix": {Device: ("weight", 1), Consumer: ("fixed", "consumers")},
}


# ---------------------------------------------------------------- options and wiring


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    # Each option has a LOCUST_* variable too (the Kubernetes component sets them).
    group = parser.add_argument_group("MQTT (mcloudtt locustfile)")
    group.add_argument(
        "--scenario",
        env_var="LOCUST_SCENARIO",
        choices=sorted(SCENARIOS),
        default="",
        help="what the users do (default fan-in; --tags NAME picks one too)",
    )
    group.add_argument(
        "--hosts",
        env_var="LOCUST_HOSTS",
        default="",
        help="brokers to spread users over: mqtt://a:1883,mqtt://b:1883",
    )
    group.add_argument(
        "--qos", env_var="LOCUST_QOS", type=int, choices=(0, 1, 2), default=0, help="publish QoS"
    )
    group.add_argument(
        "--qos-mix",
        env_var="LOCUST_QOS_MIX",
        default="",
        help="publishers' QoS in turn, e.g. 0,1,2 (qos-mix: 0,1,2)",
    )
    group.add_argument(
        "--sub-qos",
        env_var="LOCUST_SUB_QOS",
        type=int,
        choices=(0, 1, 2),
        default=2,
        help="subscription QoS",
    )
    group.add_argument(
        "--interval",
        env_var="LOCUST_INTERVAL",
        type=float,
        default=1.0,
        help="seconds between one user's publishes",
    )
    group.add_argument(
        "--payload-size",
        env_var="LOCUST_PAYLOAD_SIZE",
        type=int,
        default=100,
        help="bytes per message (header: 32)",
    )
    group.add_argument(
        "--consumers",
        env_var="LOCUST_CONSUMERS",
        type=int,
        default=2,
        help="subscribers in fan-in, shared, cross-broker",
    )
    group.add_argument(
        "--retained",
        env_var="LOCUST_RETAINED",
        type=int,
        default=1000,
        help="retained messages (retained scenario)",
    )
    group.add_argument(
        "--share-group",
        env_var="LOCUST_SHARE_GROUP",
        default="locust",
        help="shared subscription group prefix",
    )
    group.add_argument(
        "--mqtt-version",
        env_var="LOCUST_MQTT_VERSION",
        type=int,
        choices=(4, 5),
        default=5,
        help="4 = 3.1.1, 5 = 5.0",
    )
    group.add_argument("--keepalive", env_var="LOCUST_KEEPALIVE", type=int, default=60)
    group.add_argument(
        "--mqtt-timeout",
        env_var="LOCUST_MQTT_TIMEOUT",
        type=float,
        default=10.0,
        help="seconds to wait for an ack",
    )
    group.add_argument(
        "--loss-grace",
        env_var="LOCUST_LOSS_GRACE",
        type=float,
        default=2.0,
        help="seconds a gap may wait before it is lost",
    )
    group.add_argument(
        "--skip-every",
        env_var="LOCUST_SKIP_EVERY",
        type=int,
        default=0,
        help="harness self-check: publishers skip every Nth sequence number (each is then lost)",
    )
    group.add_argument(
        "--mqtt-summary",
        env_var="LOCUST_MQTT_SUMMARY",
        default="",
        help="write the MQTT counters to this JSON file",
    )


def scenario_of(opts: Any) -> str:
    if opts.scenario:
        return str(opts.scenario)
    picked = [t for t in (opts.tags or []) if t in SCENARIOS]
    return picked[0] if picked else "fan-in"


@events.init.add_listener
def _pick_scenario(environment: Any, runner: Any, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None or isinstance(runner, WorkerRunner):
        return  # workers keep every class: the master says which to spawn
    name = scenario_of(opts)
    if name == "qos-mix" and not opts.qos_mix:
        opts.qos_mix = "0,1,2"
    if name == "cross-broker" and len(_hosts(environment)) < 2:
        log.warning("cross-broker with one broker: give --hosts mqtt://a:1883,mqtt://b:1883")
    chosen = SCENARIOS[name]
    for cls, (kind, value) in chosen.items():
        count = int(getattr(opts, value) if isinstance(value, str) else value)
        cls.fixed_count = count if kind == "fixed" else 0
        cls.weight = count if kind == "weight" else 0
    environment.user_classes[:] = [c for c in environment.user_classes if c in chosen]
    COUNTERS["scenario:" + name] = 1
    log.info("scenario %s: %s", name, ", ".join(c.__name__ for c in chosen))


@events.report_to_master.add_listener
def _report(client_id: str, data: dict[str, Any]) -> None:
    delta = COUNTERS - _REPORTED
    data["mqtt_counters"] = dict(delta)
    _REPORTED.update(delta)


@events.worker_report.add_listener
def _collect(client_id: str, data: dict[str, Any]) -> None:
    COUNTERS.update(data.get("mqtt_counters", {}))
    _WORKERS.add(client_id)


_WORKERS: set[str] = set()  # on the master: the workers whose counters were summed


def summary(environment: Any) -> dict[str, Any]:
    stats = environment.runner.stats
    received = [
        e for (name, method), e in stats.entries.items() if method == "RECV" and name != "duplicate"
    ]
    latencies: dict[str, Any] = {}
    for entry in received:
        if entry.num_requests - entry.num_failures:
            latencies[entry.name] = {
                "p50_ms": entry.get_response_time_percentile(0.5),
                "p99_ms": entry.get_response_time_percentile(0.99),
            }
    counters = {k: v for k, v in COUNTERS.items() if not k.startswith("scenario:")}
    return {
        "scenario": next((k[9:] for k in COUNTERS if k.startswith("scenario:")), ""),
        "counters": {
            "received": 0,
            "lost": 0,
            "duplicates": 0,
            "reordered": 0,
            **counters,
            "published": sum(v for k, v in counters.items() if k.startswith("published_qos")),
        },
        "e2e_latency": latencies,
        "workers": len(_WORKERS),
        "failures": stats.total.num_failures,
        "requests": stats.total.num_requests,
    }


_ENV: list[Any] = []  # the environment, for the quit event (which does not carry it)


@events.init.add_listener
def _keep_environment(environment: Any, **_: Any) -> None:
    _ENV[:] = [environment]


@events.quit.add_listener
def _write_summary(exit_code: int, **_: Any) -> None:
    # `quit` comes after the runner has stopped every user (`quitting` comes before, while the
    # users still run): the counters are final, the subscribers have flushed their gaps.
    if not _ENV or _ENV[0].parsed_options is None or isinstance(_ENV[0].runner, WorkerRunner):
        return
    environment = _ENV[0]
    opts = environment.parsed_options
    result = summary(environment)
    c = result["counters"]
    log.info(
        "MQTT: %d published, %d received, %d lost, %d duplicates, %d reordered",
        c["published"],
        c["received"],
        c["lost"],
        c["duplicates"],
        c["reordered"],
    )
    if opts.mqtt_summary:
        with open(opts.mqtt_summary, "w") as handle:
            json.dump(result, handle, indent=2)
