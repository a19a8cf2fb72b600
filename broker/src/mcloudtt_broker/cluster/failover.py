"""Sessions across brokers: where a ClientId's session is, and how it moves.

* `{prefix}:client:{id}` names the broker that last took the ClientId. A CONNECT sets it to us
  and reads who had it (`locate_session`): nobody or us, go on; a live peer, ask it on the
  control channel to hand the session over (it closes its connection and leaves the snapshot in
  `{prefix}:handover:{requester}:{id}`, so that no other broker waiting for the same ClientId
  takes it); a gone peer (or one that does not answer), take the copy it stored.
* A live hand-over loses nothing routed to the old holder X after its snapshot: X announces
  `moved` (new holder Y, a token, the filters) before its `del` of them; every other broker
  routes them to Y at once and writes a marker for the token into X's inbox after what it sent
  X. Y takes the session offline, writes its own marker (what it publishes for it is queued
  from then on; until then it routed to X, whose `del` it holds back), reads X's inbox past the
  snapshot's marks to every origin's marker (nothing of an origin after its marker: that went
  to Y too), puts what it found before what it queued meanwhile, and only then lets the client
  in; its inbox skips for the session what X had delivered already (an origin sent it to both).
* Order per publisher across brokers: a ClientId the registry knew (connected before, here or
  elsewhere) gets its CONNACK only once our inbox was read past where it ended then. Its old
  broker wrote what it forwarded for it before giving it up (its outbox drained before it
  answers a hand-over), so that reaches our subscribers before its first PUBLISH here.
* Stored sessions: each broker writes its persistent sessions to `{prefix}:sessions:{me}`
  (client id -> snapshot, `session_snapshot.py`) within SESSION_WRITE_DELAY of each change.
* Adoption: when a broker is gone, one survivor (the lock `{prefix}:adopter:{id}`, taken only
  while the presence is missing) claims its stored sessions (a Lua script, so each is claimed
  once) as offline sessions, with their filters held back; it parks its own inbox, announces
  `adopted` (every broker stops routing to the dead inbox and routes those filters to it, in one
  step, and writes an end marker into the dead inbox), replays the dead inbox past each
  session's marks until every origin's marker is read (`replay.py`), then resumes its inbox and
  sets `{prefix}:adopted:{id}`. A CONNECT whose holder does not answer waits for that adoption
  and then takes the session from the adopter: nothing routed to the dead broker is lost.
* Wills: each broker also stores the wills due for its connections in `{prefix}:wills:{me}`
  (with the sessions, only when one changes); whoever takes a dead broker's sessions (its
  adopter, or its own restart under its id) publishes them once (MQTT-3.1.2-8: those
  connections ended without DISCONNECT). A restart names itself in `adopted:{me}` only once
  it listens on the control channel, and a CONNECT on an adopter waits until the session it
  claimed is restored.
* Marks: each stored session carries where it stood in its broker's inbox; online sessions
  seen idle are checkpointed in `{prefix}:marks:{me}` every SESSION_WRITE_DELAY, so that a
  replay does not repeat what their clients already acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from ..core.message import Message
from ..core.ports import ClusterCore, Resume
from ..core.session import SessionSnapshot
from ..mqtt.reason_codes import ReasonCode
from .envelope import EnvelopeFields
from .keys import cluster_keys
from .link import GROUP, Link, LinkError, RedisClient, redis_errors, stream_id
from .replay import Marks, Replay, origins_and_sequences
from .resp import Commands
from .session_snapshot import (
    SnapshotError,
    decode_snapshot,
    decode_will,
    encode_snapshot,
    encode_will,
    snapshot_marks,
)
from .settings import ClusterSettings
from .topology import TAKE_STORED_SCRIPT, is_cluster

log = logging.getLogger("mcloudtt.cluster")

# Persistent sessions are written to Redis at most this long after they change.
SESSION_WRITE_DELAY = 0.1
# Stored sessions of a gone broker claimed per round trip.
ADOPT_BATCH = 200
# Claim a session a gone broker stored (a CONNECT elsewhere that took it removed it, so a stored
# copy is still the gone broker's; a CONNECT waiting for this adoption asks us next): KEYS
# client registry, stored sessions of the gone broker; ARGV gone broker, me, client id,
# registry TTL. Returns the stored session, or nil; the stored copy is removed either way. The
# registry names us only if it still names the gone broker: one that names a CONNECT waiting
# elsewhere is left alone (that CONNECT is the latest, it takes the session from us).
_ADOPT_SCRIPT = """
local data = redis.call('HGET', KEYS[2], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[3])
if data then
  local holder = redis.call('GET', KEYS[1])
  if (not holder) or holder == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[4])
  end
  return data
end
return false
"""
# The same for a Redis Cluster, where the registry key is in another slot than the stored hash:
# KEYS client registry; ARGV gone broker, me, registry TTL.
_NAME_ADOPTER_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if (not holder) or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return 1
"""
# A hand-over answered with where the session is instead of the session itself (the answering
# broker's CONNECT for it was superseded before it fetched it): b"@" + that broker's id.
REDIRECT = b"@"
# Redirects followed by one CONNECT before it takes what it has.
MAX_REDIRECTS = 3
# How long a route to a broker we handed a session to outlives a `del` it sent before its `add`.
PIN_SECONDS = 10.0
# Take the adoption lock of a gone broker only while its presence is missing: KEYS presence,
# lock; ARGV me, lock TTL seconds.
_LOCK_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
return 0
"""
ADOPTER_LOCK_TTL = 300
T = TypeVar("T")
# Redis connections for the work CONNECTs bring (look-ups, hand-overs); more wait their turn.
SESSION_CONNECTIONS = 16
# Every CONNECT waiting for a gone holder's adoption shares one poll of its `adopted` key.
ADOPTED_POLL = 0.05
# How long after an adoption the dead inbox is looked at again for records the replay missed.
DEAD_TAIL_CHECK = 1.0


class LookupOverdue(Exception):
    """A session look-up did not finish in its time (the cluster is busy): CONNACK 0x88."""


async def _within(work: Awaitable[T], timeout: float) -> T:
    """`work`'s result, or LookupOverdue after `timeout` seconds, then at once: the work is
    cancelled but not waited for (asyncio.wait_for waits for the cancelled work to finish, and
    a CONNECT must get its CONNACK on time whatever the work is stuck in)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise LookupOverdue(f"not done in {timeout:g} s")
    try:
        return task.result()
    except asyncio.CancelledError:
        # The work was cancelled from inside (not us): a failed look-up, not our end.
        raise LookupOverdue("cancelled") from None


async def _feed_range(
    redis: RedisClient, key: str, replay: Replay, start: str, stop: str
) -> bytes | None:
    """Every entry of the stream `key` from `start` to `stop` (XRANGE bounds), fed to `replay`
    a page at a time; the id of the last one (None: there was none)."""
    last: bytes | None = None
    low: bytes | str = start
    while True:
        entries = await redis.xrange(key, min=low, max=stop, count=1000)
        for entry_id, fields in entries:
            replay.feed(entry_id, fields)
            last = entry_id
            low = b"(" + entry_id
        if len(entries) < 1000:
            return last


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


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
        inbox_handled: Callable[[], dict[str, int]] = dict,
        to_message: Callable[[EnvelopeFields], Message | None] | None = None,
        pause_inbox: Callable[[], None] | None = None,
        resume_inbox: Callable[[], None] | None = None,
        announce_adoption: Callable[[str, list[str]], None] | None = None,
        finish_adoption: Callable[[str], list[bytes]] | None = None,
        announce_move: Callable[[str, str, list[str]], None] | None = None,
        mark_inbox: Callable[[str, str], None] | None = None,
        delivered_before: Callable[[str, dict[str, int], tuple[int, int]], None] | None = None,
        outbox_sequence: Callable[[], int] = int,
        replay: bool = True,
    ) -> None:
        self.settings = settings
        self.me = settings.broker_id
        prefix = settings.prefix
        self.k_sessions = f"{prefix}:sessions:{{{self.me}}}"
        self.k_inbox = f"{prefix}:inbox:{{{self.me}}}"
        self.k_control = f"{prefix}:control"
        self.keys = cluster_keys(settings.keys)
        self.core = core
        self.link = link
        self.peers = peers
        self.stats = stats
        self.drain = drain  # returns once what we forwarded so far was written and answered
        self.inbox_position = inbox_position  # id of the last inbox entry handled
        self.inbox_handled = inbox_handled  # origin -> highest sequence handled
        self.to_message = to_message
        self.pause_inbox = pause_inbox
        self.resume_inbox = resume_inbox
        self.announce_adoption = announce_adoption  # (dead, filters): tell every broker
        self.finish_adoption = finish_adoption  # stop routing to dead: our records for it
        self.announce_move = announce_move  # (requester, token, filters): `moved`, before `del`
        self.mark_inbox = mark_inbox  # (broker, token): our end marker in its inbox
        self.delivered_before = delivered_before  # (client id, old holder's seen, until)
        self.outbox_sequence = outbox_sequence  # the sequence of the last record we forwarded
        self.replay_enabled = replay  # False only to show what is lost without it (tests)
        self.k_marks = f"{prefix}:marks:{{{self.me}}}"
        # The wills due if we died now (client id -> will), published by whoever takes our
        # sessions (an adopter, or our own restart under this id).
        self.k_wills = f"{prefix}:wills:{{{self.me}}}"
        self._wills_stored: dict[str, Message] = {}
        self._write_soon = False  # a write of the sessions is due at the loop's next turn
        # The sessions a restart under our id took back from its previous run (`_readopt_own`),
        # for what was published here before they were back (`RedisBus._route_unrouted`).
        self.readopted: set[str] = set()
        self.readopted_after = 0  # how many of those publishes came before they were back
        self.unrouted_count: Callable[[], int] = lambda: 0
        self._checkpointed: dict[str, tuple[int, int]] = {}
        self._checkpoint_position: tuple[int, int] = (0, 0)
        self._completed: set[str] = set()
        self._releases: list[tuple[str, int]] = []  # PUBRELs waiting for the session's store
        self._completed_scheduled = False
        self._paused_for: dict[str, int] = {}  # client id -> inbox pauses until it resumes
        self.loop: asyncio.AbstractEventLoop | None = None
        self._dirty: set[str] = set()  # client ids whose stored session is stale
        self._write_scheduled = False
        self._handovers: dict[str, asyncio.Future[None]] = {}
        # Client ids claimed from a gone broker and not restored here yet (a hand-over or a
        # CONNECT of one waits for it: the registry names us from the claim on).
        self._adopting: set[str] = set()
        self._adopting_changed = asyncio.Event()
        # A restart under our id took stored sessions back: `adopted:{me}` is set once we
        # listen on the control channel (a CONNECT elsewhere then asks us for them).
        self._own_readopted = False
        # CONNECTs here still looking for their session: the registry names us already, so a
        # hand-over asked of us meanwhile waits for it (the client may have given up on us).
        self._locating: dict[str, asyncio.Event] = {}
        # ClientIds whose CONNECT here was superseded by a later one elsewhere before it fetched
        # the session: where the session is, for the hand-over the later CONNECT asks of us.
        self._redirects: dict[str, str] = {}
        # Routes to a broker we handed a session to, set before its own `add` comes: (broker,
        # filter) -> [until (loop time), a `del` of it came meanwhile and was held back].
        self._pinned: dict[tuple[str, str], list[float | bool]] = {}
        # Sessions handed to us by a live broker, whose inbox we still drain past the snapshot:
        # client id -> (that broker, its marks at the snapshot, the hand-over's token).
        self._drains: dict[str, tuple[str, Marks, str]] = {}
        # Sessions whose drain runs now: a hand-over asked of us waits for it (the snapshot
        # must hold what the drain delivers, and our marks must be past it).
        self._draining: dict[str, asyncio.Event] = {}
        # Hand-overs to us whose session is here now (tokens): a late `moved` of one is moot.
        self._moves_done: set[str] = set()
        # Routes to an old holder kept for hand-overs to us still in progress: (holder,
        # filter) -> their tokens (two sessions with one filter moving at once need it both).
        self._move_pins: dict[tuple[str, str], set[str]] = {}
        # ClientIds that connected while Redis was away: the registry learns them on reconnect.
        self._unregistered: set[str] = set()
        # CONNECTs refused because their session could not be located: the registry names us
        # already, so the client's retry must look where the session was (client id -> holder).
        self._unresolved: dict[str, str] = {}
        # Where our inbox stood when a CONNECT here stopped holding it for a hand-over that did
        # not answer in time (client id -> holder asked -> entry): a late answer's holder and
        # origins routed the session here from its move on, and what our inbox read of that
        # meanwhile found no session (`_take_drained` replays it). Kept, like `_unresolved`,
        # across CONNECTs.
        self._unheld_since: dict[str, dict[str, tuple[int, int]]] = {}
        # ClientIds whose CONNECT found them registered (they were connected before, here or
        # elsewhere): `_behind_earlier_records` before their CONNACK.
        self._returning: set[str] = set()
        # Per holder a CONNECT here waits to hand a session over: set once it is known gone
        # (declared so, or its adoption announced), so that the CONNECT waits for the adopter
        # instead of the rest of the hand-over timeout (with our inbox paused).
        self._holder_gone: dict[str, asyncio.Event] = {}
        # One poll of `{prefix}:adopted:{holder}` per gone holder, shared by its CONNECTs.
        self._adoption_watches: dict[str, asyncio.Future[str | None]] = {}
        # Hand-overs asked of us share their reads of the inbox's end and their wait for it.
        self._next_goal: asyncio.Future[tuple[int, int]] | None = None
        self._goal_reader: asyncio.Task[None] | None = None
        self._inbox_waiters: list[tuple[tuple[int, int], asyncio.Future[None]]] = []
        self._inbox_watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ stored sessions

    def session_changed(self, client_id: str) -> None:
        self._dirty.add(client_id)
        if (
            self.link.connected
            and self.loop is not None
            and (client_id in self._wills_stored or self.core.will_of(client_id) is not None)
        ):
            # A will due now, or one stored whose connection may have ended just now (published
            # or no longer due): stored, or removed next to the will's own forward, at the
            # loop's next turn, not a write delay later. A broker killed in between loses the
            # new will, or has its restart or adopter publish the old one again (MQTT-3.1.2-8:
            # once).
            if not self._write_soon:
                self._write_soon = True
                self.loop.call_soon(self._write_now)
            return
        if not self._write_scheduled and self.link.connected and self.loop is not None:
            self._write_scheduled = True
            self.loop.call_later(SESSION_WRITE_DELAY, self.write_sessions)

    def _write_now(self) -> None:
        self._write_soon = False
        self.write_sessions()

    def write_sessions(self) -> None:
        """Store the persistent sessions that changed in `{prefix}:sessions:{me}`, so that
        another broker can take them over if this one dies; forget the ones that ended."""
        self._write_scheduled = False
        writer = self.link.writable()
        if writer is None or not self._dirty:
            return  # kept dirty: written when the link is back
        commands = self.session_commands()
        if commands is not None:
            writer.write(commands)

    def session_commands(self) -> Commands | None:
        """The commands that store the dirty sessions (None when none are)."""
        if not self._dirty:
            return None
        commands = Commands()
        core = self.core
        now = core.clock()
        marks = self.marks()
        for client_id in self._dirty:
            snapshot = core.stored_session(client_id)
            if snapshot is not None:
                commands.hset(
                    self.k_sessions, client_id, encode_snapshot(snapshot, self.me, now, marks)
                )
            else:
                commands.hdel(self.k_sessions, client_id)
                commands.hdel(self.k_marks, client_id)
            will = core.will_of(client_id)
            if will is not None:
                if self._wills_stored.get(client_id) is not will:
                    self._wills_stored[client_id] = will
                    commands.hset(self.k_wills, client_id, encode_will(will, self.me, now).encode())
            elif self._wills_stored.pop(client_id, None) is not None:
                commands.hdel(self.k_wills, client_id)
        self._dirty.clear()
        return commands

    async def publish_wills(self, redis: RedisClient, broker: str) -> None:
        """`broker` died (or this is its restart under its id): publish the wills it stored
        for the connections it had, once (whoever takes the hash takes them all). Those
        connections ended without a DISCONNECT: their wills are due (MQTT-3.1.2-8)."""
        key = f"{self.settings.prefix}:wills:{{{broker}}}"
        pipe = redis.pipeline(transaction=True)
        pipe.hgetall(key)
        pipe.delete(key)
        stored, _ = await pipe.execute()
        now = self.core.clock()
        for client_id, data in stored.items():
            try:
                will = decode_will(data, now)
            except SnapshotError as error:
                log.warning("stored will of %r on %s dropped: %s", client_id, broker, error)
                continue
            self.core.publish(will)
            self.stats["wills_published"] += 1

    def marks(self, own: bool = False) -> dict[str, object]:
        seen = dict(self.inbox_handled())
        if own:
            # A hand-over's: what we published ourselves up to now is in the session's queue,
            # and may also be in the requester's inbox (another session there has the filter).
            seen[self.me] = self.outbox_sequence()
        return Marks(self.inbox_position(), seen).encode()

    def delivery_completed(self, client_id: str) -> None:
        """A QoS 2 delivery completed: store the session (with its marks) on the next turn of
        the loop, so that a replay after our death does not deliver it again."""
        self._completed.add(client_id)
        if not self._completed_scheduled and self.loop is not None:
            self._completed_scheduled = True
            self.loop.call_soon(self._write_completed)

    def _write_completed(self) -> None:
        self._completed_scheduled = False
        self._dirty |= self._completed
        self._completed.clear()
        releases, self._releases = self._releases, []
        if not releases:
            self.write_sessions()
            return
        self._dirty.update(client_id for client_id, _ in releases)
        commands = self.session_commands()
        writer = self.link.writable()
        if writer is None or commands is None:
            self._release(releases)
            return
        self._spawn(self._store_then_release(writer.call(commands), releases))

    async def _store_then_release(
        self, stored: Awaitable[object], releases: list[tuple[str, int]]
    ) -> None:
        with contextlib.suppress(ConnectionError):
            await stored
        self._release(releases)

    def _release(self, releases: list[tuple[str, int]]) -> None:
        for client_id, packet_id in releases:
            self.core.release(client_id, packet_id)

    def release_after_store(self, client_id: str, packet_id: int) -> bool:
        """PUBREC: store the session (it now awaits PUBCOMP), then send PUBREL."""
        if self.loop is None or self.link.writable() is None:
            return False
        self._releases.append((client_id, packet_id))
        if not self._completed_scheduled:
            self._completed_scheduled = True
            self.loop.call_soon(self._write_completed)
        return True

    def checkpoint(self) -> None:
        """Online sessions seen idle: everything their broker's inbox delivered to them so far
        is acknowledged; a replay starts after it (one HSET, only when the inbox moved)."""
        writer = self.link.writable()
        if writer is None:
            return
        position = self.inbox_position()
        if self._checkpoint_position != position:
            # Online sessions that are not idle: stored again, with what they have in flight.
            self._checkpoint_position = position
            self._dirty.update(self.core.busy_sessions())
            if self._dirty:
                self.write_sessions()
        idle = [c for c in self.core.idle_sessions() if self._checkpointed.get(c) != position]
        if not idle:
            return
        marks = json.dumps(self.marks(), separators=(",", ":")).encode()
        commands = Commands()
        for client_id in idle:
            commands.hset(self.k_marks, client_id, marks)
            self._checkpointed[client_id] = position
        writer.write(commands)
        if len(self._checkpointed) > 100_000:
            self._checkpointed.clear()

    async def store_all(self, redis: RedisClient) -> None:
        """After a reconnect: Redis may have lost what we stored, store every session again."""
        stored = {
            raw.decode() if isinstance(raw, bytes) else raw
            for raw in await redis.hkeys(self.k_sessions)
        }
        self._dirty |= stored | set(self.core.persistent_sessions()) | set(self._wills_stored)
        self._wills_stored.clear()  # stored again (the hash may be gone)
        self.write_sessions()
        # Sessions that connected while Redis was away: name us in the registry, or a CONNECT
        # elsewhere after our death would find no holder and start afresh.
        unregistered = [c for c in self._unregistered if self.core.has_session(c)]
        self._unregistered.clear()
        if unregistered:
            pipe = redis.pipeline(transaction=False)
            for client_id in unregistered:
                pipe.set(
                    f"{self.settings.prefix}:client:{client_id}",
                    self.me,
                    ex=self.settings.client_ttl,
                )
            await pipe.execute()

    # ------------------------------------------------------------------ CONNECT elsewhere

    def locate_session(self, client_id: str, clean_start: bool, resume: Resume) -> bool:
        """CONNECT for `client_id`: take it over from whichever broker had it, then resume."""
        loop = self.loop
        assert loop is not None
        if not self.link.connected:
            # Serving locally while Redis is away (the retry pattern).
            self._unregistered.add(client_id)
            loop.call_soon(resume, None)
        elif len(self._locating) >= self.settings.max_locating:
            # Bounded work per broker: the client is told to come back (its session stays
            # where it is), not queued without end.
            self.stats["connects_busy"] += 1
            loop.call_soon(resume, ReasonCode.SERVER_BUSY)
        else:
            self._spawn(self._locate(client_id, clean_start, resume))
        return True

    def _redis(self) -> RedisClient:
        """The client for the work CONNECTs bring (the bounded pool, `Link.sessions`)."""
        redis = self.link.sessions if self.link.sessions is not None else self.link.redis
        assert redis is not None
        return redis

    async def _locate(self, client_id: str, clean_start: bool, resume: Resume) -> None:
        snapshot: SessionSnapshot | ReasonCode | None = None
        located = self._locating.get(client_id)
        if located is not None:
            await located.wait()  # an earlier CONNECT of this ClientId goes first
        located = self._locating[client_id] = asyncio.Event()
        try:
            with redis_errors():
                snapshot = await _within(
                    self._take_over(client_id, clean_start),
                    2 * self.settings.handover_timeout + self.adoption_wait(),
                )
        except LookupOverdue as error:
            # The cluster is too busy to find it in time: not a fresh session in place of the
            # one elsewhere (its messages would be lost), a CONNACK that sends the client to
            # retry (0x88 Server unavailable; 3.1.1: 3).
            log.warning("session %r not taken over from the cluster: %s", client_id, error)
            self.stats["handover_failures"] += 1
            snapshot = ReasonCode.SERVER_UNAVAILABLE
        except LinkError as error:
            log.warning("session %r not taken over from the cluster: %s", client_id, error)
            self.stats["handover_failures"] += 1
            if client_id in self._unresolved:
                # Redis went away while we fetched it from the broker the registry named: the
                # session is there, with what is queued for it; a fresh one here would lose
                # that. The client is sent to retry, as above: its retry finds the session once
                # the link is back, or is served here while Redis is away (the retry pattern).
                snapshot = ReasonCode.SERVER_UNAVAILABLE
            else:
                # Redis went away before we learnt of a session elsewhere (a broker cut from
                # Redis, its link held): served here, as while Redis is away; the registry
                # learns it on reconnect.
                self._unregistered.add(client_id)
        except SnapshotError as error:
            log.warning("session %r not taken over from the cluster: %s", client_id, error)
            self.stats["handover_failures"] += 1
        finally:
            self._handovers.pop(client_id, None)
        unheld = self._unheld_since.get(client_id, {})
        if not isinstance(snapshot, ReasonCode):
            self._unresolved.pop(client_id, None)  # found (or none to find): done looking
            self._unheld_since.pop(client_id, None)
        drain = self._drains.pop(client_id, None)
        try:
            if (
                drain is not None
                and isinstance(snapshot, SessionSnapshot)
                and await self._take_drained(client_id, snapshot, *drain, unheld.get(drain[0]))
            ):
                snapshot = None  # here already, with what was routed to its old holder
            if client_id in self._returning and not isinstance(snapshot, ReasonCode):
                snapshot = await self._behind_earlier_records(client_id, snapshot)
            resume(snapshot)  # the session is here now, also if its client went away meanwhile
        finally:
            self._returning.discard(client_id)
            if self._locating.get(client_id) is located:
                del self._locating[client_id]
            located.set()
        # Our inbox delivers to it again (after what it brought).
        while client_id in self._paused_for:
            self._unpause(client_id)

    async def _behind_earlier_records(
        self, client_id: str, snapshot: SessionSnapshot | None
    ) -> SessionSnapshot | None:
        """A ClientId seen before (here or elsewhere) comes back: what its old broker forwarded
        here for our subscribers before it gave the client up is in our inbox already, and its
        first PUBLISH here, delivered at once, must not overtake it (MQTT-4.6.0-6: a topic is
        ordered per publisher, also across its brokers). CONNACK waits until our inbox has been
        read past its last entry now; the session is restored offline first, so that what the
        inbox brings for it meanwhile is queued for it."""
        core = self.core
        if isinstance(snapshot, SessionSnapshot) and not core.has_session(client_id):
            core.adopt_session(snapshot, core.clock())
            snapshot = None  # here now: resumed as a local session
        while client_id in self._paused_for:
            self._unpause(client_id)
        offline = core.has_session(client_id)
        if offline:
            core.bound_queue(client_id, False)  # until the client takes it back (its CONNACK)
        try:
            with redis_errors():
                goal = await self._inbox_goal(self._redis())
            await self._inbox_reached(goal, self.settings.handover_timeout / 2)
        except LinkError as error:
            log.warning("%r let in without reading our inbox first: %s", client_id, error)
        finally:
            if offline:
                core.bound_queue(client_id, True)
        return snapshot

    def _unpause(self, client_id: str) -> None:
        count = self._paused_for.pop(client_id, 0)
        if count > 1:
            self._paused_for[client_id] = count - 1
        if count and self.resume_inbox is not None:
            self.resume_inbox()

    async def _take_over(self, client_id: str, clean_start: bool) -> SessionSnapshot | None:
        redis = self._redis()
        prefix = self.settings.prefix
        previous = await redis.set(
            f"{prefix}:client:{client_id}", self.me, get=True, ex=self.settings.client_ttl
        )
        holder = previous.decode() if previous is not None else None
        if holder is not None:
            self._returning.add(client_id)  # CONNACK only behind what it sent before
        if holder == self.me and client_id in self._adopting:
            # Claimed here from a gone broker (the claim named us): local once restored.
            await self._until_adopted(client_id, self.adoption_wait())
        if holder == self.me and not self.core.has_session(client_id):
            # An earlier CONNECT of it here was refused half way: look where it looked, and
            # first whether its holder handed it over late.
            holder = self._unresolved.get(client_id, holder)
            if holder != self.me:
                late = await redis.getdel(f"{prefix}:handover:{self.me}:{client_id}")
                if late is not None:
                    self.stats["handovers"] += 1
                    return await self._answer(redis, late, client_id, clean_start, 0)
        if holder is None or holder == self.me:
            self._unresolved.pop(client_id, None)
            return None
        # Kept until this CONNECT finishes: refused, the next one looks at the same holder.
        self._unresolved[client_id] = holder
        if len(self._unresolved) > 100_000:
            self._unresolved.clear()
        if holder not in self.peers:
            return await self._after_adoption(redis, holder, client_id, clean_start)
        try:
            return await self._handover_from(redis, holder, client_id, clean_start)
        except TimeoutError:
            # No answer: the holder died (or froze) and its presence has not expired yet.
            return await self._after_adoption(redis, holder, client_id, clean_start)

    def adoption_wait(self) -> float:
        """The longest a CONNECT waits for a silent holder's sessions to be adopted."""
        settings = self.settings
        return settings.presence_ttl + 2 * settings.backoff_max + 2 * settings.handover_timeout + 2

    async def _handover_from(
        self, redis: RedisClient, holder: str, client_id: str, clean_start: bool, hops: int = 0
    ) -> SessionSnapshot | None:
        """Ask the live broker `holder` for the session; TimeoutError if it does not answer."""
        prefix = self.settings.prefix
        # The holder routes the session's messages to us from the moment it gives it up: our
        # inbox must wait until the session is restored here, or they reach nobody.
        if self.pause_inbox is not None:
            self.pause_inbox()
            self._paused_for[client_id] = self._paused_for.get(client_id, 0) + 1
        # What we already forwarded to the holder must reach it before it snapshots the session.
        await self.drain()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._handovers[client_id] = waiter
        await redis.publish(
            self.k_control,
            self.control_message(
                f"handover\x00{self.me}\x00{holder}\x00{int(clean_start)}\x00{client_id}"
            ),
        )
        gone = self._holder_gone.get(holder)
        if gone is None:
            gone = self._holder_gone[holder] = asyncio.Event()
        gone_wait: asyncio.Future[Any] = asyncio.ensure_future(gone.wait())
        waits: set[asyncio.Future[Any]] = {waiter, gone_wait}
        try:
            # Not cancelled on a timeout: the waiter stays, for the late answer
            # (`_late_handover`, `_after_adoption`); cancelled, it would cancel whoever waited
            # on it next.
            await asyncio.wait(
                waits,
                timeout=self.settings.handover_timeout / 2,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            gone_wait.cancel()
        if not waiter.done():
            # No answer in time, or the holder is gone (its adopter has the session).
            asked = self._unheld_since.setdefault(client_id, {})
            asked.setdefault(holder, self.inbox_position())
            if len(self._unheld_since) > 100_000:
                self._unheld_since.clear()
            self._unpause(client_id)  # no session coming (yet): do not hold the inbox up
            raise TimeoutError
        self.stats["handovers"] += 1
        data = await redis.getdel(f"{prefix}:handover:{self.me}:{client_id}")
        return await self._answer(redis, data, client_id, clean_start, hops)

    async def _answer(
        self,
        redis: RedisClient,
        data: bytes | None,
        client_id: str,
        clean_start: bool,
        hops: int,
    ) -> SessionSnapshot | None:
        """What a hand-over brought: the session, nothing, or where the session is."""
        if data is not None and data.startswith(REDIRECT):
            return await self._follow(redis, data[1:].decode(), client_id, clean_start, hops + 1)
        if data is None or clean_start:
            return None
        snapshot = decode_snapshot(data, self.core.clock)
        moved = snapshot_marks(data)
        if isinstance(moved, dict) and self.replay_enabled:
            token, holder = moved.get("token"), moved.get("from")
            if isinstance(token, str) and isinstance(holder, str) and holder != self.me:
                self._drains[client_id] = (holder, Marks.decode(moved), token)
        return snapshot

    async def _take_drained(
        self,
        client_id: str,
        snapshot: SessionSnapshot,
        holder: str,
        marks: Marks,
        token: str,
        unheld_since: tuple[int, int] | None = None,
    ) -> bool:
        """The live broker `holder` handed us the session: what was routed to `holder` for it
        after its snapshot is in `holder`'s inbox, up to each origin's marker for this
        hand-over (written once it routed the session's filters to us, `moved`). The session
        is taken here offline first (what we publish for it from then on is queued for it),
        our own marker written, `holder`'s inbox read to the markers and what it found put
        before what was queued meanwhile; our inbox waits (what it holds is newer). An answer
        that came late, after our inbox went on without the session (`unheld_since`): what it
        read since of what `holder` and the origins routed here past their marks goes in too.
        False: not drained, the caller restores the snapshot."""
        redis = self.link.redis
        core = self.core
        if (
            redis is None
            or self.pause_inbox is None
            or self.resume_inbox is None
            or self.mark_inbox is None
            or self.to_message is None
            or core.has_session(client_id)
        ):
            return False
        self.pause_inbox()
        drained = self._draining[client_id] = asyncio.Event()
        try:
            core.adopt_session(snapshot, core.clock())
            core.bound_queue(client_id, False)  # until the client takes it back (below)
            base = core.queued(client_id)
            self.mark_inbox(holder, token)
            # What we publish for it is queued here now: `holder` has no more use for it.
            self._moves_done.add(token)
            if len(self._moves_done) > 100_000:
                self._moves_done.clear()
            for record in snapshot.subscriptions:
                route = (holder, record.topic_filter)
                tokens = self._move_pins.get(route)
                if tokens is not None:
                    tokens.discard(token)
                    if not tokens:
                        del self._move_pins[route]
                        self._release_pin(*route)
            key = f"{self.settings.prefix}:inbox:{{{holder}}}"
            replay = Replay(
                core,
                self.to_message,
                {client_id: marks},
                (set(self.peers) | {self.me}) - {holder},
                keys=self.keys,
                inbox=key,
                token=token,
                redelivered=False,  # the old holder never sent what is past its snapshot
                shared=False,  # the old holder is alive and passes its groups' records on
            )
            try:
                with redis_errors():
                    ms, seq = marks.position
                    start: bytes | str = f"({ms}-{seq}"
                    deadline = time.monotonic() + self.settings.handover_timeout
                    while not replay.done and time.monotonic() < deadline:
                        entries = await redis.xrange(key, min=start, max="+", count=1000)
                        for entry_id, fields in entries:
                            replay.feed(entry_id, fields)
                            start = b"(" + entry_id
                        if not entries:
                            # A peer that left meanwhile sends nothing more (and no marker).
                            replay.pending &= self.peers | {self.me}
                            await asyncio.sleep(0.002)
                    if replay.pending:
                        log.warning(
                            "hand-over of %r from %s: no marker from %s",
                            client_id,
                            holder,
                            sorted(replay.pending),
                        )
                    ms, seq = self.inbox_position()
                    missed = None
                    if unheld_since is not None and (ms, seq) > unheld_since:
                        # Past the drain's marks: every origin's records since its marker (the
                        # holder's since its snapshot), no earlier one twice.
                        missed = Replay(
                            core,
                            self.to_message,
                            {client_id: Marks(unheld_since, replay.sessions[client_id].seen)},
                            (),
                            keys=self.keys,
                            inbox=self.k_inbox,
                            redelivered=False,
                            shared=False,
                        )
                        await _feed_range(
                            redis,
                            self.k_inbox,
                            missed,
                            f"({unheld_since[0]}-{unheld_since[1]}",
                            f"{ms}-{seq}",
                        )
                    ours = await redis.xrange(self.k_inbox, min=f"({ms}-{seq}", max="+")
            except LinkError as error:
                log.warning("hand-over of %r from %s not drained: %s", client_id, holder, error)
                return True
            # From here on, no await: what the drain found goes before what was queued since.
            if ours and self.delivered_before is not None:
                # What an origin sent both to `holder` (delivered there before the snapshot,
                # so in it) and to us (another session here has the filter): not twice.
                self.delivered_before(client_id, marks.seen, stream_id(ours[-1][0]))
            if core.has_session(client_id):
                since = core.queued(client_id)
                self.stats["drained"] += replay.deliver(origins_and_sequences(ours))
                if missed is not None:
                    # Read by our inbox already, to no session: not delivered by it again.
                    self.stats["drained"] += missed.deliver(set())
                core.queue_behind(client_id, base, since)
            return True
        finally:
            core.bound_queue(client_id, True)
            if self._draining.get(client_id) is drained:
                del self._draining[client_id]
            drained.set()
            self.resume_inbox()

    async def _follow(
        self, redis: RedisClient, holder: str, client_id: str, clean_start: bool, hops: int
    ) -> SessionSnapshot | None:
        """The session is at `holder` (a dead broker's adopter, or where a hand-over pointed):
        take it from there, unless a later CONNECT elsewhere superseded ours meanwhile. That
        one asks us (the registry named us when it came): we tell it where the session is,
        rather than compete with it for the session (each waiting for the other)."""
        if holder == self.me:
            return None  # it is here already
        if not await self._current(redis, client_id):
            self._redirects[client_id] = holder
            if len(self._redirects) > 100_000:
                self._redirects.clear()
            return None
        if hops > MAX_REDIRECTS:
            log.warning("session %r: too many redirects, last to %s", client_id, holder)
            return None
        try:
            return await self._handover_from(redis, holder, client_id, clean_start, hops)
        except TimeoutError:
            return await self._late_handover(redis, holder, client_id, clean_start, hops)

    async def _current(self, redis: RedisClient, client_id: str) -> bool:
        """Whether the registry still names us for `client_id` (our CONNECT is the latest)."""
        raw = await redis.get(f"{self.settings.prefix}:client:{client_id}")
        return raw is not None and raw.decode() == self.me

    async def _after_adoption(
        self, redis: RedisClient, holder: str, client_id: str, clean_start: bool
    ) -> SessionSnapshot | None:
        """The holder is gone or silent: wait until a survivor adopted its sessions (with what
        was routed to its inbox), then take this one from that adopter. A holder that was only
        frozen answers the hand-over late; one that nobody adopts leaves its stored copy."""
        prefix = self.settings.prefix
        deadline = time.monotonic() + self.adoption_wait()
        adopter = None
        # The hand-over asked of the holder, if any: a late answer wakes us (`handed`).
        asked = self._handovers.get(client_id)
        late_key = f"{prefix}:handover:{self.me}:{client_id}"
        while (left := deadline - time.monotonic()) > 0:
            watch = self._watch_adoption(redis, holder)
            waits: set[asyncio.Future[Any]] = {watch}
            if asked is not None and not asked.done():
                waits.add(asked)
            await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if watch.done() and watch.result() is not None:
                adopter = watch.result()
                break
            if asked is not None and asked.done():
                asked = None
                late = await redis.getdel(late_key)
                if late is not None:
                    self.stats["handovers"] += 1
                    return await self._answer(redis, late, client_id, clean_start, 0)
        if adopter is None:
            # (A `handed` lost while the control channel reconnected: its snapshot is there.)
            late = await redis.getdel(late_key)
            if late is not None:
                self.stats["handovers"] += 1
                return await self._answer(redis, late, client_id, clean_start, 0)
            log.warning("sessions of %s not adopted; taking %r as stored", holder, client_id)
            return await self._take_stored(redis, holder, client_id, clean_start)
        # (The registry is not set to us again here: a CONNECT elsewhere that came after ours
        # named its broker, and the adoption left it alone, `_ADOPT_SCRIPT`.)
        return await self._follow(redis, adopter, client_id, clean_start, 0)

    async def _late_handover(
        self, redis: RedisClient, holder: str, client_id: str, clean_start: bool, hops: int
    ) -> SessionSnapshot | None:
        """A live holder did not answer in time (busy: thousands of hand-overs in a reconnect
        storm): its answer comes late, and its stored copy may be older than what it hands
        over. Wait for it as long as an adoption may take; then take what it stored."""
        asked = self._handovers.get(client_id)
        if asked is not None and not asked.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(asked), self.adoption_wait())
        late = await redis.getdel(f"{self.settings.prefix}:handover:{self.me}:{client_id}")
        if late is not None:
            self.stats["handovers"] += 1
            return await self._answer(redis, late, client_id, clean_start, hops)
        return await self._take_stored(redis, holder, client_id, clean_start)

    def _watch_adoption(self, redis: RedisClient, holder: str) -> asyncio.Future[str | None]:
        """Who adopted `holder`'s sessions, once someone did (None: nobody within
        adoption_wait). One poll per holder, however many CONNECTs wait for it."""
        watch = self._adoption_watches.get(holder)
        if watch is None or watch.done():
            watch = asyncio.ensure_future(self._poll_adopted(redis, holder))
            self._adoption_watches[holder] = watch
            watch.add_done_callback(lambda done: self._forget_watch(holder, done))
        return watch

    def _forget_watch(self, holder: str, watch: asyncio.Future[str | None]) -> None:
        if self._adoption_watches.get(holder) is watch:
            del self._adoption_watches[holder]
        if not watch.cancelled():
            watch.exception()  # retrieved: a failed poll fails its waiters' next look, not this

    async def _poll_adopted(self, redis: RedisClient, holder: str) -> str | None:
        key = f"{self.settings.prefix}:adopted:{{{holder}}}"
        deadline = time.monotonic() + self.adoption_wait()
        while time.monotonic() < deadline:
            with redis_errors():
                raw = await redis.get(key)
            # (The holder naming itself is its restart under its id; unless it died again.)
            if raw is not None and (raw.decode() != holder or holder in self.peers):
                return str(raw.decode())
            await asyncio.sleep(ADOPTED_POLL)
        return None

    async def _take_stored(
        self, redis: RedisClient, holder: str, client_id: str, clean_start: bool
    ) -> SessionSnapshot | None:
        """The session as the gone broker `holder` last stored it in Redis (removed there)."""
        stored_key = f"{self.settings.prefix}:sessions:{{{holder}}}"
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
        if argument.partition("\x00")[0] != self.me:
            return  # asked of another broker (a storm of CONNECTs elsewhere spawns nothing here)
        if self.link.redis is not None:
            self._spawn(self._give_up_session(self._redis(), requester, argument))

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
        # We are taking it from a gone broker right now: hand it over once it is here (the
        # requester takes a late hand-over while it waits).
        await self._until_adopted(client_id, self.adoption_wait())
        located = self._locating.get(client_id)
        if located is not None:
            if await self._current(redis, client_id):
                # Our CONNECT came after the requester's (it named us in the registry last):
                # the requester's client moved on to us, and our CONNECT may be waiting for
                # that very requester. Waiting for it would be a cycle; tell it the session
                # comes here.
                await self._hand(redis, requester, client_id, REDIRECT + self.me.encode())
                return
            # A CONNECT here is still fetching the session (from a dead broker's adopter, say):
            # hand it over once it arrived, late if need be (the requester looks for a late
            # hand-over while it waits), never as "no session".
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(located.wait(), self.adoption_wait())
        drained = self._draining.get(client_id)
        if drained is not None:
            # Handed to us a moment ago and its old holder's inbox still being drained: what
            # that brings belongs in the snapshot (handed on now, it would reach nobody).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drained.wait(), 2 * self.settings.handover_timeout)
        # Messages for this session that are already in our inbox belong in the snapshot.
        goal = await self._inbox_goal(redis)
        await self._inbox_reached(goal, self.settings.handover_timeout / 2)
        core = self.core
        now = core.clock()
        # Where our inbox stands (the requester drains it past these), and our own outbox: the
        # requester's inbox skips our records up to it for the session (MQTT-4.3.3-2: QoS 2
        # once), they are in the snapshot.
        marks = self.marks(own=True)
        snapshot = core.handover(client_id, clean_start, now)
        if snapshot is not None:
            # The requester will announce these filters; route to it from now on, so nothing
            # published here in between is lost.
            filters = [record.topic_filter for record in snapshot.subscriptions]
            for full_filter in filters:
                core.remote_subscribe(requester, full_filter)
                self.pin_route(requester, full_filter)
            if self.announce_move is not None and filters:
                # Every broker routes them to the requester and marks our inbox (before our
                # `del` of them, so that no broker is left routing them nowhere).
                token = uuid.uuid4().hex[:16]
                marks["token"], marks["from"] = token, self.me
                self.announce_move(requester, token, filters)
        redirect = self._redirects.pop(client_id, None)
        # What its client published here is in the peers' inboxes before the requester lets it
        # in (it reads its own inbox past them first: order per publisher), and, with a
        # snapshot, within what the requester's inbox skips for the session.
        await self.drain()
        if snapshot is not None:
            data: bytes | None = encode_snapshot(snapshot, self.me, now, marks)
        elif redirect is not None:
            # Our CONNECT was superseded before it fetched the session: it is still there.
            data = REDIRECT + redirect.encode()
        else:
            data = None
        await self._hand(redis, requester, client_id, data)

    async def _hand(
        self, redis: RedisClient, requester: str, client_id: str, data: bytes | None
    ) -> None:
        """Answer a hand-over: what it brings (if anything), then `handed`."""
        pipe = redis.pipeline(transaction=False)
        if data is not None:
            pipe.set(f"{self.settings.prefix}:handover:{requester}:{client_id}", data, ex=60)
        pipe.publish(
            self.k_control,
            self.control_message(f"handed\x00{self.me}\x00{requester}\x00{client_id}"),
        )
        await pipe.execute()

    async def _inbox_goal(self, redis: RedisClient) -> tuple[int, int]:
        """The id of the last entry in our inbox, read after this call began: one XINFO for
        every hand-over asked of us meanwhile (thousands in a reconnect storm), not one each."""
        waiting = self._next_goal
        if waiting is None:
            waiting = self._next_goal = asyncio.get_running_loop().create_future()
            if self._goal_reader is None or self._goal_reader.done():
                self._goal_reader = asyncio.ensure_future(self._read_goals(redis))
        return await asyncio.shield(waiting)

    async def _read_goals(self, redis: RedisClient) -> None:
        # Each read starts after every caller waiting for it had asked: none gets an old id.
        while (waiting := self._next_goal) is not None:
            self._next_goal = None
            try:
                with redis_errors():
                    info = await redis.xinfo_stream(self.k_inbox)
            except BaseException as error:
                # Whatever it is (redis-py under load raises more than RedisError), the
                # hand-overs waiting for this read learn it: none waits forever.
                waiting.set_exception(
                    error if isinstance(error, Exception) else LinkError("cancelled")
                )
                # Its callers get it through their shield; one cancelled meanwhile (a CONNECT
                # whose client left, the broker stopping) must not leave it "never retrieved".
                waiting.exception()
                if not isinstance(error, Exception):
                    raise
            else:
                waiting.set_result(stream_id(info.get("last-generated-id", b"0-0")))

    async def _inbox_reached(self, goal: tuple[int, int], timeout: float) -> None:
        """Until our inbox has handled the entry `goal` (or `timeout`): one watcher for all."""
        if self.inbox_position() >= goal:
            return
        reached: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox_waiters.append((goal, reached))
        if self._inbox_watcher is None or self._inbox_watcher.done():
            self._inbox_watcher = asyncio.ensure_future(self._watch_inbox())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reached), timeout)

    async def _watch_inbox(self) -> None:
        while self._inbox_waiters:
            position = self.inbox_position()
            waiting = []
            for goal, reached in self._inbox_waiters:
                if reached.done():
                    continue
                if position >= goal:
                    reached.set_result(None)
                else:
                    waiting.append((goal, reached))
            self._inbox_waiters = waiting
            await asyncio.sleep(0.005)

    def pin_route(self, broker: str, full_filter: str) -> None:
        """Keep routing `full_filter` to `broker` until its own `add` of it comes (or for
        PIN_SECONDS): a `del` it announced before it took the session (it had the filter from
        an earlier session, say) may arrive after we routed to it, and must not undo that."""
        loop = self.loop
        if loop is None:
            return
        until = loop.time() + PIN_SECONDS
        key = (broker, full_filter)
        pin = self._pinned.get(key)
        if pin is None:
            self._pinned[key] = [until, False]
        else:
            pin[0] = until
        loop.call_at(until, self._unpin, key)

    def moved_here(self, holder: str, token: str, filters: Iterable[str]) -> None:
        """Control `moved` of a session `holder` hands to us: until it is here (and our marker
        in `holder`'s inbox), what we publish for it goes to `holder`, whose `del` of its
        filters (announced right after) must not stop that."""
        if token in self._moves_done:
            return
        for full_filter in filters:
            self._move_pins.setdefault((holder, full_filter), set()).add(token)
            self.core.remote_subscribe(holder, full_filter)
            self.pin_route(holder, full_filter)

    def _release_pin(self, broker: str, full_filter: str) -> None:
        pin = self._pinned.pop((broker, full_filter), None)
        if pin is not None and pin[1]:
            self.core.remote_unsubscribe(broker, full_filter)  # the `del` held back stands

    def route_removed(self, broker: str, full_filter: str) -> bool:
        """Control `del` from `broker`: True if it is held back (the route is pinned)."""
        pin = self._pinned.get((broker, full_filter))
        if pin is None:
            return False
        pin[1] = True
        return True

    def route_added(self, broker: str, full_filter: str) -> None:
        """Control `add` from `broker`: its table says so itself now, the pin is done."""
        if self._pinned:
            self._pinned.pop((broker, full_filter), None)

    def _unpin(self, key: tuple[str, str]) -> None:
        pin = self._pinned.get(key)
        if pin is None or self.loop is None or self.loop.time() < float(pin[0]):
            return  # done, or pinned again since
        del self._pinned[key]
        self._move_pins.pop(key, None)
        if pin[1]:
            # No `add` came after the `del` we held back: it stands.
            self.core.remote_unsubscribe(*key)

    def control_message(self, text: str) -> str | bytes:
        """A message for the control channel, tagged when a cluster key is set (keys.py)."""
        keys = self.keys
        return text if keys is None else keys.sign_text(self.k_control.encode(), text)

    # ------------------------------------------------------------------ adoption

    def holder_gone(self, broker: str) -> None:
        """`broker` is gone (declared so, or its sessions' adoption announced): it answers
        no hand-over. A CONNECT waiting for one goes on to wait for the adoption."""
        gone = self._holder_gone.pop(broker, None)
        if gone is not None:
            gone.set()

    def peer_gone(self, peer: str) -> None:
        self.holder_gone(peer)
        redis = self.link.redis
        if self.link.connected and redis is not None:
            self._spawn(self.adopt_sessions(redis, peer))

    async def adopt_sessions(self, redis: RedisClient, peer: str) -> None:
        """Take over the persistent sessions a gone broker stored, as offline sessions here,
        with what was routed to its inbox for them: their subscriptions route to us and what
        they miss is queued until the client comes back (to us, or to any broker, which then
        takes the session from us). `peer` is our own id after a restart under it."""
        prefix = self.settings.prefix
        try:
            with redis_errors():
                if peer != self.me:
                    locked = await redis.eval(
                        _LOCK_SCRIPT,
                        2,
                        f"{prefix}:broker:{{{peer}}}",
                        f"{prefix}:adopter:{{{peer}}}",
                        self.me,
                        ADOPTER_LOCK_TTL,
                    )
                    if not locked:
                        return  # another survivor adopts it, or it is back
                claiming: set[str] = set()
                try:
                    claimed = await self._claim(redis, peer, claiming)
                    if peer == self.me:
                        await self._readopt_own(redis, claimed)
                    else:
                        await self._adopt_gone(redis, peer, claimed)
                finally:
                    self._settle_adopting(claiming)
        except LinkError as error:
            log.warning("sessions of %s not taken over yet: %s", peer, error)

    async def _claim(
        self, redis: RedisClient, peer: str, claiming: set[str]
    ) -> dict[str, tuple[SessionSnapshot, Marks]]:
        """Claim what `peer` stored, each session with its marks (the freshest we have). The
        ids go into `claiming` and `_adopting` (the caller removes them once restored)."""
        core = self.core
        prefix = self.settings.prefix
        stored_key = f"{prefix}:sessions:{{{peer}}}"
        stored = [raw.decode() for raw in await redis.hkeys(stored_key)]
        waiting = [client_id for client_id in stored if not core.has_session(client_id)]
        claimed: dict[str, tuple[SessionSnapshot, Marks]] = {}
        for first in range(0, len(waiting), ADOPT_BATCH):
            # One round trip claims a batch (each claim is atomic on its own).
            batch = waiting[first : first + ADOPT_BATCH]
            self._adopting.update(batch)
            claiming.update(batch)
            pipe = redis.pipeline(transaction=False)
            cluster = is_cluster(redis)
            for client_id in batch:
                if cluster:
                    # The ClientId's key is in another slot than the stored hash: take
                    # the session here, then name us its holder (below).
                    pipe.eval(TAKE_STORED_SCRIPT, 1, stored_key, client_id)
                    continue
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
            pipe.hmget(f"{prefix}:marks:{{{peer}}}", batch)
            *results, checkpoints = await pipe.execute()
            if cluster:
                taken = [c for c, data in zip(batch, results, strict=True) if data]
                if taken:
                    # Only where the registry still names the gone broker (_ADOPT_SCRIPT).
                    named = redis.pipeline(transaction=False)
                    for client_id in taken:
                        named.eval(
                            _NAME_ADOPTER_SCRIPT,
                            1,
                            f"{prefix}:client:{client_id}",
                            peer,
                            self.me,
                            self.settings.client_ttl,
                        )
                    await named.execute()
            for client_id, data, checkpoint in zip(batch, results, checkpoints, strict=True):
                if data is None or core.has_session(client_id):
                    continue
                try:
                    snapshot = decode_snapshot(data, core.clock)
                except SnapshotError as error:
                    log.warning("stored session %r of %s dropped: %s", client_id, peer, error)
                    self.stats["bad_sessions"] += 1
                    continue
                marks = Marks.decode(snapshot_marks(data))
                if checkpoint is not None:
                    fresher = Marks.decode(json.loads(checkpoint))
                    if fresher.position > marks.position:
                        # Seen idle after it was stored: nothing in it is unacknowledged.
                        snapshot = dataclasses.replace(snapshot, inflight=(), queue=())
                        marks = fresher
                claimed[client_id] = (snapshot, marks)
        return claimed

    def _settle_adopting(self, client_ids: Iterable[str]) -> None:
        self._adopting.difference_update(client_ids)
        self._adopting_changed.set()
        self._adopting_changed = asyncio.Event()

    async def _until_adopted(self, client_id: str, timeout: float) -> None:
        """Until a session we claimed from a gone broker is restored here (or `timeout`)."""
        deadline = time.monotonic() + timeout
        while client_id in self._adopting and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._adopting_changed.wait(), left)

    def _restore(self, claimed: dict[str, tuple[SessionSnapshot, Marks]]) -> None:
        core = self.core
        for snapshot, _ in claimed.values():
            if core.has_session(snapshot.client_id):
                continue  # a CONNECT here that could not wait made it afresh: it stays
            core.adopt_session(snapshot, core.clock())
            self.stats["sessions_adopted"] += 1

    async def _adopt_gone(
        self, redis: RedisClient, peer: str, claimed: dict[str, tuple[SessionSnapshot, Marks]]
    ) -> None:
        """Adopt a dead broker's sessions with what was routed to it: every other broker
        routes their filters to us from `adopted` on and marks the dead inbox; we read it
        up to those markers, then (in one step, so that nothing published here falls between)
        restore the sessions, add what we had sent the dead broker ourselves, stop routing to
        it, and hand the replayed messages to the sessions. Our inbox waits meanwhile: what
        it delivers to them comes after the replay."""
        prefix = self.settings.prefix
        assert self.pause_inbox is not None and self.resume_inbox is not None
        assert self.announce_adoption is not None and self.finish_adoption is not None
        self.pause_inbox()
        try:
            origins = set(self.peers) - {peer}
            filters = sorted(
                {r.topic_filter for snapshot, _ in claimed.values() for r in snapshot.subscriptions}
            )
            self.announce_adoption(peer, filters)
            replay = None
            if self.replay_enabled:
                # Also with no session claimed: shared groups it served go to other members.
                replay = await self._read_dead_inbox(redis, peer, claimed, origins)
                ms, seq = self.inbox_position()
                ours = await redis.xrange(self.k_inbox, min=f"({ms}-{seq}", max="+")
                elsewhere = origins_and_sequences(ours)
            # From here to the end, no await: nothing published here comes in between.
            self._restore(claimed)
            own = self.finish_adoption(peer)
            if replay is not None:
                replay.feed_records(own)
                # What our own waiting inbox holds is delivered by it: not twice.
                self.stats["replayed"] += replay.deliver(elsewhere)
        finally:
            self.resume_inbox()
        pipe = redis.pipeline(transaction=False)
        pipe.set(f"{prefix}:adopted:{{{peer}}}", self.me, ex=ADOPTER_LOCK_TTL)
        pipe.delete(f"{prefix}:marks:{{{peer}}}")
        await pipe.execute()
        await self.publish_wills(redis, peer)
        log.info("adopted %d sessions of %s", len(claimed), peer)
        if replay is not None:
            self._spawn(self._check_dead_tail(redis, peer, replay.read_to))

    async def _check_dead_tail(self, redis: RedisClient, peer: str, read_to: bytes | str) -> None:
        """A while after an adoption: what another broker wrote to the dead inbox after the
        replay read it (each origin wrote its end marker after its last record there, so
        nothing should). Counted and logged with its (origin, sequence): it reached no session."""
        await asyncio.sleep(DEAD_TAIL_CHECK)
        if peer in self.peers:
            return  # back under its id: what comes to its inbox now is its own
        with contextlib.suppress(LinkError), redis_errors():
            key = f"{self.settings.prefix}:inbox:{{{peer}}}"
            late = [
                found
                for found in origins_and_sequences(
                    await redis.xrange(key, min=read_to, max="+", count=1000)
                )
                # Ours came back from the outbox (`finish_adoption`) and were replayed too.
                if len(found) == 2 and found[0] != self.me
            ]
            if late:
                self.stats["replay_missed"] += len(late)
                log.warning(
                    "replay of %s: %d records came to its inbox after the replay read it "
                    "(origin, sequence): %s",
                    peer,
                    len(late),
                    sorted(late)[:10],
                )

    async def _read_dead_inbox(
        self,
        redis: RedisClient,
        peer: str,
        claimed: dict[str, tuple[SessionSnapshot, Marks]],
        origins: set[str],
    ) -> Replay:
        """Read the dead inbox past the claimed sessions' marks, to every origin's marker."""
        assert self.to_message is not None
        replay = Replay(
            self.core,
            self.to_message,
            # A session without subscriptions takes nothing: left out, the replay does not
            # look at each record once per such session (10,000 of them stalled the loop
            # past the presence TTL, and the adopter was declared dead).
            {
                client_id: marks
                for client_id, (snapshot, marks) in claimed.items()
                if snapshot.subscriptions
            },
            origins,
            keys=self.keys,
            inbox=f"{self.settings.prefix}:inbox:{{{peer}}}",
            groups=group_marks(claimed),
            handled=await self._progress(redis, peer),
            gone=peer,
        )
        key = f"{self.settings.prefix}:inbox:{{{peer}}}"
        start: bytes | str = "-"
        deadline = time.monotonic() + self.settings.handover_timeout
        while True:
            entries = await redis.xrange(key, min=start, max="+", count=1000)
            for entry_id, fields in entries:
                replay.feed(entry_id, fields)
                start = b"(" + entry_id
            if replay.done or (not entries and time.monotonic() > deadline):
                break
            if not entries:
                await asyncio.sleep(0.005)
        replay.read_to = start
        if replay.pending:
            log.warning("replay of %s: no end marker from %s", peer, sorted(replay.pending))
        return replay

    async def _readopt_own(
        self, redis: RedisClient, claimed: dict[str, tuple[SessionSnapshot, Marks]]
    ) -> None:
        """A restart under our id: our stored sessions, and our inbox replayed to them past
        their marks; the inbox reader then goes on after what was replayed. The wills of
        the connections our previous run had are due."""
        self._restore(claimed)
        self.readopted = set(claimed)
        self.readopted_after = self.unrouted_count()
        await self.publish_wills(redis, self.me)
        if not claimed:
            return
        # Announced in `listening`, once a hand-over asked of us reaches us (not before: a
        # CONNECT elsewhere would ask, get no answer and take the stored copy of a session we
        # hold, which then lives on two brokers).
        self._own_readopted = True
        if not self.replay_enabled:
            return
        assert self.to_message is not None
        replay = Replay(
            self.core,
            self.to_message,
            {
                client_id: marks
                for client_id, (snapshot, marks) in claimed.items()
                if snapshot.subscriptions  # (as in `_read_dead_inbox`)
            },
            (),
            keys=self.keys,
            inbox=self.k_inbox,
            groups=group_marks(claimed),
            handled=await self._progress(redis, self.me),
            gone=self.me,
        )
        last = await _feed_range(redis, self.k_inbox, replay, "-", "+")
        self.stats["replayed"] += replay.deliver(set())
        if last is not None:
            # Start the group after what was replayed (its pending entries were in it).
            pipe = redis.pipeline(transaction=True)
            pipe.xgroup_destroy(self.k_inbox, GROUP)
            pipe.xgroup_create(self.k_inbox, GROUP, id=last, mkstream=True)
            await pipe.execute()

    async def listening(self, redis: RedisClient) -> None:
        """We listen on the control channel. After a restart under our id that took stored
        sessions back: a CONNECT elsewhere waiting for their adoption (we died and came back
        before anyone adopted them) takes them from us; not over an adoption by another broker,
        and not for longer than such a wait lasts (a later death of ours is adopted as usual)."""
        if not self._own_readopted:
            return
        await redis.set(
            f"{self.settings.prefix}:adopted:{{{self.me}}}",
            self.me,
            nx=True,
            ex=max(1, int(self.adoption_wait())),
        )
        self._own_readopted = False

    async def _progress(self, redis: RedisClient, broker: str) -> dict[str, int]:
        """What `broker`'s inbox last reported handled: origin -> highest sequence."""
        raw = await redis.hgetall(f"{self.settings.prefix}:progress:{{{broker}}}")
        progress = {}
        for origin, sequence in raw.items():
            with contextlib.suppress(ValueError):
                progress[origin.decode()] = int(sequence)
        return progress


def group_marks(claimed: dict[str, tuple[SessionSnapshot, Marks]]) -> dict[str, Marks]:
    """Per shared group that claimed sessions are members of, the earliest of their marks:
    a group's record past them may not have been acknowledged by its member there."""
    groups: dict[str, Marks] = {}
    for snapshot, marks in claimed.values():
        for record in snapshot.subscriptions:
            if not record.topic_filter.startswith("$share/"):
                continue
            known = groups.get(record.topic_filter)
            if known is None:
                groups[record.topic_filter] = Marks(marks.position, dict(marks.seen))
            else:
                known.position = min(known.position, marks.position)
                for origin in set(known.seen) | set(marks.seen):
                    known.seen[origin] = min(known.seen.get(origin, 0), marks.seen.get(origin, 0))
    return groups
