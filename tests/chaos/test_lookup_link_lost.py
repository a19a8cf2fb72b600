"""What `reconnect-storm` found under load, on the `local` backend's real parts (real
redis-server behind the chaos FaultProxy, real broker processes, a raw MQTT client and paho).

A CONNECT looks for its session in the cluster; the broker's link to Redis breaks while it
looks (under load, a heartbeat past its deadline takes the link down with every look-up in
flight). The session is still on its old broker with what was queued for it: the client must be
sent to retry (CONNACK 3, Server unavailable), not given a fresh session that leaves the old one
and its messages behind. Before the fix: 505 storm clients (half the storm) started afresh in
one run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker.clients import PahoClient
from broker.mqttraw import CONNACK, RawClient
from broker.mqttraw import connect as connect_packet
from mcloudtt_chaos.backends.local import LocalBackend
from mcloudtt_chaos.procs import scrape, wait_for

from .localpair import local_pair, port

pytest.importorskip("paho.mqtt")

QUEUED = 5


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalBackend]:
    with local_pair(tmp_path, presence_ttl_s=10.0) as backend:  # b1 frozen is not b1 dead
        yield backend


def _redis_link(cluster: LocalBackend, broker: str, op: str) -> None:
    command: dict[str, Any] = {"op": op}
    cluster._proxy_call(cluster.redis_proxies[broker], command)


def test_a_link_lost_while_a_connect_looks_for_its_session_sends_the_client_to_retry(
    cluster: LocalBackend,
) -> None:
    b0_http = {e.name: e for e in cluster.endpoints()}["b0"].http_port
    sub = PahoClient(port(cluster, "b1"), "ll-sub", version=4, clean=False)
    assert sub.subscribe("ll/#", qos=1) == [1]
    sub.kill()  # offline on b1: what comes for it is queued there
    pub = PahoClient(port(cluster, "b0"), "ll-pub", version=4)
    try:
        wait_for(
            lambda: scrape(b0_http).value("mcloudtt_cluster_remote_filters") >= 1,
            timeout=10.0,
            what="b0 to route ll/# to b1",
        )
        for n in range(QUEUED):
            pub.publish("ll/t", f"m{n}".encode(), qos=1)
    finally:
        pub.stop()
    time.sleep(0.3)  # forwarded to b1 and queued in the session
    cluster.freeze_broker("b1")  # its hand-over answer does not come: b0's look-up goes on
    try:
        raw = RawClient(port(cluster, "b0"), version=4, timeout=20.0)
        try:
            raw.send(connect_packet("ll-sub", version=4, clean=False))
            time.sleep(0.5)
            _redis_link(cluster, "b0", "reset_peer")  # every Redis call of b0 fails from here
            ack = raw._await(CONNACK)
            assert ack.code == 3, f"a fresh session in place of the one on b1: {ack!r}"
        finally:
            raw.close()
    finally:
        _redis_link(cluster, "b0", "normal")
        cluster.thaw_broker("b1")
    wait_for(lambda: cluster.readyz("b0")[0] == 200, timeout=20.0, what="b0 back on Redis")
    # The client's retry finds its session, with what was queued for it.
    back = PahoClient(port(cluster, "b0"), "ll-sub", version=4, clean=False)
    try:
        assert back.session_present
        assert [m.payload for m in back.get_n(QUEUED)] == [f"m{n}".encode() for n in range(QUEUED)]
    finally:
        back.stop()
