"""The `partition` scenario's two promises, on the `local` backend's real parts: real
redis-server behind the chaos FaultProxy, real broker processes, real paho clients.

- A broker cut from Redis (the link held, not refused: it learns of the cut only by its own
  timeouts) keeps serving its local clients: a new client's CONNECT, SUBSCRIBE and QoS 1
  round trip take about a heartbeat, not Redis's 5 s socket timeout.
- A broker cut from its clients (it still reaches Redis): a persistent client that reconnects
  to another broker gets its session there, with what was queued for it on the cut one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from broker.clients import PahoClient
from mcloudtt_chaos.backends.local import LocalBackend
from mcloudtt_chaos.faultproxy import FaultProxy
from mcloudtt_chaos.procs import scrape, wait_for

from .localpair import local_pair, port

pytest.importorskip("paho.mqtt")

PRESENCE_TTL_S = 3.0  # as the partition scenario's --presence-ttl
# A black-holed link is noticed within a heartbeat interval (TTL/5) and its deadline (two
# intervals): 1.8 s here; the bound leaves room for a loaded machine, and stays well under the
# 5 s socket timeout a CONNECT waited for before.
SERVED_WITHIN_S = 3.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalBackend]:
    with local_pair(tmp_path, PRESENCE_TTL_S) as backend:
        yield backend


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


def test_a_rejoining_broker_writes_what_it_acknowledged_before_giving_up_its_sessions(
    cluster: LocalBackend,
) -> None:
    """b0 is cut from Redis past its presence TTL: b1 adopts its sessions while b0 still
    PUBACKs its publisher locally, holding the messages for b1's subscriber in its outbox.
    When b0 rejoins it gives the adopted sessions up (the publisher is disconnected and
    reconnects to b1). What b0 acknowledged must reach the subscriber before what the
    publisher sends next through b1 (MQTT-4.6.0-5: order per publisher and topic), also when
    b0's link is slow after the heal (every round trip 300 ms)."""
    sub = PahoClient(port(cluster, "b1"), "rj-sub", version=5, session_expiry=300)
    pub = PahoClient(port(cluster, "b0"), "rj-pub", version=5, session_expiry=300)
    # No automatic reconnect to b0: the test reconnects it to b1, as a load balancer would.
    pub.c.reconnect_delay_set(60, 60)
    again: PahoClient | None = None
    try:
        assert sub.subscribe("rj/t", qos=1) == [1]
        wait_for(
            lambda: cluster.readyz("b0")[0] == 200 and _routes_to(pub, sub, "rj/t"),
            timeout=10.0,
            what="b0 to route rj/t to b1",
        )
        assert cluster.redis is not None
        stored = redis.Redis(port=cluster.redis.port)
        wait_for(  # b0 stored the session: b1 can adopt it
            lambda: stored.hexists("mcloudtt:sessions:{b0}", "rj-pub"),
            timeout=10.0,
            what="b0 to store rj-pub's session",
        )
        stored.close()
        cluster.cut_from_redis("b0")
        http = {e.name: e for e in cluster.endpoints()}["b1"].http_port
        wait_for(
            lambda: scrape(http).value("mcloudtt_cluster_sessions_adopted_total") >= 1,
            timeout=PRESENCE_TTL_S + 10.0,
            what="b1 to adopt b0's sessions",
        )
        for i in range(10):  # PUBACKed by b0 alone, while it cannot reach Redis
            pub.publish("rj/t", f"m{i}", qos=1)
        _heal_slowly(cluster, "b0", latency_ms=150.0)
        assert pub.disconnected.wait(20.0), "b0 kept the session b1 adopted"
        pub.c.loop_stop()
        again = PahoClient(
            port(cluster, "b1"), "rj-pub", version=5, clean=False, session_expiry=300
        )
        for i in range(5):
            again.publish("rj/t", f"n{i}", qos=1)
        got: list[str] = []
        while not {"m9", "n4"} <= set(got):
            payload = sub.get().payload.decode()
            if payload != "probe":
                got.append(payload)
        first_new = got.index("n0")
        late = [m for m in got[first_new:] if m.startswith("m")]
        assert not late, f"acknowledged by b0, overtaken by the publisher's later ones: {late}"
        assert got[:first_new] == [f"m{i}" for i in range(10)]
    finally:
        if again is not None:
            again.stop()
        pub.kill()
        sub.stop()
        cluster.heal("b0")


def _heal_slowly(backend: LocalBackend, broker: str, latency_ms: float) -> None:
    """Lift the cut from Redis and add latency in one step (no fast moment in between)."""
    proxy = backend.redis_proxies[broker]

    async def heal(proxy: FaultProxy) -> None:
        proxy.normal()
        proxy.latency(latency_ms)

    assert backend._loop is not None
    backend._loop.run(heal(proxy))


def test_a_session_handed_over_gets_its_old_brokers_own_messages_once(
    cluster: LocalBackend,
) -> None:
    """A publisher on b1 streams QoS 2 to a topic that an offline persistent session on b1 and
    an online subscriber on b0 both have: each message is queued for the session on b1 and
    forwarded to b0. The session's client reconnects to b0 (a live hand-over): what b1 had
    queued comes in the snapshot, and b0's inbox must not deliver b1's records of the same
    messages to it again, also those still in b0's inbox while the hand-over drained
    (MQTT-4.3.3-2: QoS 2 exactly once)."""
    watcher = PahoClient(port(cluster, "b0"), "ho-watch", version=5)
    pub = PahoClient(port(cluster, "b1"), "ho-pub", version=5)
    try:
        assert watcher.subscribe("ho/t", qos=2) == [2]
        wait_for(
            lambda: cluster.readyz("b1")[0] == 200 and _routes_to(pub, watcher, "ho/t"),
            timeout=10.0,
            what="b1 to route ho/t to b0",
        )
        sent = 0
        twice: list[bytes] = []
        for round_ in range(5):
            device = PahoClient(
                port(cluster, "b1"), "ho-dev", version=5, clean=False, session_expiry=300
            )
            if round_ == 0:
                assert device.subscribe("ho/t", qos=2) == [2]
            device.kill()  # offline on b1: what b1's publisher sends is queued there
            stop = threading.Event()

            def stream(stop: threading.Event = stop) -> None:
                nonlocal sent
                while not stop.is_set():
                    sent += 1
                    pub.publish("ho/t", f"{sent}", qos=2, wait=False)
                    time.sleep(0.001)

            streamer = threading.Thread(target=stream)
            streamer.start()
            time.sleep(0.05)
            again = PahoClient(
                port(cluster, "b0"), "ho-dev", version=5, clean=False, session_expiry=300
            )
            time.sleep(0.05)
            stop.set()
            streamer.join()
            time.sleep(0.3)
            again.disconnect()
            seen: set[bytes] = set()
            while not again.messages.empty():
                payload = again.messages.get().payload
                if payload in seen and payload != b"probe":
                    twice.append(payload)
                seen.add(payload)
        assert not twice, f"QoS 2 delivered twice to the handed-over session: {twice}"
    finally:
        pub.stop()
        watcher.stop()
