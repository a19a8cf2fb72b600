"""What an idle subscribed connection costs the whole broker process, shell included: the asyncio
shell (`BrokerServer` under uvloop, as `mcloudtt-broker` runs it) in this process, real TCP
clients from a child process (so none of their memory is counted), the Python heap each added
connection keeps measured with tracemalloc.

Counted: every allocation under 4 KiB the added connections keep (uvloop's transport and libuv
handle, the protocol, the core's connection, session and subscription, their strings). Left out:
the broker-wide hash tables (sessions, connections, the exact-filter index, uvloop's transport
table), which grow in doublings shared by all connections; `mcloudtt-conn-bench` measures them
with everything else, as RSS, at 10,000 and more.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tracemalloc

import uvloop
from mcloudtt_broker.core.broker import BrokerSettings
from mcloudtt_broker.server import BrokerServer, ServerOptions
from mcloudtt_chaos.procs import free_port

# Measured here: 2,452 bytes before this bound (two empty ACL caches and a one-entry dict of
# subscriptions per session, an empty output buffer per connection), 2,084 after; uvloop's
# transport, libuv handle and transport-table entry are about 1,230 of them.
MAX_BYTES_PER_IDLE_CONNECTION = 2_250
WARM = 100
N = 400
BIG = 4096

# The child opens `count` connections (CONNECT, then SUBSCRIBE to its own filter, as an IoT
# device does), reads the 9 bytes of CONNACK + SUBACK on each, says so, and holds them.
CLIENTS = """
import socket, sys
from mcloudtt_loadtest.conn_bench import client_packets
port, start, count = map(int, sys.argv[1:4])
held = []
for i in range(start, start + count):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(client_packets(i))
    got = b""
    while len(got) < 9:
        chunk = s.recv(64)
        if not chunk:
            sys.exit("closed by the broker")
        got += chunk
    held.append(s)
print("held", flush=True)
sys.stdin.read()
"""


async def _open(port: int, start: int, count: int) -> asyncio.subprocess.Process:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-c", CLIENTS, str(port), str(start), str(count)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), 60)
    assert line == b"held\n"
    return child


async def _close(child: asyncio.subprocess.Process) -> None:
    assert child.stdin is not None
    child.stdin.close()
    await asyncio.wait_for(child.wait(), 30)


def _small(snapshot: tracemalloc.Snapshot) -> int:
    return sum(trace.size for trace in snapshot.traces if trace.size < BIG)


async def _measure() -> tuple[float, float, int]:
    port = free_port()
    server = BrokerServer(BrokerSettings(), ServerOptions(binds=[("127.0.0.1", port)]))
    await server.start()
    children = []
    try:
        children.append(await _open(port, 0, WARM))  # warm code paths, caches, free lists
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            total_before = tracemalloc.get_traced_memory()[0]
            children.append(await _open(port, WARM, N))
            await asyncio.sleep(0.2)  # the last SUBACKs flushed
            gc.collect()
            after = tracemalloc.take_snapshot()
            total = (tracemalloc.get_traced_memory()[0] - total_before) / N
        finally:
            tracemalloc.stop()
        held = sum(1 for c in server.broker.connections if c.session is not None)
        return (_small(after) - _small(before)) / N, total, held
    finally:
        for child in children:
            await _close(child)
        await server.stop()


def test_an_idle_subscribed_connection_costs_the_process_under_the_bound() -> None:
    per_connection, with_tables, held = uvloop.run(_measure())
    assert held == WARM + N
    assert per_connection <= MAX_BYTES_PER_IDLE_CONNECTION, (per_connection, with_tables)
