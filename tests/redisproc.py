"""Start real redis-server processes on free ports, so tests can kill and restart them
(thin wrappers over mcloudtt_chaos.procs)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mcloudtt_chaos.procs import ProcessError, RedisServer, redis_server_binary

__all__ = [
    "RedisProcess",
    "SecureRedisProcess",
    "TlsFiles",
    "redis_server_binary",
    "running_redis",
]


class RedisProcess(RedisServer):
    """A redis-server on a free port (or a given one, to restart on the same port)."""

    def __init__(self, port: int | None = None, *, appendonly: bool = False) -> None:
        super().__init__(port, appendonly=appendonly)

    def restart(self) -> None:
        self.stop()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                self.start()
                return
            except ProcessError:  # the port is not free again yet
                time.sleep(0.05)
        self.start()


@contextmanager
def running_redis(**kwargs: bool) -> Iterator[RedisProcess]:
    server = RedisProcess(**kwargs).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.close()


# ---------------------------------------------------------------- TLS, passwords, unix sockets


class TlsFiles:
    """A private CA made for one test, with a server certificate for 127.0.0.1 and a client
    certificate (mutual TLS), as PEM files in `directory`."""

    def __init__(self, directory: Path) -> None:
        import trustme

        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA(organization_name="mcloudtt test CA")
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert("mcloudtt-client")
        self.ca = directory / "ca.pem"
        self.server_cert = directory / "server.pem"
        self.server_key = directory / "server.key"
        self.client_cert = directory / "client.pem"
        self.client_key = directory / "client.key"
        ca.cert_pem.write_to_path(str(self.ca))
        server.cert_chain_pems[0].write_to_path(str(self.server_cert))
        server.private_key_pem.write_to_path(str(self.server_key))
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))


class SecureRedisProcess(RedisProcess):
    """A redis-server the way a managed Redis runs: TLS only (`--port 0`, `--tls-port`), a
    password (`requirepass`), optionally client certificates required (`--tls-auth-clients`),
    ACL users (`user` lines, e.g. "alice on >secret ~* &* +@all") and a unix socket."""

    def __init__(
        self,
        *,
        tls: TlsFiles | None,
        password: str | None = None,
        auth_clients: bool = False,
        users: tuple[str, ...] = (),
        unix_socket: bool = False,
    ) -> None:
        super().__init__()
        self.tls = tls
        self.password = password
        self.auth_clients = auth_clients
        self.users = users
        self.socket_path = self.data_dir / "redis.sock" if unix_socket else None

    def extra_args(self) -> list[str]:
        extra = super().extra_args()  # the password is the plain server's --requirepass
        if self.tls is not None:
            extra += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.server_cert),
                "--tls-key-file", str(self.tls.server_key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "yes" if self.auth_clients else "no",
            ]  # fmt: skip
        for user in self.users:
            extra += ["--user", *user.split()]
        if self.socket_path is not None:
            extra += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        return extra

    @property
    def url(self) -> str:
        """The TLS URL (or redis:// without TLS), with the password and the CA."""
        auth = f":{self.password}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"

    @property
    def unix_url(self) -> str:
        assert self.socket_path is not None
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket_path}?db=0"

    def start(self, timeout: float = 10.0) -> SecureRedisProcess:
        super().start(timeout)  # the TLS port accepts TCP connections like the plain one
        if self.socket_path is not None:
            socket_path = self.socket_path
            self.wait_until(socket_path.exists, what=f"making its socket {socket_path}")
        return self
