"""The `redis` authenticator: a user store in Redis shared by every broker of the cluster.

The hash `{prefix}:users` maps a username to the same salted scrypt hash as a password file's
line (`mcloudtt_broker.auth.passwords`). A lookup is asynchronous: the core's CONNECT waits
(`Authenticator.authenticate` returns None and answers later), the event loop never blocks on
Redis, and scrypt runs in a worker thread. A fetched hash is kept `ttl` seconds (0.5 by
default), so a user added, changed or removed in Redis is seen by every broker within a second.
Redis unreachable: CONNACK 0x88 (3.1.1: 3), never a stack trace.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import Any

from ..cluster.redis_url import parse_redis_url
from ..core.auth import Answer, Credentials, Outcome, Result
from .passwords import verify_password

log = logging.getLogger("mcloudtt.auth")


class RedisUsers:
    name = "redis"

    def __init__(self, url: str, prefix: str, *, ttl: float = 0.5, timeout: float = 2.0) -> None:
        self.key = f"{prefix}:users"
        self.ttl = ttl
        self.client: Any = parse_redis_url(url).client(
            socket_timeout=timeout, socket_connect_timeout=timeout
        )
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
                return Outcome.ALLOW, username
        task = asyncio.get_running_loop().create_task(self._lookup(credentials, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None

    async def _lookup(self, credentials: Credentials, answer: Answer) -> None:
        username = credentials.username
        assert username is not None
        try:
            raw = await self.client.hget(self.key, username)
        except Exception as error:  # redis-py's errors, timeouts, OSError: one line, no trace
            log.warning("user store in Redis unreachable: %s", type(error).__name__)
            answer((Outcome.UNAVAILABLE, None))
            return
        stored = raw.decode() if isinstance(raw, bytes) else raw
        self._hashes[username] = (time.monotonic(), stored)
        if len(self._hashes) > 100_000:
            self._hashes.clear()
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
        answer((Outcome.ALLOW, username))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.client.aclose()
