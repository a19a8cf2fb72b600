from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from broker.clients import PahoClient
from brokerproc import BrokerProcess
from mcloudtt_chaos.procs import scrape, wait_for
from redisproc import RedisProcess

CLUSTER_ARGS = ("--presence-ttl", "2", "--sys-interval", "0", "--redis-backoff-max", "0.5")


def wait_until(
    condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
) -> None:
    """`wait_for`, failing as an assertion (some tests expect a condition never to hold)."""
    try:
        wait_for(condition, timeout=timeout, what=what)
    except TimeoutError as error:
        raise AssertionError(str(error)) from None


def start_broker(redis_url: str, broker_id: str, *extra: str) -> BrokerProcess:
    return BrokerProcess("--redis", redis_url, "--id", broker_id, *CLUSTER_ARGS, *extra).start()


def wait_ready(brokers: list[BrokerProcess], timeout: float = 5.0) -> None:
    for b in brokers:
        wait_until(lambda b=b: b.http_get("/readyz")[0] == 200, timeout, f"{b.port} ready")
    for b in brokers:
        wait_until(
            lambda b=b: b.metric("mcloudtt_cluster_peers") == len(brokers) - 1,
            timeout,
            "every broker to see its peers",
        )


def wait_filters(brokers: list[BrokerProcess], at_least: int) -> None:
    """Wait until every broker's cluster table holds `at_least` remote filters."""
    for b in brokers:
        wait_until(
            lambda b=b: b.metric("mcloudtt_cluster_remote_filters") >= at_least,
            5.0,
            f"the cluster table on {b.port} to hold {at_least} remote filters",
        )


def deliver_across(a: BrokerProcess, b: BrokerProcess, topic: str, count: int = 20) -> None:
    """A QoS 1 subscriber on b gets, in order, what a publisher on a sends (TLS tests: the
    link works end to end)."""
    subscriber = PahoClient(b.port, f"sub-{topic}")
    publisher = PahoClient(a.port, f"pub-{topic}")
    try:
        assert subscriber.subscribe(f"{topic}/#", qos=1) == [1]
        wait_filters([a], at_least=1)
        for n in range(count):
            publisher.publish(f"{topic}/{n}", f"m{n}".encode(), qos=1)
        received = subscriber.get_n(count)
        assert [m.payload for m in received] == [f"m{n}".encode() for n in range(count)]
        assert {m.qos for m in received} == {1}
    finally:
        publisher.stop()
        subscriber.stop()


@pytest.fixture
def cluster_factory(redis_server: RedisProcess) -> Iterator[Callable[..., list[BrokerProcess]]]:
    started: list[BrokerProcess] = []

    def start(count: int, *extra: str, ready: bool = True) -> list[BrokerProcess]:
        brokers = [
            start_broker(redis_server.url, f"b{len(started) + i + 1}", *extra) for i in range(count)
        ]
        started.extend(brokers)
        if ready:
            wait_ready(brokers)
        return brokers

    yield start
    for b in started:
        try:
            interesting = [
                f"{name}{dict(labels) or ''} {value:g}"
                for (name, labels), value in scrape(b.http_port).items()
                if name.endswith("_total") and value
            ]
        except OSError as error:
            interesting = [f"/metrics unreachable: {error}"]
        code = b.stop()
        # Shown by pytest when the test failed: what each broker logged.
        print(f"--- broker {b.port} exited {code}", *interesting, b.output()[-4000:], sep="\n")


@pytest.fixture
def clients() -> Iterator[Callable[..., PahoClient]]:
    made: list[PahoClient] = []

    def make(port: int, client_id: str = "", **kwargs: object) -> PahoClient:
        client = PahoClient(port, client_id, **kwargs)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        client.stop()


class UserStore:
    """Where the tests of the Redis user store keep users: one Redis or a Redis Cluster."""

    def __init__(self, kind: str, url: str, store: Any, server: RedisProcess | None) -> None:
        self.kind = kind
        self.url = url  # the brokers' --redis
        self.store = store  # redis-py's client (the cluster client on a cluster)
        self.server = server  # one Redis only: a test may stop it

    @property
    def cluster(self) -> bool:
        return self.kind == "cluster"


@pytest.fixture(params=["single", "cluster"])
def user_store(request: pytest.FixtureRequest) -> Iterator[UserStore]:
    """The user store on one Redis, and on the session's Redis Cluster (3+3, emptied)."""
    import redis

    if request.param == "single":
        with RedisProcess() as server:
            store = redis.Redis.from_url(server.url)
            yield UserStore("single", server.url, store, server)
            store.close()
        return
    cluster = request.getfixturevalue("redis_cluster")
    store = cluster.client()
    yield UserStore("cluster", cluster.seed_url, store, None)
    store.close()
