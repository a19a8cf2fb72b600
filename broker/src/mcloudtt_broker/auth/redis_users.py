"""The `redis` authenticator: a user store in Redis shared by every broker of the cluster.

Rights: the hash `{prefix}:acl:{user}` maps topic filters to `read`, `write`, `readwrite` or
`deny` (an ACL file's `topic` lines for that user). They are read with the user and then
every `ttl` seconds while the broker knows the user; a change drops the cached decisions, so
it reaches running clients within a second. A user without the hash has no rights of its own
(the ACL file decides, or without one everything is allowed).

The hash `{prefix}:users` maps a username to the same salted scrypt hash as a password file's
line (`mcloudtt_broker.auth.passwords`). A lookup is asynchronous: the core's CONNECT waits
(`Authenticator.authenticate` returns None and answers later), the event loop never blocks on
Redis, and scrypt runs in a worker thread. A fetched hash is kept `ttl` seconds (0.5 by
default), so a user added, changed or removed in Redis is seen by every broker within a second.
Redis unreachable: CONNACK 0x88 (3.1.1: 3), never a stack trace.

On a Redis Cluster (the URL reaches a cluster node, as `topology.probe` finds) the store is read
with redis-py's cluster client: the users hash and each user's rights hash are keys of their own
(in whatever slots they fall), and a pipeline is split by node. The key names are the same as on
one Redis: `redis-cli -c HSET {prefix}:users ...` writes them on a cluster.

A user whose value is a `$scram-sha-256$` credential can also log in through MQTT 5.0 enhanced
authentication (SCRAM-SHA-256) on any broker of the cluster; the credential is fetched the same
way (`scram_credential`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

from ..cluster.redis_url import RedisOptions, parse_redis_url
from ..core.auth import Answer, Credentials, Outcome, Result
from ..core.scram import PREFIX as SCRAM_PREFIX
from ..core.scram import Lookup, parse_credential
from .acl import AclFile
from .passwords import verify_password

log = logging.getLogger("mcloudtt.auth")


class RedisUsers:
    name = "redis"

    def __init__(self, url: str, prefix: str, *, ttl: float = 0.5, timeout: float = 2.0) -> None:
        self.key = f"{prefix}:users"
        self.acl_prefix = f"{prefix}:acl:"
        self.rights: dict[str, AclFile] = {}  # per user, updated in place by `refresh`
        self._raw_rights: dict[str, dict[bytes, bytes]] = {}
        self.changed: Callable[[], None] | None = None  # told when some user's rights changed
        self.ttl = ttl
        self.options: RedisOptions = parse_redis_url(url)
        self.timeout = timeout
        self.client: Any = None  # made at the first lookup: one Redis or a Redis Cluster
        self._connecting: asyncio.Lock | None = None
        self._hashes: dict[str, tuple[float, str | None]] = {}  # user -> (fetched at, hash)
        self._verified: dict[tuple[str, str], bytes] = {}  # as PasswordFile keeps them
        self._tasks: set[asyncio.Task[None]] = set()

    def authenticate(self, credentials: Credentials, answer: Answer) -> Result | None:
        username = credentials.username
        if username is None:
            return Outcome.IGNORE, None
        entry = self._hashes.get(username)
        if entry is not None and time.monotonic() - entry[0] < self.ttl:
            stored = entry[1]
            if stored is None:
                return Outcome.IGNORE, None
            digest = hashlib.sha256(credentials.password or b"").digest()
            seen = self._verified.get((username, stored))
            if seen is not None and hmac.compare_digest(seen, digest):
                return Outcome.ALLOW, username, self.rights.get(username)
        task = asyncio.get_running_loop().create_task(self._lookup(credentials, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None

    def scram_credential(self, username: str, answer: Callable[[Lookup], None]) -> Lookup | None:
        entry = self._hashes.get(username)
        if entry is not None and time.monotonic() - entry[0] < self.ttl:
            return _scram_lookup(entry[1], self.rights.get(username))
        task = asyncio.get_running_loop().create_task(self._scram_lookup(username, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None

    async def _scram_lookup(self, username: str, answer: Callable[[Lookup], None]) -> None:
        fetched = await self._fetch(username)
        if fetched is None:
            answer((Outcome.UNAVAILABLE, None, None))
            return
        answer(_scram_lookup(fetched[0], self.rights.get(username)))

    async def _client(self) -> Any:
        """The redis-py client for the URL: the cluster client when the URL's node is in a
        Redis Cluster (the single-node client would get MOVED for most keys), else one
        Redis's. Asked once; a failed probe is asked again at the next lookup."""
        if self.client is not None:
            return self.client
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.client is None:
                from ..cluster.topology import probe

                timeouts: dict[str, Any] = {
                    "socket_timeout": self.timeout,
                    "socket_connect_timeout": self.timeout,
                }
                slots = await probe(self.options, timeout=self.timeout)
                if slots is None:
                    self.client = self.options.client(**timeouts)
                else:
                    self.client = self.options.cluster_client(slots.nodes, **timeouts)
            return self.client

    async def _fetch(self, username: str) -> tuple[str | None] | None:
        """The user's stored hash (None: no such user), its rights kept; None when Redis
        cannot be asked."""
        try:
            client = await self._client()
            async with client.pipeline(transaction=False) as pipe:
                pipe.hget(self.key, username)
                pipe.hgetall(self.acl_prefix + username)
                raw, rules = await pipe.execute()
        except Exception as error:  # redis-py's errors, timeouts, OSError: one line, no trace
            log.warning("user store in Redis unreachable: %s", type(error).__name__)
            return None
        stored = raw.decode() if isinstance(raw, bytes) else raw
        self._hashes[username] = (time.monotonic(), stored)
        if len(self._hashes) > 100_000:
            self._hashes.clear()
        if stored is not None:
            self._set_rights(username, rules)
        return (stored,)

    async def _lookup(self, credentials: Credentials, answer: Answer) -> None:
        username = credentials.username
        assert username is not None
        fetched = await self._fetch(username)
        if fetched is None:
            answer((Outcome.UNAVAILABLE, None))
            return
        stored = fetched[0]
        if stored is None:
            answer((Outcome.IGNORE, None))
            return
        password = credentials.password or b""
        ok = await asyncio.to_thread(verify_password, password, stored)
        if not ok:
            answer((Outcome.DENY, None))
            return
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[username, stored] = hashlib.sha256(password).digest()
        answer((Outcome.ALLOW, username, self.rights.get(username)))

    def _set_rights(self, username: str, rules: dict[bytes, bytes]) -> bool:
        """Keep the user's rights from Redis; True when they changed."""
        if self._raw_rights.get(username) == rules:
            return False
        self._raw_rights[username] = rules
        lines = "\n".join(
            f"topic {access.decode()} {topic.decode()}"
            for topic, access in sorted(rules.items())
            if access.decode() in ("read", "write", "readwrite", "deny")
        )
        parsed = AclFile.parse(f"user {username}\n{lines}", f"{self.acl_prefix}{username}")
        if not rules:
            # Running clients holding the old rules lose them all (fail closed); from their
            # next CONNECT on they have none of their own (the ACL file decides).
            old = self.rights.pop(username, None)
            if old is not None:
                old.users = {}
        elif username in self.rights:
            self.rights[username].users = parsed.users  # running clients hold this object
        else:
            self.rights[username] = parsed
        return True

    async def refresh_forever(self) -> None:
        """Read the known users' rights again every `ttl` seconds."""
        while True:
            await asyncio.sleep(self.ttl)
            users = list(self._raw_rights)
            if not users:
                continue
            try:
                client = await self._client()
                async with client.pipeline(transaction=False) as pipe:
                    for username in users:
                        pipe.hgetall(self.acl_prefix + username)
                    results = await pipe.execute()
            except Exception as error:  # kept as they were until Redis answers again
                log.warning("rights in Redis unreachable: %s", type(error).__name__)
                continue
            changed = [self._set_rights(u, r) for u, r in zip(users, results, strict=True)]
            if any(changed) and self.changed is not None:
                self.changed()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.client is not None:
            await self.client.aclose()


def _scram_lookup(stored: str | None, rights: AclFile | None) -> Lookup:
    if stored is None:
        return Outcome.IGNORE, None, None
    if not stored.startswith(SCRAM_PREFIX):
        return Outcome.DENY, None, None  # an scrypt user: no SCRAM for them
    try:
        return Outcome.ALLOW, parse_credential(stored), rights
    except ValueError:
        log.warning("user store in Redis: a broken SCRAM credential")
        return Outcome.DENY, None, None
