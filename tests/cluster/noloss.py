"""The no-loss tests' parts (tests/cluster/test_noloss.py, test_redis_cluster.py): a paho
publisher with sequence numbers at RATE, a persistent paho subscriber, and `streaming()`, which
sets the two up across two brokers and waits for what was acknowledged.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import paho.mqtt.client as mqtt
from brokerproc import BrokerProcess
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .conftest import wait_until

TOPIC = "noloss/seq"
RATE = 300  # messages a second


class Publisher(threading.Thread):
    """Publishes 0, 1, 2, ... at RATE; `acked` holds what the broker acknowledged."""

    def __init__(self, port: int, qos: int) -> None:
        super().__init__(daemon=True)
        self.qos = qos
        self.acked: set[int] = set()
        self.sent = 0
        self._mids: dict[int, int] = {}
        self._early: set[int] = set()
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="noloss-pub")
        self.c.max_inflight_messages_set(100)
        self.c.on_publish = self._on_publish
        self.c.connect("127.0.0.1", port, 60)
        self.c.loop_start()

    def _on_publish(self, c: Any, u: Any, mid: int, rc: Any, p: Any) -> None:
        with self._lock:
            seq = self._mids.pop(mid, None)
            if seq is None:
                self._early.add(mid)  # acknowledged before `run` noted its mid
            else:
                self.acked.add(seq)

    def run(self) -> None:
        start = time.monotonic()
        while not self.stopping.is_set():
            due = start + self.sent / RATE
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            # Not under our lock: paho calls `_on_publish` under its own.
            info = self.c.publish(TOPIC, str(self.sent).encode(), self.qos)
            with self._lock:
                if info.mid in self._early:
                    self._early.discard(info.mid)
                    self.acked.add(self.sent)
                else:
                    self._mids[info.mid] = self.sent
            self.sent += 1

    def finish(self) -> None:
        self.stopping.set()
        self.join()
        wait_until(lambda: not self._mids, 10.0, "every publish acknowledged")
        self.c.loop_stop()
        self.c.disconnect()


class Subscriber:
    """A persistent-session subscriber; `got` is (sequence, DUP flag) in arrival order."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.got: list[tuple[int, bool]] = []
        self.client: mqtt.Client | None = None
        self.connections = 0
        self.per_connection: list[tuple[int, int]] = []  # (connection, sequence)

    def connect(self, port: int, timeout: float = 20.0) -> bool:
        proto = mqtt.MQTTv5 if self.version == 5 else mqtt.MQTTv311
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"noloss-sub-{self.version}",
            protocol=proto,
            clean_session=None if self.version == 5 else False,
        )
        connected = threading.Event()
        present: list[bool] = []

        def on_connect(c: Any, u: Any, flags: Any, rc: Any, p: Any) -> None:
            present.append(bool(flags.session_present))
            connected.set()

        c.on_connect = on_connect
        conn = self.connections = self.connections + 1

        def on_message(c: Any, u: Any, m: Any) -> None:
            self.got.append((int(m.payload), bool(m.dup)))
            self.per_connection.append((conn, int(m.payload)))

        c.on_message = on_message
        props = None
        if self.version == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
        c.connect(
            "127.0.0.1",
            port,
            60,
            clean_start=False if self.version == 5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        c.loop_start()
        assert connected.wait(timeout), "no CONNACK"
        self.client = c
        return present[0]

    def give_up(self, port: int, after: float) -> None:
        """CONNECT to `port` and close the socket `after` seconds later, CONNACK or not (a
        device whose connect timeout ran out while the broker looked for its session)."""
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"noloss-sub-{self.version}",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        # On a loaded machine the session may come before `after`: what the device got (and
        # acknowledged) then is delivered, not lost.
        c.on_message = lambda c, u, m: self.got.append((int(m.payload), bool(m.dup)))
        c.connect("127.0.0.1", port, 60)
        c.loop_start()
        time.sleep(after)
        c.loop_stop()
        sock = c.socket()
        if sock is not None:
            sock.close()

    def drop(self) -> None:
        if self.client is not None:
            self.client.loop_stop()
            sock = self.client.socket()
            if sock is not None:
                sock.close()
            self.client = None


def received(sub: Subscriber) -> list[int]:
    return [seq for seq, _ in sub.got]


def ranges(values: list[int]) -> str:
    """1,2,3,7,8 -> '1-3, 7-8' (what a failure shows)."""
    parts: list[str] = []
    for v in values:
        if parts and int(parts[-1].split("-")[-1]) == v - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{v}"
        else:
            parts.append(str(v))
    return ", ".join(parts[:30])


def check(pub: Publisher, sub: Subscriber, qos: int) -> None:
    got = received(sub)
    print(f"acked {len(pub.acked)}, received {len(got)}, distinct {len(set(got))}")
    lost = sorted(pub.acked - set(got))
    if lost:
        lo = lost[0]
        print("around", [(i, x) for i, x in enumerate(sub.got) if lo - 20 <= x[0] <= lo + 5])
    assert not lost, f"{len(lost)} of {len(pub.acked)} acknowledged lost: {ranges(lost)}"
    firsts: list[int] = []
    seen: set[int] = set()
    for seq in got:
        if seq not in seen:
            seen.add(seq)
            firsts.append(seq)
    assert firsts == sorted(firsts), "order per publisher broken"
    dups = sorted(k for k, v in Counter(got).items() if v > 1)
    if dups:
        first_idx = [i for i, x in enumerate(sub.got) if x[0] == dups[0]]
        print(
            "duplicates",
            ranges(dups),
            "first at",
            first_idx,
            "DUP flags",
            [dup for seq, dup in sub.got if seq in set(dups)][:10],
        )
    if qos == 2:
        assert len(got) == len(set(got)), f"QoS 2 delivered twice: {len(got) - len(set(got))}"


def subscribed(broker: BrokerProcess, version: int, qos: int) -> Subscriber:
    """A persistent subscriber on `broker`, subscribed to TOPIC."""
    sub = Subscriber(version)
    sub.connect(broker.port)
    assert sub.client is not None
    sub.client.subscribe(TOPIC, qos)
    return sub


@contextmanager
def streaming(
    origin: BrokerProcess,
    sub: Subscriber,
    qos: int,
    *,
    before: int = 200,
    what: str = "deliveries before the fault",
    settle: float = 15.0,
    routed: bool = True,
) -> Iterator[Publisher]:
    """Once `origin` routes TOPIC to `sub`'s broker, a Publisher on `origin`; yields when `sub`
    has more than `before` messages (the fault goes in the body); after the body the publisher
    stops, and until every acknowledged message has arrived, or `settle` seconds passed, it
    waits (the test judges what arrived). `routed` False: `sub` is on `origin` itself."""
    if routed:
        wait_until(lambda: origin.metric("mcloudtt_cluster_remote_filters") >= 1, 5.0, "routing")
    pub = Publisher(origin.port, qos)
    pub.start()
    try:
        wait_until(lambda: len(sub.got) > before, 10.0, what)
        yield pub
    finally:
        pub.finish()
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline and not pub.acked <= set(received(sub)):
        time.sleep(0.05)
