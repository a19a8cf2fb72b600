"""Sessions across brokers: where a ClientId's session is, and how it moves.

* `{prefix}:client:{id}` names the broker that last took the ClientId. A CONNECT sets it to us
  and reads who had it (`locate_session`): nobody or us, go on; a live peer, ask it on the
  control channel to hand the session over (it closes its connection and leaves the snapshot in
  `{prefix}:handover:{id}`); a gone peer (or one that does not answer), take the copy it stored.
* Stored sessions: each broker writes its persistent sessions to `{prefix}:sessions:{me}`
  (client id -> snapshot, `session_snapshot.py`) within SESSION_WRITE_DELAY of each change.
* Adoption: when a broker is gone, the survivors claim its stored sessions (a Lua script, so
  each is claimed once, and only if no broker took the ClientId since) as offline sessions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from ..core.ports import ClusterCore, Resume
from ..core.session import SessionSnapshot
from .link import Link, LinkError, RedisClient, redis_errors, stream_id
from .resp import Commands
from .session_snapshot import SnapshotError, decode_snapshot, encode_snapshot
from .settings import ClusterSettings

log = logging.getLogger("mcloudtt.cluster")

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


class Failover:
    def __init__(
        self,
        settings: ClusterSettings,
        core: ClusterCore,
        link: Link,
        peers: set[str],
        stats: Counter[str],
        *,
        drain: Callable[[], Awaitable[None]],
        inbox_position: Callable[[], tuple[int, int]],
    ) -> None:
        self.settings = settings
        self.me = settings.broker_id
        prefix = settings.prefix
        self.k_sessions = f"{prefix}:sessions:{self.me}"
        self.k_inbox = f"{prefix}:inbox:{self.me}"
        self.k_control = f"{prefix}:control"
        self.core = core
        self.link = link
        self.peers = peers
        self.stats = stats
        self.drain = drain  # returns once what we forwarded so far was written and answered
        self.inbox_position = inbox_position  # id of the last inbox entry handled
        self.loop: asyncio.AbstractEventLoop | None = None
        self._dirty: set[str] = set()  # client ids whose stored session is stale
        self._write_scheduled = False
        self._handovers: dict[str, asyncio.Future[None]] = {}
        self._adopting: set[str] = set()  # client ids being claimed from a gone broker
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ stored sessions

    def session_changed(self, client_id: str) -> None:
        self._dirty.add(client_id)
        if not self._write_scheduled and self.link.connected and self.loop is not None:
            self._write_scheduled = True
            self.loop.call_later(SESSION_WRITE_DELAY, self.write_sessions)

    def write_sessions(self) -> None:
        """Store the persistent sessions that changed in `{prefix}:sessions:{me}`, so that
        another broker can take them over if this one dies; forget the ones that ended."""
        self._write_scheduled = False
        writer = self.link.writable()
        if writer is None or not self._dirty:
            return  # kept dirty: written when the link is back
        commands = Commands()
        core = self.core
        now = core.clock()
        for client_id in self._dirty:
            snapshot = core.stored_session(client_id)
            if snapshot is not None:
                commands.hset(self.k_sessions, client_id, encode_snapshot(snapshot, self.me, now))
            else:
                commands.hdel(self.k_sessions, client_id)
        self._dirty.clear()
        writer.write(commands)

    async def store_all(self, redis: RedisClient) -> None:
        """After a reconnect: Redis may have lost what we stored, store every session again."""
        stored = {
            raw.decode() if isinstance(raw, bytes) else raw
            for raw in await redis.hkeys(self.k_sessions)
        }
        self._dirty |= stored | set(self.core.persistent_sessions())
        self.write_sessions()

    # ------------------------------------------------------------------ CONNECT elsewhere

    def locate_session(self, client_id: str, clean_start: bool, resume: Resume) -> bool:
        """CONNECT for `client_id`: take it over from whichever broker had it, then resume."""
        loop = self.loop
        assert loop is not None
        if not self.link.connected:
            # Serving locally while Redis is away (the retry pattern).
            loop.call_soon(resume, None)
        else:
            self._spawn(self._locate(client_id, clean_start, resume))
        return True

    async def _locate(self, client_id: str, clean_start: bool, resume: Resume) -> None:
        snapshot = None
        try:
            with redis_errors():
                snapshot = await asyncio.wait_for(
                    self._take_over(client_id, clean_start), self.settings.handover_timeout
                )
        except (LinkError, SnapshotError) as error:
            log.warning("session %r not taken over from the cluster: %s", client_id, error)
            self.stats["handover_failures"] += 1
        finally:
            self._handovers.pop(client_id, None)
        resume(snapshot)

    async def _take_over(self, client_id: str, clean_start: bool) -> SessionSnapshot | None:
        redis = self.link.redis
        assert redis is not None
        prefix = self.settings.prefix
        previous = await redis.set(
            f"{prefix}:client:{client_id}", self.me, get=True, ex=self.settings.client_ttl
        )
        holder = previous.decode() if previous is not None else None
        if holder is None or holder == self.me:
            return None
        if holder not in self.peers:
            return await self._take_stored(redis, holder, client_id, clean_start)
        # What we already forwarded to the holder must reach it before it snapshots the session.
        await self.drain()
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
        return decode_snapshot(data, self.core.clock)

    async def _take_stored(
        self, redis: RedisClient, holder: str, client_id: str, clean_start: bool
    ) -> SessionSnapshot | None:
        """The session as the gone broker `holder` last stored it in Redis (removed there)."""
        stored_key = f"{self.settings.prefix}:sessions:{holder}"
        pipe = redis.pipeline(transaction=True)
        pipe.hget(stored_key, client_id)
        pipe.hdel(stored_key, client_id)
        data, _ = await pipe.execute()
        if data is None or clean_start:
            return None
        self.stats["sessions_restored"] += 1
        return decode_snapshot(data, self.core.clock)

    def handed(self, argument: str) -> None:
        """Control `handed`: the holder gave up a session one of our CONNECTs asked for."""
        requester, _, client_id = argument.partition("\x00")
        waiter = self._handovers.get(client_id) if requester == self.me else None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ giving a session up

    def handover_requested(self, requester: str, argument: str) -> None:
        """Control `handover`. In its own task: it waits for our inbox, which must not hold up
        control messages."""
        redis = self.link.redis
        if redis is not None:
            self._spawn(self._give_up_session(redis, requester, argument))

    async def _give_up_session(self, redis: RedisClient, requester: str, argument: str) -> None:
        """A peer took one of our ClientIds: close it here and hand the session over."""
        target, clean, client_id = argument.split("\x00", 2)
        if target != self.me:
            return
        try:
            with redis_errors():
                await self._give_up(redis, requester, client_id, clean == "1")
        except LinkError as error:
            log.warning("session %r not handed over to %s: %s", client_id, requester, error)

    async def _give_up(
        self, redis: RedisClient, requester: str, client_id: str, clean_start: bool
    ) -> None:
        deadline = time.monotonic() + self.settings.handover_timeout / 2
        while client_id in self._adopting and time.monotonic() < deadline:
            await asyncio.sleep(0.005)  # we are taking it from a gone broker right now
        # Messages for this session that are already in our inbox belong in the snapshot.
        info = await redis.xinfo_stream(self.k_inbox)
        goal = stream_id(info.get("last-generated-id", b"0-0"))
        deadline = time.monotonic() + self.settings.handover_timeout / 2
        while self.inbox_position() < goal and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        core = self.core
        now = core.clock()
        snapshot = core.handover(client_id, clean_start, now)
        if snapshot is not None:
            # The requester will announce these filters; route to it from now on, so nothing
            # published here in between is lost.
            for record in snapshot.subscriptions:
                core.remote_subscribe(requester, record.topic_filter)
        pipe = redis.pipeline(transaction=False)
        if snapshot is not None:
            pipe.set(
                f"{self.settings.prefix}:handover:{client_id}",
                encode_snapshot(snapshot, self.me, now),
                ex=60,
            )
        pipe.publish(self.k_control, f"handed\x00{self.me}\x00{requester}\x00{client_id}")
        await pipe.execute()

    # ------------------------------------------------------------------ adoption

    def peer_gone(self, peer: str) -> None:
        redis = self.link.redis
        if self.link.connected and redis is not None:
            self._spawn(self.adopt_sessions(redis, peer))

    async def adopt_sessions(self, redis: RedisClient, peer: str) -> None:
        """Take over the persistent sessions a gone broker stored, as offline sessions here:
        their subscriptions route to us again and what they miss is queued until the client
        comes back (to us, or to any broker, which then takes the session from us)."""
        core = self.core
        prefix = self.settings.prefix
        stored_key = f"{prefix}:sessions:{peer}"
        try:
            with redis_errors():
                stored = [raw.decode() for raw in await redis.hkeys(stored_key)]
                waiting = [client_id for client_id in stored if not core.has_session(client_id)]
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
                            if data is not None and not core.has_session(client_id):
                                self._adopt(peer, client_id, data)
                    finally:
                        self._adopting.difference_update(batch)
        except LinkError as error:
            log.warning("sessions of %s not taken over yet: %s", peer, error)

    def _adopt(self, peer: str, client_id: str, data: bytes) -> None:
        """Restore a claimed session as an offline session, its expiry counted from now."""
        core = self.core
        try:
            snapshot = decode_snapshot(data, core.clock)
        except SnapshotError as error:
            log.warning("stored session %r of %s dropped: %s", client_id, peer, error)
            self.stats["bad_sessions"] += 1
            return
        core.adopt_session(snapshot, core.clock())
        self.stats["sessions_adopted"] += 1
