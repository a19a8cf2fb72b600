"""The `local` backend: Redis and the brokers as processes on loopback, faults by signals and by
fault proxies.

    workload ──> client proxy b0 ──> broker b0 ──> redis proxy b0 ──┐
    workload ──> client proxy b1 ──> broker b1 ──> redis proxy b1 ──┼──> redis-server (AOF)
    ...                                                             ┘

Every link a scenario may break has its own `FaultProxy`: a broker is cut from Redis (its
clients still reach it) by black-holing its Redis proxy, cut from its clients by black-holing
its client proxy, and slowed by the proxy's toxics. The proxies run on an event loop of their
own in a daemon thread, so the blocking `Backend` calls (and the workload's loop) need not
share theirs. Ports are fixed at setup and kept across restarts, so a restarted broker or Redis
comes back at the same address, as a StatefulSet pod does.

Everything is torn down by `teardown()`, and also at interpreter exit and on SIGTERM/SIGHUP
(the processes run in sessions of their own, so a Ctrl-C at the terminal reaches only us; the
KeyboardInterrupt unwinds through the caller's `finally`, and atexit catches the rest).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mcloudtt_chaos.backend import Backend, ClusterSpec, Endpoint, LinkFault, ProcessBackend
from mcloudtt_chaos.faultproxy import FaultProxy
from mcloudtt_chaos.procs import (
    HOST,
    Process,
    RedisServer,
    console_script,
    free_port,
    http_get,
)

T = TypeVar("T")


class _ProxyLoop:
    """An event loop in a daemon thread, for the fault proxies."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="faultproxies", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


class LocalBackend(ProcessBackend):
    name = "local"

    def __init__(self, workdir: Path | str | None = None, *, seed: int | None = None) -> None:
        super().__init__(workdir, seed=seed)
        self.redis: RedisServer | None = None
        self.brokers: dict[str, Process] = {}
        self.redis_proxies: dict[str, FaultProxy] = {}
        self.client_proxies: dict[str, FaultProxy] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._loop: _ProxyLoop | None = None

    # ------------------------------------------------------------------ life cycle

    def _build(self, spec: ClusterSpec) -> None:
        workdir = self._fresh_workdir()
        self._loop = _ProxyLoop()
        self.redis = RedisServer(
            appendonly=spec.redis_appendonly,
            data_dir=workdir / "redis",
            log_path=workdir / "redis.log",
        )
        names = [f"b{i}" for i in range(spec.brokers)]
        for index, name in enumerate(names):
            seed = None if self.seed is None else self.seed * 100 + index
            self.redis_proxies[name] = self._loop.run(
                FaultProxy(HOST, self.redis.port, seed=seed).start()
            )
            mqtt_port, http_port = free_port(), free_port()
            self.brokers[name] = Process(
                [
                    *console_script("mcloudtt-broker", "mcloudtt_broker"),
                    "--bind",
                    f"{HOST}:{mqtt_port}",
                    "--http",
                    f"{HOST}:{http_port}",
                    "--redis",
                    f"redis://{HOST}:{self.redis_proxies[name].port}/0",
                    "--id",
                    name,
                    *spec.broker_args,
                ],
                name=name,
                log_path=workdir / f"{name}.log",
                env=spec.env,
                port=mqtt_port,
                http_port=http_port,
            )
            self.client_proxies[name] = self._loop.run(
                FaultProxy(HOST, mqtt_port, seed=seed).start()
            )
            self._endpoints[name] = Endpoint(
                name=name,
                host=HOST,
                mqtt_port=self.client_proxies[name].port,
                http_port=http_port,
            )

    def broker_names(self) -> list[str]:
        return list(self.brokers)

    def _wait_serving(self, broker: str) -> None:
        self.brokers[broker].wait_port(timeout=30)

    def _process(self, broker: str) -> Process:
        return self.brokers[broker]

    def _stop_brokers(self) -> None:
        for broker in self.brokers.values():
            if broker.proc is not None:
                broker.stop(timeout=5)

    def _release(self) -> None:
        if self._loop is not None:
            proxies = [*self.redis_proxies.values(), *self.client_proxies.values()]
            try:
                self._loop.run(_close_all(proxies))
            finally:
                self._loop.close()
                self._loop = None

    # ------------------------------------------------------------------ looking

    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def direct_endpoints(self) -> list[Endpoint]:
        """The brokers' own MQTT ports, past the client proxies (a reconnect storm's thousands
        of clients would cost the proxies two descriptors each in this process)."""
        return [
            Endpoint(
                name=name, host=HOST, mqtt_port=process.port or e.mqtt_port, http_port=e.http_port
            )
            for (name, e), process in zip(
                self._endpoints.items(), self.brokers.values(), strict=True
            )
        ]

    def readyz(self, broker: str) -> tuple[int, str]:
        try:
            return http_get(self._endpoints[broker].http_port, "/readyz", timeout=2.0)
        except OSError as error:
            return 0, f"unreachable: {error}"

    # ------------------------------------------------------------------ links

    def _proxy_call(self, proxy: FaultProxy, command: dict[str, Any]) -> None:
        assert self._loop is not None, "setup() first"
        self._loop.run(proxy.apply(command))

    def cut_from_redis(self, broker: str) -> None:
        # Held, not refused: the broker learns of it only by its own timeouts, as in a partition.
        self._proxy_call(self.redis_proxies[broker], {"op": "blackhole"})

    def cut_from_clients(self, broker: str) -> None:
        self._proxy_call(self.client_proxies[broker], {"op": "blackhole"})

    def heal(self, broker: str) -> None:
        self._proxy_call(self.redis_proxies[broker], {"op": "heal"})
        self._proxy_call(self.client_proxies[broker], {"op": "heal"})

    def degrade_redis_link(self, broker: str, fault: LinkFault) -> None:
        proxy = self.redis_proxies[broker]
        if fault.latency_ms is not None:
            self._proxy_call(
                proxy, {"op": "latency", "ms": fault.latency_ms, "jitter_ms": fault.jitter_ms}
            )
        if fault.bandwidth_bytes_per_s is not None:
            self._proxy_call(proxy, {"op": "bandwidth", "bytes_per_s": fault.bandwidth_bytes_per_s})
        if fault.slice_bytes is not None:
            self._proxy_call(
                proxy,
                {
                    "op": "slicer",
                    "average_size": fault.slice_bytes,
                    "size_variation": fault.slice_bytes // 2,
                    "delay_ms": 1,
                },
            )
        if fault.blackhole:
            self._proxy_call(proxy, {"op": "blackhole"})


async def _close_all(proxies: list[FaultProxy]) -> None:
    await asyncio.gather(*(p.close() for p in proxies), return_exceptions=True)


def create() -> LocalBackend:
    return LocalBackend()


if TYPE_CHECKING:  # mypy checks that the class implements the interface
    _implements: Backend = LocalBackend()
