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
from .noloss import Publisher, Subscriber, check, streaming, subscribed
from .test_cluster import (  # noqa: F401 (collected again here, on the cluster)
    test_a_broker_restarted_under_its_id_takes_back_its_stored_sessions,
    test_clean_start_on_b_discards_the_session_on_a,
    test_connect_on_b_takes_over_a_live_connection_on_a,
    test_duplicate_broker_id_is_refused,
    test_offline_session_survives_the_death_of_its_broker,
    test_publish_on_a_reaches_b_and_c_once_at_every_qos,
    test_retained_set_on_a_seen_on_b_cleared_on_b_gone_on_a,
    test_shared_subscription_across_brokers_delivers_each_message_once,
)
from .test_cluster import test_session_resumes_on_another_broker_with_what_was_queued as resumes
from .test_noloss import test_broker_kill_qos2_no_loss_no_duplicate  # noqa: F401


@pytest.fixture
def redis_server(redis_cluster: RedisClusterProcess) -> RedisClusterProcess:
    return redis_cluster


def test_session_resumes_on_another_broker_with_what_was_queued_v5(cluster_factory, clients):
    resumes(cluster_factory, clients, 5)  # one protocol version is enough here


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
        sub = subscribed(b, 4, 1)
        with streaming(a, sub, 1) as pub:
            fault(b_id)
            time.sleep(1.0)
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
    consumer group) while A forwards to it: ASK, then MOVED; nothing acknowledged is lost and
    no link drops."""
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
        # The brokers followed ASK and MOVED without dropping their links (topology.py).
        assert sum(b.metric("mcloudtt_cluster_link_losses_total") for b in brokers) == 0
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
    except BaseException:
        for broker in brokers:
            broker.stop()
            print(broker.output()[-6000:])
        raise
    finally:
        for broker in brokers:
            broker.stop()


def test_brokers_started_before_the_cluster_serve_locally_then_join(clients) -> None:
    """The retry pattern on a cluster: brokers given a seed list where nothing runs yet serve
    their own clients, keep trying (no node, then a cluster without every slot while it forms),
    and join once the cluster is up."""
    cluster = RedisClusterProcess()
    brokers = [start_broker(cluster.seeds_url, f"early{i}") for i in (1, 2)]
    try:
        sub = clients(brokers[0].port, "early-sub")
        sub.subscribe("local/#", qos=1)
        clients(brokers[0].port, "early-pub").publish("local/x", b"served", qos=1)
        assert sub.get().payload == b"served"
        assert brokers[0].http_get("/readyz")[0] == 503

        cluster.start()
        wait_ready(brokers, timeout=10.0)
        wait_until(lambda: brokers[1].metric("mcloudtt_cluster_remote_filters") >= 1)
        clients(brokers[1].port, "late-pub").publish("local/y", b"across", qos=1)
        assert sub.get().payload == b"across"
    finally:
        for b in brokers:
            b.stop()
        cluster.close()


def test_retained_messages_spread_over_the_shards(cluster_factory, clients, redis_cluster) -> None:
    """On a cluster the retained messages are kept in hashes by topic (`...:retained:{rN}`)
    on every shard, not in one hash; a broker that starts later loads them all."""
    (a,) = cluster_factory(1)
    publisher = clients(a.port, "retainer")
    for n in range(40):
        publisher.publish(f"spread/{n}", str(n).encode(), qos=1, retain=True)
    r = redis_cluster.client()
    keys = [f"mcloudtt:retained:{{r{n}}}" for n in range(16)]
    wait_until(lambda: sum(r.hlen(k) for k in keys) == 40, what="40 retained in Redis")
    assert not r.exists("mcloudtt:retained")
    holders = {redis_cluster.primary_for(k).port for k in keys if r.hlen(k)}
    assert len(holders) == 3, "every shard holds some"
    assert max(r.hlen(k) for k in keys) < 40 // 2

    (late,) = cluster_factory(1, ready=False)
    wait_until(lambda: late.http_get("/readyz")[0] == 200, 10.0, "the late broker ready")
    wait_until(lambda: late.metric("mcloudtt_retained_messages") == 40, what="loaded on start")
    sub = clients(late.port, "late-sub")
    sub.subscribe("spread/#", qos=1)
    assert sorted(int(m.payload) for m in sub.get_n(40)) == list(range(40))
