from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcloudtt_chaos.procs import raise_nofile_limit
from mcloudtt_chaos.watchdog import guard

sys.path.insert(0, str(Path(__file__).parent))

from broker.mqttraw import RawClient
from brokerproc import TARGET, BrokerProcess, broker_pool
from rediscluster import RedisClusterProcess
from redisproc import RedisProcess


def pytest_configure(config: pytest.Config) -> None:
    # The chaos tests run fault proxies and workload clients in this process (two descriptors
    # per proxied link); the brokers started by tests inherit the raised limit too.
    raise_nofile_limit(1 << 20)
    # Whatever the tests start dies with this process, even when it is SIGKILLed and runs no
    # teardown: brokers, Redis nodes, CLIs started with a bare Popen, xdist workers and theirs.
    guard()


@pytest.fixture
def uid(request: pytest.FixtureRequest) -> str:
    """A short id unique to this test, for client ids and topic roots."""
    return "t" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]


@pytest.fixture
def raw() -> Iterator[Callable[..., RawClient]]:
    """`raw(port, version=5, ...)`: a raw-socket MQTT connection closed at teardown."""
    made: list[RawClient] = []

    def make(port: int, **kw: Any) -> RawClient:
        c = RawClient(port, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def broker() -> Iterator[BrokerProcess]:
    """A fresh broker with default options on free ports."""
    b = BrokerProcess().start()
    yield b
    b.stop()


@pytest.fixture
def broker_factory() -> Iterator[Callable[..., BrokerProcess]]:
    """Start brokers with extra command-line options: `broker_factory("--max-keepalive", "10")`."""
    with broker_pool() as start_broker:

        def start(*args: str, env: dict[str, str] | None = None) -> BrokerProcess:
            if TARGET == "mosquitto" and args:
                pytest.skip("option specific to mcloudtt-broker")
            return start_broker(*args, env=env)

        yield start


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    """A fresh redis-server on a free port; `kill()`, `restart()` and `url` for fault tests."""
    with RedisProcess() as server:
        yield server


@pytest.fixture(scope="session")
def _shared_redis_cluster() -> Iterator[RedisClusterProcess]:
    with RedisClusterProcess() as cluster:  # some seconds to form: once per session
        yield cluster


@pytest.fixture
def redis_cluster(_shared_redis_cluster: RedisClusterProcess) -> RedisClusterProcess:
    """A real Redis Cluster (3 primaries, 3 replicas) shared by the session, emptied for each
    test. Tests that kill nodes or move slots take `fresh_redis_cluster` instead."""
    cluster = _shared_redis_cluster
    cluster.wait_healthy()
    for node, _ in cluster.shards():
        with node.client() as r:
            r.flushall()
    return cluster


@pytest.fixture
def fresh_redis_cluster() -> Iterator[RedisClusterProcess]:
    """A Redis Cluster of its own, for a test that kills primaries or reshards."""
    with RedisClusterProcess() as cluster:
        yield cluster
