"""The broker core: sessions, subscriptions, retained messages, wills, expiry and `$SYS`.

Sans-IO: time comes from an injected clock and all output goes to connections' buffers. The
asyncio shell (`mcloudtt_broker.server`) calls `connect()` for each accepted socket and `tick()`
about once a second for keepalive, delayed wills, session expiry and `$SYS` statistics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import __version__
from ..cluster.bus import ClusterBus, LocalBus
from ..mqtt.reason_codes import ReasonCode
from ..mqtt.topics import split_shared
from .connection import CONNECTED, CONNECTING, Link, ServerConnection
from .message import Message
from .retained import MemoryRetainedStore, RetainedStore
from .session import NEVER_EXPIRES, Session
from .stats import Stats
from .trie import Subscription, SubscriptionTrie


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    broker_id: str = "mcloudtt"
    max_keepalive: int = 0  # 0: accept what the client asks
    max_packet_size: int = 4 * 1024 * 1024
    max_queued_messages: int = 1000  # per session, QoS 1/2 not yet sent
    receive_maximum: int = 1024  # inbound QoS 2 awaiting PUBREL, per client
    max_inflight: int = 1024  # outbound unacknowledged QoS 1/2, per client
    topic_alias_maximum: int = 64
    max_session_expiry: int = 7 * 24 * 3600
    connect_timeout: float = 10.0
    sys_interval: float = 10.0  # 0 disables $SYS


Authenticator = Callable[[str, "str | None", "bytes | None"], bool]


def allow_all(client_id: str, username: str | None, password: bytes | None) -> bool:
    return True


class Broker:
    def __init__(
        self,
        settings: BrokerSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        bus: ClusterBus | None = None,
        retained: RetainedStore | None = None,
        authenticate: Authenticator = allow_all,
    ) -> None:
        self.settings = settings or BrokerSettings()
        self.clock = clock
        self.bus: ClusterBus = bus or LocalBus()
        self.retained: RetainedStore = retained if retained is not None else MemoryRetainedStore()
        self.authenticate = authenticate
        self.stats = Stats(clock())
        self.sessions: dict[str, Session] = {}
        self.connections: set[ServerConnection] = set()
        self.trie = SubscriptionTrie()
        self.pending_wills: dict[str, tuple[float, Message]] = {}
        self.expiring: dict[str, float] = {}
        self._next_sys = clock() + self.settings.sys_interval

    # ------------------------------------------------------------ connections and sessions

    def connect(self, link: Link, now: float) -> ServerConnection:
        conn = ServerConnection(self, link, now)
        self.connections.add(conn)
        self.stats.connections_total += 1
        return conn

    def attach_session(
        self, conn: ServerConnection, client_id: str, clean_start: bool, now: float
    ) -> tuple[Session, bool]:
        # MQTT-3.1.3-9: a new connection for the ClientId cancels a delayed will.
        self.pending_wills.pop(client_id, None)
        existing = self.sessions.get(client_id)
        if existing is not None and existing.connection is not None:
            old = existing.connection
            existing.connection = None
            old.session = None
            if old.will_delay:
                old.will = None  # the new connection came within the will delay
            old.disconnect(ReasonCode.SESSION_TAKEN_OVER, publish_will=True)  # MQTT-3.1.4-3
        if existing is not None and not clean_start:
            session, present = existing, True
            self.expiring.pop(client_id, None)
        else:
            if existing is not None:
                self.destroy_session(existing)
            session = Session(
                client_id, max_queued=self.settings.max_queued_messages, stats=self.stats
            )
            self.sessions[client_id] = session
            present = False
        session.connection = conn
        session.ended_at = None
        return session, present

    def detach(self, conn: ServerConnection, now: float) -> None:
        """A connected client's network connection ended."""
        self.connections.discard(conn)
        session = conn.session
        expiry = NEVER_EXPIRES
        if session is not None and session.connection is conn:
            session.connection = None
            session.ended_at = now
            expiry = session.expiry_interval
            if expiry == 0:
                self.destroy_session(session)
            elif expiry != NEVER_EXPIRES:
                self.expiring[session.client_id] = now + expiry
        will = conn.will
        if will is not None and conn.will_on_close:
            delay = min(
                conn.will_delay, expiry
            )  # the will goes at the latest when the session ends
            if delay <= 0:
                self.publish(will)
            else:
                self.pending_wills[conn.client_id] = (now + delay, will)
        conn.will = None

    def forget(self, conn: ServerConnection) -> None:
        """A connection closed before its CONNECT was accepted."""
        self.connections.discard(conn)

    def destroy_session(self, session: Session) -> None:
        for full_filter in list(session.subscriptions):
            self.unsubscribe(session, full_filter)
        session.drop_all()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        self.expiring.pop(session.client_id, None)

    # ------------------------------------------------------------ subscriptions

    def subscribe(self, session: Session, sub: Subscription, inner_filter: str) -> bool:
        session.subscriptions[sub.topic_filter] = sub
        return self.trie.add(sub, inner_filter)

    def unsubscribe(self, session: Session, full_filter: str) -> bool:
        sub = session.subscriptions.pop(full_filter, None)
        if sub is None:
            return False
        group, inner = split_shared(full_filter)
        self.trie.remove(session, inner, group)
        return True

    def send_retained(
        self, session: Session, sub: Subscription, inner_filter: str, now: float
    ) -> None:
        identifiers = (sub.identifier,) if sub.identifier else ()
        for message in list(self.retained.match(inner_filter)):
            if message.expired(now):
                self.retained.delete(message.topic)  # MQTT-3.3.2-5
                continue
            # MQTT-3.3.1-8/9: retained messages for a new subscription carry RETAIN=1.
            session.deliver(message, min(message.qos, sub.qos), True, identifiers)

    # ------------------------------------------------------------ publish and routing

    def authorize_publish(self, client_id: str, topic: str) -> bool:
        # $SYS belongs to the broker; clients may read it, not write it.
        return not topic.startswith("$SYS/")

    def publish(self, message: Message) -> None:
        """A publish accepted here (from a client, a will or $SYS): store, route, forward."""
        if message.retain:
            if message.payload:
                self.retained.set(message)
            else:
                self.retained.delete(message.topic)  # MQTT-3.3.1-10: empty payload clears
        self.route(message)
        self.bus.forward(message)

    def deliver_remote(self, message: Message) -> None:
        """A publish from another broker: store its retained state and route locally only."""
        if message.retain:
            if message.payload:
                self.retained.set(message)
            else:
                self.retained.delete(message.topic)
        self.route(message)

    def route(self, message: Message) -> None:
        per_session, groups = self.trie.match(message.topic)
        origin = message.origin
        msg_qos = message.qos
        msg_retain = message.retain
        for session, subs in per_session:
            if len(subs) == 1:
                sub = subs[0]
                if sub.no_local and session.client_id == origin:
                    continue  # MQTT-3.8.3-3
                qos = sub.qos if sub.qos < msg_qos else msg_qos
                retain = msg_retain and sub.retain_as_published  # MQTT-3.3.1-12/13
                identifiers: tuple[int, ...] = (sub.identifier,) if sub.identifier else ()
            else:
                # Overlapping subscriptions: one copy at the highest QoS, with every matching
                # subscription identifier (MQTT-3.3.4-2, MQTT-3.3.4-3).
                live = [s for s in subs if not (s.no_local and session.client_id == origin)]
                if not live:
                    continue
                qos = min(max(s.qos for s in live), msg_qos)
                retain = msg_retain and any(s.retain_as_published for s in live)
                identifiers = tuple(s.identifier for s in live if s.identifier)
            session.deliver(message, qos, retain, identifiers)
        for group in groups:
            member = group.pick()
            if member is None:
                continue
            qos = member.qos if member.qos < msg_qos else msg_qos
            retain = msg_retain and member.retain_as_published
            member.session.deliver(
                message, qos, retain, (member.identifier,) if member.identifier else ()
            )

    # ------------------------------------------------------------ time

    def tick(self, now: float) -> None:
        settings = self.settings
        for conn in list(self.connections):
            if conn.state == CONNECTING:
                if now - conn.created_at > settings.connect_timeout:
                    conn.disconnect(ReasonCode.MAXIMUM_CONNECT_TIME, publish_will=False)
            elif conn.state == CONNECTED and conn.keep_alive:
                # MQTT-3.1.2-22: one and a half times the keep alive without a packet.
                if now - conn.last_received > 1.5 * conn.keep_alive:
                    conn.disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT, publish_will=True)
        if self.pending_wills:
            for client_id, (due, will) in list(self.pending_wills.items()):
                if due <= now:
                    del self.pending_wills[client_id]
                    self.publish(will)
        if self.expiring:
            for client_id, due in list(self.expiring.items()):
                if due <= now:
                    session = self.sessions.get(client_id)
                    if session is not None and session.connection is None:
                        self.destroy_session(session)
                    self.expiring.pop(client_id, None)
        if settings.sys_interval and now >= self._next_sys:
            self._next_sys = now + settings.sys_interval
            self.publish_sys(now)

    def sys_values(self, now: float) -> dict[str, str]:
        stats = self.stats
        return {
            "version": f"mcloudtt {__version__}",
            "uptime": str(int(now - stats.started_at)),
            "clients/connected": str(self.connected_count()),
            "clients/total": str(len(self.sessions)),
            "messages/received": str(sum(stats.messages_received)),
            "messages/sent": str(sum(stats.messages_sent)),
            "bytes/received": str(stats.bytes_received),
            "bytes/sent": str(stats.bytes_sent),
            "retained messages/count": str(len(self.retained)),
            "subscriptions/count": str(self.trie.count),
        }

    def publish_sys(self, now: float) -> None:
        for name, value in self.sys_values(now).items():
            self.publish(Message(f"$SYS/broker/{name}", value.encode(), 0, True))

    def connected_count(self) -> int:
        return sum(1 for c in self.connections if c.state == CONNECTED)

    def shutdown(self) -> None:
        """Tell 5.0 clients the server is going away (0x8B) and close every connection."""
        for conn in list(self.connections):
            conn.disconnect(ReasonCode.SERVER_SHUTTING_DOWN, publish_will=False)
