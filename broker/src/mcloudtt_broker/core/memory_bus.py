"""An in-memory cluster bus: several `Broker` cores in one process, linked without I/O.

Theory of operation. A `MemoryHub` stands for what Redis is to the `RedisBus`: the cluster
table, the retained hash, the inboxes and the ClientId -> broker map. Each core gets its own
`MemoryBus` (`hub.bus(broker_id)`), passed to `Broker(bus=...)` and then `attach`ed, which loads
the table and the retained messages into the core and makes the core's own filters known.

* Table changes (`subscription_added/removed`) reach every other core at once, as the control
  channel does (the Redis bus also routes to a session's new broker before its filters arrive).
* A forwarded publish goes where `RedisBus` sends it in routed mode: to the plain `targets`, to
  the brokers chosen for shared groups, and, when it is retained, to every broker; never back to
  its origin (no echo). Each copy arrives through `Broker.deliver_remote`, with its Message
  Expiry Interval as what remained when it was forwarded, less its time in transit.
* Deliveries and the end of a cross-core CONNECT wait in one queue until `pump()` (the next
  loop iteration, for the Redis bus), or happen inside `forward` with `synchronous=True`.
  Either way the order is fixed, so tests that drive cores with it are deterministic.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .message import Message

if TYPE_CHECKING:
    from .broker import Broker
    from .ports import ClusterBus, Resume


@dataclass(frozen=True, slots=True)
class Delivery:
    """One copy of a publish on its way to a broker, as recorded in `MemoryHub.log`."""

    dest: str
    topic: str
    payload: bytes
    plain: bool
    groups: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _InTransit:
    message: Message
    sent_at: float  # hub clock
    interval: int | None  # Message Expiry Interval that remained at `sent_at`


class MemoryHub:
    """The shared side of an in-memory cluster (what Redis holds for the Redis bus)."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, synchronous: bool = False
    ) -> None:
        self.clock = clock
        self.synchronous = synchronous
        self.buses: dict[str, MemoryBus] = {}
        self.table: dict[str, set[str]] = {}  # broker id -> filters with local subscribers
        self.retained: dict[str, _InTransit] = {}
        self.holders: dict[str, str] = {}  # ClientId -> broker id that last accepted it
        self.log: list[Delivery] = []
        self.stats: Counter[str] = Counter()
        self._queue: deque[Callable[[], None]] = deque()

    def bus(self, broker_id: str) -> MemoryBus:
        if broker_id in self.buses:
            raise ValueError(f"broker id {broker_id!r} is taken")
        bus = self.buses[broker_id] = MemoryBus(self, broker_id)
        return bus

    def pending(self) -> int:
        return len(self._queue)

    def pump(self) -> int:
        """Run everything queued (deliveries, CONNECTs that located their session); return
        how many steps ran. Deliveries never forward again, so this ends."""
        steps = 0
        queue = self._queue
        while queue:
            queue.popleft()()
            steps += 1
        return steps

    def _later(self, step: Callable[[], None]) -> None:
        if self.synchronous:
            step()
        else:
            self._queue.append(step)

    def leave(self, broker_id: str) -> None:
        """A broker left the cluster: its filters disappear from every other core's table."""
        bus = self.buses.pop(broker_id, None)
        self.table.pop(broker_id, None)
        if bus is None:
            return
        for other in self.buses.values():
            if other.broker is not None:
                other.broker.remote_forget(broker_id)

    def _deliver(self, dest: str, sent: _InTransit, plain: bool, groups: tuple[str, ...]) -> None:
        bus = self.buses.get(dest)
        if bus is None or bus.broker is None:
            self.stats["undeliverable"] += 1
            return
        message = _arrive(sent, self.clock(), bus.broker.clock())
        if message is None:
            self.stats["expired"] += 1
            return
        self.stats["delivered"] += 1
        self.log.append(Delivery(dest, message.topic, message.payload, plain, groups))
        orphaned = bus.broker.deliver_remote(message, plain, groups)
        if orphaned:  # as the Redis inbox does: to a member broker elsewhere
            bus.broker.replay_shared(message, orphaned, "")


def _arrive(sent: _InTransit, hub_now: float, local_now: float) -> Message | None:
    """The copy a receiving core gets: its expiry counted on the receiver's clock."""
    message = sent.message
    if sent.interval is None:
        return Message(
            message.topic,
            message.payload,
            message.qos,
            message.retain,
            message.properties,
            origin=message.origin,
        )
    remaining = sent.interval - max(0.0, hub_now - sent.sent_at)
    if remaining <= 0:
        return None  # MQTT-3.3.2-5: expired on the way
    return Message(
        message.topic,
        message.payload,
        message.qos,
        message.retain,
        message.properties.replace(message_expiry_interval=sent.interval),
        expires_at=local_now + remaining,
        origin=message.origin,
    )


class MemoryBus:
    """One core's link to a `MemoryHub`; implements `ClusterBus`."""

    def __init__(self, hub: MemoryHub, broker_id: str) -> None:
        self.hub = hub
        self.broker_id = broker_id
        self.broker: Broker | None = None
        self.changed_sessions: Counter[str] = Counter()
        self.locate_sessions = False

    def attach(self, broker: Broker, *, locate_sessions: bool = True) -> None:
        """Join the cluster: load the table and the retained messages into `broker`, announce
        its filters; with `locate_sessions`, a CONNECT takes its session from another core."""
        hub = self.hub
        self.broker = broker
        for peer, filters in hub.table.items():
            if peer != self.broker_id:
                for full_filter in filters:
                    broker.remote_subscribe(peer, full_filter)
        now = hub.clock()
        for sent in hub.retained.values():
            message = _arrive(sent, now, broker.clock())
            if message is not None:
                broker.retained.set(message)
        for full_filter in broker.local_filters():
            self.subscription_added(full_filter)
        self.locate_sessions = locate_sessions

    # ------------------------------------------------------------------ ClusterBus

    def forward(
        self, message: Message, targets: Sequence[str], groups: Mapping[str, list[str]]
    ) -> None:
        retain = message.retain
        if not (targets or groups or retain):
            return  # nobody else wants it
        hub = self.hub
        interval = None
        if message.expires_at is not None:
            assert self.broker is not None
            # MQTT-3.3.2-6: forwarded with the interval that remains.
            interval = message.remaining_expiry(self.broker.clock())
        sent = _InTransit(message, hub.clock(), interval)
        dests = set(targets) | set(groups)
        if retain:
            dests |= set(hub.buses)  # every broker keeps the same retained state
            if message.payload:
                hub.retained[message.topic] = sent
            else:
                hub.retained.pop(message.topic, None)  # MQTT-3.3.1-10
        plain = set(targets)
        me = self.broker_id
        for dest in sorted(dests):
            if dest != me:
                hub.stats["forwarded"] += 1
                hub._later(_Step(hub, dest, sent, dest in plain, tuple(groups.get(dest, ()))).run)

    def subscription_added(self, full_filter: str) -> None:
        hub = self.hub
        hub.table.setdefault(self.broker_id, set()).add(full_filter)
        for peer, bus in hub.buses.items():
            if peer != self.broker_id and bus.broker is not None:
                bus.broker.remote_subscribe(self.broker_id, full_filter)

    def subscription_removed(self, full_filter: str) -> None:
        hub = self.hub
        hub.table.get(self.broker_id, set()).discard(full_filter)
        for peer, bus in hub.buses.items():
            if peer != self.broker_id and bus.broker is not None:
                bus.broker.remote_unsubscribe(self.broker_id, full_filter)

    def session_changed(self, client_id: str) -> None:
        self.changed_sessions[client_id] += 1

    def delivery_completed(self, client_id: str) -> None:
        return None

    def release_after_store(self, client_id: str, packet_id: int) -> bool:
        return False

    # ------------------------------------------------------------------ sessions across cores

    def locate_session(self, client_id: str, clean_start: bool, resume: Resume) -> bool:
        """CONNECT for `client_id`: take the session over from the core that holds it."""
        if not self.locate_sessions:
            return False
        hub = self.hub
        holder = hub.holders.get(client_id)
        hub.holders[client_id] = self.broker_id
        hub._later(_Locate(hub, self, resume, client_id, clean_start, holder).run)
        return True


@dataclass(frozen=True, slots=True)
class _Step:
    hub: MemoryHub
    dest: str
    sent: _InTransit
    plain: bool
    groups: tuple[str, ...]

    def run(self) -> None:
        self.hub._deliver(self.dest, self.sent, self.plain, self.groups)


@dataclass(frozen=True, slots=True)
class _Locate:
    hub: MemoryHub
    bus: MemoryBus
    resume: Resume
    client_id: str
    clean_start: bool
    holder: str | None

    def run(self) -> None:
        snapshot = None
        holder_bus = self.hub.buses.get(self.holder) if self.holder is not None else None
        if holder_bus is not None and holder_bus is not self.bus and holder_bus.broker is not None:
            # Everything already on its way to the holder is delivered before the snapshot
            # (the queue is in order: those steps ran before this one).
            snapshot = holder_bus.broker.handover(
                self.client_id, self.clean_start, holder_bus.broker.clock()
            )
            self.hub.stats["handovers"] += 1
        self.resume(None if self.clean_start else snapshot)


if TYPE_CHECKING:

    def _is_a_cluster_bus(bus: MemoryBus) -> ClusterBus:
        return bus  # mypy checks that MemoryBus satisfies the Protocol
