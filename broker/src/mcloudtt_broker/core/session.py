"""Session state (MQTT 5.0 section 4.1): subscriptions, QoS 1/2 flows and the offline queue.

A session outlives its network connections when it is persistent. Outgoing QoS 1/2 messages sit
in `inflight` (sent, not yet acknowledged; resent with DUP on reconnect, MQTT-4.4.0-1) or in
`queue` (not yet sent: the client is away, its Receive Maximum is used up, or its socket is
congested). Incoming QoS 2 packet ids wait in `awaiting_release` until PUBREL (method B of
MQTT 4.3.3: the message is delivered on receipt, duplicates are recognised by id).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .message import Message
from .trie import Subscription

if TYPE_CHECKING:
    from .auth import Authorizer
    from .connection import ServerConnection
    from .stats import Stats

NEVER_EXPIRES = 0xFFFFFFFF

AWAITING_ACK = 0  # QoS 1 PUBLISH sent, PUBACK due; QoS 2 PUBLISH sent, PUBREC due
AWAITING_COMP = 1  # QoS 2 PUBREL sent, PUBCOMP due


class Outgoing:
    __slots__ = ("identifiers", "message", "qos", "retain", "state")

    def __init__(
        self, message: Message, qos: int, retain: bool, identifiers: tuple[int, ...]
    ) -> None:
        self.message = message
        self.qos = qos
        self.retain = retain
        self.identifiers = identifiers
        self.state = AWAITING_ACK


Pending = tuple[Message, int, bool, tuple[int, ...]]

# Most sessions never queue a message nor receive QoS 2: an idle subscribed device would carry an
# empty deque (760 bytes) and an empty set (216 bytes) for nothing. These immutable stand-ins are
# shared until the first write makes the session its own (`queue_for_append`, `hold_release`).
_NO_QUEUE: tuple[Pending, ...] = ()
_NO_IDS: frozenset[int] = frozenset()
# Shared and never written to: `_send` and `Broker.restore_session` give a session its own first.
_NO_INFLIGHT: dict[int, Outgoing] = {}
# ACL decisions are only cached with an authorizer: without one (and until the first decision)
# a session points at this shared empty dict (two empty dicts were 128 bytes per session);
# `own_acl_cache` / `own_acl_read` give it its own before the first write.
NO_DECISIONS: dict[Any, bool] = {}
_NO_SUBS: Mapping[str, Subscription[Any]] = MappingProxyType({})


class Session:
    __slots__ = (
        "acl_cache",
        "acl_read",
        "awaiting_release",
        "changed",
        "client_id",
        "completed",
        "connection",
        "ended_at",
        "expiry_interval",
        "inflight",
        "max_queued",
        "next_packet_id",
        "queue",
        "rights",
        "stats",
        "subs",
        "username",
        "version",
    )

    def __init__(self, client_id: str, *, max_queued: int, stats: Stats) -> None:
        self.client_id = client_id
        self.version = 4
        self.connection: ServerConnection | None = None
        # By full filter. Most devices hold one subscription: it is kept as itself (a dict with
        # one entry is 184 bytes), a dict from the second on, None without any. Written only
        # through `add_subscription` / `remove_subscription`; read with `subscriptions`.
        self.subs: Subscription[Session] | dict[str, Subscription[Session]] | None = None
        self.inflight: dict[int, Outgoing] = _NO_INFLIGHT
        self.queue: deque[Pending] | tuple[Pending, ...] = _NO_QUEUE
        self.awaiting_release: set[int] | frozenset[int] = _NO_IDS
        self.next_packet_id = 1
        self.expiry_interval = 0
        self.ended_at: float | None = None  # when the last connection closed
        self.max_queued = max_queued
        self.stats = stats
        # Told when a message is queued while the client is away (the cluster stores the session).
        self.changed: Callable[[str], None] | None = None
        # Told of each QoS 2 completion (the cluster stores the session again).
        self.completed: Callable[[str], None] | None = None
        # The identity the ACL sees (set at each CONNECT) and its decisions: (action, topic) ->
        # allowed; only used when an authorizer is configured, dropped when the rules reload.
        self.username: str | None = None
        # Write decisions by topic, subscribe decisions by ("subscribe", filter).
        self.acl_cache: dict[tuple[str, str] | str, bool] = NO_DECISIONS
        self.acl_read: dict[str, bool] = NO_DECISIONS  # delivery decisions by topic (the hot one)
        self.rights: Authorizer | None = None  # the client's own rules (JWT claims)

    def __repr__(self) -> str:
        return f"Session({self.client_id!r}, online={self.online})"

    @property
    def online(self) -> bool:
        return self.connection is not None

    @property
    def subscriptions(self) -> Mapping[str, Subscription[Session]]:
        """A read-only view of the subscriptions by full filter (made on each call: not for
        a per-message path)."""
        subs = self.subs
        if subs is None:
            return _NO_SUBS
        if isinstance(subs, dict):
            return MappingProxyType(subs)
        return MappingProxyType({subs.topic_filter: subs})

    def subscription(self, full_filter: str) -> Subscription[Session] | None:
        subs = self.subs
        if subs is None or isinstance(subs, dict):
            return subs.get(full_filter) if subs else None
        return subs if subs.topic_filter == full_filter else None

    def subscription_count(self) -> int:
        subs = self.subs
        return 0 if subs is None else len(subs) if isinstance(subs, dict) else 1

    def add_subscription(self, sub: Subscription[Session]) -> None:
        """Add, or replace the one with the same full filter."""
        subs = self.subs
        if subs is None or (not isinstance(subs, dict) and subs.topic_filter == sub.topic_filter):
            self.subs = sub
        elif isinstance(subs, dict):
            subs[sub.topic_filter] = sub
        else:
            self.subs = {subs.topic_filter: subs, sub.topic_filter: sub}

    def remove_subscription(self, full_filter: str) -> Subscription[Session] | None:
        subs = self.subs
        if subs is None:
            return None
        if isinstance(subs, dict):
            sub = subs.pop(full_filter, None)
            if not subs:
                self.subs = None
            return sub
        if subs.topic_filter != full_filter:
            return None
        self.subs = None
        return subs

    def own_inflight(self) -> dict[int, Outgoing]:
        if self.inflight is _NO_INFLIGHT:
            self.inflight = {}
        return self.inflight

    def own_acl_cache(self) -> dict[tuple[str, str] | str, bool]:
        if self.acl_cache is NO_DECISIONS:
            self.acl_cache = {}
        return self.acl_cache

    def own_acl_read(self) -> dict[str, bool]:
        if self.acl_read is NO_DECISIONS:
            self.acl_read = {}
        return self.acl_read

    def forget_decisions(self) -> None:
        """The identity or the rules changed: no cached ACL decision holds (back to shared)."""
        self.acl_cache = NO_DECISIONS
        self.acl_read = NO_DECISIONS

    def queue_for_append(self) -> deque[Pending]:
        queue = self.queue
        if isinstance(queue, deque):
            return queue
        made: deque[Pending] = deque(queue)
        self.queue = made
        return made

    def hold_release(self, packet_id: int) -> None:
        """Remember an incoming QoS 2 packet id until its PUBREL."""
        ids = self.awaiting_release
        if isinstance(ids, set):
            ids.add(packet_id)
        else:
            self.awaiting_release = {*ids, packet_id}

    def allocate_packet_id(self) -> int:
        pid = self.next_packet_id
        inflight = self.inflight
        while pid in inflight:  # MQTT-2.2.1-3: an id is not reused while it is in flight
            pid = pid + 1 if pid < 65_535 else 1
        self.next_packet_id = pid + 1 if pid < 65_535 else 1
        return pid

    def deliver(
        self, message: Message, qos: int, retain: bool, identifiers: tuple[int, ...]
    ) -> None:
        """Send `message` to this session's client at `qos`, or queue it, or count the drop."""
        conn = self.connection
        if qos == 0:
            if conn is None:
                # QoS 0 is not kept for absent clients (MQTT 5.0 section 3.1.2.4 allows either).
                self.stats.dropped["offline_qos0"] += 1
            elif conn.congested:
                self.stats.dropped["slow_consumer"] += 1
            else:
                conn.write_publish(message, 0, retain, 0, False, identifiers)
            return
        if (
            conn is not None
            and not self.queue
            and len(self.inflight) < conn.send_quota
            and not conn.congested
        ):
            self._send(conn, message, qos, retain, identifiers)
        elif len(self.queue) < self.max_queued:
            self.queue_for_append().append((message, qos, retain, identifiers))
            if conn is None and self.changed is not None:
                self.changed(self.client_id)
        else:
            self.stats.dropped["queue_full"] += 1

    def _send(
        self,
        conn: ServerConnection,
        message: Message,
        qos: int,
        retain: bool,
        identifiers: tuple[int, ...],
    ) -> None:
        pid = self.allocate_packet_id()
        if conn.write_publish(message, qos, retain, pid, message.redelivered, identifiers):
            inflight = self.inflight
            if inflight is _NO_INFLIGHT:
                inflight = self.inflight = {}
            inflight[pid] = Outgoing(message, qos, retain, identifiers)

    def pump(self, now: float) -> None:
        """Move queued messages into flight while the client's window and socket allow."""
        conn = self.connection
        if conn is None:
            return
        queue = self.queue
        if not queue:
            return
        assert isinstance(queue, deque)  # a non-empty queue is always the session's own deque
        inflight = self.inflight
        quota = conn.send_quota
        while queue and len(inflight) < quota and not conn.congested:
            message, qos, retain, identifiers = queue.popleft()
            if message.expires_at is not None and now >= message.expires_at:
                self.stats.dropped["expired"] += 1  # MQTT-3.3.2-5
                continue
            self._send(conn, message, qos, retain, identifiers)

    def resend_inflight(self) -> None:
        """On a resumed session: resend unacknowledged PUBLISH with DUP, and PUBREL (MQTT-4.4.0-1)."""
        conn = self.connection
        assert conn is not None
        for pid, entry in list(self.inflight.items()):
            if entry.state == AWAITING_ACK:
                if not conn.write_publish(
                    entry.message, entry.qos, entry.retain, pid, True, entry.identifiers
                ):
                    del self.inflight[pid]
            else:
                conn.write_pubrel(pid)

    def drop_all(self) -> None:
        # In place, as before the stand-ins: a caller holding one of them sees it emptied.
        if self.inflight:  # non-empty, so the session's own dict
            self.inflight.clear()
        if isinstance(self.queue, deque):
            self.queue.clear()
        if isinstance(self.awaiting_release, set):
            self.awaiting_release.clear()


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionRecord:
    """A subscription as it moves between brokers with its session."""

    topic_filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    identifier: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class InflightRecord:
    packet_id: int
    message: Message
    qos: int
    retain: bool
    identifiers: tuple[int, ...]
    awaiting_comp: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionSnapshot:
    """Everything of a session that must survive a move to another broker."""

    client_id: str
    expiry_interval: int
    subscriptions: tuple[SubscriptionRecord, ...] = ()
    inflight: tuple[InflightRecord, ...] = ()
    queue: tuple[Pending, ...] = ()
    awaiting_release: tuple[int, ...] = ()


def snapshot_of(session: Session) -> SessionSnapshot:
    return SessionSnapshot(
        client_id=session.client_id,
        expiry_interval=session.expiry_interval,
        subscriptions=tuple(
            SubscriptionRecord(
                topic_filter=sub.topic_filter,
                qos=sub.qos,
                no_local=sub.no_local,
                retain_as_published=sub.retain_as_published,
                retain_handling=sub.retain_handling,
                identifier=sub.identifier,
            )
            for sub in session.subscriptions.values()
        ),
        inflight=tuple(
            InflightRecord(
                packet_id=pid,
                message=entry.message,
                qos=entry.qos,
                retain=entry.retain,
                identifiers=entry.identifiers,
                awaiting_comp=entry.state == AWAITING_COMP,
            )
            for pid, entry in session.inflight.items()
        ),
        queue=tuple(session.queue),
        awaiting_release=tuple(sorted(session.awaiting_release)),
    )
