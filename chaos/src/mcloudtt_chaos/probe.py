"""Minimal MQTT 3.1.1 probes over asyncio streams, for what a scenario measures itself: "does
this broker serve a local client right now" and "can thousands of clients reconnect at once".

Only CONNECT/CONNACK, SUBSCRIBE/SUBACK and QoS 0 PUBLISH: a few bytes each, so that 2,000
probe connections cost the harness almost nothing (the workload's real clients judge the rest).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from mcloudtt_chaos.backend import Endpoint


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def connect_packet(client_id: str, *, clean: bool = True, keepalive: int = 0) -> bytes:
    flags = 0x02 if clean else 0x00
    body = _str("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + _str(client_id)
    return b"\x10" + _length(len(body)) + body


def subscribe_packet(packet_id: int, topic_filter: str, qos: int = 0) -> bytes:
    body = packet_id.to_bytes(2, "big") + _str(topic_filter) + bytes([qos])
    return b"\x82" + _length(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> bytes:
    body = _str(topic) + payload
    return b"\x30" + _length(len(body)) + body


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(first byte, body) of the next packet."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


class ProbeClient:
    """One connection: `await connect()` returns (session_present, return code)."""

    def __init__(
        self, endpoint: Endpoint, client_id: str, *, clean: bool = True, rcvbuf: int | None = None
    ) -> None:
        self.endpoint = endpoint
        self.rcvbuf = (
            rcvbuf  # a small receive buffer: a slow reader's backlog stays with the broker
        )
        self.client_id = client_id
        self.clean = clean
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> tuple[bool, int]:
        if self.rcvbuf is None:
            self.reader, self.writer = await asyncio.open_connection(
                self.endpoint.host, self.endpoint.mqtt_port
            )
        else:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(
                    sock, (self.endpoint.host, self.endpoint.mqtt_port)
                )
            except BaseException:
                sock.close()
                raise
            self.reader, self.writer = await asyncio.open_connection(sock=sock)
        self.writer.write(connect_packet(self.client_id, clean=self.clean))
        await self.writer.drain()
        first, body = await read_packet(self.reader)
        if first >> 4 != 2 or len(body) < 2:
            raise ConnectionError(f"expected CONNACK, got packet type {first >> 4}")
        return bool(body[0] & 1), body[1]

    async def subscribe(self, topic_filter: str, qos: int = 0, packet_id: int = 1) -> int:
        """SUBSCRIBE and wait for its SUBACK; the granted QoS (0x80: refused)."""
        assert self.reader is not None and self.writer is not None, "connect() first"
        self.writer.write(subscribe_packet(packet_id, topic_filter, qos))
        await self.writer.drain()
        while True:
            first, body = await read_packet(self.reader)
            if first >> 4 == 9:
                return body[-1]

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await self.writer.wait_closed()


async def local_roundtrip(endpoint: Endpoint, timeout: float = 3.0) -> bool:
    """Does this broker deliver a client's own QoS 0 message back to it (no Redis needed)?"""
    tag = os.urandom(4).hex()
    client = ProbeClient(endpoint, f"probe-{tag}")
    try:
        async with asyncio.timeout(timeout):
            _, code = await client.connect()
            if code != 0:
                return False
            assert client.reader is not None and client.writer is not None
            topic = f"chaos/probe/{tag}"
            await client.subscribe(topic)
            client.writer.write(publish_packet(topic, b"ping"))
            await client.writer.drain()
            while True:
                first, body = await read_packet(client.reader)
                if first >> 4 == 3 and body.endswith(b"ping"):
                    return True
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        return False
    finally:
        await client.close()
