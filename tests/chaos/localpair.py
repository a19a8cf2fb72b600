"""Two brokers on the local backend (their Redis links through fault proxies), ready: the set-up
of the partition and slow-link tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mcloudtt_chaos.backend import ClusterSpec
from mcloudtt_chaos.backends.local import LocalBackend
from mcloudtt_chaos.procs import wait_for


@contextmanager
def local_pair(tmp_path: Path, presence_ttl_s: float) -> Iterator[LocalBackend]:
    backend = LocalBackend(tmp_path)
    try:
        backend.setup(ClusterSpec(brokers=2, broker_args=("--presence-ttl", f"{presence_ttl_s:g}")))
        for broker in ("b0", "b1"):
            wait_for(
                lambda b=broker: backend.readyz(b)[0] == 200, timeout=10.0, what=f"{broker} ready"
            )
        yield backend
    finally:
        backend.teardown()


def port(backend: LocalBackend, broker: str) -> int:
    """The broker's own MQTT port (past its client proxy)."""
    return {e.name: e for e in backend.endpoints()}[broker].mqtt_port
