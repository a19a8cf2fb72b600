"""The lean RESP connection against a real redis-server: writes and calls share one connection,
replies reach the right caller in order, errors are values, a lost link fails waiting calls."""

from __future__ import annotations

import asyncio

import hiredis
import pytest
from mcloudtt_broker.cluster.resp import Commands, open_connection
from redisproc import RedisProcess


def commands(*calls: tuple[str | bytes | int, ...]) -> Commands:
    out = Commands()
    for args in calls:
        out.add(*args)
    return out


def test_writes_and_calls_interleave_and_each_caller_gets_its_own_replies(
    redis_server: RedisProcess,
) -> None:
    async def scenario() -> None:
        lost: list[BaseException] = []
        conn = await open_connection(redis_server.url, lost.append)
        try:
            conn.write(commands(("SET", "k", "1"), ("INCR", "k")))
            first = asyncio.ensure_future(conn.call(commands(("INCR", "k"), ("GET", "k"))))
            await asyncio.sleep(0)  # the call is written: the next write goes after it
            conn.write(commands(("INCR", "k"), ("HSET", "k", "f", "v")))
            second = asyncio.ensure_future(
                conn.call(
                    commands(
                        ("INCR", "k"),
                    )
                )
            )
            assert await first == [3, b"3"]
            assert await second == [5]
            assert await conn.settled(2.0)
            assert conn.sent == conn.replies == 1 + 7  # SELECT when it connected, then ours
            # HSET on a string is an error reply to a write: counted, not raised.
            assert conn.errors == 1 and "WRONGTYPE" in conn.last_error
            # To a call, an error reply is a value in its place.
            replies = await conn.call(commands(("HSET", "k", "f", "v"), ("GET", "k")))
            assert isinstance(replies[0], hiredis.ReplyError) and replies[1] == b"5"
            # A blocking read waits in Redis, then answers nil.
            nothing = await conn.call(
                commands(
                    ("BLPOP", "empty-list", "0.1"),
                )
            )
            assert nothing == [None]
        finally:
            conn.close()
        assert not lost

    asyncio.run(scenario())


def test_a_lost_link_fails_the_waiting_call_and_reports_once(redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        lost: list[BaseException] = []
        conn = await open_connection(redis_server.url, lost.append)
        waiting = asyncio.ensure_future(
            conn.call(
                commands(
                    ("BLPOP", "never", "10"),
                )
            )
        )
        await asyncio.sleep(0.2)
        redis_server.kill()
        with pytest.raises(ConnectionError, match="lost"):
            await asyncio.wait_for(waiting, 5)
        assert len(lost) == 1 and conn.closed
        with pytest.raises(ConnectionError, match="closed"):
            await conn.call(
                commands(
                    ("PING",),
                )
            )

    asyncio.run(scenario())


def test_a_refused_password_is_a_clear_error(redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        url = f"redis://:wrong@127.0.0.1:{redis_server.port}/0"
        with pytest.raises(ConnectionError, match="refused the connection"):
            await open_connection(url, lambda error: None)

    asyncio.run(scenario())
