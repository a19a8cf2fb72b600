"""A real Redis Cluster on loopback for the tests: three primaries and three replicas (by
default), each a `redis-server --cluster-enabled yes` on a free port, joined by
`redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes`.

    with RedisClusterProcess() as cluster:
        cluster.seed_url            # one node's URL, as Memorystore's discovery endpoint
        cluster.urls                # every node's URL
        cluster.kill_primary("k")   # SIGKILL the primary of k's slot; its replica takes over
        cluster.reshard(4000, source, target)   # `redis-cli --cluster reshard`

A small `cluster-node-timeout` (default 1 s) makes a killed primary's replica take over within
a couple of seconds, so failover tests stay short.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from mcloudtt_chaos.procs import HOST, NotInstalled, RedisServer, free_port, redis_server_binary
from redis.crc import key_slot

__all__ = ["ClusterNode", "RedisClusterProcess", "redis_cli_binary", "running_redis_cluster"]

SLOTS = 16_384


def redis_cli_binary() -> str:
    """redis-cli beside the redis-server in use, else on PATH."""
    beside = Path(redis_server_binary()).with_name("redis-cli")
    for candidate in (str(beside), shutil.which("redis-cli")):
        if candidate and os.path.exists(candidate):
            return candidate
    raise NotInstalled("redis-cli not found (Debian: apt-get install -y redis-tools)")


def slot_of(slot_or_key: int | str | bytes) -> int:
    """A slot number as given, or the slot of a key (its hash tag's, if it has one)."""
    if isinstance(slot_or_key, int):
        return slot_or_key
    key = slot_or_key.encode() if isinstance(slot_or_key, str) else slot_or_key
    return int(key_slot(key))


class ClusterNode(RedisServer):
    """One cluster node: its own data directory (nodes.conf) and an explicit bus port (a free
    one, not port+10000, which might be taken)."""

    def __init__(self, *, node_timeout_ms: int, password: str | None = None) -> None:
        super().__init__(password=password, name="redis-cluster-node")
        self.bus_port = free_port()
        self.node_timeout_ms = node_timeout_ms

    def extra_args(self) -> list[str]:
        extra = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.data_dir / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-port", str(self.bus_port),
            # A replica takes over however long its link to the primary has been down.
            "--cluster-replica-validity-factor", "0",
        ]  # fmt: skip
        if self.password is not None:
            extra += ["--masterauth", self.password]
        return [*super().extra_args(), *extra]

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(
            host=HOST,
            port=self.port,
            password=self.password,
            socket_timeout=2,
            decode_responses=True,
            **kwargs,
        )

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as r:
            return dict(r.info(section))

    def cluster_info(self) -> dict[str, str]:
        with self.client() as r:
            raw = r.execute_command("CLUSTER INFO")
        if isinstance(raw, dict):  # redis-py parses it
            return {str(k): str(v) for k, v in raw.items()}
        text = raw if isinstance(raw, str) else raw.decode()
        return dict(line.split(":", 1) for line in text.strip().splitlines() if ":" in line)

    def node_id(self) -> str:
        with self.client() as r:
            return str(r.execute_command("CLUSTER MYID"))

    def role(self) -> str:
        return str(self.info("replication")["role"])  # "master" or "slave"


class RedisClusterProcess:
    """`primaries` primaries with `replicas` replicas each, on loopback. A context manager."""

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 1,
        *,
        node_timeout_ms: int = 1000,
        password: str | None = None,
    ) -> None:
        self.primaries = primaries
        self.replicas = replicas
        self.password = password
        self.nodes = [
            ClusterNode(node_timeout_ms=node_timeout_ms, password=password)
            for _ in range(primaries * (1 + replicas))
        ]

    # ---------------------------------------------------------------- addresses

    def _url(self, node: ClusterNode) -> str:
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}{HOST}:{node.port}/0"

    @property
    def urls(self) -> list[str]:
        """Every node's URL (primaries and replicas; a cluster has database 0 only)."""
        return [self._url(node) for node in self.nodes]

    @property
    def seed_url(self) -> str:
        """One live node's URL: the cluster is found from any node."""
        return self._url(next(node for node in self.nodes if node.alive()))

    @property
    def url(self) -> str:
        """`seed_url`, so a test written for one Redis (`redis_server.url`) runs on a cluster."""
        return self.seed_url

    @property
    def seeds_url(self) -> str:
        """A comma-separated list of every node, started or not: redis://h:p1,h:p2,.../0"""
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}{','.join(n.address for n in self.nodes)}/0"

    def live_nodes(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.alive()]

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        """redis-py's cluster client on a live node (decoded strings)."""
        node = self.live_nodes()[0]
        return redis.RedisCluster(
            host=HOST, port=node.port, password=self.password, decode_responses=True, **kwargs
        )

    # ---------------------------------------------------------------- life cycle

    def start(self, timeout: float = 30.0) -> RedisClusterProcess:
        try:
            for node in self.nodes:
                node.start()
            cmd = [
                redis_cli_binary(),
                "--cluster", "create", *(node.address for node in self.nodes),
                "--cluster-replicas", str(self.replicas),
                "--cluster-yes",
            ]  # fmt: skip
            if self.password is not None:
                cmd += ["-a", self.password, "--no-auth-warning"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if done.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}"
                )
            self.wait_healthy(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every live node says `cluster_state:ok`, knows every live node and every slot
        is served, and every live replica's link to its primary is up (a kill test must not
        lose what the replica had not copied yet)."""
        self._wait(self._healthy, timeout, "the cluster to be healthy")

    def _healthy(self) -> bool:
        live = self.live_nodes()
        for node in live:
            info = node.cluster_info()
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                return False
            if int(info.get("cluster_known_nodes", 0)) < len(live):
                return False
            replication = node.info("replication")
            if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    @staticmethod
    def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except (redis.RedisError, OSError) as error:
                last = error
            time.sleep(0.05)
        raise TimeoutError(f"not {what} after {timeout:g}s (last error: {last})")

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisClusterProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------- topology

    def shards(self) -> list[tuple[ClusterNode, list[tuple[int, int]]]]:
        """Each live primary with its slot ranges, as a live node reports them."""
        by_port = {node.port: node for node in self.nodes}
        with self.live_nodes()[0].client() as r:
            slots = r.execute_command("CLUSTER SLOTS")
        ranges: dict[int, list[tuple[int, int]]] = {}
        for entry in slots:
            start, end, primary = entry[0], entry[1], entry[2]
            ranges.setdefault(int(primary[1]), []).append((int(start), int(end)))
        return [(by_port[port], sorted(r)) for port, r in sorted(ranges.items())]

    def primary_for(self, slot_or_key: int | str | bytes) -> ClusterNode:
        slot = slot_of(slot_or_key)
        for node, ranges in self.shards():
            if any(start <= slot <= end for start, end in ranges):
                return node
        raise LookupError(f"no primary serves slot {slot}")

    def kill_primary(self, slot_or_key: int | str | bytes, timeout: float = 30.0) -> ClusterNode:
        """SIGKILL the primary serving this slot (or key), then wait until a replica has taken
        its slots and the survivors agree (`cluster_state:ok`). The killed node."""
        victim = self.primary_for(slot_or_key)
        victim.kill()

        def promoted() -> bool:
            if any(node is victim for node, _ in self.shards()):
                return False
            return all(n.cluster_info().get("cluster_state") == "ok" for n in self.live_nodes())

        self._wait(promoted, timeout, f"a replica to take over from {victim.address}")
        return victim

    def restart(self, node: ClusterNode, timeout: float = 30.0) -> None:
        """Start a killed node again (its nodes.conf brings it back, as a replica if it was
        failed over) and wait for the cluster to be healthy."""
        node.start()
        self.wait_healthy(timeout)

    def reshard(
        self,
        slots: int,
        source: ClusterNode,
        target: ClusterNode,
        *,
        pipeline: int = 10,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Move `slots` slots (with their keys) from `source` to `target` with
        `redis-cli --cluster reshard`; MIGRATE moves `pipeline` keys at a time, so clients
        meet ASK and then MOVED while it runs."""
        cmd = [
            redis_cli_binary(),
            "--cluster", "reshard", self.live_nodes()[0].address,
            "--cluster-from", source.node_id(),
            "--cluster-to", target.node_id(),
            "--cluster-slots", str(slots),
            "--cluster-pipeline", str(pipeline),
            "--cluster-yes",
        ]  # fmt: skip
        if self.password is not None:
            cmd += ["-a", self.password, "--no-auth-warning"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster reshard failed:\n{done.stdout}{done.stderr}")
        return done


@contextmanager
def running_redis_cluster(**kwargs: Any) -> Iterator[RedisClusterProcess]:
    with RedisClusterProcess(**kwargs) as cluster:
        yield cluster
