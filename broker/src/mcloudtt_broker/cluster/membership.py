"""Membership: who is in the cluster, and what each broker subscribed to.

* Presence: `{prefix}:broker:{id}` holds this instance's token with a TTL, refreshed by the
  heartbeat; a second live broker with the same id is refused (`DuplicateBrokerId`).
  `{prefix}:brokers` lists ids.
* Cluster table: `{prefix}:subs:{id}` is the set of filters with local subscribers on broker
  `id`; changes are announced on the Pub/Sub channel `{prefix}:control` (by the outbox, in order
  with the messages), and every broker keeps the whole table in its core, reloaded after every
  reconnect. A peer whose presence stays missing for GONE_GRACE past its TTL is gone (the grace
  covers a Redis restart, after which every broker claims its presence again within its
  reconnect backoff). Gone is not forgotten: peers keep routing to its inbox until a survivor
  announces that it adopted its sessions (`adopted`), then route to that survivor instead.
* Safety of the id: the adoption lock `{prefix}:adopter:{id}` is taken only while the presence
  is missing (one script), and a broker refreshes its presence only while that lock is absent
  (one script): a broker frozen or cut off past its TTL whose sessions were adopted gives
  them up and rejoins with what it has left, instead of coming back as a second owner.
* The control channel also carries `reset` (a peer's table was rewritten), `gone` (a peer left)
  and the session hand-over (`handover`, `handed`, for `failover.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import ClusterError, ResponseError

from ..core.ports import ClusterCore
from .failover import Failover
from .link import LinkError, RedisClient, redis_errors
from .redis_url import RedisOptions, parse_redis_url, redact_url
from .settings import BROADCAST, ClusterSettings, DuplicateBrokerId
from .topology import is_cluster

T = TypeVar("T")

log = logging.getLogger("mcloudtt.cluster")

# Refresh our presence if it is ours, or re-create it if it expired and nobody adopted us:
# KEYS presence, adoption lock; ARGV token, TTL ms. 1 ok, 0 adopted (declared dead), -1 taken.
_REFRESH_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# The beat's common case in one key (KEYS presence; ARGV token, TTL ms): 1 refreshed, else 0
# (not ours: the two-key script above decides). Two keys of one hash tag share a slot, but
# while that slot migrates key by key a two-key call is refused (TRYAGAIN) as long as one of
# them is on each side, and the adoption lock is normally absent: one key is always served
# (by the source, or the target after ASK), so a migration of our slot costs no beat.
_BEAT_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# Our table rewritten in one command (KEYS table; ARGV filters): atomic like MULTI/EXEC, so a
# peer never reads it empty, but one command, which redis-py follows through ASK and MOVED
# while the table's slot migrates (a transaction is refused until the slot has moved). Added
# before the stale members go, never DEL then SADD: in a migrating slot a script may not
# create a key ("non local key"), and the table only disappears when it is to be empty.
_TABLE_SCRIPT = """
local new = {}
for i = 1, #ARGV do new[ARGV[i]] = true end
local old = redis.call('SMEMBERS', KEYS[1])
for i = 1, #ARGV, 4000 do
  redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 3999, #ARGV)))
end
for _, member in ipairs(old) do
  if not new[member] then redis.call('SREM', KEYS[1], member) end
end
return 1
"""

# TRYAGAIN (a multi-key call while its slot migrates): retried this often, this far apart.
TRYAGAIN_ATTEMPTS = 20
TRYAGAIN_BACKOFF = 0.05


async def retry_tryagain(call: Callable[[], Awaitable[T]], what: str) -> T:
    """`call()`, again after a short pause while Redis Cluster answers TRYAGAIN (a slot of
    ours is being migrated), up to about a second; then a LinkError that says so."""
    for attempt in range(TRYAGAIN_ATTEMPTS):
        try:
            return await call()
        except (ResponseError, ClusterError) as error:
            # redis-py's cluster client retries TRYAGAIN itself for ~0.4 s, then gives up
            # with "TTL exhausted".
            if "TRYAGAIN" not in str(error) and "TTL exhausted" not in str(error):
                raise
            await asyncio.sleep(TRYAGAIN_BACKOFF * min(4, attempt + 1))
    raise LinkError(f"{what}: the slot stayed mid-migration (TRYAGAIN) past its retries")


# A gone peer whose adoption was never announced to us (its adopter died, or our link was down
# when it was) is forgotten after this long: its inbox is not read any more.
ADOPTION_DEADLINE = 30.0


def heartbeat_deadline(settings: ClusterSettings) -> float:
    """How long one presence refresh may go unanswered before the link counts as lost: two
    beats (TTL/5 each), within 1-2 s (a tiny script; Redis answering it later than that is
    unreachable for the cluster's purposes, and peers see our presence expire soon anyway)."""
    return min(2.0, max(1.0, 2 * settings.presence_ttl / 5))


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # a late failure of a call we gave up on: nothing to do with it


def gone_grace(settings: ClusterSettings) -> float:
    """How long past its TTL a peer's presence must stay missing before it is gone."""
    return max(1.0, 2 * settings.backoff_max)


class Membership:
    def __init__(
        self,
        settings: ClusterSettings,
        core: ClusterCore,
        peers: set[str],
        stats: Counter[str],
        *,
        token: str,
        failover: Failover,
        on_peer_gone: Callable[[str], None],
        on_adopted: Callable[[str, str], None],
        on_table: Callable[[str], None] = lambda peer: None,
        on_moved: Callable[[str, str], None] = lambda holder, token: None,
        on_sync: Callable[[bytes], None],
        answers: Callable[[], int] = lambda: 0,
    ) -> None:
        self.settings = settings
        # How many answers the link's other connections have read so far (the outbox's
        # writer): a beat late while they still get answers is on a slow link, not a cut one.
        self.answers = answers
        self.me = settings.broker_id
        prefix = settings.prefix
        self.k_presence = f"{prefix}:broker:{{{self.me}}}"
        self.k_brokers = f"{prefix}:brokers"
        self.k_control = f"{prefix}:control"
        self.k_subs = f"{prefix}:subs:{{{self.me}}}"
        self.core = core
        self.live_peers = peers
        self.stats = stats
        self.token = token
        self.failover = failover
        self.on_peer_gone = on_peer_gone
        self.on_adopted = on_adopted
        self.on_table = on_table  # a peer's table was loaded
        self.on_moved = on_moved  # (holder, token): mark its inbox for a hand-over's drain
        self.k_adopter = f"{prefix}:adopter:{{{self.me}}}"
        self.on_sync = on_sync
        self.sharded_pubsub = settings.sharded_pubsub  # the bus sets it on a Redis Cluster
        self.missing_since: dict[str, float] = {}  # peer -> when its presence was first missed
        self.awaiting_adoption: set[str] = set()  # gone peers we still route to

    # ------------------------------------------------------------------ joining and leaving

    async def claim_id(self, redis: RedisClient, first: bool) -> bool:
        """Claim our id: a new process (`first`) clears an old adoption of it. A reconnecting
        one whose sessions were adopted meanwhile (it was cut off or frozen past its presence
        TTL) must not serve them any longer: it gives them up (their clients reconnect and find
        them at the adopter) and rejoins with what it has left. It never exits because Redis
        was away (the retry pattern).

        Returns True when another broker adopted our sessions (with what our inbox held for
        them, which it replayed): our inbox's backlog is not ours to deliver any more (after a
        restart none of it; after a rejoin its shared groups' records, `Inbox.groups_replayed`)."""
        k_adopted = f"{self.settings.prefix}:adopted:{{{self.me}}}"
        adopted_elsewhere = False
        if first and await redis.exists(self.k_adopter):
            # A restart under our id while a survivor adopts our previous run's sessions: let
            # it finish (its replay reads our inbox), then leave the backlog to it.
            deadline = time.monotonic() + self.settings.handover_timeout
            while not await redis.exists(k_adopted) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        if first:
            adopter = await redis.get(k_adopted)
            adopted_elsewhere = adopter is not None and adopter.decode() != self.me
        state = None if first else await self._rejoin(redis)
        if state == 1:
            return False  # still ours (or re-created, nobody adopting us): nothing was adopted
        if state == 0:
            # Declared dead meanwhile (the adoption lock is there). Let an adoption under way
            # finish first: its replay reads our inbox and sessions. (-1, our id taken by
            # another process: `_claim` below waits for it to expire, or says so.)
            deadline = time.monotonic() + self.settings.handover_timeout
            while not await redis.exists(k_adopted) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            adopted_elsewhere = True  # the adopter replayed our inbox for them
            given_up = self.core.surrender_sessions()
            self.stats["sessions_surrendered"] += len(given_up)
            log.warning(
                "broker %s was declared dead while away from Redis and its sessions adopted: "
                "gave up %d persistent session(s) and rejoined",
                self.me,
                len(given_up),
            )
            first = True
        await self._claim(redis)
        if first:
            await redis.delete(self.k_adopter, k_adopted)
        return adopted_elsewhere

    async def _rejoin(self, redis: RedisClient) -> object:
        """Our presence refreshed, or re-created if it expired and nobody took the adoption
        lock, in one step (`_REFRESH_SCRIPT`): a check of the lock, then a plain SET, leaves a
        window (a round trip, long on a slow link) in which a peer takes the lock and adopts
        the sessions we go on serving. 1 ours, 0 adopted, -1 taken."""
        ttl_ms = int(self.settings.presence_ttl * 1000)

        async def refresh() -> object:
            return await redis.eval(
                _REFRESH_SCRIPT, 2, self.k_presence, self.k_adopter, self.token, ttl_ms
            )

        return await retry_tryagain(refresh, "presence refresh")

    async def _claim(self, redis: RedisClient) -> None:
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

    async def register(self, redis: RedisClient) -> None:
        """Our whole table, announced again: whatever the others knew about us may be stale."""
        # One script: a peer must never read our table half rewritten (empty).
        await redis.eval(_TABLE_SCRIPT, 1, self.k_subs, *self.core.local_filters())
        pipe = redis.pipeline(transaction=False)
        pipe.sadd(self.k_brokers, self.me)
        pipe.publish(self.k_control, self.failover.control_message(f"reset\x00{self.me}\x00"))
        await pipe.execute()

    async def leave(self, redis: RedisClient) -> None:
        if (await redis.get(self.k_presence)) == self.token.encode():
            pipe = redis.pipeline(transaction=False)
            pipe.delete(self.k_presence)
            pipe.delete(self.k_subs)
            pipe.srem(self.k_brokers, self.me)
            pipe.publish(self.k_control, self.failover.control_message(f"gone\x00{self.me}\x00"))
            await pipe.execute()

    # ------------------------------------------------------------------ the peer table

    async def load_peers(self, redis: RedisClient) -> None:
        """(Re)load the table of every live peer.

        A peer we knew whose presence is missing is not forgotten here: after a Redis restart
        nobody's presence exists until they reconnect. The heartbeat forgets a peer once its
        presence has been missing for a whole TTL.
        """
        ids = {raw.decode() for raw in await redis.smembers(self.k_brokers)} - {self.me}
        prefix = self.settings.prefix
        for peer in ids:
            if await redis.exists(f"{prefix}:broker:{{{peer}}}"):
                self.live_peers.add(peer)
                self.missing_since.pop(peer, None)
                await self.load_peer_table(redis, peer)
                # Its `reset` may have come before we listened: this load is its table.
                self.on_table(peer)
            else:
                await redis.srem(self.k_brokers, peer)

    async def load_peer_table(self, redis: RedisClient, peer: str) -> None:
        filters = await redis.smembers(f"{self.settings.prefix}:subs:{{{peer}}}")
        self.core.remote_forget(peer)
        for raw in filters:
            self.core.remote_subscribe(peer, raw.decode())

    def peer_gone(self, peer: str) -> None:
        # Its table stays: we route to its inbox until its sessions' adopter says so.
        if peer not in self.live_peers:
            return
        self.live_peers.discard(peer)
        self.missing_since.pop(peer, None)
        log.info("peer %s left the cluster", peer)
        self.awaiting_adoption.add(peer)
        asyncio.get_running_loop().call_later(ADOPTION_DEADLINE, self._adoption_overdue, peer)
        self.on_peer_gone(peer)

    def _adoption_overdue(self, peer: str) -> None:
        if peer in self.awaiting_adoption and peer not in self.live_peers:
            log.warning("no adoption of %s announced; no longer routing to it", peer)
            self.adopted("", peer)

    def adopted(self, adopter: str, argument: str) -> None:
        """Control `adopted`: `adopter` took the sessions of a gone broker; route their
        filters to it instead, in one step (nothing falls between the two)."""
        dead, *filters = argument.split("\x00")
        core = self.core
        self.awaiting_adoption.discard(dead)
        if dead != adopter:
            # Gone, whether or not our heartbeat noticed yet: not to be adopted again later.
            self.live_peers.discard(dead)
            self.missing_since.pop(dead, None)
            self.failover.holder_gone(dead)
        if adopter and adopter != self.me:
            self.live_peers.add(adopter)
            for full_filter in filters:
                core.remote_subscribe(adopter, full_filter)
        core.remote_forget(dead)
        log.info("peer %s's sessions adopted by %s", dead, adopter)
        self.on_adopted(adopter, dead)

    def moved(self, holder: str, argument: str) -> None:
        """Control `moved`: `holder` handed a session to a live broker; route its filters
        there (before `holder`'s `del` of them comes), then mark `holder`'s inbox: the new
        broker delivers what `holder` got for the session up to every origin's marker. The
        new broker marks it itself when it restores the session."""
        requester, token, *filters = argument.split("\x00")
        if requester == self.me:
            self.failover.moved_here(holder, token, filters)
            return
        self.live_peers.add(requester)
        for full_filter in filters:
            self.core.remote_subscribe(requester, full_filter)
            self.failover.pin_route(requester, full_filter)
        self.on_moved(holder, token)

    # ------------------------------------------------------------------ workers

    async def heartbeat(self, redis: RedisClient) -> None:
        # One connection of its own (not a cluster client's): a beat is one round trip, and
        # its deadline never pays for a connection set up through a slow link.
        beat = redis if is_cluster(redis) else redis.client()
        try:
            if beat is not redis:
                # Set up under a deadline too (a few round trips): a link cut right after it
                # came up is noticed as fast as one cut later.
                async with asyncio.timeout(2 * heartbeat_deadline(self.settings)):
                    await beat.initialize()
            await self._beat_forever(beat)
        finally:
            if beat is not redis:
                with contextlib.suppress(Exception):
                    await beat.aclose()

    async def _beat_forever(self, redis: RedisClient) -> None:
        # Five beats per TTL: a broker must miss four in a row to look dead.
        interval = max(0.1, self.settings.presence_ttl / 5)
        deadline = heartbeat_deadline(self.settings)
        prefix = self.settings.prefix
        grace = gone_grace(self.settings)
        while True:
            await asyncio.sleep(interval)
            ttl_ms = int(self.settings.presence_ttl * 1000)
            # A link held rather than refused (a partition: nothing answers, nothing resets)
            # is lost when a beat goes unanswered past its deadline, not after the 5 s socket
            # timeout: until then every CONNECT here waits on its session look-up, and a
            # broker cut from Redis must keep serving its local clients. (TimeoutError is an
            # OSError: the link's guard makes it a LinkError.)
            state = await self._answered(
                redis.eval(_BEAT_SCRIPT, 1, self.k_presence, self.token, ttl_ms), deadline
            )
            if state != 1:  # expired (or taken): whether we were adopted meanwhile

                async def refresh(ttl_ms: int = ttl_ms) -> object:
                    return await self._answered(
                        redis.eval(
                            _REFRESH_SCRIPT, 2, self.k_presence, self.k_adopter, self.token, ttl_ms
                        ),
                        deadline,
                    )

                state = await retry_tryagain(refresh, "presence refresh")
            if state == -1:
                raise DuplicateBrokerId(f"broker id {self.me!r} was taken by another broker")
            if state == 0:
                # Frozen past --presence-ttl and declared dead: reconnect, and `claim_id`
                # gives the adopted sessions up before we serve anything again.
                raise LinkError(f"broker {self.me!r} was declared dead while frozen; rejoining")
            # Peers whose presence expired have left (their sessions are adopted).
            now = time.monotonic()
            for peer in list(self.live_peers):
                present = await self._answered(
                    redis.exists(f"{prefix}:broker:{{{peer}}}"), deadline
                )
                if present:
                    self.missing_since.pop(peer, None)
                elif now - self.missing_since.setdefault(peer, now) > grace:
                    self.peer_gone(peer)

    async def _answered(self, call: Awaitable[Any], deadline: float) -> Any:
        """`call`'s answer. None within `deadline` loses the link, unless the link's other
        connections read answers meanwhile: a slow link (a saturated bandwidth cap queues the
        beat behind the outbox's writes, and drops what overflows: TCP resends it after its
        backoff, on every connection), not a cut one. Once answers came, the beat is waited
        for until our presence would expire (peers must not see it expire meanwhile), even
        across a deadline without any. A cut link answers nothing anywhere: it is noticed after
        one deadline, as before."""
        task = asyncio.ensure_future(call)
        ttl = self.settings.presence_ttl
        # Deadlines that fit before our presence expires (less the beat's own interval).
        waits = max(1, int((ttl - max(0.1, ttl / 5)) / deadline + 1e-9))
        seen = self.answers()
        try:
            for _ in range(waits):
                done, _ = await asyncio.wait({task}, timeout=deadline)
                if done:
                    return task.result()
                if self.answers() == seen:
                    break
            raise TimeoutError("Redis left a heartbeat unanswered past its deadline")
        finally:
            if not task.done():
                task.cancel()
                task.add_done_callback(_retrieved)

    async def listen(self, redis: RedisClient) -> None:
        """The control channel (and in broadcast mode the sync channel) until the link breaks."""
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        channels = [self.k_control]
        broadcast = self.settings.mode == BROADCAST
        sharded = self.sharded_pubsub
        if broadcast and not sharded:
            channels.append(self.settings.sync_channel)
        shard_reader: asyncio.Task[None] | None = None
        try:
            await pubsub.subscribe(*channels)
            if broadcast and sharded and is_cluster(redis):
                # SSUBSCRIBE on the primary of the channel's slot: only that shard carries it.
                # A plain connection of our own there, read like the classic channel; a
                # failover or migration breaks it, and with it the link (which reconnects).
                node = redis.get_node_from_key(self.settings.sync_channel)
                options = parse_redis_url(self.settings.url).for_node(node.host, node.port)
                shard_reader = asyncio.create_task(self._read_shard_channel(options))
            elif broadcast and sharded:
                await pubsub.ssubscribe(self.settings.sync_channel)
            # Anything announced before we listened is covered by the table load on connect;
            # reload once more now that we listen, so nothing falls between the two.
            await self.load_peers(redis)
            await self.failover.listening(redis)
            sync = self.settings.sync_channel.encode()
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if shard_reader is not None and shard_reader.done():
                    shard_reader.result()  # its link broke: so did ours
                if message is None:
                    continue
                channel = message["channel"]
                data = message["data"]
                if channel == sync:
                    self.on_sync(data)
                else:
                    await self.on_control(redis, data)
        finally:
            if shard_reader is not None:
                shard_reader.cancel()
            with contextlib.suppress(Exception):  # the link may be broken already
                await pubsub.aclose()

    async def _read_shard_channel(self, options: RedisOptions) -> None:
        client = options.client(socket_connect_timeout=1.0)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            with redis_errors():
                await pubsub.ssubscribe(self.settings.sync_channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self.on_sync(message["data"])
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await client.aclose()

    async def on_control(self, redis: RedisClient, data: bytes) -> None:
        keys = self.failover.keys
        if keys is not None:
            opened = keys.open_text(self.k_control.encode(), data)
            if opened is None:
                self.stats["bad_tag"] += 1
                return
            data = opened
        try:
            op, peer, argument = data.decode().split("\x00", 2)
        except (UnicodeDecodeError, ValueError):
            self.stats["bad_control"] += 1
            return
        if peer == self.me:
            return
        if op == "add":
            self.live_peers.add(peer)
            self.core.remote_subscribe(peer, argument)
            self.failover.route_added(peer, argument)
        elif op == "del":
            # Not while we route it to that broker for a session we just handed it.
            if not self.failover.route_removed(peer, argument):
                self.core.remote_unsubscribe(peer, argument)
        elif op == "reset":
            self.live_peers.add(peer)
            await self.load_peer_table(redis, peer)
            self.on_table(peer)
        elif op == "gone":
            self.peer_gone(peer)
        elif op == "adopted":
            self.adopted(peer, argument)
        elif op == "handover":
            self.failover.handover_requested(peer, argument)
        elif op == "handed":
            self.failover.handed(argument)
        elif op == "moved":
            self.moved(peer, argument)
        else:
            self.stats["bad_control"] += 1
