"""The Redis cluster bus: brokers that act as one, and keep serving when Redis does not.

Theory of operation.

* Presence: `{prefix}:broker:{id}` holds this instance's token with a TTL, refreshed by a
  heartbeat; a second live broker with the same id is refused. `{prefix}:brokers` lists ids.
* Cluster table: `{prefix}:subs:{id}` is the set of filters with local subscribers on broker
  `id`; changes are announced on the Pub/Sub channel `{prefix}:control`, and every broker keeps
  the whole table in its core (`Broker.remote_subscribe`), reloaded after every reconnect.
* Messages: each broker reads its inbox stream `{prefix}:inbox:{id}` with a consumer group and
  acknowledges entries after handing them to local sessions. Entries are batches of records
  (`records.py`), one XADD per destination per flush, so the Redis cost is per batch, not per
  message. Routed mode (default) sends a publish only to brokers with a matching subscriber;
  broadcast mode (the seed's) puts every publish on the Pub/Sub channel `sync`, where QoS 0 is
  delivered from, and sends QoS 1/2 to every broker's inbox for at-least-once.
* At least once for QoS 1/2: the origin keeps each QoS 1/2 record until the receiver reports
  progress in `{prefix}:progress:{receiver}` (origin -> highest sequence handled), and resends
  what is unconfirmed after every reconnect, even if Redis lost its data; receivers drop
  sequences they have already handled (per origin, in order). Envelope sequences start at the
  boot time in microseconds, so a restarted origin never reuses one.
* Persistent sessions: stored in the hash `{prefix}:sessions:{id}` (client id -> snapshot,
  `handover.py`) within SESSION_WRITE_DELAY of each change. A CONNECT for a client whose broker
  is alive hands the session over directly; when that broker is gone (or does not answer), the
  stored copy is taken, and survivors adopt a gone broker's stored sessions as offline sessions.
* Retained messages: the hash `{prefix}:retained` (topic -> envelope), written on each retained
  publish, loaded at start and after each reconnect; retained publishes go to every broker.
* The retry pattern: Redis unreachable (at start or later) never stops the broker. It serves
  local clients, buffers outbound cluster traffic up to a bound (QoS 0 dropped first, counted),
  retries with capped exponential backoff and jitter, and on reconnect re-registers, reloads the
  table and retained messages, resends unconfirmed records and flushes its buffer.
* Bad data (malformed batches or envelopes, unknown versions) is counted and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hiredis
from redis.exceptions import RedisError, ResponseError

from ..config import redact_url
from ..core.message import Message
from ..core.session import NEVER_EXPIRES, snapshot_of
from ..mqtt.properties import EMPTY_PROPERTIES, Properties
from .envelope import (
    EnvelopeError,
    EnvelopeFields,
    EnvelopePacker,
    EnvelopeReader,
    unpack_envelope,
)
from .handover import SnapshotError, decode_snapshot, encode_snapshot
from .records import InboxError, encode_record, iter_records
from .redis_url import RedisUrlError, link_error_reason, parse_redis_url
from .resp import Commands, RespConnection, open_connection
from .settings import BROADCAST, ClusterSettings, DuplicateBrokerId

if TYPE_CHECKING:
    from ..core.broker import Broker
    from ..core.connection import ServerConnection
    from ..core.session import SessionSnapshot

log = logging.getLogger("mcloudtt.cluster")

GROUP = "brokers"
# Messages per write: small enough that the next hop starts while we read the rest of a burst.
FLUSH_BATCH = 256
# How long one inbox read blocks in Redis, and how long past that an answer may take before the
# link counts as lost.
INBOX_BLOCK_MS = 1000
REPLY_TIMEOUT = 5.0
# Persistent sessions are written to Redis at most this long after they change.
SESSION_WRITE_DELAY = 0.1
# Stored sessions of a gone broker claimed per round trip.
ADOPT_BATCH = 200
# Claim a session a gone broker stored, if the client registry still names that broker (or no
# one): KEYS client registry, stored sessions of the gone broker; ARGV gone broker, me, client
# id, registry TTL. Returns the stored session, or nil; the stored copy is removed either way.
_ADOPT_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
local data = redis.call('HGET', KEYS[2], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[3])
if data and (holder == false or holder == ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[4])
  return data
end
return false
"""
# Seconds between reads of the receivers' progress (what unconfirmed QoS 1/2 records to forget).
CONFIRM_INTERVAL = 0.1

# redis-py's annotations describe every response shape at once (RESP2 and RESP3, bytes or str);
# we use bytes responses throughout and check shapes where they are read.
RedisClient = Any


def _stream_id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


@dataclass(slots=True)
class _Outbound:
    """A message for other brokers that needs more than one plain record (retained, shared
    groups, broadcast mode or a tap): its envelope, records are made when it is written."""

    message: Message
    envelope: bytes
    sequence: int
    targets: Sequence[str]
    groups: Mapping[str, list[str]]


# The common case, a message for plain subscriptions on other brokers only, with its inbox
# record built at once: (QoS, sequence, record, destination broker ids).
_PlainOutbound = tuple[int, int, bytes, Sequence[str]]


class RedisBus:
    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self.me = settings.broker_id
        prefix = settings.prefix
        self.k_presence = f"{prefix}:broker:{self.me}"
        self.k_brokers = f"{prefix}:brokers"
        self.k_control = f"{prefix}:control"
        self.k_retained = f"{prefix}:retained"
        self.k_inbox = f"{prefix}:inbox:{self.me}"
        self.k_progress = f"{prefix}:progress:{self.me}"
        self.k_sessions = f"{prefix}:sessions:{self.me}"
        self.token = uuid.uuid4().hex
        self.packer = EnvelopePacker(self.me.encode())
        self.reader = EnvelopeReader()
        # Every publish goes to Redis in these settings, whether or not a peer subscribed.
        self._forward_all = settings.mode == BROADCAST or bool(settings.tap_stream)
        self.broker: Broker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.redis: RedisClient | None = None
        self.redis_options = parse_redis_url(settings.url)
        self.link_error = ""  # why the link is down, for the log and /readyz ("" when up)
        self.connected = False
        self.sequence = time.time_ns() // 1000  # never reused by a later incarnation
        self.outbound: deque[_Outbound | _PlainOutbound] = deque()
        self.control: list[tuple[str, str]] = []  # ("add"|"del", filter) announced on connect
        self.unconfirmed: dict[str, deque[tuple[int, bytes]]] = {}
        self.handled: dict[str, int] = {}  # origin -> highest sequence delivered from my inbox
        self.live_peers: set[str] = set()
        self.missing_since: dict[str, float] = {}  # peer -> when its presence was first missed
        self.stats: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.fatal: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._flush_scheduled = False
        self.writer: RespConnection | None = None
        self._unanswered: deque[
            tuple[int, list[_Outbound | _PlainOutbound], list[tuple[str, str]]]
        ] = deque()
        self._connected_event = asyncio.Event()
        self._lost_event = asyncio.Event()
        self._closing = False
        self._handovers: dict[str, asyncio.Future[None]] = {}
        self._locating: set[asyncio.Task[None]] = set()
        self._inbox_position: tuple[int, int] = (0, 0)  # id of the last inbox entry handled
        self._control_tasks: set[asyncio.Task[None]] = set()
        self._dirty_sessions: set[str] = set()  # client ids whose stored session is stale
        self._sessions_scheduled = False
        self._adopting: set[str] = set()  # client ids being claimed from a gone broker

    # ------------------------------------------------------------------ lifecycle

    def attach(self, broker: Broker) -> None:
        self.broker = broker
        broker.session_locator = self.locate

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.fatal = self.loop.create_future()
        self._tasks.append(asyncio.create_task(self._link_forever(), name="cluster-link"))

    async def stop(self) -> None:
        """Flush what can be flushed quickly, leave the cluster, close."""
        self._closing = True
        if self.connected and self.redis is not None:
            self._write_sessions()
            self._flush()
            if self.writer is not None:
                await self.writer.settled(2.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._leave(), 2.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()

    def ready(self) -> bool:
        return self.connected

    # ------------------------------------------------------------------ ClusterBus (sync, hot path)

    def forward(
        self, message: Message, targets: Sequence[str], groups: Mapping[str, list[str]]
    ) -> None:
        retain = message.retain
        if not (targets or groups or retain or self._forward_all):
            return  # nobody else wants it: no envelope, no Redis traffic
        self.sequence += 1
        sequence = self.sequence
        qos = message.qos
        properties = message.properties
        if message.expires_at is not None:
            properties = self._remaining_expiry(message)
        item: _Outbound | _PlainOutbound
        if groups or retain or self._forward_all:
            envelope = self.packer.envelope(
                sequence,
                time.time_ns() // 1000,
                message.origin,
                message.topic_wire,
                message.payload,
                qos,
                retain,
                properties,
            )
            item = _Outbound(message, envelope, sequence, targets, groups)
        else:
            record = self.packer.plain_record(
                sequence,
                time.time_ns() // 1000,
                message.origin,
                message.topic_wire,
                message.payload,
                qos,
                properties,
            )
            item = (qos, sequence, record, targets)
        outbound = self.outbound
        if len(outbound) >= self.settings.buffer_limit and not self._make_room(qos):
            return
        outbound.append(item)
        if len(outbound) >= FLUSH_BATCH and self.connected:
            self._flush()  # mid-burst: the next broker starts on these while we read the rest
        elif not self._flush_scheduled:
            self._schedule_flush()

    def subscription_added(self, full_filter: str) -> None:
        self.control.append(("add", full_filter))
        self._schedule_flush()

    def subscription_removed(self, full_filter: str) -> None:
        self.control.append(("del", full_filter))
        self._schedule_flush()

    def session_changed(self, client_id: str) -> None:
        self._dirty_sessions.add(client_id)
        if not self._sessions_scheduled and self.connected and self.loop is not None:
            self._sessions_scheduled = True
            self.loop.call_later(SESSION_WRITE_DELAY, self._write_sessions)

    def _write_sessions(self) -> None:
        """Store the persistent sessions that changed in `{prefix}:sessions:{me}`, so that
        another broker can take them over if this one dies; forget the ones that ended."""
        self._sessions_scheduled = False
        writer = self.writer
        broker = self.broker
        if not self.connected or writer is None or writer.closed or broker is None:
            return  # kept dirty: written when the link is back
        if not self._dirty_sessions:
            return
        commands = Commands()
        now = broker.clock()
        for client_id in self._dirty_sessions:
            session = broker.sessions.get(client_id)
            if session is not None and session.expiry_interval:
                snapshot = encode_snapshot(snapshot_of(session), self.me, now)
                commands.hset(self.k_sessions, client_id, snapshot)
            else:
                commands.hdel(self.k_sessions, client_id)
        self._dirty_sessions.clear()
        writer.write(commands)

    def _remaining_expiry(self, message: Message) -> Properties:
        """The properties to forward: Message Expiry Interval as what remains (MQTT-3.3.2-6)."""
        assert self.broker is not None
        remaining = message.remaining_expiry(self.broker.clock())
        return message.properties.replace(message_expiry_interval=remaining)

    def _make_room(self, qos: int) -> bool:
        """The buffer is full: drop QoS 0 first (MQTT allows it), then the oldest message."""
        if qos == 0:
            self.dropped["buffer_full_qos0"] += 1
            return False
        for index, item in enumerate(self.outbound):
            if (item[0] if isinstance(item, tuple) else item.message.qos) == 0:
                del self.outbound[index]
                self.dropped["buffer_full_qos0"] += 1
                return True
        self.outbound.popleft()
        self.dropped["buffer_full"] += 1
        return True

    # ------------------------------------------------------------------ flushing

    def _schedule_flush(self) -> None:
        if self._flush_scheduled or not self.connected or self.loop is None:
            return
        self._flush_scheduled = True
        self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write buffered traffic on the pipelined writer now (synchronous, no round trip)."""
        self._flush_scheduled = False
        writer = self.writer
        if not self.connected or writer is None or writer.closed:
            return
        self._forget_answered()
        while self.outbound or self.control:
            control, self.control = self.control, []
            items = [self.outbound.popleft() for _ in range(min(len(self.outbound), FLUSH_BATCH))]
            commands = Commands()
            self._add_control(commands, control)
            confirmable = self._add_items(commands, items)
            writer.write(commands)
            # Kept until Redis answered, to be written again if the connection breaks first.
            self._unanswered.append((writer.sent, items, control))
            self.stats["forwarded"] += len(items)
            self.stats["flushes"] += 1
            for dest, records in confirmable.items():
                queue = self.unconfirmed.get(dest)
                if queue is None:
                    queue = self.unconfirmed[dest] = deque()
                queue.extend(records)
        self._bound_unconfirmed()

    def _forget_answered(self) -> None:
        writer = self.writer
        if writer is None:
            return
        unanswered = self._unanswered
        while unanswered and unanswered[0][0] <= writer.replies:
            unanswered.popleft()

    def _requeue_unanswered(self) -> None:
        """The writer broke: what Redis may not have got goes back to the front of the buffer."""
        self._forget_answered()
        for _, items, control in reversed(self._unanswered):
            self.outbound.extendleft(reversed(items))
            self.control[:0] = control
        self._unanswered.clear()

    def _add_control(self, pipe: Commands, control: list[tuple[str, str]]) -> None:
        subs_key = f"{self.settings.prefix}:subs:{self.me}"
        for op, full_filter in control:
            if op == "add":
                pipe.sadd(subs_key, full_filter)
            else:
                pipe.srem(subs_key, full_filter)
            pipe.publish(self.k_control, f"{op}\x00{self.me}\x00{full_filter}")

    def _add_items(
        self, pipe: Commands, items: list[_Outbound | _PlainOutbound]
    ) -> dict[str, list[tuple[int, bytes]]]:
        """Add the commands for `items`; return the QoS 1/2 records written per destination
        (sequence, record), which are kept until the destination confirms them."""
        settings = self.settings
        broadcast = settings.mode == BROADCAST
        batches: dict[str, list[bytes]] = {}
        confirmable: dict[str, list[tuple[int, bytes]]] = {}
        live_peers = self.live_peers
        me = self.me
        for item in items:
            if isinstance(item, tuple):
                # The common case: the same plain record for every broker with a subscriber.
                qos, sequence, record, targets = item
                for dest in targets:
                    if dest != me:
                        batch = batches.get(dest)
                        if batch is None:
                            batch = batches[dest] = []
                        batch.append(record)
                        if qos:
                            kept = confirmable.get(dest)
                            if kept is None:
                                kept = confirmable[dest] = []
                            kept.append((sequence, record))
                continue
            message = item.message
            envelope = item.envelope
            sequence = item.sequence
            qos = message.qos
            if broadcast:
                pipe.publish(settings.sync_channel, envelope)
                # QoS 0 is delivered from `sync`; QoS 1/2 also go to every inbox.
                if qos or message.retain:
                    dests: set[str] = set(live_peers)
                else:
                    dests = set(item.groups)
                plain_to = dests if qos else set()
            else:
                dests = set(item.targets) | set(item.groups)
                if message.retain:
                    dests |= live_peers  # every broker keeps the same retained state
                plain_to = set(item.targets)
            for dest in dests:
                if dest == self.me:
                    continue
                record = encode_record(envelope, dest in plain_to, item.groups.get(dest, ()))
                batches.setdefault(dest, []).append(record)
                if qos:
                    confirmable.setdefault(dest, []).append((sequence, record))
            if message.retain:
                if message.payload:
                    pipe.hset(self.k_retained, message.topic, envelope)
                else:
                    pipe.hdel(self.k_retained, message.topic)
            if settings.tap_stream:
                pipe.xadd(settings.tap_stream, "e", envelope, settings.tap_maxlen)
        for dest, records in batches.items():
            pipe.xadd(
                f"{settings.prefix}:inbox:{dest}", "b", b"".join(records), settings.inbox_maxlen
            )
        return confirmable

    def _bound_unconfirmed(self) -> None:
        total = sum(len(q) for q in self.unconfirmed.values())
        limit = self.settings.buffer_limit
        while total > limit:
            dest = max(self.unconfirmed, key=lambda d: len(self.unconfirmed[d]))
            self.unconfirmed[dest].popleft()
            self.dropped["unconfirmed_overflow"] += 1
            total -= 1

    # ------------------------------------------------------------------ the link

    async def _link_forever(self) -> None:
        delay = 0.05
        while not self._closing:
            try:
                await self._connect()
                delay = 0.05
                self._lost_event.clear()
                workers = [
                    asyncio.create_task(self._inbox_loop(), name="cluster-inbox"),
                    asyncio.create_task(self._pubsub_loop(), name="cluster-pubsub"),
                    asyncio.create_task(self._heartbeat_loop(), name="cluster-heartbeat"),
                    asyncio.create_task(self._confirm_loop(), name="cluster-confirm"),
                ]
                try:
                    await self._lost_event.wait()
                finally:
                    for worker in workers:
                        worker.cancel()
                    for worker in workers:
                        with contextlib.suppress(BaseException):
                            await worker
            except DuplicateBrokerId as error:
                log.error("%s", error)
                if self.fatal is not None and not self.fatal.done():
                    self.fatal.set_exception(error)
                return
            except (RedisError, OSError, RedisUrlError) as error:
                self._link_lost(error)
            if self._closing:
                return
            # Capped exponential backoff with jitter.
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.settings.backoff_max)

    def _link_lost(self, error: BaseException) -> None:
        reason = link_error_reason(error, self.redis_options)
        if self.connected:
            log.warning("lost Redis: %s; retrying", reason)
            self.stats["link_losses"] += 1
        elif reason != self.link_error:
            # Once per reason, not once per retry.
            log.warning("Redis link down: %s; retrying", reason)
        self.link_error = reason
        self.connected = False
        if self.writer is not None:
            self._requeue_unanswered()
            self.writer.close()
            self.writer = None
        self._connected_event.clear()
        self._lost_event.set()

    async def _connect(self) -> None:
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
        self.redis = self.redis_options.client(
            socket_connect_timeout=1.0,
            socket_timeout=5.0,
            health_check_interval=10,
        )
        redis = self.redis
        await redis.ping()
        await self._claim_id(redis)
        # Our whole table, re-announced: whatever the others knew about us may be stale.
        self.control.clear()
        assert self.broker is not None
        subs_key = f"{self.settings.prefix}:subs:{self.me}"
        # One transaction: a peer must never read our table half rewritten (empty).
        pipe = redis.pipeline(transaction=True)
        pipe.delete(subs_key)
        filters = list(self.broker.filter_refs)
        if filters:
            pipe.sadd(subs_key, *filters)
        pipe.sadd(self.k_brokers, self.me)
        pipe.publish(self.k_control, f"reset\x00{self.me}\x00")
        await pipe.execute()
        await self._ensure_group(redis)
        await self._load_peers(redis)
        # Resend what receivers have not confirmed (Redis may have lost it), then the buffer,
        # in sequence order: receivers drop a sequence lower than one they already handled.
        await self._resend_unconfirmed(redis)
        if not self.stats["connects"]:
            # Sessions a previous run of this broker id stored (a restarted pod keeps its name).
            await self._adopt_sessions(redis, self.me)
        self.writer = await open_connection(self.redis_options, self._link_lost)
        self.connected = True
        self.stats["connects"] += 1
        self._flush()
        # Redis may have lost what we stored: store every persistent session again.
        stored = {
            raw.decode() if isinstance(raw, bytes) else raw
            for raw in await redis.hkeys(self.k_sessions)
        }
        self._dirty_sessions |= stored | {
            client_id for client_id, s in self.broker.sessions.items() if s.expiry_interval
        }
        self._write_sessions()
        await self._load_retained(redis)
        self.link_error = ""
        self._connected_event.set()
        log.info("cluster link up (%s mode, %d peers)", self.settings.mode, len(self.live_peers))

    async def _claim_id(self, redis: RedisClient) -> None:
        ttl_ms = int(self.settings.presence_ttl * 1000)
        deadline = time.monotonic() + self.settings.presence_ttl + 1.0
        while True:
            if await redis.set(self.k_presence, self.token, nx=True, px=ttl_ms):
                return
            holder = await redis.get(self.k_presence)
            if holder is not None and holder.decode() == self.token:
                await redis.pexpire(self.k_presence, ttl_ms)
                return
            if time.monotonic() > deadline:
                raise DuplicateBrokerId(
                    f"broker id {self.me!r} is already live in the cluster at {redact_url(self.settings.url)}; "
                    "give each broker a unique --id"
                )
            await asyncio.sleep(0.25)

    async def _leave(self) -> None:
        redis = self.redis
        assert redis is not None
        if (await redis.get(self.k_presence)) == self.token.encode():
            pipe = redis.pipeline(transaction=False)
            pipe.delete(self.k_presence)
            pipe.delete(f"{self.settings.prefix}:subs:{self.me}")
            pipe.srem(self.k_brokers, self.me)
            pipe.publish(self.k_control, f"gone\x00{self.me}\x00")
            await pipe.execute()

    async def _ensure_group(self, redis: RedisClient) -> None:
        try:
            await redis.xgroup_create(self.k_inbox, GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def _load_peers(self, redis: RedisClient) -> None:
        """(Re)load the table of every live peer.

        A peer we knew whose presence is missing is not forgotten here: after a Redis restart
        nobody's presence exists until they reconnect. The heartbeat forgets a peer once its
        presence has been missing for a whole TTL.
        """
        assert self.broker is not None
        ids = {raw.decode() for raw in await redis.smembers(self.k_brokers)} - {self.me}
        prefix = self.settings.prefix
        for peer in ids:
            if await redis.exists(f"{prefix}:broker:{peer}"):
                self.live_peers.add(peer)
                self.missing_since.pop(peer, None)
                await self._load_peer_table(redis, peer)
            else:
                await redis.srem(self.k_brokers, peer)

    async def _load_peer_table(self, redis: RedisClient, peer: str) -> None:
        assert self.broker is not None
        filters = await redis.smembers(f"{self.settings.prefix}:subs:{peer}")
        self.broker.remote_forget(peer)
        for raw in filters:
            self.broker.remote_subscribe(peer, raw.decode())

    async def _load_retained(self, redis: RedisClient) -> None:
        assert self.broker is not None
        store = self.broker.retained
        seen: set[str] = set()
        async for _topic, envelope_raw in redis.hscan_iter(self.k_retained):
            try:
                fields = unpack_envelope(envelope_raw)
            except EnvelopeError:
                self.stats["bad_envelopes"] += 1
                continue
            message = self._to_message(fields)
            if message is None:
                continue
            seen.add(message.topic)
            store.set(message)
        # A retained message cleared while we were away is gone from the hash: drop it here too.
        # ('#' leaves out $-topics, which include our own $SYS statistics.)
        for topic in [m.topic for m in store.match("#")]:
            if topic not in seen:
                store.delete(topic)

    async def _resend_unconfirmed(self, redis: RedisClient) -> None:
        if not self.unconfirmed:
            return
        progress = await self._progress(redis, list(self.unconfirmed))
        pipe = redis.pipeline(transaction=False)
        resent = 0
        for dest, queue in self.unconfirmed.items():
            confirmed = progress.get(dest, 0)
            while queue and queue[0][0] <= confirmed:
                queue.popleft()
            if queue:
                pipe.xadd(
                    f"{self.settings.prefix}:inbox:{dest}",
                    {"b": b"".join(record for _, record in queue)},
                    maxlen=self.settings.inbox_maxlen,
                    approximate=True,
                )
                resent += len(queue)
        if resent:
            await pipe.execute()
            self.stats["resent"] += resent

    async def _progress(self, redis: RedisClient, dests: list[str]) -> dict[str, int]:
        pipe = redis.pipeline(transaction=False)
        for dest in dests:
            pipe.hget(f"{self.settings.prefix}:progress:{dest}", self.me)
        values = await pipe.execute()
        return {
            dest: int(value) for dest, value in zip(dests, values, strict=True) if value is not None
        }

    # ------------------------------------------------------------------ sessions across brokers

    def locate(self, conn: ServerConnection, client_id: str, clean_start: bool) -> None:
        """CONNECT for `client_id`: take it over from whichever broker had it, then finish."""
        assert self.loop is not None and self.broker is not None
        if not self.connected:
            # Serving locally while Redis is away (the retry pattern).
            self.loop.call_soon(self._finish, conn, None)
            return
        task = self.loop.create_task(self._locate(conn, client_id, clean_start))
        self._locating.add(task)
        task.add_done_callback(self._locating.discard)

    def _finish(self, conn: ServerConnection, snapshot: SessionSnapshot | None) -> None:
        assert self.broker is not None
        conn.finish_connect(snapshot, self.broker.clock())

    async def _locate(self, conn: ServerConnection, client_id: str, clean_start: bool) -> None:
        snapshot = None
        try:
            snapshot = await asyncio.wait_for(
                self._take_over(client_id, clean_start), self.settings.handover_timeout
            )
        except (RedisError, OSError, TimeoutError, SnapshotError) as error:
            log.warning("session %r not taken over from the cluster: %s", client_id, error)
            self.stats["handover_failures"] += 1
        finally:
            self._handovers.pop(client_id, None)
        self._finish(conn, snapshot)

    async def _take_over(self, client_id: str, clean_start: bool) -> SessionSnapshot | None:
        redis = self.redis
        assert redis is not None and self.broker is not None
        prefix = self.settings.prefix
        previous = await redis.set(
            f"{prefix}:client:{client_id}", self.me, get=True, ex=self.settings.client_ttl
        )
        holder = previous.decode() if previous is not None else None
        if holder is None or holder == self.me:
            return None
        if holder not in self.live_peers:
            return await self._take_stored(redis, holder, client_id, clean_start)
        # What we already forwarded to the holder must reach it before it snapshots the session.
        await self._drain_outbound()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._handovers[client_id] = waiter
        await redis.publish(
            self.k_control,
            f"handover\x00{self.me}\x00{holder}\x00{int(clean_start)}\x00{client_id}",
        )
        try:
            await asyncio.wait_for(waiter, self.settings.handover_timeout / 2)
        except TimeoutError:
            # No answer: the holder died and its presence has not expired yet.
            return await self._take_stored(redis, holder, client_id, clean_start)
        self.stats["handovers"] += 1
        data = await redis.getdel(f"{prefix}:handover:{client_id}")
        if data is None or clean_start:
            return None
        return decode_snapshot(data, self.broker.clock)

    async def _take_stored(
        self, redis: RedisClient, holder: str, client_id: str, clean_start: bool
    ) -> SessionSnapshot | None:
        """The session as the gone broker `holder` last stored it in Redis (removed there)."""
        assert self.broker is not None
        stored_key = f"{self.settings.prefix}:sessions:{holder}"
        pipe = redis.pipeline(transaction=True)
        pipe.hget(stored_key, client_id)
        pipe.hdel(stored_key, client_id)
        data, _ = await pipe.execute()
        if data is None or clean_start:
            return None
        self.stats["sessions_restored"] += 1
        return decode_snapshot(data, self.broker.clock)

    async def _drain_outbound(self) -> None:
        """Return once everything forwarded so far has been written to Redis and answered."""
        self._flush()
        if self.writer is not None:
            await self.writer.settled(self.settings.handover_timeout / 2)

    async def _give_up_session(self, redis: RedisClient, requester: str, argument: str) -> None:
        """A peer took one of our ClientIds: close it here and hand the session over."""
        assert self.broker is not None
        target, clean, client_id = argument.split("\x00", 2)
        if target != self.me:
            return
        deadline = time.monotonic() + self.settings.handover_timeout / 2
        while client_id in self._adopting and time.monotonic() < deadline:
            await asyncio.sleep(0.005)  # we are taking it from a gone broker right now
        # Messages for this session that are already in our inbox belong in the snapshot.
        info = await redis.xinfo_stream(self.k_inbox)
        goal = _stream_id(info.get("last-generated-id", b"0-0"))
        deadline = time.monotonic() + self.settings.handover_timeout / 2
        while self._inbox_position < goal and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        now = self.broker.clock()
        snapshot = self.broker.handover(client_id, clean == "1", now)
        if snapshot is not None:
            # The requester will announce these filters; route to it from now on, so nothing
            # published here in between is lost.
            for record in snapshot.subscriptions:
                self.broker.remote_subscribe(requester, record.topic_filter)
        pipe = redis.pipeline(transaction=False)
        if snapshot is not None:
            pipe.set(
                f"{self.settings.prefix}:handover:{client_id}",
                encode_snapshot(snapshot, self.me, now),
                ex=60,
            )
        pipe.publish(self.k_control, f"handed\x00{self.me}\x00{requester}\x00{client_id}")
        await pipe.execute()

    # ------------------------------------------------------------------ workers

    async def _heartbeat_loop(self) -> None:
        redis = self.redis
        assert redis is not None and self.broker is not None
        interval = max(0.2, self.settings.presence_ttl / 4)
        try:
            while True:
                await asyncio.sleep(interval)
                ttl_ms = int(self.settings.presence_ttl * 1000)
                holder = await redis.get(self.k_presence)
                if holder is not None and holder.decode() != self.token:
                    raise DuplicateBrokerId(f"broker id {self.me!r} was taken by another broker")
                await redis.set(self.k_presence, self.token, px=ttl_ms)
                # Peers whose presence expired have left: forget their table entries.
                prefix = self.settings.prefix
                now = time.monotonic()
                for peer in list(self.live_peers):
                    if await redis.exists(f"{prefix}:broker:{peer}"):
                        self.missing_since.pop(peer, None)
                    elif (
                        now - self.missing_since.setdefault(peer, now) > self.settings.presence_ttl
                    ):
                        self._peer_gone(peer)
                self._forget_answered()
        except DuplicateBrokerId as error:
            log.error("%s", error)
            if self.fatal is not None and not self.fatal.done():
                self.fatal.set_exception(error)
        except (RedisError, OSError) as error:
            self._link_lost(error)

    async def _confirm_loop(self) -> None:
        """Forget the QoS 1/2 records receivers have handled, a few times a second: what is
        kept is what a lost link would make us resend, and it must stay well under the bound."""
        redis = self.redis
        assert redis is not None
        try:
            while True:
                await asyncio.sleep(CONFIRM_INTERVAL)
                if not self.unconfirmed:
                    continue
                progress = await self._progress(redis, list(self.unconfirmed))
                for dest, queue in list(self.unconfirmed.items()):
                    confirmed = progress.get(dest, 0)
                    while queue and queue[0][0] <= confirmed:
                        queue.popleft()
                    if not queue:
                        del self.unconfirmed[dest]
        except (RedisError, OSError) as error:
            self._link_lost(error)

    def _peer_gone(self, peer: str) -> None:
        assert self.broker is not None
        self.live_peers.discard(peer)
        self.missing_since.pop(peer, None)
        self.broker.remote_forget(peer)
        dropped = self.unconfirmed.pop(peer, None)
        if dropped:
            self.dropped["peer_gone"] += len(dropped)
        log.info("peer %s left the cluster", peer)
        if self.connected and self.redis is not None:
            task = asyncio.ensure_future(self._adopt_sessions(self.redis, peer))
            self._control_tasks.add(task)
            task.add_done_callback(self._control_tasks.discard)

    async def _adopt_sessions(self, redis: RedisClient, peer: str) -> None:
        """Take over the persistent sessions a gone broker stored, as offline sessions here:
        their subscriptions route to us again and what they miss is queued until the client
        comes back (to us, or to any broker, which then takes the session from us)."""
        assert self.broker is not None
        broker = self.broker
        stored_key = f"{self.settings.prefix}:sessions:{peer}"
        prefix = self.settings.prefix
        try:
            stored = [raw.decode() for raw in await redis.hkeys(stored_key)]
            waiting = [client_id for client_id in stored if client_id not in broker.sessions]
            for first in range(0, len(waiting), ADOPT_BATCH):
                # One round trip claims a batch (each claim is atomic on its own).
                batch = waiting[first : first + ADOPT_BATCH]
                self._adopting.update(batch)
                try:
                    pipe = redis.pipeline(transaction=False)
                    for client_id in batch:
                        pipe.eval(
                            _ADOPT_SCRIPT,
                            2,
                            f"{prefix}:client:{client_id}",
                            stored_key,
                            peer,
                            self.me,
                            client_id,
                            self.settings.client_ttl,
                        )
                    for client_id, data in zip(batch, await pipe.execute(), strict=True):
                        if data is not None and client_id not in broker.sessions:
                            self._adopt(peer, client_id, data)
                finally:
                    self._adopting.difference_update(batch)
        except (RedisError, OSError) as error:
            log.warning("sessions of %s not taken over yet: %s", peer, error)

    def _adopt(self, peer: str, client_id: str, data: bytes) -> None:
        """Restore a claimed session as an offline session, its expiry counted from now."""
        assert self.broker is not None
        broker = self.broker
        try:
            snapshot = decode_snapshot(data, broker.clock)
        except SnapshotError as error:
            log.warning("stored session %r of %s dropped: %s", client_id, peer, error)
            self.stats["bad_sessions"] += 1
            return
        now = broker.clock()
        session = broker.restore_session(snapshot, now)
        session.ended_at = now
        if session.expiry_interval != NEVER_EXPIRES:
            broker.expiring[client_id] = now + session.expiry_interval
        self.stats["sessions_adopted"] += 1

    async def _pubsub_loop(self) -> None:
        redis = self.redis
        assert redis is not None
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        channels = [self.k_control]
        if self.settings.mode == BROADCAST:
            channels.append(self.settings.sync_channel)
        try:
            await pubsub.subscribe(*channels)
            # Anything announced before we listened is covered by the table load in _connect;
            # reload once more now that we listen, so nothing falls between the two.
            await self._load_peers(redis)
            sync = self.settings.sync_channel.encode()
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                channel = message["channel"]
                data = message["data"]
                if channel == sync:
                    self._on_sync(data)
                else:
                    await self._on_control(redis, data)
        except (RedisError, OSError) as error:
            self._link_lost(error)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _on_control(self, redis: RedisClient, data: bytes) -> None:
        assert self.broker is not None
        try:
            op, peer, argument = data.decode().split("\x00", 2)
        except (UnicodeDecodeError, ValueError):
            self.stats["bad_control"] += 1
            return
        if peer == self.me:
            return
        if op == "add":
            self.live_peers.add(peer)
            self.broker.remote_subscribe(peer, argument)
        elif op == "del":
            self.broker.remote_unsubscribe(peer, argument)
        elif op == "reset":
            self.live_peers.add(peer)
            await self._load_peer_table(redis, peer)
        elif op == "gone":
            self._peer_gone(peer)
        elif op == "handover":
            # In its own task: it waits for our inbox, which must not hold up control messages.
            task = asyncio.ensure_future(self._give_up_session(redis, peer, argument))
            self._control_tasks.add(task)
            task.add_done_callback(self._control_tasks.discard)
        elif op == "handed":
            requester, _, client_id = argument.partition("\x00")
            waiter = self._handovers.get(client_id) if requester == self.me else None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        else:
            self.stats["bad_control"] += 1

    def _on_sync(self, data: bytes) -> None:
        assert self.broker is not None
        try:
            fields = unpack_envelope(data)
        except EnvelopeError:
            self.stats["bad_envelopes"] += 1
            return
        if fields[0] == self.me or fields[6] or fields[7]:
            return  # our own, or it comes through the inbox (QoS 1/2 and retained)
        message = self._to_message(fields)
        if message is not None:
            self.stats["received"] += 1
            self.broker.deliver_remote(message, plain=True, groups=())

    async def _inbox_loop(self) -> None:
        redis = self.redis
        assert redis is not None
        last_id = b"0"  # first what was delivered to us before and not acknowledged
        acks: list[bytes] = []
        inbox: RespConnection | None = None
        try:
            inbox = await open_connection(self.redis_options, lambda error: None)
            while True:
                # Acknowledge the last batch, report progress and ask for the next: one trip.
                commands = Commands()
                if acks:
                    commands.xack(self.k_inbox, GROUP, acks)
                    if self.handled:
                        commands.hset_many(self.k_progress, self.handled)
                    commands.xtrim_minid(self.k_inbox, acks[-1])
                commands.xreadgroup(GROUP, self.me, self.k_inbox, last_id, 16, INBOX_BLOCK_MS)
                async with asyncio.timeout(INBOX_BLOCK_MS / 1000 + REPLY_TIMEOUT):
                    replies = await inbox.call(commands)
                acks = []
                errors = [str(r) for r in replies if isinstance(r, hiredis.ReplyError)]
                if errors:
                    if any("NOGROUP" in error for error in errors):  # Redis restarted empty
                        await self._ensure_group(redis)
                        last_id = b"0"
                        continue
                    raise ResponseError(errors[0])
                response = replies[-1]
                entries = response[0][1] if response else []
                if not entries:
                    if last_id == b"0":
                        last_id = b">"
                    continue
                self.stats["inbox_reads"] += 1
                for entry_id, fields in entries:
                    self._handle_entry(fields)
                    acks.append(entry_id)
                    self._inbox_position = _stream_id(entry_id)
                    # Let deliveries flush to subscribers between batches.
                    await asyncio.sleep(0)
        except (RedisError, OSError) as error:
            self._link_lost(error)
        finally:
            if inbox is not None:
                inbox.close()

    def _handle_entry(self, fields: list[bytes] | None) -> None:
        """One inbox entry: its field list, `b` then the batch (None if it was deleted)."""
        assert self.broker is not None
        handled = self.handled
        deliver = self.broker.deliver_remote
        read = self.reader.read
        batch = None
        if isinstance(fields, list):
            for index in range(0, len(fields) - 1, 2):
                if fields[index] == b"b" and isinstance(fields[index + 1], bytes):
                    batch = fields[index + 1]
                    break
        if batch is None:
            self.stats["bad_batches"] += 1
            return
        received = 0
        try:
            for plain, groups, start, stop in iter_records(batch):
                try:
                    envelope = read(batch, start, stop)
                except EnvelopeError:
                    self.stats["bad_envelopes"] += 1
                    continue
                origin, sequence, _, client_id, topic, payload, qos, retain, props = envelope
                if sequence <= handled.get(origin, 0):
                    self.stats["duplicates"] += 1
                    continue
                handled[origin] = sequence
                if props is EMPTY_PROPERTIES:  # nothing expires: the common case, inline
                    message: Message | None = Message(
                        topic, payload, qos, retain, props, origin=client_id
                    )
                else:
                    message = self._to_message(envelope)
                if message is not None:
                    received += 1
                    deliver(message, plain, groups)
        except InboxError:
            self.stats["bad_batches"] += 1
        self.stats["received"] += received

    def _to_message(self, envelope: EnvelopeFields) -> Message | None:
        _, _, received_at_us, client_id, topic, payload, qos, retain, props = envelope
        expires_at = None
        if props is not EMPTY_PROPERTIES and props.message_expiry_interval is not None:
            assert self.broker is not None
            age = max(0.0, time.time() - received_at_us / 1e6)
            remaining = props.message_expiry_interval - age
            if remaining <= 0:
                self.stats["expired"] += 1
                return None
            expires_at = self.broker.clock() + remaining
        return Message(topic, payload, qos, retain, props, expires_at=expires_at, origin=client_id)

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> dict[str, float]:
        return {
            "link_up": 1.0 if self.connected else 0.0,
            "connects_total": float(self.stats["connects"]),
            "link_losses_total": float(self.stats["link_losses"]),
            "buffered_messages": float(len(self.outbound)),
            "unconfirmed_messages": float(sum(len(q) for q in self.unconfirmed.values())),
            "forwarded_total": float(self.stats["forwarded"]),
            "received_total": float(self.stats["received"]),
            "duplicates_total": float(self.stats["duplicates"]),
            "resent_total": float(self.stats["resent"]),
            "sessions_adopted_total": float(self.stats["sessions_adopted"]),
            "sessions_restored_total": float(self.stats["sessions_restored"]),
            "flushes_total": float(self.stats["flushes"]),
            "inbox_reads_total": float(self.stats["inbox_reads"]),
            "bad_envelopes_total": float(self.stats["bad_envelopes"] + self.stats["bad_batches"]),
            "peers": float(len(self.live_peers)),
            "remote_filters": float(sum(len(p.filters) for p in self.broker.peers.values()))
            if self.broker is not None
            else 0.0,
        }
