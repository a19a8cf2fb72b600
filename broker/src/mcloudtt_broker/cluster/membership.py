"""Membership: who is in the cluster, and what each broker subscribed to.

* Presence: `{prefix}:broker:{id}` holds this instance's token with a TTL, refreshed by the
  heartbeat; a second live broker with the same id is refused (`DuplicateBrokerId`).
  `{prefix}:brokers` lists ids.
* Cluster table: `{prefix}:subs:{id}` is the set of filters with local subscribers on broker
  `id`; changes are announced on the Pub/Sub channel `{prefix}:control` (by the outbox, in order
  with the messages), and every broker keeps the whole table in its core, reloaded after every
  reconnect. A peer whose presence stays missing for a whole TTL is gone.
* The control channel also carries `reset` (a peer's table was rewritten), `gone` (a peer left)
  and the session hand-over (`handover`, `handed`, for `failover.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable

from ..core.ports import ClusterCore
from .failover import Failover
from .link import RedisClient
from .redis_url import redact_url
from .settings import BROADCAST, ClusterSettings, DuplicateBrokerId

log = logging.getLogger("mcloudtt.cluster")


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
        on_sync: Callable[[bytes], None],
    ) -> None:
        self.settings = settings
        self.me = settings.broker_id
        prefix = settings.prefix
        self.k_presence = f"{prefix}:broker:{self.me}"
        self.k_brokers = f"{prefix}:brokers"
        self.k_control = f"{prefix}:control"
        self.k_subs = f"{prefix}:subs:{self.me}"
        self.core = core
        self.live_peers = peers
        self.stats = stats
        self.token = token
        self.failover = failover
        self.on_peer_gone = on_peer_gone
        self.on_sync = on_sync
        self.missing_since: dict[str, float] = {}  # peer -> when its presence was first missed

    # ------------------------------------------------------------------ joining and leaving

    async def claim_id(self, redis: RedisClient) -> None:
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
        # One transaction: a peer must never read our table half rewritten (empty).
        pipe = redis.pipeline(transaction=True)
        pipe.delete(self.k_subs)
        filters = self.core.local_filters()
        if filters:
            pipe.sadd(self.k_subs, *filters)
        pipe.sadd(self.k_brokers, self.me)
        pipe.publish(self.k_control, f"reset\x00{self.me}\x00")
        await pipe.execute()

    async def leave(self, redis: RedisClient) -> None:
        if (await redis.get(self.k_presence)) == self.token.encode():
            pipe = redis.pipeline(transaction=False)
            pipe.delete(self.k_presence)
            pipe.delete(self.k_subs)
            pipe.srem(self.k_brokers, self.me)
            pipe.publish(self.k_control, f"gone\x00{self.me}\x00")
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
            if await redis.exists(f"{prefix}:broker:{peer}"):
                self.live_peers.add(peer)
                self.missing_since.pop(peer, None)
                await self.load_peer_table(redis, peer)
            else:
                await redis.srem(self.k_brokers, peer)

    async def load_peer_table(self, redis: RedisClient, peer: str) -> None:
        filters = await redis.smembers(f"{self.settings.prefix}:subs:{peer}")
        self.core.remote_forget(peer)
        for raw in filters:
            self.core.remote_subscribe(peer, raw.decode())

    def peer_gone(self, peer: str) -> None:
        self.live_peers.discard(peer)
        self.missing_since.pop(peer, None)
        self.core.remote_forget(peer)
        log.info("peer %s left the cluster", peer)
        self.on_peer_gone(peer)

    # ------------------------------------------------------------------ workers

    async def heartbeat(self, redis: RedisClient) -> None:
        interval = max(0.2, self.settings.presence_ttl / 4)
        prefix = self.settings.prefix
        while True:
            await asyncio.sleep(interval)
            ttl_ms = int(self.settings.presence_ttl * 1000)
            holder = await redis.get(self.k_presence)
            if holder is not None and holder.decode() != self.token:
                raise DuplicateBrokerId(f"broker id {self.me!r} was taken by another broker")
            await redis.set(self.k_presence, self.token, px=ttl_ms)
            # Peers whose presence expired have left: forget their table entries.
            now = time.monotonic()
            for peer in list(self.live_peers):
                if await redis.exists(f"{prefix}:broker:{peer}"):
                    self.missing_since.pop(peer, None)
                elif now - self.missing_since.setdefault(peer, now) > self.settings.presence_ttl:
                    self.peer_gone(peer)

    async def listen(self, redis: RedisClient) -> None:
        """The control channel (and in broadcast mode the sync channel) until the link breaks."""
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        channels = [self.k_control]
        if self.settings.mode == BROADCAST:
            channels.append(self.settings.sync_channel)
        try:
            await pubsub.subscribe(*channels)
            # Anything announced before we listened is covered by the table load on connect;
            # reload once more now that we listen, so nothing falls between the two.
            await self.load_peers(redis)
            sync = self.settings.sync_channel.encode()
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                channel = message["channel"]
                data = message["data"]
                if channel == sync:
                    self.on_sync(data)
                else:
                    await self.on_control(redis, data)
        finally:
            with contextlib.suppress(Exception):  # the link may be broken already
                await pubsub.aclose()

    async def on_control(self, redis: RedisClient, data: bytes) -> None:
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
        elif op == "del":
            self.core.remote_unsubscribe(peer, argument)
        elif op == "reset":
            self.live_peers.add(peer)
            await self.load_peer_table(redis, peer)
        elif op == "gone":
            self.peer_gone(peer)
        elif op == "handover":
            self.failover.handover_requested(peer, argument)
        elif op == "handed":
            self.failover.handed(argument)
        else:
            self.stats["bad_control"] += 1
