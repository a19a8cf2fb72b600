"""What `broker-restart-same-id` found, on the `local` backend's real parts: real redis-server
behind the chaos FaultProxy, real broker processes, real paho clients.

A broker restarted under its id takes its previous run's persistent sessions back only once it
reaches Redis; until then it serves new clients locally (the retry pattern). A will published
by one of those clients meanwhile found neither the sessions (not back yet) nor a route (no
table yet): kept for the table, it went to the other brokers only, and a watcher whose session
was on the restarted broker never got it. It is delivered to the sessions taken back too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from broker.clients import PahoClient
from mcloudtt_chaos.backends.local import LocalBackend
from mcloudtt_chaos.procs import wait_for

from .localpair import local_pair, port

pytest.importorskip("paho.mqtt")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalBackend]:
    with local_pair(tmp_path, presence_ttl_s=10.0) as backend:
        yield backend


def test_a_will_published_before_a_restart_reached_redis_reaches_its_restored_watcher(
    cluster: LocalBackend,
) -> None:
    """The watcher (a persistent session) is on b1; b1 is SIGKILLed and started again under
    its id while its link to Redis is held; a client connects to it, and drops without
    DISCONNECT. Once b1 reaches Redis and the watcher comes back (to b0, as a device behind a
    load balancer may), the will is there, once; and so is, once, the will b1's restart
    published from its previous run's store."""
    watcher = PahoClient(
        port(cluster, "b1"), "rw-watch", version=5, clean=False, session_expiry=300
    )
    watcher.c.reconnect_delay_set(60, 60)
    again: PahoClient | None = None
    try:
        assert watcher.subscribe("rw/will/#", qos=1) == [1]
        # Its will is stored with b1's sessions; b1's restart publishes it (the kill ended it).
        old = PahoClient(
            port(cluster, "b1"), "rw-old", version=4, will=("rw/will/rw-old", b"k", 1, False)
        )
        old.c.reconnect_delay_set(60, 60)
        assert cluster.redis is not None
        stored = redis.Redis(port=cluster.redis.port)
        wait_for(
            lambda: (
                stored.hexists("mcloudtt:sessions:{b1}", "rw-watch")
                and stored.hexists("mcloudtt:wills:{b1}", "rw-old")
            ),
            timeout=10.0,
            what="b1 to store the watcher's session",
        )
        stored.close()
        watcher.kill()
        cluster.kill_broker("b1")
        cluster.cut_from_redis("b1")
        cluster.start_broker("b1")  # serving, its Redis link held
        dropping = PahoClient(
            port(cluster, "b1"),
            "rw-dev",
            version=4,
            will=("rw/will/rw-dev", b"gone", 1, False),
        )
        dropping.kill()  # no DISCONNECT: its will is due, while b1 is away from Redis
        cluster.heal("b1")
        wait_for(lambda: cluster.readyz("b1")[0] == 200, timeout=20.0, what="b1 to join")
        again = PahoClient(
            port(cluster, "b0"), "rw-watch", version=5, clean=False, session_expiry=300
        )
        assert again.session_present
        wills = sorted((m.topic, m.payload) for m in again.get_n(2, timeout=10.0))
        assert wills == [("rw/will/rw-dev", b"gone"), ("rw/will/rw-old", b"k")]
        again.nothing_more(1.0, "more than the one will")
    finally:
        cluster.heal("b1")
        old.kill()
        if again is not None:
            again.stop()
