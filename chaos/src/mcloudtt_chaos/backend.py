"""What a chaos backend does: the one interface the scenarios are written against.

A scenario says *what* breaks ("kill broker b", "cut b from Redis for 5 s"); a backend says *how*
on its platform: signals and a fault proxy for `local`, network namespaces and links for `netns`,
kubectl for `kind`, the Docker CLI for `docker`. The workload only ever sees `Endpoint`s, so the
same scenario, workload and checker run on every backend.

Brokers are named `b0`, `b1`, ... (their broker ids); `redis` is the one Redis server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """Where the workload reaches one broker."""

    name: str  # the broker id
    host: str
    mqtt_port: int
    http_port: int  # /healthz, /readyz, /metrics


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """The cluster a scenario asks for."""

    brokers: int = 3
    # Extra broker options as on the command line (e.g. ["--presence-ttl", "3"]).
    broker_args: tuple[str, ...] = ()
    # Redis starts only when `start_redis()` is called (brokers-before-redis).
    redis_first: bool = True
    redis_appendonly: bool = True
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class LinkFault:
    """A degraded link (Toxiproxy's toxics); None leaves that toxic off."""

    latency_ms: float | None = None
    jitter_ms: float = 0.0
    bandwidth_bytes_per_s: float | None = None
    slice_bytes: int | None = None  # deliver in pieces of this size
    blackhole: bool = False  # accept and forward nothing


class Backend(Protocol):
    """One platform's way of running and breaking a cluster. Every method blocks until done."""

    name: str

    def setup(self, spec: ClusterSpec) -> None:
        """Start Redis (unless `spec.redis_first` is False) and the brokers; return once each
        broker serves MQTT (not necessarily ready: Redis may be down on purpose)."""
        ...

    def teardown(self) -> None:
        """Stop everything and remove all the run made (processes, namespaces, containers).
        Safe to call twice and after a partial setup."""
        ...

    def endpoints(self) -> list[Endpoint]:
        """Every broker, in id order, also those currently down (their address stays)."""
        ...

    def readyz(self, broker: str) -> tuple[int, str]:
        """`/readyz` of one broker: (status, body); (0, reason) when it cannot be reached."""
        ...

    # Redis
    def start_redis(self) -> None: ...
    def kill_redis(self) -> None:
        """SIGKILL (or the platform's equivalent); data not yet on disk is gone."""
        ...

    def restart_redis(self, *, keep_data: bool = True) -> None:
        """Start Redis again after `kill_redis`; with keep_data False it comes back empty."""
        ...

    def freeze_redis(self) -> None: ...  # SIGSTOP / docker pause
    def thaw_redis(self) -> None: ...

    # Brokers
    def kill_broker(self, broker: str) -> None: ...  # SIGKILL, no drain
    def stop_broker(self, broker: str) -> None: ...  # SIGTERM and its drain
    def start_broker(self, broker: str) -> None:
        """Start a broker again under the same id and address (a StatefulSet pod)."""
        ...

    def freeze_broker(self, broker: str) -> None: ...
    def thaw_broker(self, broker: str) -> None: ...

    # Links
    def cut_from_redis(self, broker: str) -> None:
        """The broker loses Redis; its clients still reach it."""
        ...

    def cut_from_clients(self, broker: str) -> None:
        """The broker's clients lose it; it still reaches Redis."""
        ...

    def heal(self, broker: str) -> None:
        """Undo every cut and degradation of this broker's links."""
        ...

    def degrade_redis_link(self, broker: str, fault: LinkFault) -> None:
        """Slow the link between one broker and Redis (both directions)."""
        ...
