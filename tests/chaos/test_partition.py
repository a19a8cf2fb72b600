"""The `partition` scenario's two promises, on the `local` backend's real parts: real
redis-server behind the chaos FaultProxy, real broker processes, real paho clients.

- A broker cut from Redis (the link held, not refused: it learns of the cut only by its own
  timeouts) keeps serving its local clients: a new client's CONNECT, SUBSCRIBE and QoS 1
  round trip take about a heartbeat, not Redis's 5 s socket timeout.
- A broker cut from its clients (it still reaches Redis): a persistent client that reconnects
  to another broker gets its session there, with what was queued for it on the cut one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker.clients import PahoClient
from mcloudtt_chaos.backend import ClusterSpec
from mcloudtt_chaos.backends.local import LocalBackend
from mcloudtt_chaos.procs import wait_for

pytest.importorskip("paho.mqtt")

PRESENCE_TTL_S = 3.0  # as the partition scenario's --presence-ttl
# A black-holed link is noticed within a heartbeat interval (TTL/5) and its deadline (two
# intervals): 1.8 s here; the bound leaves room for a loaded machine, and stays well under the
# 5 s socket timeout a CONNECT waited for before.
SERVED_WITHIN_S = 3.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalBackend]:
    backend = LocalBackend(tmp_path)
    try:
        backend.setup(ClusterSpec(brokers=2, broker_args=("--presence-ttl", f"{PRESENCE_TTL_S:g}")))
        for broker in ("b0", "b1"):
            wait_for(
                lambda b=broker: backend.readyz(b)[0] == 200, timeout=10.0, what=f"{broker} ready"
            )
        yield backend
    finally:
        backend.teardown()


def port(backend: LocalBackend, broker: str) -> int:
    return {e.name: e for e in backend.endpoints()}[broker].mqtt_port


@pytest.mark.parametrize("version", [3, 4, 5], ids=["3.1", "3.1.1", "5.0"])
def test_a_broker_cut_from_redis_serves_a_new_local_client_at_once(
    cluster: LocalBackend, version: int
) -> None:
    cluster.cut_from_redis("b0")
    start = time.monotonic()
    client = PahoClient(port(cluster, "b0"), f"cut-{version}", version=version)
    try:
        assert client.reason == 0
        client.subscribe("local/t", qos=1)
        client.publish("local/t", b"ping", qos=1)  # waits for the PUBACK
        assert client.get().payload == b"ping"
        took = time.monotonic() - start
    finally:
        client.stop()
    assert took < SERVED_WITHIN_S, f"CONNECT..delivery took {took:.2f}s while cut from Redis"
    cluster.heal("b0")
    wait_for(lambda: cluster.readyz("b0")[0] == 200, timeout=10.0, what="b0 ready after the heal")


def test_a_broker_cut_from_redis_keeps_serving_its_connected_clients(
    cluster: LocalBackend,
) -> None:
    client = PahoClient(port(cluster, "b0"), "connected", version=5)
    try:
        client.subscribe("local/c", qos=1)
        cluster.cut_from_redis("b0")
        for i in range(5):  # across the moment the broker notices the cut
            start = time.monotonic()
            client.publish("local/c", f"{i}", qos=1)
            assert client.get().payload == f"{i}".encode()
            assert time.monotonic() - start < 0.5, f"message {i} waited on Redis"
            time.sleep(0.5)
    finally:
        client.stop()


def test_a_broker_cut_from_its_clients_hands_their_sessions_to_where_they_reconnect(
    cluster: LocalBackend,
) -> None:
    device = PahoClient(port(cluster, "b1"), "device", version=5, session_expiry=300)
    publisher = PahoClient(port(cluster, "b0"), "pub", version=5)
    try:
        assert device.subscribe("dev/q", qos=1) == [1]
        wait_for(
            lambda: cluster.readyz("b0")[0] == 200 and _routes_to(publisher, device, "dev/q"),
            timeout=10.0,
            what="b0 to route dev/q to b1",
        )
        cluster.cut_from_clients("b1")
        # While the device cannot reach its broker, what is published for it queues there.
        for i in range(10):
            publisher.publish("dev/q", f"m{i}", qos=1)
        device.kill()  # its old connection hangs in the cut; it gives up on it
        # It reconnects through the load balancer, to b0: the session comes from the cut b1
        # (which still reaches Redis), with the ten messages.
        again = PahoClient(
            port(cluster, "b0"), "device", version=5, clean=False, session_expiry=300
        )
        try:
            assert again.session_present, "the session stayed on the cut broker"
            want = {f"m{i}".encode() for i in range(10)}
            got: set[bytes] = set()
            while not want <= got:  # (a routing probe in flight at the cut may come again)
                got.add(again.get().payload)
        finally:
            again.stop()
    finally:
        publisher.stop()
        device.stop()
        cluster.heal("b1")


def _routes_to(publisher: PahoClient, device: PahoClient, topic: str) -> bool:
    """One QoS 1 probe through the cluster: True once it reached the device."""
    publisher.publish(topic, b"probe", qos=1)
    try:
        return device.get(timeout=0.5).payload == b"probe"
    except AssertionError:
        return False
