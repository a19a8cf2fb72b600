"""A write-only, pipelined Redis connection for the cluster's outbound traffic.

redis-py's pipelines wait for every reply before the next batch can go, so a broker could only
forward one batch per round trip. This connection writes commands as soon as they are built,
from inside the callback that accepted the publishes, and counts the replies as they come back
(Redis answers in order on one connection): the next hop starts while we are still reading
the rest of a burst. Replies are only counted; error replies are counted too.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

import hiredis
from redis.connection import parse_url

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
    """Collects commands for one write, with the names the bus uses."""

    __slots__ = ("count", "data")

    def __init__(self) -> None:
        self.data = bytearray()
        self.count = 0

    def _add(self, *args: Arg) -> None:
        pack(*args, out=self.data)
        self.count += 1

    def xadd(self, key: str, field: str, value: bytes, maxlen: int) -> None:
        self._add("XADD", key, "MAXLEN", "~", maxlen, "*", field, value)

    def publish(self, channel: str, message: bytes | str) -> None:
        self._add("PUBLISH", channel, message)

    def hset(self, key: str, field: str, value: bytes) -> None:
        self._add("HSET", key, field, value)

    def hdel(self, key: str, field: str) -> None:
        self._add("HDEL", key, field)

    def sadd(self, key: str, member: str) -> None:
        self._add("SADD", key, member)

    def srem(self, key: str, member: str) -> None:
        self._add("SREM", key, member)


class RespWriter(asyncio.Protocol):
    def __init__(self, on_lost: Callable[[BaseException], None]) -> None:
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.sent = 0  # commands written
        self.replies = 0  # replies read
        self.errors = 0  # error replies
        self.last_error = ""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        while True:
            reply = reader.gets()
            if reply is False:
                return
            self.replies += 1
            if isinstance(reply, hiredis.ReplyError):
                self.errors += 1
                self.last_error = str(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.on_lost(exc or ConnectionError("Redis closed the connection"))

    def write(self, commands: Commands) -> None:
        assert self.transport is not None
        self.transport.write(commands.data)
        self.sent += commands.count

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


async def open_writer(
    url: str, on_lost: Callable[[BaseException], None], timeout: float = 2.0
) -> RespWriter:
    """Connect, authenticate and select the database of `url`."""
    options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context() if url.startswith("rediss://") else None
    if context is not None and "ssl_cert_reqs=none" in url.lower():
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.wait_for(
        loop.create_connection(
            lambda: RespWriter(on_lost),
            options.get("host", "127.0.0.1"),
            int(options.get("port", 6379)),
            ssl=context,
        ),
        timeout,
    )
    setup = Commands()
    if options.get("password"):
        if options.get("username"):
            setup._add("AUTH", options["username"], options["password"])
        else:
            setup._add("AUTH", options["password"])
    setup._add("SELECT", int(options.get("db", 0)))
    writer.write(setup)
    if not await writer.settled(timeout) or writer.errors:
        writer.close()
        raise ConnectionError(
            f"Redis refused the writer connection: {writer.last_error or 'no answer'}"
        )
    return writer
