"""What `slow-link` on netns found, on the `local` backend's real parts: real redis-server behind
the chaos FaultProxy, real broker processes, real paho clients.

A broker whose Redis link breaks reconnects through a slow link. Its reconnect (connect, probe,
PING, its outbox written, its id claimed, its table announced) is many round trips, and its
presence is refreshed only when it claims its id: while that comes before peers give up on its
presence (its TTL and their grace), nobody adopts its sessions and it keeps serving them. The
claim is one script with the adoption lock's check (`Membership._rejoin`): a peer that took the
lock first makes it give its sessions up, never serve them next to their adopter.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker.clients import PahoClient
from mcloudtt_chaos.backend import LinkFault
from mcloudtt_chaos.backends.local import LocalBackend
from mcloudtt_chaos.procs import scrape, wait_for

from .localpair import local_pair, port

pytest.importorskip("paho.mqtt")

PRESENCE_TTL_S = 10.0  # the default
LATENCY_MS = 600  # each way: a 1.2 s round trip


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalBackend]:
    with local_pair(tmp_path, PRESENCE_TTL_S) as backend:
        yield backend


def break_into_slow_link(cluster: LocalBackend, broker: str) -> None:
    """Every connection of the broker to Redis reset; what it opens next crosses a slow link."""
    proxy = cluster.redis_proxies[broker]

    async def reset_into_latency() -> None:
        proxy.latency(LATENCY_MS)
        proxy._drop_all(reset=True)

    assert cluster._loop is not None
    cluster._loop.run(reset_into_latency())


def test_a_broker_reconnecting_through_a_slow_link_keeps_its_sessions(
    cluster: LocalBackend,
) -> None:
    """b0's connections to Redis are reset and what it opens next has a 1.2 s round trip (its
    reconnect takes about twice its presence TTL). b0 rejoins; nobody adopts its sessions, and
    its persistent subscriber stays connected and gets what b1's publisher sends."""
    sub = PahoClient(port(cluster, "b0"), "sr-sub", version=5, clean=False, session_expiry=300)
    pub = PahoClient(port(cluster, "b1"), "sr-pub", version=5)
    try:
        assert sub.subscribe("sr/t", qos=1) == [1]

        def routed(payload: bytes) -> bool:
            pub.publish("sr/t", payload, qos=1)
            try:
                return sub.get(timeout=0.5).payload == payload
            except AssertionError:
                return False

        wait_for(lambda: routed(b"before"), timeout=10.0, what="b1 to route sr/t to b0")
        break_into_slow_link(cluster, "b0")
        wait_for(lambda: cluster.readyz("b0")[0] != 200, timeout=10.0, what="b0 to notice")
        wait_for(
            lambda: cluster.readyz("b0")[0] == 200,
            timeout=3 * PRESENCE_TTL_S,
            what="b0 to rejoin through the slow link",
        )
        cluster.degrade_redis_link("b0", LinkFault(latency_ms=0))
        wait_for(lambda: routed(b"after"), timeout=10.0, what="deliveries to b0 again")
        time.sleep(PRESENCE_TTL_S)  # an adoption and b0's surrender would have come by now
        assert not sub.disconnected.is_set(), "b0 gave its subscriber's session up"
        b1 = {e.name: e for e in cluster.endpoints()}["b1"].http_port
        assert scrape(b1).value("mcloudtt_cluster_sessions_adopted_total") == 0
        assert "left the cluster" not in cluster.log("b1")
        assert "declared dead" not in cluster.log("b0")
    finally:
        cluster.degrade_redis_link("b0", LinkFault(latency_ms=0))
        cluster.heal("b0")
        sub.stop()
        pub.stop()
