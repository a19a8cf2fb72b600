"""A tiny HTTP/1.1 endpoint for probes and Prometheus (/healthz, /readyz, /metrics, ...).

Each route is an async handler returning (status line, body, content type); one request per
connection. The adapter serves its endpoints with the same class.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

Handler = Callable[[], Awaitable[tuple[str, bytes, str]]]
# A route that reads the query string (`/clients?id=...`), as a dict of its last values.
QueryHandler = Callable[[dict[str, str]], Awaitable[tuple[str, bytes, str]]]
TEXT = "text/plain; charset=utf-8"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
JSON = "application/json"


class HttpServer:
    def __init__(
        self, routes: dict[str, Handler], query_routes: dict[str, QueryHandler] | None = None
    ) -> None:
        self.routes = routes
        self.query_routes = query_routes or {}
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            parts = request.split(b"\r\n", 1)[0].split()
            target = parts[1].decode(errors="replace") if len(parts) >= 2 else ""
            path, _, query = target.partition("?")
            handler = self.routes.get(path)
            query_handler = self.query_routes.get(path)
            if handler is None and query_handler is None:
                status, body, ctype = "404 Not Found", b"not found\n", TEXT
            else:
                try:
                    if query_handler is not None:
                        status, body, ctype = await query_handler(dict(parse_qsl(query)))
                    else:
                        assert handler is not None
                        status, body, ctype = await handler()
                except Exception as error:  # a probe must answer, whatever broke
                    status = "500 Internal Server Error"
                    body = f"{type(error).__name__}: {error}\n".encode()
                    ctype = TEXT
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
