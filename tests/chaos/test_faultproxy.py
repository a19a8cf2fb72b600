"""The fault proxy's toxics over real sockets on 127.0.0.1, measured; and Redis behind it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import redis
import redis.asyncio as aioredis
from mcloudtt_chaos.faultproxy import CHUNK, FaultProxy, Toxics, send_reset
from mcloudtt_chaos.procs import Process, free_port, port_free
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as SyncRetry
from redisproc import RedisProcess

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


@asynccontextmanager
async def echo_proxy() -> AsyncIterator[FaultProxy]:
    async with serving(_echo) as port, FaultProxy("127.0.0.1", port, seed=1) as proxy:
        yield proxy


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    start = time.perf_counter()
    writer.write(b"x")
    await writer.drain()
    assert await reader.readexactly(1) == b"x"
    return time.perf_counter() - start


async def median_rtt(proxy: FaultProxy, count: int = 9) -> float:
    reader, writer = await connect(proxy)
    samples = [await round_trip(reader, writer) for _ in range(count)]
    writer.close()
    return statistics.median(samples)


def test_data_passes_unchanged_small_and_large() -> None:
    async def main() -> None:
        async with echo_proxy() as proxy:
            reader, writer = await connect(proxy)
            for i in range(20):
                message = f"message {i}\n".encode()
                writer.write(message)
                assert await reader.readexactly(len(message)) == message
            blob = os.urandom(8 * 1024 * 1024)

            async def send() -> None:
                for i in range(0, len(blob), 100_000):
                    writer.write(blob[i : i + 100_000])
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            received = await reader.read(-1)  # up to EOF: the half-close went through
            await sender
            assert received == blob
            small = sum(len(f"message {i}\n") for i in range(20))
            expected = len(blob) + small
            assert proxy.stats.bytes == {"upstream": expected, "downstream": expected}
            writer.close()

    asyncio.run(main())


def test_latency_is_added_within_20_percent() -> None:
    async def main() -> None:
        async with echo_proxy() as proxy:
            base = await median_rtt(proxy)
            proxy.latency(50, direction="upstream")
            one_way = await median_rtt(proxy) - base
            proxy.latency(30)  # both directions: a round trip pays twice
            both = await median_rtt(proxy) - base
            proxy.normal()
            again = await median_rtt(proxy) - base
        assert one_way == pytest.approx(0.050, rel=0.2)
        assert both == pytest.approx(0.060, rel=0.2)
        assert again < 0.010

    asyncio.run(main())


def test_latency_delays_each_chunk_without_serialising_them() -> None:
    # A link with latency still carries pipelined traffic: 20 writes 5 ms apart each take
    # ~50 ms, so the last answer comes ~150 ms after the first write, not 20 x 50 ms.
    async def main() -> float:
        async with echo_proxy() as proxy:
            proxy.latency(50, direction="upstream")
            reader, writer = await connect(proxy)
            start = time.perf_counter()
            for i in range(20):
                writer.write(bytes([i]))
                await writer.drain()
                await asyncio.sleep(0.005)
            assert await asyncio.wait_for(reader.readexactly(20), 5) == bytes(range(20))
            writer.close()
            return time.perf_counter() - start

    assert 0.14 <= asyncio.run(main()) < 0.4


def test_jitter_spreads_the_latency_around_its_setting() -> None:
    async def main() -> list[float]:
        async with echo_proxy() as proxy:
            proxy.latency(50, jitter_ms=20, direction="downstream")
            reader, writer = await connect(proxy)
            samples = [await round_trip(reader, writer) for _ in range(20)]
            writer.close()
            return samples

    samples = asyncio.run(main())
    assert min(samples) >= 0.029
    assert max(samples) <= 0.085
    assert max(samples) - min(samples) > 0.015
    assert statistics.mean(samples) == pytest.approx(0.050, rel=0.2)


def test_bandwidth_is_capped_within_20_percent_with_bounded_buffers() -> None:
    total = 2_000_000
    got = asyncio.Event()
    received = 0

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while data := await reader.read(65536):
            received += len(data)
            if received >= total:
                got.set()
        writer.close()

    async def main() -> tuple[float, int, int]:
        async with serving(sink) as port, FaultProxy("127.0.0.1", port) as proxy:
            proxy.bandwidth(1_000_000, direction="upstream")
            _, writer = await connect(proxy)
            start = time.perf_counter()
            writer.write(os.urandom(total))
            await asyncio.wait_for(got.wait(), 10)
            elapsed = time.perf_counter() - start
            writer.close()
            return elapsed, proxy.stats.peak_buffered, proxy.buffer_bytes

    elapsed, peak, limit = asyncio.run(main())
    assert received == total
    assert total / elapsed == pytest.approx(1_000_000, rel=0.2)
    # The sender was held back by TCP, not buffered in the proxy.
    assert peak <= limit + CHUNK


def test_slicer_delivers_everything_in_small_delayed_pieces() -> None:
    data = os.urandom(10_000)

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        writer.close()

    async def main() -> tuple[list[bytes], float]:
        async with serving(source) as port, FaultProxy("127.0.0.1", port, seed=3) as proxy:
            proxy.slicer(100, size_variation=40, delay_ms=2, direction="downstream")
            reader, writer = await connect(proxy)
            start = time.perf_counter()
            pieces = []
            while piece := await reader.read(65536):
                pieces.append(piece)
            writer.close()
            return pieces, time.perf_counter() - start

    pieces, elapsed = asyncio.run(main())
    assert b"".join(pieces) == data
    assert len(pieces) >= 20  # unsliced, 10 kB arrive in one or two reads
    assert elapsed >= 0.8 * (len(data) / 100) * 0.002


def test_blackhole_holds_the_connection_then_lets_held_data_through() -> None:
    async def main() -> None:
        async with echo_proxy() as proxy:
            reader, writer = await connect(proxy)
            await round_trip(reader, writer)
            proxy.blackhole()
            writer.write(b"held")
            await writer.drain()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.readexactly(4), 0.5)
            assert not reader.at_eof()
            # A new connection is accepted but reaches nothing either.
            reader2, writer2 = await connect(proxy)
            writer2.write(b"new")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader2.readexactly(3), 0.3)
            proxy.normal()
            assert await asyncio.wait_for(reader.readexactly(4), 2) == b"held"
            assert await asyncio.wait_for(reader2.readexactly(3), 2) == b"new"
            writer.close()
            writer2.close()

    asyncio.run(main())


def test_blackhole_with_timeout_drops_the_connections() -> None:
    async def main() -> float:
        async with echo_proxy() as proxy:
            reader, writer = await connect(proxy)
            await round_trip(reader, writer)
            start = time.perf_counter()
            proxy.blackhole(timeout_ms=300)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 3)
            writer.close()
            return time.perf_counter() - start

    assert 0.25 <= asyncio.run(main()) < 1.5


def test_reset_peer_resets_open_and_new_connections_until_normal() -> None:
    async def main() -> None:
        async with echo_proxy() as proxy:
            reader, writer = await connect(proxy)
            await round_trip(reader, writer)
            proxy.reset_peer()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(1), 2)
            writer.close()
            reader, writer = await connect(proxy)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(1), 2)
            writer.close()
            assert proxy.stats.resets == 2
            proxy.normal()
            reader, writer = await connect(proxy)
            await round_trip(reader, writer)
            writer.close()

    asyncio.run(main())


def test_down_refuses_and_drops_then_up_listens_on_the_same_port() -> None:
    async def main() -> None:
        async with echo_proxy() as proxy:
            port = proxy.port
            reader, writer = await connect(proxy)
            await round_trip(reader, writer)
            await proxy.down()
            assert not proxy.is_up
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 2)
            writer.close()
            with pytest.raises(ConnectionRefusedError):
                await connect(proxy)
            await proxy.up()
            assert proxy.port == port
            reader, writer = await connect(proxy)
            await round_trip(reader, writer)
            writer.close()

    asyncio.run(main())


def test_an_unreachable_upstream_resets_the_client() -> None:
    async def main() -> None:
        async with serving(_echo) as port:
            pass  # closed: nothing listens there any more
        async with FaultProxy("127.0.0.1", port) as proxy:
            reader, writer = await connect(proxy)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(1), 2)
            writer.close()
            assert proxy.stats.refused_upstream == 1

    asyncio.run(main())


def test_a_reset_from_upstream_reaches_the_client_as_a_reset() -> None:
    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        send_reset(writer)

    async def main() -> None:
        async with serving(resetter) as port, FaultProxy("127.0.0.1", port) as proxy:
            reader, writer = await connect(proxy)
            writer.write(b"x")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(1), 2)
            writer.close()

    asyncio.run(main())


def test_redis_through_the_proxy(redis_server: RedisProcess) -> None:
    async def main() -> None:
        async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
            # No retries: the reset must reach us, not be hidden behind redis-py's backoff.
            client = aioredis.Redis(port=proxy.port, socket_timeout=2, retry=Retry(NoBackoff(), 0))
            try:
                assert await client.ping() is True
                await client.set("k", "v" * 100_000)
                assert await client.get("k") == b"v" * 100_000
                start = time.perf_counter()
                for _ in range(5):
                    await client.ping()
                fast = (time.perf_counter() - start) / 5
                proxy.latency(40)
                start = time.perf_counter()
                for _ in range(5):
                    await client.ping()
                slow = (time.perf_counter() - start) / 5
                assert slow - fast == pytest.approx(0.080, rel=0.2)
                proxy.reset_peer()
                with pytest.raises(RedisConnectionError):
                    await client.ping()
                proxy.normal()
                assert await client.ping() is True  # redis-py reconnects
            finally:
                await client.aclose()

    asyncio.run(main())


async def _command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, command: object
) -> dict[str, object]:
    writer.write(json.dumps(command).encode() + b"\n")
    answer = json.loads(await asyncio.wait_for(reader.readline(), 2))
    assert isinstance(answer, dict)
    return answer


def test_the_control_socket_changes_toxics_at_run_time() -> None:
    async def main() -> None:
        async with echo_proxy() as proxy:
            control = await proxy.serve_control()
            creader, cwriter = await asyncio.open_connection(
                "127.0.0.1", control.sockets[0].getsockname()[1]
            )
            base = await median_rtt(proxy, 5)
            answer = await _command(
                creader, cwriter, {"op": "latency", "ms": 50, "direction": "upstream"}
            )
            assert answer["ok"] is True
            assert answer["toxics"] == {
                "upstream": {**dataclasses.asdict(Toxics()), "latency_s": 0.05},
                "downstream": dataclasses.asdict(Toxics()),
            }
            assert await median_rtt(proxy, 5) - base == pytest.approx(0.050, rel=0.2)
            bad = await _command(creader, cwriter, {"op": "melt"})
            assert bad["ok"] is False
            assert "melt" in str(bad["error"])
            assert (await _command(creader, cwriter, {"op": "down"}))["up"] is False
            with pytest.raises(ConnectionRefusedError):
                await connect(proxy)
            healed = await _command(creader, cwriter, {"op": "heal"})
            assert healed["up"] is True
            assert healed["toxics"]["upstream"]["latency_s"] == 0  # type: ignore[index]
            assert await median_rtt(proxy, 5) < base + 0.010
            cwriter.close()
            control.close()

    asyncio.run(main())


def test_the_proxy_runs_as_its_own_process(redis_server: RedisProcess) -> None:
    command = [sys.executable, "-m", "mcloudtt_chaos.faultproxy"]
    args = ["--upstream", f"127.0.0.1:{redis_server.port}", "--control", "0"]
    with Process([*command, *args], name="faultproxy") as proc:
        ports = json.loads(proc.wait_log(r"\{.*\}", timeout=20).group(0))
        client = redis.Redis(
            port=ports["listen"], socket_timeout=0.5, retry=SyncRetry(NoBackoff(), 0)
        )
        assert client.ping() is True
        with socket.create_connection(("127.0.0.1", ports["control"])) as control:
            lines = control.makefile("rw")
            lines.write(json.dumps({"op": "blackhole"}) + "\n")
            lines.flush()
            assert json.loads(lines.readline())["blackhole"] is True
            with pytest.raises(RedisTimeoutError):
                client.ping()
            lines.write(json.dumps({"op": "normal"}) + "\n")
            lines.flush()
            assert json.loads(lines.readline())["blackhole"] is False
        assert client.ping() is True
        client.close()


def test_a_proxy_told_to_forward_to_its_own_port_refuses_to_start() -> None:
    # Each accepted connection would dial the proxy again: descriptors run out in a second.
    async def main() -> None:
        port = free_port()
        with pytest.raises(ValueError, match="forward to itself"):
            await FaultProxy("127.0.0.1", port, listen_port=port).start()
        assert port_free(port)  # and it let the port go

    asyncio.run(main())
