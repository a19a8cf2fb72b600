"""Issue 11, found by the chaos harness (brokers-before-redis at its full length): what a broker
acknowledged before the cluster was ready reaches the shared groups whose members are all on
brokers that joined the cluster after it (real brokers, a real redis-server, paho clients)."""

from __future__ import annotations

import signal
import time

from .conftest import wait_ready, wait_until
from .test_noloss import QUEUE, TOPIC, Publisher, Subscriber, received

GROUP = f"$share/g/{TOPIC}"


def test_publishes_before_ready_reach_a_group_whose_members_joined_later(
    redis_server, cluster_factory
):
    """A and B start before Redis; the group's only member is on B; A acknowledges QoS 1
    publishes for it while Redis is away. Redis comes, A loads the cluster table first (B is
    held back: SIGSTOP), so no member of the group is in A's table yet. When B's table comes,
    A gives the group what it kept, once: nothing A acknowledged is lost, nothing doubled."""
    redis_server.stop()
    a, b = cluster_factory(2, *QUEUE, ready=False)
    member = Subscriber(5)
    assert not member.connect(b.port)  # served locally, before Redis
    assert member.client is not None
    member.client.subscribe(GROUP, 1)
    pub = Publisher(a.port, 1)
    pub.start()
    time.sleep(1.0)
    pub.finish()  # every publish acknowledged by A, with nowhere to route it yet
    assert len(pub.acked) > 100
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)
    try:
        redis_server.restart()
        wait_until(lambda: a.http_get("/readyz")[0] == 200, 15.0, "A in the cluster")
        assert a.metric("mcloudtt_cluster_peers") == 0  # B's table is not there yet
        time.sleep(0.5)
    finally:
        b.proc.send_signal(signal.SIGCONT)
    wait_ready([a, b], timeout=15.0)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and not pub.acked <= set(received(member)):
        time.sleep(0.05)
    got = received(member)
    lost = sorted(pub.acked - set(got))
    assert not lost, f"{len(lost)} of {len(pub.acked)} acknowledged lost"
    assert len(got) == len(set(got)), "the group got a message twice"
