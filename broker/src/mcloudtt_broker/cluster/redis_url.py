"""One Redis URL, every Redis link: what `redis://`, `rediss://` and `unix://` URLs mean here.

The broker's lean RESP link (`resp.py`) and every redis-py client of the broker and the adapter
take their connection from `parse_redis_url`, so they reach the same server the same way: the
same TLS trust and client certificate, user, password and database.

    redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]
    rediss://[[USER]:PASSWORD@]HOST[:PORT][/DB][?ssl_ca_certs=CA&ssl_certfile=CERT
        &ssl_keyfile=KEY&ssl_cert_reqs=none|optional|required&ssl_check_hostname=true|false]
    unix://[[USER]:PASSWORD@]/PATH/TO/redis.sock[?db=DB]
    redis[s]://[[USER]:PASSWORD@]HOST1[:PORT1],HOST2[:PORT2],...[/0][?...]   (cluster seeds)

Any node of a Redis Cluster will do (as Memorystore's discovery endpoint); a comma-separated
list of seed nodes is tried in order until one answers (`topology.py` finds the shards). The
user, password and TLS options apply to every node of the cluster.

User and password are percent-decoded (`%40` for `@`). An option we do not know, or an `ssl_*`
option on a URL without TLS, is refused: a typo must not quietly turn verification off. This
module imports no redis at load time (a single node never does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

if TYPE_CHECKING:
    import redis.asyncio

SCHEMES = ("redis", "rediss", "unix")
DEFAULT_PORT = 6379
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_TLS_OPTIONS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = (62, 64)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_WRONG_PASSWORD = ("WRONGPASS", "invalid username-password", "invalid password", "Invalid Username")
_NO_PASSWORD = ("NOAUTH", "Authentication required", "called with the client already authenticated")


class RedisUrlError(ValueError):
    """A Redis URL we cannot use; the message is one line, without the password."""


@dataclass(frozen=True, kw_only=True)
class RedisOptions:
    """How to reach one Redis: the parsed URL."""

    scheme: str
    host: str = ""
    port: int = DEFAULT_PORT
    path: str = ""  # unix:// only
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    ssl_check_hostname: bool = True
    # Further seed nodes of a Redis Cluster given after the first (host, port).
    seeds: tuple[tuple[str, int], ...] = ()

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    @property
    def address(self) -> str:
        """Where, for log lines and /readyz (never the password)."""
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @functools.cached_property
    def _context(self) -> ssl.SSLContext:
        # Built as redis-py's RedisSSLContext builds its own, so both links trust the same CAs.
        context = ssl.create_default_context()
        verify = _CERT_REQS[self.ssl_cert_reqs]
        context.check_hostname = self.ssl_check_hostname and verify != ssl.CERT_NONE
        context.verify_mode = verify
        if self.ssl_certfile:
            _load("ssl_certfile", self.ssl_certfile, context.load_cert_chain, self.ssl_keyfile)
        if self.ssl_ca_certs:
            _load("ssl_ca_certs", self.ssl_ca_certs, context.load_verify_locations)
        return context

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of a `rediss://` URL, built once (None without TLS). Raises
        RedisUrlError when a certificate or key file cannot be read."""
        return self._context if self.tls else None

    def pool_kwargs(self) -> dict[str, Any]:
        """The same options as keyword arguments of `redis.asyncio.ConnectionPool`: what
        `ConnectionPool.from_url` would make of the URL, our way of reading it."""
        from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

        kwargs: dict[str, Any] = {"db": self.db, "username": self.username}
        kwargs["password"] = self.password
        if self.scheme == "unix":
            kwargs.update(connection_class=UnixDomainSocketConnection, path=self.path)
            return kwargs
        kwargs.update(host=self.host, port=self.port, connection_class=Connection)
        if self.tls:
            kwargs.update(
                connection_class=SSLConnection,
                ssl_ca_certs=self.ssl_ca_certs,
                ssl_certfile=self.ssl_certfile,
                ssl_keyfile=self.ssl_keyfile,
                ssl_cert_reqs=self.ssl_cert_reqs,
                ssl_check_hostname=self.ssl_check_hostname,
            )
        return kwargs

    @property
    def nodes(self) -> tuple[tuple[str, int], ...]:
        """Every node the URL names, the first first (empty for a unix socket)."""
        if self.scheme == "unix":
            return ()
        return ((self.host, self.port), *self.seeds)

    def for_node(self, host: str, port: int) -> RedisOptions:
        """The same user, password and TLS options, for another node of the cluster."""
        return dataclasses.replace(self, host=host, port=port, seeds=())

    def cluster_client(
        self,
        nodes: Sequence[tuple[str, int]] = (),
        client_class: type[redis.asyncio.RedisCluster] | None = None,
        **extra: Any,
    ) -> redis.asyncio.RedisCluster:
        """redis-py's cluster client, found from `nodes` (default: the URL's), with this URL's
        user, password and TLS options on every node; no client-side retries of its own beyond
        following MOVED and ASK (the bus reconnects)."""
        import redis.asyncio
        from redis.asyncio.cluster import ClusterNode

        self.ssl_context()
        kwargs: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.tls:
            kwargs.update(
                ssl=True,
                ssl_ca_certs=self.ssl_ca_certs,
                ssl_certfile=self.ssl_certfile,
                ssl_keyfile=self.ssl_keyfile,
                ssl_cert_reqs=self.ssl_cert_reqs,
                ssl_check_hostname=self.ssl_check_hostname,
            )
        startup = [ClusterNode(host, port) for host, port in (nodes or self.nodes)]
        return (client_class or redis.asyncio.RedisCluster)(
            startup_nodes=startup, cluster_error_retry_attempts=2, **kwargs, **extra
        )

    def client(
        self, *, bounded: int | None = None, wait: float | None = None, **extra: Any
    ) -> redis.asyncio.Redis:
        """A redis-py asyncio client for this URL (`extra`: timeouts and the like), made the
        way `Redis.from_url` makes one (a pool of its own, no client-side retries). `bounded`:
        at most that many connections, and a command waits up to `wait` seconds (None:
        as long as it takes) for one to be free instead of failing."""
        import redis.asyncio

        self.ssl_context()  # an unreadable file is our one-line error, not redis-py's
        pool: redis.asyncio.ConnectionPool
        if bounded is None:
            pool = redis.asyncio.ConnectionPool(**self.pool_kwargs(), **extra)
        else:
            pool = _waiting_pool(bounded, wait, {**self.pool_kwargs(), **extra})
        return redis.asyncio.Redis.from_pool(pool)


def _waiting_pool(bound: int, wait: float | None, kwargs: dict[str, Any]) -> Any:
    """A redis-py pool of at most `bound` connections where a command waits its turn.

    Not redis-py's BlockingConnectionPool: it waits on an asyncio.Condition, which before
    Python 3.13 loses a notification when the waiter it woke is cancelled (gh-112202); in a
    reconnect storm, where CONNECTs time out by the thousand, its waiters then sleep beside
    free connections. An asyncio.Semaphore hands a cancelled waiter's turn on."""
    import redis.asyncio

    class WaitingPool(redis.asyncio.ConnectionPool):
        def __init__(self) -> None:
            super().__init__(max_connections=bound, **kwargs)
            self.turns = asyncio.Semaphore(bound)

        async def get_connection(self, *args: Any, **options: Any) -> Any:
            async with asyncio.timeout(wait):
                await self.turns.acquire()
            try:
                return await super().get_connection(*args, **options)  # type: ignore[no-untyped-call]
            except BaseException:
                self.turns.release()
                raise

        async def release(self, connection: Any) -> None:
            try:
                await super().release(connection)
            finally:
                self.turns.release()

    return WaitingPool()


def _load(option: str, path: str, load: Any, *args: Any) -> None:
    try:
        load(path, *args)
    except OSError as error:
        if isinstance(error, ssl.SSLError):
            raise RedisUrlError(f"{option} {path}: not a usable PEM file ({error})") from None
        raise RedisUrlError(f"cannot read {option} {path}: {error.strerror or error}") from None


def _flag(name: str, text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise RedisUrlError(f"{name} in the Redis URL must be true or false, got {text!r}")


def _db(text: str) -> int:
    if not text.isdigit():
        raise RedisUrlError(f"the Redis database must be a number, got {text!r}")
    return int(text)


@functools.lru_cache(maxsize=32)
def parse_redis_url(url: str) -> RedisOptions:
    """The options of one Redis URL (cached: the same URL gets the same TLS context)."""
    url, seeds = _split_seeds(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise RedisUrlError(f"not a Redis URL: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise RedisUrlError(
            f"expected a redis:// or rediss:// (TLS) or unix:// URL, got {scheme or 'no'} scheme"
        )
    query: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in ("db", *_TLS_OPTIONS):
            raise RedisUrlError(
                f"unknown option {name!r} in the Redis URL (known: db, {', '.join(_TLS_OPTIONS)})"
            )
        query[name] = value
    tls_given = [name for name in _TLS_OPTIONS if name in query]
    if tls_given and scheme != "rediss":
        raise RedisUrlError(f"{tls_given[0]} needs a rediss:// URL (TLS), got {scheme}://")
    fields: dict[str, Any] = {
        "scheme": scheme,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,  # as redis-py
    }
    if seeds and scheme == "unix":
        raise RedisUrlError("a unix:// Redis URL names one socket, not a list of seed nodes")
    if seeds:
        fields["seeds"] = seeds
    if scheme == "unix":
        if not parts.path:
            raise RedisUrlError("a unix:// Redis URL needs the socket's path: unix:///path/to/sock")
        fields["path"] = unquote(parts.path)
    else:
        if not parts.hostname:
            raise RedisUrlError(f"the Redis URL names no host: {scheme}://HOST[:PORT][/DB]")
        fields["host"] = unquote(parts.hostname)
        fields["port"] = DEFAULT_PORT if port is None else port
        if parts.path.strip("/"):
            fields["db"] = _db(parts.path.strip("/"))
    if "db" in query:
        fields["db"] = _db(query["db"])
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if query.get(name):
            fields[name] = query[name]
    if "ssl_cert_reqs" in query:
        reqs = query["ssl_cert_reqs"].lower()
        if reqs not in _CERT_REQS:
            raise RedisUrlError(
                f"ssl_cert_reqs in the Redis URL must be none, optional or required, got {reqs!r}"
            )
        fields["ssl_cert_reqs"] = reqs
    if "ssl_check_hostname" in query:
        fields["ssl_check_hostname"] = _flag("ssl_check_hostname", query["ssl_check_hostname"])
    if "ssl_keyfile" in fields and "ssl_certfile" not in fields:
        raise RedisUrlError("ssl_keyfile in the Redis URL needs ssl_certfile (the certificate)")
    return RedisOptions(**fields)


def _split_seeds(url: str) -> tuple[str, tuple[tuple[str, int], ...]]:
    """`scheme://auth@h1:p1,h2:p2/db?q` -> (`scheme://auth@h1:p1/db?q`, ((h2, p2),))."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, ()
    netloc, slash, tail = rest.partition("/")
    if "?" in netloc:  # no path: the query follows the hosts
        netloc, _, query = netloc.partition("?")
        slash, tail = "/", "?" + query
    auth, at, hosts = netloc.rpartition("@")
    if "," not in hosts:
        return url, ()
    first, *others = hosts.split(",")
    seeds = []
    for other in others:
        try:
            seed = urlsplit(f"//{other}")
            port = seed.port
        except ValueError as error:
            raise RedisUrlError(f"not a Redis URL: seed {other!r}: {error}") from None
        if not seed.hostname:
            raise RedisUrlError(f"an empty seed node in the Redis URL's list: {other!r}")
        seeds.append((unquote(seed.hostname), DEFAULT_PORT if port is None else port))
    return f"{scheme}://{auth}{at}{first}{slash}{tail}", tuple(seeds)


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    hosts = parts.netloc.rpartition("@")[2]  # as given: a seed list stays a list
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


def check_redis_url(url: str) -> RedisOptions:
    """Parse and build the TLS context now, so a bad URL or an unreadable file is a
    configuration error at start, not a link that never comes up."""
    options = parse_redis_url(url)
    options.ssl_context()
    return options


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def link_error_reason(error: BaseException, options: RedisOptions) -> str:
    """One line that says why a Redis link failed, for the log and /readyz."""
    where = options.address
    chain = _chain(error)
    for cause in chain:
        if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_code in _NAME_MISMATCH:
            # The CA is right; the certificate names other hosts. On a Redis Cluster the nodes
            # after the seed are reached at the addresses CLUSTER SHARDS gives (often IPs).
            named = re.search(r"not valid for '([^']*)'", cause.verify_message or "")
            used = named.group(1) if named else "the address used"
            return (
                f"TLS certificate of a Redis node does not name {used}, the address it was "
                f"reached at ({where}; {cause.verify_message}): use certificates that name the "
                "addresses CLUSTER SHARDS reports, or add ssl_check_hostname=false to the Redis "
                "URL (the CA is still checked)"
            )
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                f"TLS certificate of {where} not trusted ({cause.verify_message}): "
                "check ssl_ca_certs in the Redis URL"
            )
        if isinstance(cause, RedisUrlError):
            return str(cause)
    # Redis's words, as the lean link gets them or as redis-py rephrases them.
    text = " ".join(str(cause) for cause in chain)
    if any(word in text for word in _WRONG_PASSWORD):
        return f"Redis at {where} refused the username or password (WRONGPASS)"
    if any(word in text for word in _NO_PASSWORD):
        return f"Redis at {where} wants a password (NOAUTH): put it in the URL"
    if "NOPERM" in text:
        return f"Redis at {where} does not let this user run a command the cluster needs: {text}"
    for cause in chain:
        if isinstance(cause, ssl.SSLError):
            if "CERTIFICATE_REQUIRED" in str(cause.reason):
                return (
                    f"Redis at {where} wants a client certificate: give ssl_certfile and "
                    "ssl_keyfile in the Redis URL"
                )
            return f"TLS handshake with {where} failed ({cause.reason or cause})"
    for cause in chain:
        if isinstance(cause, TimeoutError):
            return f"cannot reach Redis at {where}: timed out"
        if isinstance(cause, OSError) and (cause.errno or cause.strerror):
            why = os.strerror(cause.errno) if cause.errno else cause.strerror
            return f"cannot reach Redis at {where}: {why}"
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"Redis at {where}: {first}"
