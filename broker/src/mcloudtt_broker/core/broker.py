"""The broker core: sessions, subscriptions, retained messages, wills, expiry and `$SYS`.

Sans-IO: time comes from an injected clock and all output goes to connections' buffers. The
asyncio shell (`mcloudtt_broker.server`) calls `connect()` for each accepted socket and `tick()`
about once a second for keepalive, delayed wills, session expiry and `$SYS` statistics.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from .. import __version__
from ..mqtt.properties import Properties
from ..mqtt.reason_codes import ReasonCode
from ..mqtt.topics import split_shared
from .auth import READ, WRITE, AuthChain, Authorizer
from .connection import CONNECTED, CONNECTING, Link, ServerConnection
from .message import Message
from .ports import ClusterBus, LocalBus
from .retained import MemoryRetainedStore, RetainedStore
from .session import (
    AWAITING_COMP,
    NEVER_EXPIRES,
    Outgoing,
    Session,
    SessionSnapshot,
    snapshot_of,
)
from .stats import Stats
from .trie import SharedGroup, Subscription, SubscriptionTrie, in_exact_index

READ_DENY = (READ, "deny")


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    broker_id: str = "mcloudtt"
    max_keepalive: int = 0  # 0: accept what the client asks
    max_packet_size: int = 4 * 1024 * 1024
    max_queued_messages: int = 1000  # per session, QoS 1/2 not yet sent
    receive_maximum: int = 1024  # inbound QoS 2 awaiting PUBREL, per client
    max_inflight: int = 1024  # outbound unacknowledged QoS 1/2, per client
    topic_alias_maximum: int = 64
    mqtt31: bool = True  # accept MQTT 3.1 (MQIsdp, level 3) clients
    max_session_expiry: int = 7 * 24 * 3600
    connect_timeout: float = 10.0
    sys_interval: float = 10.0  # 0 disables $SYS
    # Single node: $SYS/broker/...; a cluster uses $SYS/brokers/{id}/... so brokers do not
    # overwrite each other's retained statistics.
    sys_root: str = "$SYS/broker"
    # Limits (0: off; an unset limit costs nothing per message).
    publish_rate: float = 0.0  # PUBLISH packets per second per client (token bucket)
    publish_burst: int = 0  # bucket size; 0: one second's worth
    bandwidth: int = 0  # bytes of PUBLISH per second per client (token bucket, 1 s burst)
    max_subscriptions: int = 0  # per client; more: SUBACK 0x97 (5.0) / 0x80 (3.1.1)
    max_topic_length: int = 0  # bytes of UTF-8 in a topic name or filter
    max_topic_levels: int = 0  # '/'-separated levels in a topic name or filter
    # What a publish or subscription the ACL denies does besides its answer: "ignore" (3.1.1:
    # dropped / SUBACK 0x80; 5.0: reason 0x87) or "disconnect" (EMQX's deny_action).
    acl_deny_action: str = "ignore"


class RemoteBroker:
    """Another broker of the cluster, as a holder of subscriptions in the cluster table."""

    __slots__ = ("broker_id", "filters")
    online = True

    def __init__(self, broker_id: str) -> None:
        self.broker_id = broker_id
        self.filters: set[str] = set()

    def __repr__(self) -> str:
        return f"RemoteBroker({self.broker_id!r})"


_NO_TARGETS: tuple[str, ...] = ()

# Decisions kept per session before its cache starts afresh (a client walking many topics).
ACL_CACHE_SIZE = 4096


class Broker:
    def __init__(
        self,
        settings: BrokerSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        bus: ClusterBus | None = None,
        retained: RetainedStore | None = None,
        auth: AuthChain | None = None,
        authorizer: Authorizer | None = None,
    ) -> None:
        self.settings = settings or BrokerSettings()
        self.clock = clock
        self.bus: ClusterBus = bus or LocalBus()
        self._session_changed = self.bus.session_changed
        self._delivery_completed = self.bus.delivery_completed
        self.retained: RetainedStore = retained if retained is not None else MemoryRetainedStore()
        self.auth = auth if auth is not None else AuthChain()
        # None: no ACL, nothing is asked on publish, subscribe or delivery (the hot path).
        self.authorizer = authorizer
        self.stats = Stats(clock())
        self.sessions: dict[str, Session] = {}
        self.connections: set[ServerConnection] = set()
        self.trie: SubscriptionTrie[Session] = SubscriptionTrie()
        # The cluster table: what other brokers subscribed to, kept current by the bus.
        self.remote: SubscriptionTrie[RemoteBroker] = SubscriptionTrie()
        # Per topic: the remote brokers with a plain subscription, and the remote shared groups
        # (fan-in repeats topics); dropped on every change of the table.
        self._remote_routes: dict[str, tuple[list[str], list[SharedGroup[RemoteBroker]]]] = {}
        self.peers: dict[str, RemoteBroker] = {}
        # Local sessions per full filter, for the filters the trie's exact index does not
        # count itself (wildcards, shared): a device's own filter costs no entry here.
        self.filter_refs: Counter[str] = Counter()
        self._group_turns: Counter[str] = Counter()
        self.pending_wills: dict[str, tuple[float, Message]] = {}
        self.expiring: dict[str, float] = {}
        self._next_sys = clock() + self.settings.sys_interval

    # ------------------------------------------------------------ connections and sessions

    def connect(self, link: Link, now: float) -> ServerConnection:
        conn = ServerConnection(self, link, now)
        self.connections.add(conn)
        return conn

    def attach_session(
        self,
        conn: ServerConnection,
        client_id: str,
        clean_start: bool,
        now: float,
        snapshot: SessionSnapshot | None = None,
    ) -> tuple[Session, bool]:
        self.stats.connections_total += 1
        # MQTT-3.1.3-9: a new connection for the ClientId cancels a delayed will.
        self.pending_wills.pop(client_id, None)
        existing = self.sessions.get(client_id)
        if existing is not None and existing.connection is not None:
            self._kick(existing, session_ends=clean_start or existing.expiry_interval == 0)
            if existing.expiry_interval == 0:
                # A session made with CleanSession 1 (3.1.1) or Session Expiry 0 (5.0) ends with
                # its connection, a takeover included: nothing of it is reused (MQTT-3.1.2-6 in
                # 3.1.1, 5.0 section 3.1.2.11.2), so the new connection starts afresh.
                self.destroy_session(existing)
                existing = None
        if snapshot is not None and not clean_start:
            # The session comes from another broker: it replaces whatever we had.
            if existing is not None:
                self.destroy_session(existing)
            session, present = self.restore_session(snapshot, now), True
        elif existing is not None and not clean_start:
            session, present = existing, True
            self.expiring.pop(client_id, None)
        else:
            if existing is not None:
                self.destroy_session(existing)
            session = self._new_session(client_id)
            present = False
        session.connection = conn
        session.ended_at = None
        self.bus.session_changed(client_id)
        return session, present

    def _kick(self, session: Session, *, session_ends: bool) -> None:
        """Close the session's current connection: its ClientId connected again (MQTT-3.1.4-3).

        The will rules on takeover: the old connection did not end with a normal DISCONNECT, so
        its will is published (MQTT-3.1.2-8), at once, unless its session continues into the
        new connection. A will with a delay whose session continues is dropped: the ClientId
        came back within the delay (MQTT-3.1.3-9). When the session ends here (the old
        connection had Session Expiry 0 / CleanSession 1, or the new one asks for Clean Start
        1), a will delay no longer holds: the will goes when the session ends (5.0 sections
        3.1.2.5 and 3.1.4). 3.1.1 has no will delay: its will is always published.
        """
        old = session.connection
        assert old is not None
        session.connection = None
        old.session = None
        if old.will_delay:
            if session_ends:
                old.will_delay = 0
            else:
                old.will = None
        old.disconnect(ReasonCode.SESSION_TAKEN_OVER, publish_will=True)

    def handover(self, client_id: str, clean_start: bool, now: float) -> SessionSnapshot | None:
        """Another broker took this ClientId: close our connection, give up the session."""
        self.pending_wills.pop(client_id, None)
        session = self.sessions.get(client_id)
        if session is None:
            return None
        # A session with expiry 0 ends with its connection (see attach_session): not handed on.
        ends = clean_start or session.expiry_interval == 0
        if session.connection is not None:
            self._kick(session, session_ends=ends)
        snapshot = None if ends else snapshot_of(session)
        self.destroy_session(session)
        return snapshot

    def _new_session(self, client_id: str) -> Session:
        session = Session(client_id, max_queued=self.settings.max_queued_messages, stats=self.stats)
        # One bound method for all sessions, not one per session (64 bytes each).
        session.changed = self._session_changed
        session.completed = self._delivery_completed
        self.sessions[client_id] = session
        return session

    def restore_session(self, snapshot: SessionSnapshot, now: float) -> Session:
        session = self._new_session(snapshot.client_id)
        session.expiry_interval = snapshot.expiry_interval
        for record in snapshot.subscriptions:
            try:
                group, inner = split_shared(record.topic_filter)
            except ValueError:
                continue
            sub: Subscription[Session] = Subscription(
                session=session,
                topic_filter=record.topic_filter,
                qos=record.qos,
                no_local=record.no_local,
                retain_as_published=record.retain_as_published,
                retain_handling=record.retain_handling,
                identifier=record.identifier,
                share_group=group,
            )
            self.subscribe(session, sub, inner)
        for entry in snapshot.inflight:
            outgoing = Outgoing(entry.message, entry.qos, entry.retain, entry.identifiers)
            if entry.awaiting_comp:
                outgoing.state = AWAITING_COMP
            session.own_inflight()[entry.packet_id] = outgoing
        if snapshot.queue:
            session.queue_for_append().extend(snapshot.queue)
        if snapshot.awaiting_release:
            session.awaiting_release = set(snapshot.awaiting_release)
        self.bus.session_changed(snapshot.client_id)
        return session

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
            else:
                if expiry != NEVER_EXPIRES:
                    self.expiring[session.client_id] = now + expiry
                self.bus.session_changed(session.client_id)
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
            self.bus.session_changed(session.client_id)
        self.expiring.pop(session.client_id, None)

    # ------------------------------------------------------------ subscriptions

    def subscribe(self, session: Session, sub: Subscription[Session], inner_filter: str) -> bool:
        session.add_subscription(sub)
        self.bus.session_changed(session.client_id)
        existed = self.trie.add(sub, inner_filter)
        if not existed:
            full_filter = sub.topic_filter
            if in_exact_index(inner_filter, sub.share_group):
                first = self.trie.exact_holders(inner_filter) == 1
            else:
                refs = self.filter_refs[full_filter] = self.filter_refs[full_filter] + 1
                first = refs == 1
            if first:
                self.bus.subscription_added(full_filter)
        return existed

    def unsubscribe(self, session: Session, full_filter: str) -> bool:
        sub = session.remove_subscription(full_filter)
        if sub is None:
            return False
        self.bus.session_changed(session.client_id)
        group, inner = split_shared(full_filter)
        self.trie.remove(session, inner, group)
        if in_exact_index(inner, group):
            last = self.trie.exact_holders(inner) == 0
        else:
            self.filter_refs[full_filter] -= 1
            last = self.filter_refs[full_filter] <= 0
            if last:
                del self.filter_refs[full_filter]
        if last:
            self.bus.subscription_removed(full_filter)
        return True

    # ------------------------------------------------------------ the cluster table

    def remote_subscribe(self, broker_id: str, full_filter: str) -> None:
        peer = self.peers.get(broker_id)
        if peer is None:
            peer = self.peers[broker_id] = RemoteBroker(broker_id)
        if full_filter in peer.filters:
            return
        try:
            group, inner = split_shared(full_filter)
        except ValueError:
            return
        peer.filters.add(full_filter)
        entry: Subscription[RemoteBroker] = Subscription(
            session=peer, topic_filter=full_filter, qos=2, share_group=group
        )
        self.remote.add(entry, inner)
        self._remote_routes.clear()

    def remote_unsubscribe(self, broker_id: str, full_filter: str) -> None:
        peer = self.peers.get(broker_id)
        if peer is None or full_filter not in peer.filters:
            return
        peer.filters.discard(full_filter)
        group, inner = split_shared(full_filter)
        self.remote.remove(peer, inner, group)
        self._remote_routes.clear()

    def remote_forget(self, broker_id: str) -> None:
        """A broker left the cluster (or its table is being reloaded): drop its entries."""
        peer = self.peers.pop(broker_id, None)
        if peer is not None:
            for full_filter in list(peer.filters):
                group, inner = split_shared(full_filter)
                self.remote.remove(peer, inner, group)
            peer.filters.clear()
            self._remote_routes.clear()

    def remote_filter_count(self) -> int:
        return sum(len(peer.filters) for peer in self.peers.values())

    def local_filters(self) -> list[str]:
        return self.trie.exact_filters() + list(self.filter_refs)

    # ------------------------------------------------------------ sessions across brokers
    # (`ports.ClusterCore`: what a cluster bus uses)

    def has_session(self, client_id: str) -> bool:
        return client_id in self.sessions

    def persistent_sessions(self) -> list[str]:
        return [client_id for client_id, s in self.sessions.items() if s.expiry_interval]

    def stored_session(self, client_id: str) -> SessionSnapshot | None:
        session = self.sessions.get(client_id)
        if session is None or not session.expiry_interval:
            return None
        return snapshot_of(session)

    def will_of(self, client_id: str) -> Message | None:
        """The will due if the connection of `client_id` here ended now without DISCONNECT
        (a cluster bus stores it, so that it is published if this broker dies). A will with
        a delay is not: it waits here, and is lost with this broker."""
        session = self.sessions.get(client_id)
        conn = session.connection if session is not None else None
        if conn is None or not conn.will_on_close or conn.will_delay:
            return None
        return conn.will

    def queued(self, client_id: str) -> int:
        """How many messages wait in the queue of `client_id`'s session (0 without one)."""
        session = self.sessions.get(client_id)
        return len(session.queue) if session is not None else 0

    def bound_queue(self, client_id: str, bounded: bool) -> None:
        """Lift (False) or restore (True) the queue bound of `client_id`'s session: a live
        hand-over's drain queues for it while its client waits for CONNACK, and what the old
        holder queued may have filled it already (dropped, those would be lost). Restored,
        the bound is at least what the queue holds then: what comes next is not dropped
        before its client, back at once, has taken some of it."""
        session = self.sessions.get(client_id)
        if session is not None:
            limit = self.settings.max_queued_messages
            session.max_queued = max(limit, len(session.queue)) if bounded else 1 << 62

    def queue_behind(self, client_id: str, start: int, stop: int) -> None:
        """Move the queued messages [start, stop) of `client_id`'s session behind the rest (a
        live hand-over: what the new broker queued for the session since it took it is newer
        than what it then found for it in the old holder's inbox)."""
        session = self.sessions.get(client_id)
        if session is None or stop <= start:
            return
        items = list(session.queue)
        session.queue = deque([*items[:start], *items[stop:], *items[start:stop]])

    def adopt_session(self, snapshot: SessionSnapshot, now: float) -> None:
        session = self.restore_session(snapshot, now)
        session.ended_at = now
        if session.expiry_interval != NEVER_EXPIRES:
            self.expiring[session.client_id] = now + session.expiry_interval

    def surrender_sessions(self) -> list[str]:
        """The cluster declared us dead and another broker adopted our persistent sessions:
        they are its now. Close their connections (5.0: DISCONNECT 0x8E Session taken over;
        no will, the session goes on elsewhere) and forget them here, so that no session has
        two owners; their clients reconnect and find them at the adopter."""
        given_up = [s for s in self.sessions.values() if s.expiry_interval]
        for session in given_up:
            self.pending_wills.pop(session.client_id, None)
            conn = session.connection
            if conn is not None:
                session.connection = None
                conn.session = None
                conn.disconnect(ReasonCode.SESSION_TAKEN_OVER, publish_will=False)
            self.destroy_session(session)
        return [s.client_id for s in given_up]

    def keep_session(self, snapshot: SessionSnapshot, now: float) -> None:
        """A session fetched for a CONNECT whose client left before its CONNACK: kept here
        offline (the next CONNECT of the ClientId, here or elsewhere, takes it)."""
        if snapshot.client_id not in self.sessions:
            self.adopt_session(snapshot, now)

    def idle_sessions(self) -> list[str]:
        # Online persistent sessions with nothing in flight or queued: everything delivered to
        # them so far is acknowledged (a cluster bus checkpoints them for its inbox replay).
        # One without subscriptions gets nothing replayed: no checkpoint to write (10,000 such
        # clients would cost 10,000 writes every checkpoint).
        return [
            client_id
            for client_id, s in self.sessions.items()
            if s.expiry_interval
            and s.connection is not None
            and s.subs is not None
            and not s.inflight
            and not s.queue
        ]

    def release(self, client_id: str, packet_id: int) -> None:
        session = self.sessions.get(client_id)
        conn = session.connection if session is not None else None
        if conn is not None and session is not None:
            entry = session.inflight.get(packet_id)
            if entry is not None and entry.state == AWAITING_COMP:
                conn.write_pubrel(packet_id)

    def busy_sessions(self) -> list[str]:
        # Online persistent sessions with something in flight or queued.
        return [
            client_id
            for client_id, s in self.sessions.items()
            if s.expiry_interval and s.connection is not None and (s.inflight or s.queue)
        ]

    def replay_to(
        self, client_ids: Iterable[str], message: Message, *, redelivered: bool = True
    ) -> None:
        """Deliver `message` to the plain subscriptions of these sessions only (a dead
        broker's inbox replayed to the sessions taken from it; with `redelivered` False, a
        live broker's inbox past the snapshot of a session it handed over)."""
        wanted = set(client_ids)
        per_session, _ = self.trie.match(message.topic)
        chosen = [(session, subs) for session, subs in per_session if session.client_id in wanted]
        if chosen:
            # The dead broker may have sent it before it died: DUP 1 (MQTT-3.3.1-1).
            self._deliver_plain(message.redelivery() if redelivered else message, chosen)

    def remote_route(self, message: Message) -> tuple[Sequence[str], dict[str, list[str]]]:
        """Where a publish accepted before the cluster table was known goes now: the remote
        brokers with a plain subscription, and a member broker for each shared group that had
        no member here (those here got it when it was published)."""
        remote_plain, remote_groups = self.remote.match(message.topic)
        targets = [peer.broker_id for peer, _ in remote_plain]
        assignments: dict[str, list[str]] = {}
        for remote_group in remote_groups:
            key = remote_group.key
            group_name, inner = split_shared(key)
            if self.trie.group(inner, group_name or "") is not None:
                continue
            brokers = [peer.broker_id for peer in remote_group.members]
            if brokers:
                turn = self._group_turns[key]
                self._group_turns[key] = turn + 1
                assignments.setdefault(brokers[turn % len(brokers)], []).append(key)
        return targets, assignments

    def replay_shared(self, message: Message, keys: Iterable[str], gone: str) -> None:
        """Give `message` to each of these shared groups (`$share/{name}/{filter}`) once more:
        the broker `gone` was chosen to serve them and died before its member acknowledged.
        A local member if there is one (an adopted offline one queues it), else a member on
        another live broker."""
        assignments: dict[str, list[str]] = {}
        remote_groups = None
        for key in keys:
            group_name, inner = split_shared(key)
            group = self.trie.group(inner, group_name or "")
            member = group.pick() if group is not None else None
            if member is not None:
                self._deliver_one(message, member)
                continue
            if remote_groups is None:
                _, remote_groups = self.remote.match(message.topic)
            for remote_group in remote_groups:
                if remote_group.key != key:
                    continue
                brokers = [p.broker_id for p in remote_group.members if p.broker_id != gone]
                if brokers:
                    turn = self._group_turns[key]
                    self._group_turns[key] = turn + 1
                    assignments.setdefault(brokers[turn % len(brokers)], []).append(key)
        if assignments:
            self.bus.forward(message, _NO_TARGETS, assignments)

    # ------------------------------------------------------------ retained messages

    def retained_messages(self) -> list[Message]:
        return list(self.retained.match("#"))  # '#' leaves out $-topics (MQTT-4.7.2-1)

    def load_retained(self, messages: Iterable[Message]) -> None:
        store = self.retained
        seen: set[str] = set()
        for message in messages:
            seen.add(message.topic)
            store.set(message)
        # A retained message cleared while we were away is gone from the cluster: drop it here.
        for topic in [m.topic for m in store.match("#")]:
            if topic not in seen:
                store.delete(topic)

    def send_retained(
        self, session: Session, sub: Subscription[Session], inner_filter: str, now: float
    ) -> None:
        identifiers = (sub.identifier,) if sub.identifier else ()
        for message in list(self.retained.match(inner_filter)):
            if message.expired(now):
                self.retained.delete(message.topic)  # MQTT-3.3.2-5
                continue
            if self.authorizer is not None and not self.may(session, READ, message.topic):
                continue
            # MQTT-3.3.1-8/9: retained messages for a new subscription carry RETAIN=1.
            session.deliver(message, min(message.qos, sub.qos), True, identifiers)

    # ------------------------------------------------------------ publish and routing

    def may(self, session: Session, action: str, topic: str) -> bool:
        """The authorizer's answer for this session, cached per action and topic; counted."""
        if action == READ:
            allowed = session.acl_read.get(topic)
            if allowed is None:
                allowed = self._read_decision(session, topic)
            if allowed:
                self.stats.read_allowed += 1
            else:
                self.stats.acl_other[READ_DENY] += 1
            return allowed
        # Write decisions are keyed by the topic alone (the hot one, looked up inline on
        # PUBLISH), subscribe decisions by (action, filter).
        key: tuple[str, str] | str = topic if action == WRITE else (action, topic)
        allowed = session.acl_cache.get(key)
        if allowed is None:
            # The client's own rights (JWT claims) decide when it has them, else the ACL.
            authorizer = session.rights or self.authorizer
            assert authorizer is not None
            allowed = authorizer.allowed(session.client_id, session.username, action, topic)
            cache = session.own_acl_cache()
            if len(cache) >= ACL_CACHE_SIZE:
                cache.clear()
            cache[key] = allowed
        if allowed and action == WRITE:
            self.stats.write_allowed += 1
        else:
            self.stats.acl_other[action, "allow" if allowed else "deny"] += 1
        return allowed

    def _read_decision(self, session: Session, topic: str) -> bool:
        """Ask (not counted: the caller counts) and cache whether a delivery may be made."""
        authorizer = session.rights or self.authorizer
        assert authorizer is not None
        allowed = authorizer.allowed(session.client_id, session.username, READ, topic)
        cache = session.own_acl_read()
        if len(cache) >= ACL_CACHE_SIZE:
            cache.clear()
        cache[topic] = allowed
        return allowed

    def set_rules(self, auth: AuthChain | None, authorizer: Authorizer | None) -> None:
        """New authentication chain and ACL (SIGHUP): every cached decision is dropped."""
        if auth is not None:
            self.auth = auth
        self.authorizer = authorizer
        self.forget_decisions()

    def forget_decisions(self) -> None:
        """Some rules changed (a reload, rights changed in Redis): drop every cached decision."""
        for session in self.sessions.values():
            session.forget_decisions()

    def authorize_publish(self, client_id: str, topic: str) -> bool:
        # $SYS belongs to the broker; clients may read it, not write it.
        return not topic.startswith("$SYS/")

    def publish(self, message: Message) -> None:
        """A publish accepted here (from a client, a will or $SYS): store, route, forward."""
        if message.retain:
            self._store_retained(message)
        targets, groups = self.route(message)
        self.bus.forward(message, targets, groups)

    def deliver_remote(
        self, message: Message, plain: bool, groups: Sequence[str], skip: Collection[str] = ()
    ) -> Sequence[str]:
        """A publish from another broker: keep its retained state and deliver here only.

        `plain`: deliver to local non-shared subscriptions (but for the sessions in `skip`:
        handed to us by a broker that delivered it already); `groups`: shared groups the
        origin chose this broker for. Returns those of them with no member here (the origin's
        table was behind: the caller passes the message on to a member elsewhere).
        """
        if message.retain:
            self._store_retained(message)
        if plain:
            per_session, _ = self.trie.match(message.topic)
            if skip:
                per_session = [pair for pair in per_session if pair[0].client_id not in skip]
            if per_session:
                self._deliver_plain(message, per_session)
        orphaned: Sequence[str] = _NO_TARGETS
        for key in groups:
            group_name, inner = split_shared(key)
            group = self.trie.group(inner, group_name or "")
            member = group.pick() if group is not None else None
            if member is not None:
                self._deliver_one(message, member)
            else:
                orphaned = [*orphaned, key]
        return orphaned

    def _store_retained(self, message: Message) -> None:
        if message.payload:
            self.retained.set(message)
        else:
            self.retained.delete(message.topic)  # MQTT-3.3.1-10: empty payload clears

    def route(self, message: Message) -> tuple[Sequence[str], dict[str, list[str]]]:
        """Deliver to local subscribers; return what the cluster still has to do.

        Returns the remote brokers with a matching plain subscription, and for each remote
        broker the shared groups it was chosen to serve: each shared group gets the message once
        in the whole cluster (round robin over the brokers that have members).
        """
        topic = message.topic
        per_session, groups = self.trie.match(topic)
        if per_session:
            self._deliver_plain(message, per_session)
        if not self.peers:
            for group in groups:
                member = group.pick()
                if member is not None:
                    self._deliver_one(message, member)
            return _NO_TARGETS, {}
        route = self._remote_routes.get(topic)
        if route is None:
            remote_plain, found_groups = self.remote.match(topic)
            route = ([peer.broker_id for peer, _ in remote_plain], found_groups)
            if len(self._remote_routes) >= 10_000:
                self._remote_routes.clear()
            self._remote_routes[topic] = route
        targets, remote_groups = route
        assignments: dict[str, list[str]] = {}
        if groups or remote_groups:
            local_groups = {group.key: group for group in groups}
            candidates: dict[str, list[str | None]] = {key: [None] for key in local_groups}
            for remote_group in remote_groups:
                options = candidates.setdefault(remote_group.key, [])
                options.extend(peer.broker_id for peer in remote_group.members)
            for key, options in candidates.items():
                turn = self._group_turns[key]
                self._group_turns[key] = turn + 1
                choice = options[turn % len(options)]
                if choice is None:
                    member = local_groups[key].pick()
                    if member is not None:
                        self._deliver_one(message, member)
                else:
                    assignments.setdefault(choice, []).append(key)
        return targets, assignments

    def _deliver_plain(
        self, message: Message, per_session: list[tuple[Session, list[Subscription[Session]]]]
    ) -> None:
        origin = message.origin
        msg_qos = message.qos
        msg_retain = message.retain
        acl = self.authorizer is not None
        topic = message.topic
        denied = 0
        for session, subs in per_session:
            if acl:
                # Inline cache lookup: one dict get per delivery; counted once per message.
                allowed = session.acl_read.get(topic)
                if allowed is None:
                    allowed = self._read_decision(session, topic)
                if not allowed:
                    denied += 1
                    continue
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
        if acl:
            stats = self.stats
            if denied:
                stats.acl_other[READ_DENY] += denied
            stats.read_allowed += len(per_session) - denied

    def _deliver_one(self, message: Message, member: Subscription[Session]) -> None:
        if self.authorizer is not None and not self.may(member.session, READ, message.topic):
            return
        qos = member.qos if member.qos < message.qos else message.qos
        retain = message.retain and member.retain_as_published
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
        # Expire after three missed updates, so a broker that left stops showing numbers.
        lifetime = max(1, int(3 * self.settings.sys_interval))
        props = Properties(message_expiry_interval=lifetime)
        root = self.settings.sys_root
        for name, value in self.sys_values(now).items():
            self.publish(
                Message(f"{root}/{name}", value.encode(), 0, True, props, expires_at=now + lifetime)
            )

    def connected_count(self) -> int:
        return sum(1 for c in self.connections if c.state == CONNECTED)

    def shutdown(self) -> None:
        """Tell 5.0 clients the server is going away (0x8B) and close every connection.

        Their wills are published: the server closes the connection without a DISCONNECT
        0x00 from the client (MQTT-3.1.2-8; 5.0 section 3.1.2.5), and the cluster gets them
        before this broker leaves. A will with a delay is kept only here, so it is lost."""
        for conn in list(self.connections):
            conn.disconnect(ReasonCode.SERVER_SHUTTING_DOWN, publish_will=True)
