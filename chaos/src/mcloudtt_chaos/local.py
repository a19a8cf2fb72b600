"""Local processes: Redis, brokers, the adapter and the simulator, started and stopped cleanly.

Every component runs as its own console script from the same environment, exactly as in the
images, so what runs here is what runs on Kubernetes.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .procs import Process, RedisServer, console_script, free_block, port_free


@dataclass
class LocalCluster:
    """Redis plus N brokers on consecutive ports, logs under `workdir`."""

    workdir: Path
    brokers: int = 3
    base_port: int = 1883
    base_http_port: int = 8080
    redis_port: int = 0
    services: list[Process] = field(default_factory=list)
    # Ports taken by something else and replaced by free ones: what to print.
    notes: list[str] = field(default_factory=list)
    # Children die with this process however it ends: every `Process` is watched by this
    # process's watchdog (`watchdog.guard()`); `guard` adds PR_SET_PDEATHSIG, which acts even
    # if the watchdog is killed too.
    guard: bool = True

    def _spawn(
        self, name: str, cmd: list[str], port: int | None = None, http_port: int | None = None
    ) -> Process:
        log_path = self.workdir / f"{name}.log"
        process = Process(
            cmd,
            name=name,
            log_path=log_path,
            port=port,
            http_port=http_port,
            die_with_parent=self.guard,
        )
        self.services.append(process.start())
        return process

    def restart(self, process: Process) -> Process:
        """Start a stopped service again (from the main thread: see `die_with_parent`)."""
        process.start()
        return process

    def start_redis(self) -> RedisServer:
        redis = RedisServer(
            self.redis_port or None,
            appendonly=True,
            data_dir=self.workdir / "redis",
            log_path=self.workdir / "redis.log",
            die_with_parent=self.guard,
        )
        self.redis_port = redis.port
        self.services.append(redis.start())
        return redis

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_brokers(self, *extra: str) -> list[Process]:
        started = []
        self.base_port = self._free_ports(self.base_port, "MQTT")
        self.base_http_port = self._free_ports(self.base_http_port, "HTTP")
        for index in range(self.brokers):
            port = self.base_port + index
            http_port = self.base_http_port + index
            started.append(
                self._spawn(
                    f"broker-{index + 1}",
                    [
                        *console_script("mcloudtt-broker"),
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
        for broker in started:
            broker.wait_port()
        return started

    def _free_ports(self, first: int, what: str) -> int:
        """`first` and the next ports for the brokers, or a free block when one is taken."""
        wanted = range(first, first + self.brokers)
        taken = [port for port in wanted if not port_free(port)]
        if not taken:
            return first
        chosen = free_block(self.brokers)
        self.notes.append(
            f"{what} port {taken[0]} is in use: brokers use {chosen}-{chosen + self.brokers - 1}"
        )
        return chosen

    def start(self, name: str, cmd: list[str], http_port: int | None = None) -> Process:
        return self._spawn(name, cmd, http_port=http_port)

    def stop(self) -> None:
        # Clients first, then brokers (they drain), Redis last.
        for service in reversed(self.services):
            if service.proc is not None:
                service.stop(timeout=15.0)


def workdir(base: Path | None) -> Path:
    if base is None:
        return Path(tempfile.mkdtemp(prefix="mcloudtt-"))
    base.mkdir(parents=True, exist_ok=True)
    return base
