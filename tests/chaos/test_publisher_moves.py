"""What `partition` on netns found, on the `local` backend's real parts: real redis-server behind
the chaos FaultProxy, real broker processes, real paho clients.

A publisher moves from broker b0 to broker b1, where its subscriber is. What b0 acknowledged
before the move reaches b1 through b1's inbox in Redis; what the publisher sends b1 after the
move is delivered there at once. b1 must not let the first ones overtake the others: the topic is
ordered per publisher (MQTT-4.6.0-6), also when the publisher changed brokers. b1's link to
Redis is slow here (30 ms each way), as a busy or distant Redis is, so that its inbox lags the
client by many round trips.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from broker.clients import PahoClient
from mcloudtt_chaos.backend import LinkFault
from mcloudtt_chaos.backends.local import LocalBackend
from mcloudtt_chaos.procs import wait_for

from .localpair import local_pair, port

pytest.importorskip("paho.mqtt")

PER_BROKER = 300


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalBackend]:
    with local_pair(tmp_path, presence_ttl_s=10.0) as backend:
        yield backend


def _burst(client: PahoClient, first: int, count: int) -> None:
    infos = [
        client.publish("pm/t", str(seq).encode(), qos=1, wait=False)
        for seq in range(first, first + count)
    ]
    for info in infos:
        info.wait_for_publish(10.0)
        assert info.is_published(), "a publish was not acknowledged"


@pytest.mark.parametrize("persistent", [False, True], ids=["clean", "persistent"])
def test_a_publisher_that_moves_keeps_its_order_for_a_subscriber_on_its_new_broker(
    cluster: LocalBackend, persistent: bool
) -> None:
    """Every message the publisher had acknowledged on b0 reaches the subscriber on b1 before
    the first one it publishes on b1 (b1 CONNACKs once its inbox was read past them), and none
    is lost."""
    sub = PahoClient(port(cluster, "b1"), "pm-sub", version=5)
    pub = PahoClient(
        port(cluster, "b0"), "pm-pub", version=5, clean=not persistent, session_expiry=300
    )
    moved: PahoClient | None = None
    try:
        assert sub.subscribe("pm/t", qos=1) == [1]

        def routed() -> bool:
            pub.publish("pm/t", b"probe", qos=1)
            try:
                return sub.get(timeout=0.3).payload == b"probe"
            except AssertionError:
                return False

        wait_for(routed, timeout=10.0, what="b0 to route pm/t to b1")
        while not sub.messages.empty():
            sub.messages.get()
        cluster.degrade_redis_link("b1", LinkFault(latency_ms=30))
        _burst(pub, 0, PER_BROKER)
        # The device comes back through the load balancer, to b1, before b0 noticed it left.
        pub.c.reconnect_delay_set(60, 60)
        moved = PahoClient(
            port(cluster, "b1"), "pm-pub", version=5, clean=not persistent, session_expiry=300
        )
        _burst(moved, PER_BROKER, PER_BROKER)
        got = [int(m.payload) for m in sub.get_n(2 * PER_BROKER, timeout=10.0)]
        overtaken = [(earlier, later) for earlier, later in pairwise(got) if later < earlier]
        assert not overtaken, f"out of order (first five): {overtaken[:5]}"
        assert got == list(range(2 * PER_BROKER))
    finally:
        cluster.degrade_redis_link("b1", LinkFault())
        if moved is not None:
            moved.stop()
        pub.kill()
        sub.stop()
