"""A TCP fault proxy: one listening port in front of one upstream, with Toxiproxy's toxics.

Put one between each broker and Redis (or between clients and a broker) and change its toxics
while the run goes on, from the same asyncio process:

    proxy = await FaultProxy("127.0.0.1", 6379).start()   # brokers use proxy.port
    proxy.latency(50, jitter_ms=10)      # per direction, or "both"
    proxy.bandwidth(100_000)             # bytes/s
    proxy.slicer(64, size_variation=32, delay_ms=1)
    proxy.blackhole()                    # hold connections, forward nothing (a partition)
    proxy.reset_peer()                   # RST every connection, also each new one
    await proxy.down(); await proxy.up() # refuse and drop everything, then listen again
    proxy.normal()                       # all toxics off

The same changes as data, for scenario definitions or another process: `await proxy.apply({"op":
"latency", "ms": 50})`, or one JSON object per line on the control socket of
`python -m mcloudtt_chaos.faultproxy --upstream 127.0.0.1:6379 --listen 6380 --control 8474`.

Theory of operation. Each accepted connection gets its own upstream connection and two pumps,
`upstream` (client to server, Toxiproxy's naming) and `downstream`. A pump is a reader task and a
writer task joined by a bounded queue: the reader stamps each chunk with its arrival time, the
writer holds it until arrival + latency (never before the chunk ahead of it, as TCP does not
reorder), then writes it in slices and at the bandwidth set. When the queue is full the reader
stops reading, the kernel's buffers fill and the sender blocks: backpressure, never unbounded
memory. A black hole stops both tasks (and new connections wait before their upstream is
opened), so data held during a partition flows again once it heals, like TCP retransmission.
Toxics are read per chunk, so a change applies at once to connections already open.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, cast

Direction = Literal["upstream", "downstream", "both"]

CHUNK = 16 * 1024


@dataclass
class Toxics:
    """What one direction suffers (all off by default)."""

    latency_s: float = 0.0
    jitter_s: float = 0.0
    rate: float | None = None  # bytes/s
    slice_size: int | None = None
    slice_variation: int = 0
    slice_delay_s: float = 0.0


@dataclass
class ProxyStats:
    accepted: int = 0
    active: int = 0
    resets: int = 0
    refused_upstream: int = 0
    bytes: dict[str, int] = field(default_factory=lambda: {"upstream": 0, "downstream": 0})
    buffered: int = 0
    peak_buffered: int = 0


def send_reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, so the peer gets a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def abort(self, *, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        # Wake the pumps wherever they wait (a black hole, a full queue, a latency sleep).
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        for writer in (self.client, self.upstream):
            if writer is not None:
                if reset:
                    send_reset(writer)
                else:
                    writer.transport.abort()

    async def run(self, client_reader: asyncio.StreamReader) -> None:
        proxy = self.proxy
        await proxy._flowing.wait()  # a black hole holds new connections too
        if self.closed:
            return
        try:
            up_reader, self.upstream = await asyncio.open_connection(
                proxy.upstream_host, proxy.upstream_port, limit=CHUNK
            )
        except OSError:
            proxy.stats.refused_upstream += 1
            self.abort(reset=True)
            return
        if self.closed:  # reset or taken down while connecting
            self.abort()
            return
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump(client_reader, self.upstream, "upstream"))
                group.create_task(self._pump(up_reader, self.client, "downstream"))
        except* ConnectionResetError:
            self.abort(reset=True)  # pass a reset on as a reset
        except* (OSError, asyncio.IncompleteReadError):
            self.abort()
        finally:
            if not self.closed:
                self.closed = True
                for writer in (self.client, self.upstream):
                    writer.close()

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(
            max(1, self.proxy.buffer_bytes // CHUNK)
        )
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read(src, queue))
                group.create_task(self._write(dst, queue, direction))
        finally:
            while not queue.empty():
                if (item := queue.get_nowait()) is not None:
                    self.proxy.stats.buffered -= len(item[1])

    async def _read(
        self, src: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        while True:
            await proxy._flowing.wait()
            data = await src.read(CHUNK)
            if not data:
                await queue.put(None)
                return
            await queue.put((loop.time(), data))
            proxy.stats.buffered += len(data)
            proxy.stats.peak_buffered = max(proxy.stats.peak_buffered, proxy.stats.buffered)

    async def _write(
        self,
        dst: asyncio.StreamWriter,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        direction: str,
    ) -> None:
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        released = 0.0  # when the previous chunk went out: TCP keeps order
        next_free = 0.0  # token bucket of the bandwidth toxic
        while True:
            item = await queue.get()
            if item is None:
                if dst.can_write_eof():
                    dst.write_eof()  # half-close, as the sender did
                return
            arrival, data = item
            proxy.stats.buffered -= len(data)
            toxics = proxy.toxics[direction]
            if toxics.latency_s or toxics.jitter_s:
                delay = toxics.latency_s + proxy._rng.uniform(-toxics.jitter_s, toxics.jitter_s)
                released = max(released, arrival + max(0.0, delay))
                if (wait := released - loop.time()) > 0:
                    await asyncio.sleep(wait)
            view = memoryview(data)
            while view:
                await proxy._flowing.wait()
                toxics = proxy.toxics[direction]
                size = len(view)
                if toxics.slice_size is not None:
                    spread = proxy._rng.randint(-toxics.slice_variation, toxics.slice_variation)
                    size = max(1, toxics.slice_size + spread)
                if toxics.rate is not None:
                    size = min(size, max(256, int(toxics.rate / 50)))  # 20 ms worth
                    now = loop.time()
                    start = max(now, next_free)
                    next_free = start + min(size, len(view)) / toxics.rate
                    if start > now:
                        await asyncio.sleep(start - now)
                piece, view = view[:size], view[size:]
                dst.write(piece)
                await dst.drain()
                proxy.stats.bytes[direction] += len(piece)
                if toxics.slice_size is not None and toxics.slice_delay_s and view:
                    await asyncio.sleep(toxics.slice_delay_s)


class FaultProxy:
    """Listen on `listen_host:listen_port` (0: any free port) and forward to the upstream."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        buffer_bytes: int = 256 * 1024,
        seed: int | None = None,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        self.port = listen_port
        self.buffer_bytes = buffer_bytes
        self.toxics: dict[str, Toxics] = {"upstream": Toxics(), "downstream": Toxics()}
        self.stats = ProxyStats()
        self._rng = random.Random(seed)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._resetting = False
        self._blackhole_timer: asyncio.TimerHandle | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        await self.up()
        return self

    async def up(self) -> None:
        """Listen (again, on the same port after `down`)."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accept, self.listen_host, self.port, limit=CHUNK, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        if (self.listen_host, self.port) == (self.upstream_host, self.upstream_port):
            # Each accepted connection would open another to itself, until no descriptor is left.
            self._server.close()
            self._server = None
            raise ValueError(
                f"fault proxy on {self.listen_host}:{self.port} would forward to itself"
            )

    async def down(self) -> None:
        """Stop listening (new connections are refused) and drop every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self._drop_all(reset=False)
        if server is not None:
            await server.wait_closed()

    async def close(self) -> None:
        await self.down()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._blackhole_timer is not None:
            self._blackhole_timer.cancel()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def is_up(self) -> bool:
        return self._server is not None

    # --- toxics ------------------------------------------------------------------------------

    def _directions(self, direction: Direction) -> list[Toxics]:
        if direction == "both":
            return [self.toxics["upstream"], self.toxics["downstream"]]
        return [self.toxics[direction]]

    def latency(self, ms: float, *, jitter_ms: float = 0.0, direction: Direction = "both") -> None:
        """Hold each chunk `ms` ± uniform `jitter_ms` (per direction: a round trip gets both)."""
        for t in self._directions(direction):
            t.latency_s, t.jitter_s = ms / 1000, jitter_ms / 1000

    def bandwidth(self, bytes_per_s: float | None, *, direction: Direction = "both") -> None:
        """Cap the rate (None: no cap)."""
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("bandwidth must be positive (use blackhole() to stop data)")
        for t in self._directions(direction):
            t.rate = bytes_per_s

    def slicer(
        self,
        average_size: int,
        *,
        size_variation: int = 0,
        delay_ms: float = 0.0,
        direction: Direction = "both",
    ) -> None:
        """Write data in pieces of about `average_size` bytes, `delay_ms` apart."""
        if average_size < 1 or not 0 <= size_variation < average_size:
            raise ValueError("need average_size >= 1 and 0 <= size_variation < average_size")
        for t in self._directions(direction):
            t.slice_size, t.slice_variation = average_size, size_variation
            t.slice_delay_s = delay_ms / 1000

    def blackhole(self, *, timeout_ms: float | None = None) -> None:
        """Forward nothing and hold every connection (Toxiproxy's `timeout`); with `timeout_ms`,
        drop the connections that long after."""
        self._flowing.clear()
        if self._blackhole_timer is not None:
            self._blackhole_timer.cancel()
            self._blackhole_timer = None
        if timeout_ms is not None:
            loop = asyncio.get_running_loop()
            self._blackhole_timer = loop.call_later(timeout_ms / 1000, self._drop_all, False)

    def reset_peer(self) -> None:
        """RST every open connection, and every new one until `normal()`."""
        self._resetting = True
        self._drop_all(reset=True)

    def normal(self) -> None:
        """All toxics off; held data flows again. (A proxy taken `down` needs `await up()`.)"""
        self.toxics = {"upstream": Toxics(), "downstream": Toxics()}
        self._resetting = False
        if self._blackhole_timer is not None:
            self._blackhole_timer.cancel()
            self._blackhole_timer = None
        self._flowing.set()

    async def heal(self) -> None:
        """Back to normal, listening included."""
        self.normal()
        await self.up()

    async def apply(self, command: Mapping[str, Any]) -> dict[str, Any]:
        """One change given as data: {"op": "latency", "ms": 50, "jitter_ms": 5, "direction":
        "upstream"}; ops are the method names (and "stats"). Returns the state after it."""
        args = {k: v for k, v in command.items() if k != "op"}
        op = command.get("op")
        direction = cast(Direction, args.pop("direction", "both"))
        if direction not in ("upstream", "downstream", "both"):
            raise ValueError(f"unknown direction {direction!r}")
        if op == "latency":
            self.latency(
                float(args["ms"]), jitter_ms=float(args.get("jitter_ms", 0)), direction=direction
            )
        elif op == "bandwidth":
            rate = args.get("bytes_per_s")
            self.bandwidth(None if rate is None else float(rate), direction=direction)
        elif op == "slicer":
            self.slicer(
                int(args["average_size"]),
                size_variation=int(args.get("size_variation", 0)),
                delay_ms=float(args.get("delay_ms", 0)),
                direction=direction,
            )
        elif op == "blackhole":
            timeout = args.get("timeout_ms")
            self.blackhole(timeout_ms=None if timeout is None else float(timeout))
        elif op == "reset_peer":
            self.reset_peer()
        elif op == "normal":
            self.normal()
        elif op == "heal":
            await self.heal()
        elif op == "down":
            await self.down()
        elif op == "up":
            await self.up()
        elif op != "stats":
            raise ValueError(f"unknown op {op!r}")
        return self.state()

    def state(self) -> dict[str, Any]:
        return {
            "up": self.is_up,
            "port": self.port,
            "blackhole": not self._flowing.is_set(),
            "reset_peer": self._resetting,
            "toxics": {d: dataclasses.asdict(t) for d, t in self.toxics.items()},
            "stats": dataclasses.asdict(self.stats),
        }

    async def serve_control(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        """A control socket: one JSON command per line in, one JSON answer per line out."""

        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while line := await reader.readline():
                    try:
                        command = json.loads(line)
                        if not isinstance(command, dict):
                            raise ValueError("a command is a JSON object")
                        answer = {"ok": True, **await self.apply(command)}
                    except (ValueError, KeyError, TypeError) as error:
                        answer = {"ok": False, "error": f"{type(error).__name__}: {error}"}
                    writer.write(json.dumps(answer).encode() + b"\n")
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        return await asyncio.start_server(session, host, port)

    # --- connections -------------------------------------------------------------------------

    def _drop_all(self, reset: bool) -> None:
        for link in list(self._links):
            if reset:
                self.stats.resets += 1
            link.abort(reset=reset)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        if self._resetting:
            self.stats.resets += 1
            send_reset(writer)
            return
        link = _Link(self, writer)
        self._links.add(link)
        self.stats.active += 1
        task = link.task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await link.run(reader)
        except asyncio.CancelledError:
            if not link.closed:  # not our own abort(): someone is cancelling us
                raise
        finally:
            self._links.discard(link)
            self.stats.active -= 1
            if task is not None:
                self._tasks.discard(task)


def _address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or default_host, int(port)


async def _serve(args: argparse.Namespace) -> None:
    upstream_host, upstream_port = _address(args.upstream)
    listen_host, listen_port = _address(args.listen)
    async with FaultProxy(
        upstream_host, upstream_port, listen_host=listen_host, listen_port=listen_port
    ) as proxy:
        line = {"listen": proxy.port}
        if args.control is not None:
            control_host, control_port = _address(args.control)
            control = await proxy.serve_control(control_host, control_port)
            line["control"] = int(control.sockets[0].getsockname()[1])
        print(json.dumps(line), flush=True)  # the ports, for whoever started us
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A TCP fault proxy with Toxiproxy's toxics.")
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--listen", default="127.0.0.1:0", help="[HOST:]PORT (0: any)")
    parser.add_argument("--control", help="[HOST:]PORT of the JSON-lines control socket")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
