"""The Redis cluster bus: brokers that act as one, and keep serving when Redis does not.

Theory of operation.

* Membership (`membership.py`): presence with a TTL and a heartbeat, a unique broker id, the
  cluster table of every broker's subscription filters, kept in each core and announced on the
  control channel.
* Messages: the outbox (`outbox.py`, sans-IO) packs every publish other brokers want and writes
  batches of records (`records.py`) to each destination's inbox stream `{prefix}:inbox:{id}`,
  one XADD per destination per flush, so the Redis cost is per batch, not per message. Routed
  mode (default) sends a publish only to brokers with a matching subscriber; broadcast mode (the
  seed's) puts every publish on the Pub/Sub channel `sync`, where QoS 0 is delivered from, and
  sends QoS 1/2 to every broker's inbox for at-least-once. The inbox (`inbox.py`) reads ours
  with a consumer group and acknowledges entries after handing them to local sessions.
* At least once for QoS 1/2: the origin keeps each QoS 1/2 record until the receiver reports
  progress in `{prefix}:progress:{receiver}` (origin -> highest sequence handled), and resends
  what is unconfirmed after every reconnect, even if Redis lost its data; receivers drop
  sequences they have already handled (per origin, in order). Envelope sequences start at the
  boot time in microseconds, so a restarted origin never reuses one.
* Persistent sessions (`failover.py`): stored in `{prefix}:sessions:{id}`, handed over directly
  when the broker that has one is alive; when it is gone, one survivor adopts them as offline
  sessions and replays the dead inbox to them (`replay.py`): nothing acknowledged is lost.
* Retained messages: the hash `{prefix}:retained` (topic -> envelope), written on each retained
  publish, loaded at start and after each reconnect; retained publishes go to every broker,
  those published while Redis was away also to the peers we learn of on reconnect (they loaded
  the hash before we wrote them).
* The retry pattern (this module, which runs the link): Redis unreachable (at start or later)
  never stops the broker. It serves local clients, buffers outbound cluster traffic up to a bound
  (QoS 0 dropped first, counted), retries with capped exponential backoff and jitter, and on
  reconnect re-registers, reloads the table and retained messages, resends unconfirmed records
  and flushes its buffer. Redis and socket errors become `LinkError` once, where the link's
  workers run (`_guarded`).
* Bad data (malformed batches or envelopes, unknown versions) is counted and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import hiredis

from ..backoff import Backoff
from ..core.message import Message
from ..core.ports import ClusterCore, Resume
from .failover import SESSION_CONNECTIONS, SESSION_WRITE_DELAY, Failover
from .inbox import Inbox
from .keyspace import RETAINED_SHARDS
from .link import Link, LinkError, RedisClient, redis_errors
from .membership import Membership
from .outbox import Outbox
from .redis_url import link_error_reason, parse_redis_url
from .settings import BROADCAST, ClusterSettings, DuplicateBrokerId
from .topology import BusCluster, Node, SlotMap, close_quietly, open_link, probe

log = logging.getLogger("mcloudtt.cluster")

# Seconds between reads of the receivers' progress (what unconfirmed QoS 1/2 records to forget).
CONFIRM_INTERVAL = 0.1
# How long what was published before the first table load is kept for peers whose tables come
# after ours (brokers that all started before Redis reconnect within a backoff of each other,
# `late_grace`).
UNROUTED_GRACE = 5.0
# How long a reconnect waits for the old link's workers and clients to close.
STOP_TIMEOUT = 2.0


def late_grace(settings: ClusterSettings) -> float:
    """How long after our first table load a peer's first table may still come: within its
    reconnect backoff of ours (twice the cap, with jitter), at least UNROUTED_GRACE."""
    return max(UNROUTED_GRACE, 2 * settings.backoff_max + 1.0)


def _group_keys(groups: Mapping[str, list[str]]) -> set[str]:
    """The shared groups (`$share/...` filters) a routing gives a message to."""
    return {key for keys in groups.values() for key in keys}


class RedisBus:
    # The hot path goes straight to the outbox: no call in between per message.
    forward: Callable[[Message, Sequence[str], Mapping[str, list[str]]], None]
    core: ClusterCore
    inbox: Inbox
    failover: Failover
    membership: Membership

    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self.me = settings.broker_id
        self.token = uuid.uuid4().hex
        self.redis_options = parse_redis_url(settings.url)
        self.link_error = ""  # why the link is down, for the log and /readyz ("" when up)
        # Reasons already logged in this outage: some alternate from one retry to the next (a
        # TLS 1.3 server refusing a missing client certificate is seen as an alert or as EOF).
        self._reasons_logged: set[str] = set()
        self.link = Link()
        self.slots: SlotMap | None = None  # the slot map when Redis is a cluster
        self.known_nodes: list[Node] = []
        self.live_peers: set[str] = set()
        self.stats: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.outbox = Outbox(
            settings, peers=self.live_peers, wake=self._wake, stats=self.stats, dropped=self.dropped
        )
        self.forward = self.outbox.forward
        # QoS 1/2 publishes accepted before the first load of the cluster table had nowhere to
        # go: kept (within the buffer bound) and routed with the table when it comes.
        self.unrouted: deque[Message] = deque()
        # Kept from before (and just after) the first table load: (message, brokers its plain
        # subscriptions were routed to, shared groups it was given to), for late peer tables.
        self._late: list[tuple[Message, set[str], set[str]]] = []
        self.table_loaded = settings.mode == BROADCAST or bool(settings.tap_stream)
        if not self.table_loaded:
            self.forward = self._forward_unrouted
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fatal: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lost_event = asyncio.Event()
        self._closing = False

    def _forward_unrouted(
        self, message: Message, targets: Sequence[str], groups: Mapping[str, list[str]]
    ) -> None:
        """`forward` until the first table load (then the outbox's, directly)."""
        self.outbox.forward(message, targets, groups)
        if message.qos and not (targets or groups or message.retain):
            if len(self.unrouted) >= self.settings.buffer_limit:
                self.dropped["cluster_buffer"] += 1
                return
            self.unrouted.append(message)

    def _route_unrouted(self) -> None:
        """The table is loaded: route what was kept, in the order it was published. Brokers
        that started without Redis too may announce their tables a moment later: what was kept,
        and what is published until UNROUTED_GRACE is over (our table does not know those
        brokers' subscribers yet), also goes to each of them whose table comes meanwhile
        (`_late_table`)."""
        self.table_loaded = True
        unrouted, self.unrouted = self.unrouted, deque()
        kept: list[tuple[Message, set[str], set[str]]] = []
        # A restart under our id took its previous run's sessions back just now: they were not
        # here to match what was published before (a will of a client that came and went
        # while Redis was away), and get it now, after their inbox's replay.
        # (Only what came before: what came after, their stored wills included, matched them.)
        readopted, self.failover.readopted = self.failover.readopted, set()
        before = self.failover.readopted_after
        for index, message in enumerate(unrouted):
            if readopted and index < before:
                self.core.replay_to(readopted, message, redelivered=False)
            targets, groups = self.core.remote_route(message)
            if targets or groups:
                self.outbox.forward(message, targets, groups)
            kept.append((message, set(targets), _group_keys(groups)))
        self._late = kept
        if self.loop is None:
            self.forward = self.outbox.forward
            return
        self.forward = self._forward_late
        self.loop.call_later(late_grace(self.settings), self._forget_late)

    def _forward_late(
        self, message: Message, targets: Sequence[str], groups: Mapping[str, list[str]]
    ) -> None:
        """`forward` for `late_grace` after the first table load (then the outbox's)."""
        self.outbox.forward(message, targets, groups)
        # (A copy kept for late tables only: past the bound, it is simply not kept.)
        if message.qos and not message.retain and len(self._late) < self.settings.buffer_limit:
            self._late.append((message, set(targets), _group_keys(groups)))

    def _late_table(self, peer: str) -> None:
        """A peer's table was (re)loaded: what we kept from before our first load (and from
        the grace after it) and did not route to it yet goes to it now, if it subscribed; so
        does each shared group it was given to nobody for (no member was in our table yet: the
        group's members may all be on brokers whose tables came after ours), once."""
        for message, routed, served in self._late:
            targets, groups = self.core.remote_route(message)
            plain = (peer,) if peer in targets and peer not in routed else ()
            assigned = {
                broker: fresh
                for broker, keys in groups.items()
                if (fresh := [key for key in keys if key not in served])
            }
            if plain or assigned:
                routed.update(plain)
                served.update(_group_keys(assigned))
                self.outbox.forward(message, plain, assigned)

    def _forget_late(self) -> None:
        self._late = []
        self.forward = self.outbox.forward

    # ------------------------------------------------------------------ lifecycle

    def attach(self, core: ClusterCore) -> None:
        self.core = core
        self.outbox.clock = core.clock
        settings, stats = self.settings, self.stats
        self.inbox = Inbox(settings, core, stats, self.redis_options)
        self.failover = Failover(
            settings,
            core,
            self.link,
            self.live_peers,
            stats,
            drain=self._drain_outbound,
            inbox_position=lambda: self.inbox.position,
            inbox_handled=lambda: self.inbox.handled,
            to_message=self.inbox.to_message,
            pause_inbox=self.inbox.pause,
            resume_inbox=self.inbox.resume,
            announce_adoption=self._announce_adoption,
            finish_adoption=self._finish_adoption,
            announce_move=self.outbox.announce_move,
            mark_inbox=self._mark_inbox,
            delivered_before=self.inbox.delivered_before,
            outbox_sequence=lambda: self.outbox.sequence,
            replay=settings.replay,
        )
        self.failover.unrouted_count = lambda: len(self.unrouted)
        self.membership = Membership(
            settings,
            core,
            self.live_peers,
            stats,
            token=self.token,
            failover=self.failover,
            on_peer_gone=self._peer_gone,
            on_adopted=self._on_adopted,
            on_moved=self._mark_inbox,
            on_table=self._late_table,
            on_sync=self.inbox.on_sync,
            answers=self._link_answers,
        )

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.failover.loop = self.loop
        self.fatal = self.loop.create_future()
        self._tasks.append(asyncio.create_task(self._link_forever(), name="cluster-link"))

    async def stop(self) -> None:
        """Flush what can be flushed quickly, leave the cluster, close."""
        self._closing = True
        redis = self.link.redis
        if self.link.connected and redis is not None:
            self.failover.write_sessions()
            self._flush()
            if self.link.writer is not None:
                await self.link.writer.settled(2.0)
            with contextlib.suppress(Exception):
                # Every connection is closed by now and its will published by us: none is
                # due again from whoever takes our sessions (once, MQTT-3.1.2-8), even one
                # whose removal had not been written yet.
                await asyncio.wait_for(redis.delete(self.failover.k_wills), 2.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.membership.leave(redis), 2.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        for client in (redis, self.link.sessions):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        close_quietly(self.link.writer)

    def ready(self) -> bool:
        return self.link.connected

    # ------------------------------------------------------------------ ClusterBus (sync)

    def subscription_added(self, full_filter: str) -> None:
        self.outbox.announce("add", full_filter)

    def subscription_removed(self, full_filter: str) -> None:
        self.outbox.announce("del", full_filter)

    def session_changed(self, client_id: str) -> None:
        self.failover.session_changed(client_id)

    def delivery_completed(self, client_id: str) -> None:
        self.failover.delivery_completed(client_id)

    def release_after_store(self, client_id: str, packet_id: int) -> bool:
        return self.failover.release_after_store(client_id, packet_id)

    def locate_session(self, client_id: str, clean_start: bool, resume: Resume) -> bool:
        return self.failover.locate_session(client_id, clean_start, resume)

    # ------------------------------------------------------------------ writing

    def _wake(self, urgent: bool) -> None:
        """The outbox has something to write: now (a whole batch), or soon."""
        if not self.link.connected:
            return  # written on reconnect
        if urgent:
            self._flush()
        elif self.loop is not None:
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write what the outbox holds on the pipelined writer now (no round trip)."""
        writer = self.link.writable()
        if writer is None:
            return
        outbox = self.outbox
        outbox.answered(writer.replies)
        for commands in outbox.flush(writer.sent):
            writer.write(commands)

    def _link_answers(self) -> int:
        writer = self.link.writer
        return 0 if writer is None else writer.replies

    async def _drain_outbound(self) -> None:
        """Return once everything forwarded so far has been written to Redis and answered."""
        self._flush()
        if self.link.writer is not None:
            await self.link.writer.settled(self.settings.handover_timeout / 2)

    # ------------------------------------------------------------------ the link

    async def _guarded(self, work: Awaitable[None], connects: int | None = None) -> None:
        """Run one of the link's jobs; the one place Redis and socket errors are handled.
        A worker of an earlier link (`connects` behind, left running by `_stopped`) cannot
        break the current one."""
        try:
            with redis_errors():
                await work
        except LinkError as error:
            if connects is None or connects == self.stats["connects"]:
                self._link_lost(error)
        except DuplicateBrokerId as error:
            log.error("%s", error)
            if self.fatal is not None and not self.fatal.done():
                self.fatal.set_exception(error)
            self._lost_event.set()  # the link stops for good

    def _worker(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.create_task(self._guarded(work, self.stats["connects"]), name=name)

    async def _link_forever(self) -> None:
        backoff = Backoff(base=0.05, cap=self.settings.backoff_max, jitter=0.2)
        while not self._closing:
            self._lost_event.clear()
            await self._guarded(self._connect())
            if self.link.connected:
                backoff.reset()
                redis = self.link.redis
                workers = [
                    self._worker(self.inbox.run(redis), "cluster-inbox"),
                    self._worker(self.membership.listen(redis), "cluster-pubsub"),
                    self._worker(self.membership.heartbeat(redis), "cluster-heartbeat"),
                    self._worker(self._confirm_loop(redis), "cluster-confirm"),
                    self._worker(self._checkpoint_loop(), "cluster-checkpoint"),
                ]
                try:
                    await self._lost_event.wait()
                finally:
                    for worker in workers:
                        worker.cancel()
                    await self._stopped(workers)
            if self._closing or (self.fatal is not None and self.fatal.done()):
                return
            await asyncio.sleep(backoff.next())

    async def _stopped(self, workers: list[asyncio.Task[None]]) -> None:
        """Wait for the cancelled workers, a bounded time: one that does not end when
        cancelled (a redis-py close waiting on a TLS shutdown or a lock) must not keep the
        link down for good; it is left to finish alone and the link reconnects."""
        done, pending = await asyncio.wait(workers, timeout=STOP_TIMEOUT)
        for worker in done:
            if not worker.cancelled():
                worker.exception()  # retrieved: `_guarded` already handled what matters
        for worker in pending:
            self.stats["workers_stuck"] += 1
            frames = worker.get_stack()
            where = f"{frames[-1].f_code.co_filename}:{frames[-1].f_lineno}" if frames else "?"
            log.warning(
                "%s did not stop when cancelled (at %s); reconnecting without it",
                worker.get_name(),
                where,
            )

    def _link_lost(self, error: BaseException) -> None:
        link = self.link
        reason = link_error_reason(error, self.redis_options)
        log.debug("link error (%s)", "up" if link.connected else "connecting", exc_info=error)
        if self._closing:
            pass  # our own close at stop (the writer's), not a lost link: nothing to say
        elif link.connected:
            log.warning("lost Redis: %s; retrying", reason)
            self.stats["link_losses"] += 1
            self._reasons_logged = {reason}
        elif reason not in self._reasons_logged:
            # Once per reason and outage, not once per retry.
            self._reasons_logged.add(reason)
            log.warning("Redis link down: %s; retrying", reason)
        self.link_error = reason
        link.connected = False
        if link.writer is not None:
            self.outbox.link_lost(link.writer.replies)
            link.writer.close()
            link.writer = None
        self._lost_event.set()

    async def _connect(self) -> None:
        link = self.link
        for old in (link.redis, link.sessions):
            if old is not None:
                # Bounded, as the workers' stop is.
                with contextlib.suppress(Exception, TimeoutError):
                    async with asyncio.timeout(STOP_TIMEOUT):
                        await old.aclose()
        link.sessions = None
        # One round trip per connect: a cluster node gives its slot map (topology.py).
        self.slots = slots = await probe(self.redis_options, self.known_nodes)
        self.inbox.slots = slots
        shards = 0 if slots is None else RETAINED_SHARDS
        self.inbox.retained_shards = self.outbox.retained_shards = shards
        # Broadcast mode on a cluster: sharded Pub/Sub (a PUBLISH is copied to every node).
        sharded = self.settings.sharded_pubsub or slots is not None
        self.outbox.sharded_pubsub = self.membership.sharded_pubsub = sharded
        redis: RedisClient
        if slots is None:
            link.redis = redis = self.redis_options.client(
                socket_connect_timeout=1.0,
                socket_timeout=5.0,
                health_check_interval=10,
            )
            # The work CONNECTs bring waits for one of a few connections (bounded by each
            # CONNECT's own deadline), so that a reconnect storm is queued, not refused.
            link.sessions = self.redis_options.client(
                bounded=SESSION_CONNECTIONS,
                wait=None,
                socket_connect_timeout=1.0,
                socket_timeout=5.0,
                health_check_interval=10,
            )
        else:
            self.known_nodes = slots.nodes  # a seed that dies later is not needed
            link.redis = redis = self.redis_options.cluster_client(
                slots.nodes,
                BusCluster,
                socket_connect_timeout=1.0,
                socket_timeout=5.0,
                health_check_interval=10,
            )
        await redis.ping()
        retained, reached = await self._write_outbox(redis, slots)
        membership = self.membership
        first = not self.stats["connects"]
        adopted_elsewhere = await membership.claim_id(redis, first)
        await self.inbox.ensure_group(redis)
        if adopted_elsewhere and first:
            await self.inbox.skip_backlog(redis)
        elif adopted_elsewhere:
            # Rejoining, not restarted: the clean sessions we kept still want their records.
            await self.inbox.groups_replayed(redis)
        if first:
            # Sessions a previous run of this broker id stored (a restarted pod keeps its name),
            # with what its inbox still holds for them, before our table is announced.
            await self.failover.adopt_sessions(redis, self.me)
        self.outbox.clear_announcements()  # the whole table is announced now
        await membership.register(redis)
        await membership.load_peers(redis)
        self._retained_to_late_peers(retained, reached)
        if not self.table_loaded:
            self._route_unrouted()
        link.connected = True
        self.stats["connects"] += 1
        self._flush()
        await self.failover.store_all(redis)
        await self.inbox.load_retained(redis)
        self.link_error = ""
        self._reasons_logged = set()
        log.info("cluster link up (%s mode, %d peers)", self.settings.mode, len(self.live_peers))

    def _retained_to_late_peers(self, retained: list[Message], reached: set[str]) -> None:
        """Retained messages published while we were away went, with our outbox, to Redis and
        to the peers we knew then: a peer we learned of since (all of them, when every broker
        started before Redis) registered and loaded the retained set before we wrote them,
        and would never hear of them. Each topic's last one goes to such peers now, in order.
        (A peer that registers after `load_peers` loads them from Redis itself.)"""
        late = self.live_peers - reached
        if not (retained and late):
            return
        for message in {message.topic: message for message in retained}.values():
            self.outbox.retained_to(message, late)

    async def _write_outbox(
        self, redis: RedisClient, slots: SlotMap | None
    ) -> tuple[list[Message], set[str]]:
        """Open the writer and write what we forwarded while away, answered, before anything
        else of the reconnect: `claim_id` may give up sessions the cluster adopted meanwhile,
        and their clients, reconnected elsewhere at once, must not have their next messages
        overtake the ones we acknowledged to them (MQTT-4.6.0-5: order per topic).

        First what receivers have not confirmed (Redis may have lost it), then the buffer, in
        sequence order: receivers drop a sequence lower than one they already handled. The
        buffer's announcements wait for our table (`clear_announcements`, `register`).

        Returns the retained messages it writes and the peers they reach (the live ones we
        know now), for `_retained_to_late_peers`."""
        outbox = self.outbox
        retained, reached = outbox.retained_buffered(), set(self.live_peers)
        resend = outbox.resend(await self._progress(redis, outbox.destinations()))
        writer = await open_link(self.redis_options, slots, self._link_lost)
        self.link.writer = writer
        calls = [] if resend is None else [writer.submit(resend)]
        control, outbox.control = outbox.control, []
        try:
            calls += [writer.submit(commands) for commands in outbox.flush(writer.sent)]
        finally:
            outbox.control[:0] = control
        # As long as a redis-py call may take (its socket timeout); TimeoutError is a LinkError.
        for replies in await asyncio.wait_for(asyncio.gather(*calls), 5.0):
            refused = [r for r in replies if isinstance(r, hiredis.ReplyError)]
            if refused:
                raise LinkError(f"outbox write refused: {refused[0]}")
        outbox.answered(writer.replies)
        return retained, reached

    async def _confirm_loop(self, redis: RedisClient) -> None:
        """Forget the QoS 1/2 records receivers have handled, a few times a second: what is
        kept is what a lost link would make us resend, and it must stay well under the bound."""
        outbox = self.outbox
        while True:
            await asyncio.sleep(CONFIRM_INTERVAL)
            writer = self.link.writer
            if writer is not None:
                outbox.answered(writer.replies)
            dests = outbox.destinations()
            if dests:
                outbox.confirm(await self._progress(redis, dests))

    async def _progress(self, redis: RedisClient, dests: list[str]) -> dict[str, int]:
        """Each destination's highest sequence from us it has handled (none if Redis lost it)."""
        if not dests:
            return {}
        pipe = redis.pipeline(transaction=False)
        for dest in dests:
            pipe.hget(f"{self.settings.prefix}:progress:{{{dest}}}", self.me)
        values = await pipe.execute()
        return {
            dest: int(value) for dest, value in zip(dests, values, strict=True) if value is not None
        }

    def _peer_gone(self, peer: str) -> None:
        # Its records stay unconfirmed, and we keep routing to its inbox, until its sessions'
        # adopter announces itself (`_on_adopted`).
        self.failover.peer_gone(peer)

    def _announce_adoption(self, dead: str, filters: list[str]) -> None:
        """We adopt `dead`'s sessions: every broker routes their filters to us instead."""
        self.outbox.announce_adoption(dead, filters)
        self._flush()

    def _finish_adoption(self, dead: str) -> list[bytes]:
        """Stop routing to `dead` ourselves; return the QoS 1/2 records we sent it that it
        never confirmed (the adopter replays them too)."""
        self._flush()
        self.core.remote_forget(dead)
        self.membership.awaiting_adoption.discard(dead)
        records = [record for _, record in self.outbox.unconfirmed.get(dead, ())]
        self.outbox.forget_destination(dead)
        return records

    def _on_adopted(self, adopter: str, dead: str) -> None:
        """We stopped routing to `dead` (`adopter` took its sessions): after everything we
        sent it, an end marker in its inbox, for the adopter's replay."""
        self._flush()
        self.outbox.mark(dead)
        self._flush()
        self.outbox.forget_destination(dead)

    def _mark_inbox(self, holder: str, token: str) -> None:
        """A session `holder` handed over is routed to its new broker now (we heard `moved`,
        or we are that broker): after everything we sent `holder`, our marker for that
        hand-over in its inbox, for the new broker's drain."""
        self._flush()
        self.outbox.mark(holder, token)
        self._flush()

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(SESSION_WRITE_DELAY)
            self.failover.checkpoint()

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> dict[str, float]:
        stats = self.stats
        return {
            "link_up": 1.0 if self.link.connected else 0.0,
            "connects_total": float(stats["connects"]),
            "link_losses_total": float(stats["link_losses"]),
            # Reconnects that went on without a worker of the old link that would not stop.
            "link_workers_stuck_total": float(stats["workers_stuck"]),
            "buffered_messages": float(self.outbox.buffered()),
            "unconfirmed_messages": float(self.outbox.unconfirmed_count()),
            "forwarded_total": float(stats["forwarded"]),
            "received_total": float(stats["received"]),
            "duplicates_total": float(stats["duplicates"]),
            "resent_total": float(stats["resent"]),
            "sessions_adopted_total": float(stats["sessions_adopted"]),
            "sessions_restored_total": float(stats["sessions_restored"]),
            "sessions_surrendered_total": float(stats["sessions_surrendered"]),
            # Sessions taken over from the broker a client was on before (its takeovers).
            "handovers_total": float(stats["handovers"]),
            "replayed_total": float(stats["replayed"]),
            # Records another broker wrote to a dead inbox after our replay of it read it.
            "replay_missed_total": float(stats["replay_missed"]),
            "flushes_total": float(stats["flushes"]),
            "inbox_reads_total": float(stats["inbox_reads"]),
            "bad_envelopes_total": float(stats["bad_envelopes"] + stats["bad_batches"]),
            # Batches, envelopes and control messages without a valid tag (--cluster-key-file).
            "bad_tags_total": float(stats["bad_tag"]),
            "peers": float(len(self.live_peers)),
            "remote_filters": float(self.core.remote_filter_count()),
            # Its own entries in the cluster table: local + remote is the same on every broker
            # once the tables converged (the chaos snapshot compares them).
            "local_filters": float(len(self.core.local_filters())),
        }
