"""A tiny HTTP endpoint for probes and Prometheus: /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from .metrics import render_metrics

if TYPE_CHECKING:
    from .server import BrokerServer


class HttpServer:
    def __init__(self, owner: BrokerServer) -> None:
        self.owner = owner
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            parts = request.split(b"\r\n", 1)[0].split()
            path = parts[1].decode(errors="replace").split("?", 1)[0] if len(parts) >= 2 else ""
            status, body, ctype = self.respond(path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()

    def respond(self, path: str) -> tuple[str, bytes, str]:
        text = "text/plain; charset=utf-8"
        if path == "/healthz":
            return "200 OK", b"ok\n", text
        if path == "/readyz":
            if self.owner.ready():
                return "200 OK", b"ready\n", text
            return "503 Service Unavailable", b"not ready\n", text
        if path == "/metrics":
            bus = self.owner.bus
            cluster = bus.metrics() if bus is not None else None
            dropped = dict(bus.dropped) if bus is not None else None
            body = render_metrics(
                self.owner.broker, self.owner.loop.time(), cluster, dropped
            ).encode()
            return "200 OK", body, "text/plain; version=0.0.4; charset=utf-8"
        return "404 Not Found", b"not found\n", text
