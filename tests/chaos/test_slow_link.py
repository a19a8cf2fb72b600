"""What `slow-link` on netns found, on the `local` backend's real parts: real redis-server
behind the chaos FaultProxy, real broker processes, real paho clients.

A broker away from Redis past its presence TTL (there: a reconnect through a slow link that
took longer than the TTL) has its sessions adopted; the adopter replays its inbox, shared
groups' records included (to a member of its own). When the broker rejoins, its inbox still
holds those records: it must not deliver or pass them on again.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from broker.clients import PahoClient
from mcloudtt_chaos.backends.local import LocalBackend
from mcloudtt_chaos.procs import scrape, wait_for

from .localpair import local_pair, port

pytest.importorskip("paho.mqtt")

PRESENCE_TTL_S = 3.0
GROUP_FILTER = "$share/g/sl/t"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalBackend]:
    with local_pair(tmp_path, PRESENCE_TTL_S) as backend:
        yield backend


def _drain(client: PahoClient, into: Counter[bytes], quiet: float = 0.5) -> None:
    while True:
        try:
            into[client.get(timeout=quiet).payload] += 1
        except AssertionError:
            return


def test_a_rejoining_broker_does_not_pass_on_shared_records_its_adopter_replayed(
    cluster: LocalBackend,
) -> None:
    """b1 publishes QoS 2 to a shared group with a member on each broker; b0 (member m1, a
    persistent session) is cut from Redis, so b1 writes every other message into b0's inbox.
    b1 adopts b0's sessions and replays that inbox: each record goes to one member. When b0
    rejoins and gives m1 up, it must not hand the same records to a member again (MQTT-4.8.2-2:
    a shared subscription's message goes to one session; QoS 2 exactly once, MQTT-4.3.3-2)."""
    m1 = PahoClient(port(cluster, "b0"), "sl-m1", version=5, clean=False, session_expiry=300)
    m1.c.reconnect_delay_set(60, 60)  # it comes back to b1 below, as a load balancer would
    m0 = PahoClient(port(cluster, "b1"), "sl-m0", version=5)
    pub = PahoClient(port(cluster, "b1"), "sl-pub", version=5)
    again: PahoClient | None = None
    got: Counter[bytes] = Counter()
    try:
        assert m1.subscribe(GROUP_FILTER, qos=2) == [2]
        assert m0.subscribe(GROUP_FILTER, qos=2) == [2]

        def both_members() -> bool:
            pub.publish("sl/t", b"probe", qos=2)
            _drain(m0, got, quiet=0.2)
            _drain(m1, got, quiet=0.2)
            return got[b"probe"] >= 2

        wait_for(both_members, timeout=10.0, what="b1 to route the group to both brokers")
        assert cluster.redis is not None
        stored = redis.Redis(port=cluster.redis.port)
        wait_for(
            lambda: stored.hexists("mcloudtt:sessions:{b0}", "sl-m1"),
            timeout=10.0,
            what="b0 to store sl-m1's session",
        )
        stored.close()
        cluster.cut_from_redis("b0")
        sent = [f"m{i}".encode() for i in range(40)]
        for payload in sent:  # about half of them for b0's member, into its inbox
            pub.publish("sl/t", payload, qos=2)
        http = {e.name: e for e in cluster.endpoints()}["b1"].http_port
        wait_for(
            lambda: scrape(http).value("mcloudtt_cluster_sessions_adopted_total") >= 1,
            timeout=PRESENCE_TTL_S + 10.0,
            what="b1 to adopt b0's sessions",
        )
        cluster.heal("b0")
        assert m1.disconnected.wait(20.0), "b0 kept the session b1 adopted"
        m1.c.loop_stop()
        _drain(m1, got, quiet=0.1)
        again = PahoClient(port(cluster, "b1"), "sl-m1", version=5, clean=False, session_expiry=300)
        wait_for(lambda: cluster.readyz("b0")[0] == 200, timeout=10.0, what="b0 rejoined")
        deadline = time.monotonic() + 3.0  # b0's inbox reader has had its backlog by then
        while time.monotonic() < deadline:
            _drain(m0, got, quiet=0.2)
            _drain(again, got, quiet=0.2)
        twice = sorted(p for p in sent if got[p] > 1)
        lost = sorted(p for p in sent if got[p] == 0)
        assert not twice, f"shared records delivered twice after b0 rejoined: {twice}"
        assert not lost, f"lost: {lost}"
    finally:
        if again is not None:
            again.stop()
        m1.kill()
        m0.stop()
        pub.stop()
        cluster.heal("b0")
