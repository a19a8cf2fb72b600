"""The asyncio shell: listeners, one Protocol object per connection, timers, graceful shutdown.

No task per packet or per delivery: each socket's `data_received` runs the sans-IO core inline,
and each connection's output is flushed once per loop iteration (`kick` schedules it), so many
deliveries to one subscriber become one `transport.write`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .auth.rules import build_authorizer, build_chain
from .auth.tls import certificate_names
from .cluster.settings import ClusterSettings
from .core.broker import Broker, BrokerSettings
from .core.connection import ServerConnection
from .core.limits import BucketTable, Throttle
from .httpd import JSON, PROMETHEUS, TEXT, HttpServer
from .metrics import registry_for, render_metrics
from .mqtt.reason_codes import ReasonCode
from .websocket import WebSocketProtocol

if TYPE_CHECKING:
    from .auth.redis_users import RedisUsers
    from .cluster.redis_bus import RedisBus
    from .core.auth import AuthChain, Authorizer

log = logging.getLogger("mcloudtt.broker")

WRITE_HIGH_WATER = 256 * 1024


class MQTTProtocol(asyncio.Protocol):
    __slots__ = (
        "cert_names",
        "conn",
        "first_bytes",
        "flush_scheduled",
        "listener",
        "loop",
        "server",
        "throttled",
        "transport",
    )

    def __init__(self, server: BrokerServer, listener: int = 0) -> None:
        self.server = server
        self.listener = listener
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.conn: ServerConnection | None = None
        self.flush_scheduled = False
        self.throttled = False  # reading paused by a publish rate or bandwidth limit
        self.first_bytes = server.connect_rates is not None  # the CONNECT rate is checked on them
        # The verified client certificate's names (subject CN, then SANs), for `tls-cert`.
        self.cert_names: tuple[str, ...] = ()

    # asyncio callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        if self.server.options.tls_ca is not None:
            self.cert_names = certificate_names(transport.get_extra_info("peercert"))
        self.conn = conn = self.server.broker.connect(self, self.loop.time())
        if self.server.admit(self, transport):
            conn.refusal = ReasonCode.QUOTA_EXCEEDED  # CONNACK 0x97 (5.0) / 0x03 (3.1.1)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None:
            if self.first_bytes:
                # The first bytes are the CONNECT: charge it to its source address's bucket
                # (a port probe that sends nothing costs no token).
                self.first_bytes = False
                if conn.refusal is None and self.server.over_connect_rate(self.transport):
                    conn.refusal = ReasonCode.QUOTA_EXCEEDED
            conn.receive_data(data, self.loop.time())
            throttle = conn.throttle
            if throttle is not None and throttle.wait:
                self._throttle(throttle)

    def _throttle(self, throttle: Throttle) -> None:
        """Over its publish rate or bandwidth: stop reading this client until its debt is paid
        (it is slowed, never dropped; its packets wait in its socket)."""
        wait = throttle.take_wait()
        self.server.broker.stats.limited[throttle.reason] += 1
        if self.throttled or self.transport is None or self.transport.is_closing():
            return
        self.throttled = True
        self.transport.pause_reading()
        self.loop.call_later(wait, self._unthrottle)

    def _unthrottle(self) -> None:
        self.throttled = False
        transport = self.transport
        conn = self.conn
        if transport is None or transport.is_closing() or conn is None:
            return
        if not conn.congested:
            transport.resume_reading()
        conn.receive_data(b"", self.loop.time())  # the packets left waiting in the decoder
        throttle = conn.throttle
        if throttle is not None and throttle.wait:
            self._throttle(throttle)

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        if conn is not None:
            conn.connection_lost(self.loop.time())
        self.server.closed(self)

    def pause_writing(self) -> None:
        # The client is not reading: stop reading from it too (its acks and publishes wait in
        # its socket), and let the core drop QoS 0 / queue QoS 1-2 for it.
        if self.conn is not None:
            self.conn.congested = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        conn = self.conn
        if self.transport is not None and not self.transport.is_closing() and not self.throttled:
            self.transport.resume_reading()
        if conn is not None:
            conn.congested = False
            if conn.session is not None and conn.session.connection is conn:
                conn.session.pump(self.loop.time())

    # Link (what the core calls) -------------------------------------------------------
    def kick(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        conn = self.conn
        transport = self.transport
        if conn is None or transport is None or not conn.out:
            return
        data = conn.take_output()
        if not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()


@dataclass(kw_only=True)
class ServerOptions:
    binds: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 1883)])
    tls_binds: list[tuple[str, int]] = field(default_factory=list)
    ws_binds: list[tuple[str, int]] = field(default_factory=list)
    wss_binds: list[tuple[str, int]] = field(default_factory=list)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_min_version: str = "1.2"
    tls_ciphers: str | None = None
    http: tuple[str, int] | None = None
    drain_timeout: float = 5.0
    cluster: ClusterSettings | None = None
    ready_without_redis: bool = False
    # Limits (0: off). Over a connection limit or the CONNECT rate, the CONNECT is answered
    # with CONNACK 0x97 Quota exceeded (5.0) / 0x03 Server unavailable (3.1.1) and closed.
    max_connections: int = 0  # open network connections, all listeners together
    max_listener_connections: int = 0  # open network connections per listener
    connect_rate: float = 0.0  # CONNECTs per second per source address (token bucket)
    connect_burst: int = 0  # that bucket's size; 0: max(1, one second's worth)
    password_file: str | None = None
    jwt_secret_file: str | None = None
    jwks_file: str | None = None
    jwt_audience: str | None = None
    tls_ca: str | None = None  # CA of client certificates (mutual TLS)
    tls_require_client_cert: bool = False
    acl_file: str | None = None
    allow_anonymous: bool | None = None  # None: only while no authenticator is configured
    auth_chain: tuple[str, ...] = ()  # empty: every configured authenticator, default order


class BrokerServer:
    def __init__(self, settings: BrokerSettings, options: ServerOptions) -> None:
        self.settings = settings
        self.options = options
        self.loop = asyncio.get_running_loop()
        self.bus: RedisBus | None = None
        self.redis_users: RedisUsers | None = None
        if options.cluster is not None:
            from .cluster.redis_bus import RedisBus

            self.bus = RedisBus(options.cluster)
        self.broker = Broker(
            settings,
            clock=self.loop.time,
            bus=self.bus,
            auth=self._chain(),
            authorizer=self._authorizer(),
        )
        if self.bus is not None:
            self.bus.attach(self.broker)
        self.protocols: set[MQTTProtocol] = set()
        self.per_listener: dict[int, int] = {}
        self.open_count = 0
        self.connect_rates: BucketTable | None = None
        if options.connect_rate:
            burst = options.connect_burst or max(1.0, options.connect_rate)
            self.connect_rates = BucketTable(options.connect_rate, burst)
        self.listeners: list[asyncio.Server] = []
        self.http: HttpServer | None = None
        self.metrics = registry_for(self.broker, self.bus)
        self.accepting = False
        self.tls_context: ssl.SSLContext | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._all_closed = asyncio.Event()

    def reload_tls(self) -> None:
        """SIGHUP: the certificate and key files again, into the listeners' context. New
        handshakes get the new certificate; established connections keep theirs."""
        if self.tls_context is None or self.options.tls_cert is None:
            return
        try:
            self.tls_context.load_cert_chain(self.options.tls_cert, self.options.tls_key)
        except (OSError, ssl.SSLError) as error:
            log.error("certificate reload failed, keeping the old one: %s", error)
            return
        log.info("TLS certificate reloaded from %s", self.options.tls_cert)

    def _chain(self) -> AuthChain:
        options = self.options
        if "redis" in options.auth_chain and self.redis_users is None:
            from .auth.redis_users import RedisUsers

            assert options.cluster is not None
            self.redis_users = RedisUsers(options.cluster.url, options.cluster.prefix)
        return build_chain(
            options.auth_chain,
            options.password_file,
            options.allow_anonymous,
            tls_cert=options.tls_ca is not None,
            redis_users=self.redis_users,
            jwt={
                "secret_file": options.jwt_secret_file,
                "jwks_file": options.jwks_file,
                "audience": options.jwt_audience,
            },
        )

    def _authorizer(self) -> Authorizer | None:
        options = self.options
        # Clients may bring rights of their own (JWT claims, Redis): an authorizer is needed.
        claims = (
            options.jwt_secret_file is not None
            or options.jwks_file is not None
            or "redis" in options.auth_chain
        )
        return build_authorizer(options.acl_file, claim_rights=claims)

    def reload(self) -> None:
        """SIGHUP: read the password and ACL files again (on a mistake the old rules stay), and
        the TLS certificate (one handler: asyncio keeps one per signal)."""
        try:
            chain, authorizer = self._chain(), self._authorizer()
        except (OSError, ValueError) as error:
            log.error("reload failed, the old rules stay: %s", error)
            return
        self.broker.set_rules(chain, authorizer)
        log.info("reloaded the password and ACL files")
        self.reload_tls()

    def _factory(self, listener: int = 0) -> MQTTProtocol:
        protocol = MQTTProtocol(self, listener)
        self.protocols.add(protocol)
        self._all_closed.clear()
        return protocol

    def _ws_factory(self, listener: int = 0) -> WebSocketProtocol:
        return WebSocketProtocol(self, self._factory(listener))

    def admit(self, protocol: MQTTProtocol, transport: asyncio.BaseTransport) -> str:
        """Count a new network connection; the limit it breaks ('' for none), counted."""
        self.open_count += 1
        count = self.per_listener[protocol.listener] = (
            self.per_listener.get(protocol.listener, 0) + 1
        )
        options = self.options
        limit = ""
        if options.max_connections and self.open_count > options.max_connections:
            limit = "connections"
        elif options.max_listener_connections and count > options.max_listener_connections:
            limit = "listener_connections"
        if limit:
            self.broker.stats.limited[limit] += 1
        return limit

    def over_connect_rate(self, transport: asyncio.BaseTransport | None) -> bool:
        """Charge a CONNECT to its source address's bucket; True (counted) when it is empty."""
        if self.connect_rates is None or transport is None:
            return False
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        if self.connect_rates.try_take(host, self.loop.time()):
            return False
        self.broker.stats.limited["connect_rate"] += 1
        return True

    def closed(self, protocol: MQTTProtocol) -> None:
        if protocol.conn is not None:  # counted by admit()
            self.open_count -= 1
            self.per_listener[protocol.listener] -= 1
        self.protocols.discard(protocol)
        if not self.protocols:
            self._all_closed.set()

    async def start(self) -> None:
        for host, port in self.options.binds:
            self.listeners.append(
                await self.loop.create_server(
                    functools.partial(self._factory, len(self.listeners)),
                    host,
                    port,
                    backlog=4096,
                    reuse_address=True,
                )
            )
            log.info("MQTT listening on %s:%d", host, port)
        if self.options.tls_binds or self.options.wss_binds:
            context = self.tls_context = tls_server_context(self.options)
            for host, port in self.options.tls_binds:
                self.listeners.append(
                    await self.loop.create_server(
                        functools.partial(self._factory, len(self.listeners)),
                        host,
                        port,
                        ssl=context,
                        backlog=4096,
                        reuse_address=True,
                    )
                )
                log.info("MQTT over TLS listening on %s:%d", host, port)
            for host, port in self.options.wss_binds:
                self.listeners.append(
                    await self.loop.create_server(
                        functools.partial(self._ws_factory, len(self.listeners)),
                        host,
                        port,
                        ssl=context,
                        backlog=4096,
                        reuse_address=True,
                    )
                )
                log.info("MQTT over secure WebSocket listening on %s:%d", host, port)
        for host, port in self.options.ws_binds:
            self.listeners.append(
                await self.loop.create_server(
                    functools.partial(self._ws_factory, len(self.listeners)),
                    host,
                    port,
                    backlog=4096,
                    reuse_address=True,
                )
            )
            log.info("MQTT over WebSocket listening on %s:%d", host, port)
        if self.options.http is not None:
            self.http = HttpServer(
                {"/healthz": self._healthz, "/readyz": self._readyz, "/metrics": self._metrics},
                {"/clients": self._clients},
            )
            await self.http.start(*self.options.http)
        self.accepting = True
        if self.bus is not None:
            await self.bus.start()
        if self.redis_users is not None:
            self.redis_users.changed = self.broker.forget_decisions
            self._refresher = asyncio.create_task(
                self.redis_users.refresh_forever(), name="mcloudtt-rights"
            )
        self._ticker = asyncio.create_task(self._tick_forever(), name="mcloudtt-tick")

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            try:
                self.broker.tick(self.loop.time())
                if self.connect_rates is not None:
                    self.connect_rates.prune(self.loop.time())
            except Exception:  # a bug in one tick must not stop keepalive for everyone
                log.exception("tick failed")

    async def _healthz(self) -> tuple[str, bytes, str]:
        return "200 OK", b"ok\n", TEXT

    async def _readyz(self) -> tuple[str, bytes, str]:
        if self.ready():
            return "200 OK", b"ready\n", TEXT
        reason = "not ready"
        if self.accepting and self.bus is not None:
            # Why the cluster link is down (wrong CA, password, host...): said once, here.
            reason = f"not ready: {self.bus.link_error or 'connecting to Redis'}"
        return "503 Service Unavailable", f"{reason}\n".encode(), TEXT

    async def _metrics(self) -> tuple[str, bytes, str]:
        return "200 OK", render_metrics(self.metrics), PROMETHEUS

    async def _clients(self, query: dict[str, str]) -> tuple[str, bytes, str]:
        """One session by ClientId (`?id=`), or the ClientIds starting with `?prefix=` (at most
        50): what the dashboard's client lookup asks every broker. Topic filters and counts
        only, never a payload; on the probe port, which is not meant to leave the cluster."""
        sessions = self.broker.sessions
        me = self.broker.settings.broker_id
        if "id" not in query:
            prefix = query.get("prefix", "")
            ids = sorted(c for c in sessions if c.startswith(prefix))[:50]
            return "200 OK", json.dumps({"broker": me, "clients": ids}).encode(), JSON
        session = sessions.get(query["id"])
        if session is None:
            body = {"broker": me, "client_id": query["id"], "found": False}
        else:
            body = {
                "broker": me,
                "client_id": session.client_id,
                "found": True,
                "connected": session.online,
                "protocol": {3: "3.1", 4: "3.1.1", 5: "5.0"}.get(session.version, "?"),
                "expiry_interval": session.expiry_interval,
                "subscriptions": [
                    {"filter": s.topic_filter, "qos": s.qos} for s in session.subscriptions.values()
                ],
                "inflight": len(session.inflight),
                "queued": len(session.queue),
                "awaiting_release": len(session.awaiting_release),
            }
        return "200 OK", json.dumps(body).encode(), JSON

    def ready(self) -> bool:
        if not self.accepting:
            return False
        if self.bus is None or self.options.ready_without_redis:
            return True
        return self.bus.ready()

    async def stop(self) -> None:
        """Stop accepting, tell clients (5.0: DISCONNECT 0x8B), flush, close within the drain timeout."""
        self.accepting = False
        for listener in self.listeners:
            listener.close()
        self.broker.shutdown()
        if self.protocols:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), self.options.drain_timeout)
        for protocol in list(self.protocols):
            if protocol.transport is not None:
                protocol.transport.abort()
        if self._ticker is not None:
            self._ticker.cancel()
        if self._refresher is not None:
            self._refresher.cancel()
        if self.bus is not None:
            await self.bus.stop()
        if self.redis_users is not None:
            await self.redis_users.close()
        if self.http is not None:
            await self.http.stop()
        for listener in self.listeners:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.wait_closed(), 1.0)


TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def tls_server_context(options: ServerOptions) -> ssl.SSLContext:
    """The context of the TLS and secure WebSocket listeners (--tls-min-version, --tls-ciphers:
    OpenSSL's cipher list for TLS 1.2; TLS 1.3's suites are OpenSSL's defaults)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = TLS_VERSIONS[options.tls_min_version]
    if options.tls_ciphers:
        context.set_ciphers(options.tls_ciphers)
    assert options.tls_cert is not None
    context.load_cert_chain(options.tls_cert, options.tls_key)
    if options.tls_ca is not None:
        context.load_verify_locations(cafile=options.tls_ca)
        # Optional: a client without a certificate may still log in another way.
        context.verify_mode = (
            ssl.CERT_REQUIRED if options.tls_require_client_cert else ssl.CERT_OPTIONAL
        )
    return context


async def serve(settings: BrokerSettings, options: ServerOptions) -> None:
    server = BrokerServer(settings, options)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    log.info("broker %s ready", settings.broker_id)
    waits: list[asyncio.Future[object]] = [asyncio.ensure_future(stop.wait())]
    if server.bus is not None and server.bus.fatal is not None:
        waits.append(server.bus.fatal)  # type: ignore[arg-type]
    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down")
    await server.stop()
    for future in done:
        if future.exception() is not None:
            raise future.exception()  # type: ignore[misc]
