"""The cluster's tests on a real Redis Cluster (3 primaries, 3 replicas) instead of one Redis.

The tests of the other modules imported here run again with `redis_server` standing for the
cluster (its `url` is one node's, as Memorystore's discovery endpoint): the brokers find the
shards themselves.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import pytest
from brokerproc import BrokerProcess
from rediscluster import RedisClusterProcess, slot_of

from .conftest import start_broker, wait_ready, wait_until
from .test_cluster import (  # noqa: F401 (collected again here, on the cluster)
    test_a_client_of_a_dead_broker_resumes_its_session_elsewhere,
    test_clean_start_on_b_discards_the_session_on_a,
    test_connect_on_b_takes_over_a_live_connection_on_a,
    test_offline_session_survives_the_death_of_its_broker,
    test_publish_on_a_reaches_b_and_c_once_at_every_qos,
    test_retained_set_on_a_seen_on_b_cleared_on_b_gone_on_a,
    test_session_resumes_on_another_broker_with_what_was_queued,
    test_shared_subscription_across_brokers_delivers_each_message_once,
)
from .test_noloss import TOPIC, Publisher, Subscriber, check, received


@pytest.fixture
def redis_server(redis_cluster: RedisClusterProcess) -> RedisClusterProcess:
    return redis_cluster


# ------------------------------------------------------------------ topology changes under load


def broker_id_in(first_slot: int, width: int, stem: str) -> str:
    """A broker id whose keys (`...:{id}`) hash into [first_slot, first_slot + width)."""
    return next(
        f"{stem}{i}"
        for i in itertools.count()
        if first_slot <= slot_of(f"{stem}{i}") < first_slot + width
    )


def run_under_load(
    cluster: RedisClusterProcess, fault: Callable[[str], None], *extra: str
) -> tuple[Publisher, Subscriber, list[BrokerProcess]]:
    """QoS 1 from a publisher on A to a persistent subscriber on B, whose inbox is in the first
    slots of the first shard; `fault(b_id)` while the messages flow."""
    (_, ranges), *_ = cluster.shards()
    b_id = broker_id_in(ranges[0][0], 400, "sink")
    brokers = [
        start_broker(cluster.seeds_url, "src", *extra),
        start_broker(cluster.seeds_url, b_id, *extra),
    ]
    a, b = brokers
    try:
        wait_ready(brokers)
        sub = Subscriber(4)
        sub.connect(b.port)
        assert sub.client is not None
        sub.client.subscribe(TOPIC, 1)
        wait_until(lambda: a.metric("mcloudtt_cluster_remote_filters") >= 1, 5.0, "routing")
        pub = Publisher(a.port, 1)
        pub.start()
        try:
            wait_until(lambda: len(sub.got) > 200, 10.0, "deliveries before the fault")
            fault(b_id)
            time.sleep(1.0)
        finally:
            pub.finish()
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline and not pub.acked <= set(received(sub)):
            time.sleep(0.05)
        sub.drop()
    except BaseException:
        for broker in brokers:
            broker.stop()
            print(broker.output()[-3000:])
        raise
    return pub, sub, brokers


def test_slot_migration_under_qos1_load_loses_nothing(
    fresh_redis_cluster: RedisClusterProcess,
) -> None:
    """`redis-cli --cluster reshard` moves the slot of B's inbox (with its pending entries and
    consumer group) while A forwards to it: ASK, then MOVED; nothing acknowledged is lost."""
    cluster = fresh_redis_cluster
    (source, _), (target, _), _ = cluster.shards()
    moved: list[str] = []

    def reshard(b_id: str) -> None:
        cluster.reshard(800, source, target, pipeline=5)
        moved.append(b_id)

    pub, sub, brokers = run_under_load(cluster, reshard)
    try:
        assert cluster.primary_for(f"mcloudtt:inbox:{{{moved[0]}}}") is target
        check(pub, sub, 1)
        assert len(pub.acked) > 300
        # The brokers followed the slot map (a MOVED reconnects the link).
        assert sum(b.metric("mcloudtt_cluster_link_losses_total") for b in brokers) >= 1
    finally:
        for broker in brokers:
            broker.stop()


def test_primary_killed_under_qos1_load_loses_no_acknowledged_message(
    fresh_redis_cluster: RedisClusterProcess,
) -> None:
    """SIGKILL of the primary that holds B's inbox: its replica is promoted (node timeout 1 s),
    the brokers reconnect to the new topology and the origin resends what B never confirmed
    (the promoted replica may not have had the last writes): 0 acknowledged messages lost."""
    cluster = fresh_redis_cluster
    killed = []

    def kill(b_id: str) -> None:
        killed.append(cluster.kill_primary(b_id))

    pub, sub, brokers = run_under_load(cluster, kill, "--presence-ttl", "5")
    try:
        assert killed and not killed[0].alive()
        check(pub, sub, 1)
        assert len(pub.acked) > 300
        assert all(b.metric("mcloudtt_cluster_link_up") == 1 for b in brokers)
    finally:
        for broker in brokers:
            broker.stop()
