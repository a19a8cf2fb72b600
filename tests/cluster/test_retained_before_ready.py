"""Issue 11, found by the chaos harness (brokers-before-redis, invariant `retained_equal`): a
retained message a broker acknowledged while Redis was away reaches every broker once the
cluster is up, also the brokers that joined first and loaded the retained set before it was
written (real brokers, a real redis-server, paho clients)."""

from __future__ import annotations

import signal

import redis

from .conftest import wait_ready, wait_until


def test_retained_before_ready_reaches_brokers_that_loaded_retained_first(
    redis_server, cluster_factory, clients
):
    """A and B start before Redis; A acknowledges retained publishes (a set, a set then a
    clear). Redis comes while A is held back (SIGSTOP), so B joins and loads the retained set
    first; then A writes what it kept. B must serve A's retained messages as A does."""
    redis_server.stop()
    a, b = cluster_factory(2, ready=False)
    publisher = clients(a.port, "retainer")  # served locally, before Redis
    for i in range(3):
        publisher.publish(f"site/retained/{i}", f"v{i}".encode(), qos=1, retain=True)
    publisher.publish("site/retained/gone", b"x", qos=1, retain=True)
    publisher.publish("site/retained/gone", b"", qos=1, retain=True)  # MQTT-3.3.1-10
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        redis_server.restart()
        wait_until(lambda: b.http_get("/readyz")[0] == 200, 15.0, "B in the cluster")
        # B has loaded the (still empty) retained set.
        assert b.metric("mcloudtt_retained_messages") == 0
    finally:
        a.proc.send_signal(signal.SIGCONT)
    wait_ready([a, b], timeout=15.0)
    store = redis.Redis(port=redis_server.port)
    wait_until(lambda: store.hlen("mcloudtt:retained") == 3, 5.0, "A's retained in Redis")
    wait_until(
        lambda: b.metric("mcloudtt_retained_messages") == 3, 5.0, "A's retained messages on B"
    )
    late = clients(b.port, "late-b")
    late.subscribe("site/retained/#", qos=1)
    got = sorted((m.topic, m.payload, m.retain) for m in late.get_n(3))
    assert got == [(f"site/retained/{i}", f"v{i}".encode(), True) for i in range(3)]
