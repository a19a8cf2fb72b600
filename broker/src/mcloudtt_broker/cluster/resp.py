"""A lean, pipelined Redis connection for the cluster's hot paths.

redis-py's pipelines wait for every reply before the next batch can go, and cost a few hundred
microseconds of Python per round trip. This connection writes commands as soon as they are built
and matches replies to them in order (Redis answers in order on one connection):

* `write()` for the outbound traffic: from inside the callback that accepted the publishes, with
  replies only counted (errors too), so the next hop starts while we still read the burst;
* `call()` for the inbox: await the replies of one batch of commands (one round trip).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis

from .redis_url import RedisOptions, parse_redis_url

Arg = bytes | str | int


def pack(*args: Arg, out: bytearray) -> None:
    """Append one command in the RESP protocol (an array of bulk strings)."""
    out += b"*%d\r\n" % len(args)
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        out += b"$%d\r\n" % len(raw)
        out += raw
        out += b"\r\n"


class Commands:
    """Commands for one write, with the names the bus uses."""

    __slots__ = ("count", "data")

    def __init__(self) -> None:
        self.data = bytearray()
        self.count = 0

    def add(self, *args: Arg) -> None:
        pack(*args, out=self.data)
        self.count += 1

    def xadd(self, key: str, field: str, value: bytes, maxlen: int) -> None:
        self.add("XADD", key, "MAXLEN", "~", maxlen, "*", field, value)

    def xadd_tagged(self, key: str, field: str, value: bytes, tag: bytes, maxlen: int) -> None:
        self.add("XADD", key, "MAXLEN", "~", maxlen, "*", field, value, "t", tag)

    def publish(self, channel: str, message: bytes | str) -> None:
        self.add("PUBLISH", channel, message)

    def spublish(self, channel: str, message: bytes | str) -> None:
        self.add("SPUBLISH", channel, message)

    def hset(self, key: str, field: str, value: bytes) -> None:
        self.add("HSET", key, field, value)

    def hdel(self, key: str, field: str) -> None:
        self.add("HDEL", key, field)

    def sadd(self, key: str, member: str) -> None:
        self.add("SADD", key, member)

    def srem(self, key: str, member: str) -> None:
        self.add("SREM", key, member)

    def xack(self, key: str, group: str, ids: list[bytes]) -> None:
        self.add("XACK", key, group, *ids)

    def hset_many(self, key: str, mapping: dict[str, int]) -> None:
        args: list[Arg] = []
        for field, value in mapping.items():
            args += (field, value)
        self.add("HSET", key, *args)

    def xtrim_minid(self, key: str, minid: bytes) -> None:
        self.add("XTRIM", key, "MINID", minid)

    def xreadgroup(
        self, group: str, consumer: str, key: str, last_id: bytes, count: int, block_ms: int
    ) -> None:
        self.add(
            "XREADGROUP", "GROUP", group, consumer, "COUNT", count, "BLOCK", block_ms,
            "STREAMS", key, last_id,
        )  # fmt: skip


class RespConnection(asyncio.Protocol):
    def __init__(self, on_lost: Callable[[BaseException], None]) -> None:
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.sent = 0  # commands written
        self.replies = 0  # replies read
        self.errors = 0  # error replies to written (not called) commands
        self.last_error = ""
        self.closed = False
        # Callers of `call()`, oldest first: (index of their first command, index after their
        # last, future, replies so far). Commands outside these ranges were `write()`s.
        self._waiting: deque[tuple[int, int, asyncio.Future[list[Any]], list[Any]]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self._waiting
        while True:
            reply = reader.gets()
            if reply is False:
                return
            index = self.replies
            self.replies = index + 1
            if waiting:
                first, stop, future, replies = waiting[0]
                if index >= first:
                    replies.append(reply)
                    if index + 1 == stop:
                        waiting.popleft()
                        if not future.done():
                            future.set_result(replies)
                    continue
            if isinstance(reply, hiredis.ReplyError):
                self.errors += 1
                self.last_error = str(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = exc or ConnectionError("Redis closed the connection")
        while self._waiting:
            _, _, future, _ = self._waiting.popleft()
            if not future.done():
                lost = ConnectionError(f"Redis connection lost: {error}")
                lost.__cause__ = error  # the TLS or socket error, for the reason in /readyz
                future.set_exception(lost)
        self.on_lost(error)

    def write(self, commands: Commands) -> None:
        """Send without waiting; the replies are only counted."""
        assert self.transport is not None
        self.transport.write(commands.data)
        self.sent += commands.count

    async def call(self, commands: Commands) -> list[Any]:
        """Send and wait for the replies, in order; error replies come back as
        `hiredis.ReplyError` values, not raised."""
        return await self.submit(commands)

    def submit(self, commands: Commands) -> asyncio.Future[list[Any]]:
        """`call()` without awaiting: send now, the replies come in the future."""
        if self.closed or self.transport is None:
            raise ConnectionError("Redis connection closed")
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        first = self.sent
        self._waiting.append((first, first + commands.count, future, []))
        self.write(commands)
        return future

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    async def settled(self, timeout: float) -> bool:
        """Wait until every command written so far has its reply."""
        target = self.sent
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.replies < target and not self.closed and loop.time() < deadline:
            await asyncio.sleep(0.001)
        return self.replies >= target


async def open_connection(
    url: str | RedisOptions, on_lost: Callable[[BaseException], None], timeout: float = 2.0
) -> RespConnection:
    """Connect (TCP, TLS or a unix socket), authenticate and select the database, as redis-py
    does for the same URL (`redis_url.py`)."""
    options = parse_redis_url(url) if isinstance(url, str) else url
    context = options.ssl_context()
    loop = asyncio.get_running_loop()
    if options.scheme == "unix":
        opening = loop.create_unix_connection(lambda: RespConnection(on_lost), options.path)
    else:
        opening = loop.create_connection(
            lambda: RespConnection(on_lost),
            options.host,
            options.port,
            ssl=context,
            server_hostname=options.host if context is not None else None,
        )
    _, connection = await asyncio.wait_for(opening, timeout)
    setup = Commands()
    if options.password is not None:
        if options.username:
            setup.add("AUTH", options.username, options.password)
        else:
            setup.add("AUTH", options.password)
    setup.add("SELECT", options.db)
    try:
        replies = await asyncio.wait_for(connection.call(setup), timeout)
    except BaseException:
        connection.close()
        raise
    refused = [str(reply) for reply in replies if isinstance(reply, hiredis.ReplyError)]
    if refused:
        connection.close()
        raise ConnectionError(f"Redis refused the connection: {refused[0]}")
    return connection
