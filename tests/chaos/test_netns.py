"""The netns backend against the real thing: namespaces, veths and bridges made by iproute2, Redis
and brokers inside them, paho clients in the root namespace reaching them through the bridge."""

from __future__ import annotations

import ipaddress
import os
import queue
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from mcloudtt_chaos.backend import ClusterSpec, LinkFault
from mcloudtt_chaos.backends.netns import (
    HTTP_PORT,
    MQTT_PORT,
    NetnsBackend,
    cleanup_stale,
    unavailable_reason,
)
from mcloudtt_chaos.procs import scrape
from paho.mqtt.enums import CallbackAPIVersion

REASON = unavailable_reason()
# Every test but the first needs root and working network namespaces: one reason says why not.
needs_netns = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def test_the_reason_it_cannot_run_is_said(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with monkeypatch.context() as patch:
        patch.setenv("PATH", str(tmp_path))  # no iproute2
        patch.setattr(os, "geteuid", lambda: 0)
        assert "iproute2" in (unavailable_reason() or "")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert unavailable_reason() == (
        "the netns backend needs root (network namespaces, veth links, bridges)"
    )


def _leftovers(backend_or_id: NetnsBackend | str) -> list[str]:
    """Namespaces and links of one run still on the machine."""
    run_id = backend_or_id if isinstance(backend_or_id, str) else backend_or_id.run_id
    base = f"mctt{run_id}"
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [w for w in (names + links).replace("@", " ").replace(":", " ").split() if base in w]


def _two_brokers(workdir: Path, presence_ttl_s: float) -> Iterator[NetnsBackend]:
    """Two ready brokers in their namespaces; nothing of them left afterwards."""
    backend = NetnsBackend(workdir)
    try:
        backend.setup(ClusterSpec(brokers=2, broker_args=("--presence-ttl", f"{presence_ttl_s:g}")))
        for name in ("b0", "b1"):
            backend.wait_ready(name)
        yield backend
    finally:
        backend.teardown()
    assert _leftovers(backend) == []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsBackend]:
    yield from _two_brokers(tmp_path_factory.mktemp("netns"), 3.0)


class Client:
    """A paho client in the root namespace, messages collected in a queue."""

    def __init__(self, backend: NetnsBackend, broker: str, *, timeout: float = 5.0) -> None:
        self.messages: queue.Queue[bytes] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}"
        )
        self.client.connect_timeout = timeout
        self.client.on_message = lambda _c, _u, msg: self.messages.put(bytes(msg.payload))
        self.connected: queue.Queue[int] = queue.Queue()
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connected.put(rc.value)
        self.client.connect(backend.broker(broker).client_addr, MQTT_PORT, keepalive=30)
        self.client.loop_start()
        assert self.connected.get(timeout=timeout) == 0  # CONNACK: accepted

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _delivered(backend: NetnsBackend, source: str, target: str, *, timeout: float = 20.0) -> None:
    """A message published on `source` reaches a subscriber on `target` (through Redis)."""
    topic = f"netns/{uuid.uuid4().hex[:8]}"
    # A CONNECT waits for the session lookup in Redis, which a link just changed may still be
    # re-establishing: a longer CONNACK wait than the default.
    sub, pub = Client(backend, target, timeout=15.0), Client(backend, source, timeout=15.0)
    try:
        sub.client.subscribe(topic, qos=1)
        deadline = time.monotonic() + timeout
        # The subscription reaches the other broker through Redis: publish until it arrived.
        while time.monotonic() < deadline:
            pub.client.publish(topic, b"hello", qos=1).wait_for_publish(5)
            try:
                assert sub.messages.get(timeout=0.3) == b"hello"
                return
            except queue.Empty:
                continue
        raise AssertionError(f"nothing published on {source} reached {target} in {timeout}s")
    finally:
        sub.close()
        pub.close()


@needs_netns
def test_brokers_in_their_namespaces_serve_and_route_through_redis(cluster: NetnsBackend) -> None:
    endpoints = cluster.endpoints()
    assert [e.name for e in endpoints] == ["b0", "b1"]
    assert len({e.host for e in endpoints}) == 2  # each its own address
    assert cluster.subnet is not None
    assert all(ipaddress.ip_address(e.host) in cluster.subnet for e in endpoints)
    assert all(cluster.readyz(e.name) == (200, "ready\n") for e in endpoints)
    _delivered(cluster, "b0", "b1")


@needs_netns
def test_cut_from_redis_keeps_clients_and_heal_restores(cluster: NetnsBackend) -> None:
    cluster.cut_from_redis("b1")
    try:
        _, body = _wait_status(cluster, "b1", 503)
        assert "Redis" in body
        Client(cluster, "b1").close()  # its clients still reach it
    finally:
        cluster.heal("b1")
    cluster.wait_ready("b1")
    _delivered(cluster, "b0", "b1")


@needs_netns
def test_cut_from_clients_while_it_stays_ready_behind(cluster: NetnsBackend) -> None:
    cluster.cut_from_clients("b0")
    try:
        with pytest.raises(OSError):  # TimeoutError: the SYN goes nowhere
            Client(cluster, "b0", timeout=1.0)
        assert cluster.readyz("b0")[0] == 0
        assert cluster.readyz("b0", via="backplane") == (200, "ready\n")
        inside = cluster.exec_in(
            "b0", "curl", "-s", "-m", "3", f"http://127.0.0.1:{HTTP_PORT}/readyz"
        )
        assert inside.stdout == "ready\n"
    finally:
        cluster.heal("b0")
    cluster.wait_ready("b0")
    _delivered(cluster, "b0", "b1")


@needs_netns
def test_kill_and_restart_under_the_same_id(cluster: NetnsBackend) -> None:
    pid = cluster.broker("b1").process.pid
    assert (cluster.rss("b1") or 0) > 1_000_000
    cluster.kill_broker("b1")
    assert cluster.readyz("b1")[0] == 0 and cluster.rss("b1") is None
    cluster.start_broker("b1")
    assert cluster.broker("b1").process.pid != pid
    cluster.wait_ready("b1", timeout=40.0)  # its old presence may first have to expire
    assert cluster.endpoints()[1].host == cluster.broker("b1").client_addr
    _delivered(cluster, "b1", "b0")
    assert "broker b1 ready" in cluster.log("b1")


@needs_netns
def test_redis_killed_restarted_and_a_broker_frozen(cluster: NetnsBackend) -> None:
    cluster.kill_redis()
    _wait_status(cluster, "b0", 503)
    cluster.restart_redis(keep_data=True)  # same namespace, address and data directory
    cluster.wait_ready("b0")
    cluster.freeze_broker("b0")
    try:
        assert cluster.readyz("b0")[0] == 0  # SIGSTOPped: nothing answers
    finally:
        cluster.thaw_broker("b0")
    cluster.wait_ready("b0")
    _delivered(cluster, "b0", "b1")


@needs_netns
def test_degraded_link_goes_through_a_proxy_in_the_namespace(cluster: NetnsBackend) -> None:
    fast = _delivery_time(cluster, "b0", "b1")
    cluster.degrade_redis_link("b1", LinkFault(latency_ms=150, jitter_ms=10, slice_bytes=512))
    b1 = cluster.broker("b1")
    try:
        assert b1.proxy is not None and b1.proxy.alive() and not b1.tbf
        toxics = cluster.proxy_state("b1")["toxics"]["downstream"]
        assert (toxics["latency_s"], toxics["jitter_s"], toxics["slice_size"]) == (0.15, 0.01, 512)
        # The broker's Redis traffic now flows through the proxy (its old connection reset),
        # and what b1 receives from Redis waits the latency (one way: Redis to b1).
        slow = _delivery_time(cluster, "b0", "b1", timeout=30.0)
        assert slow >= 0.14 > fast, (fast, slow)  # 150 ms, less at most 10 of jitter
        stats = cluster.proxy_state("b1")["stats"]
        assert stats["accepted"] >= 1 and stats["bytes"]["downstream"] > 0
        # Another degradation replaces this one (a new proxy, only the new toxics).
        cluster.degrade_redis_link("b1", LinkFault(slice_bytes=64))
        toxics = cluster.proxy_state("b1")["toxics"]["downstream"]
        assert (toxics["latency_s"], toxics["slice_size"]) == (0.0, 64)
    finally:
        cluster.heal("b1")
    assert b1.proxy is None
    cluster.wait_ready("b1")
    assert _delivery_time(cluster, "b0", "b1") < 0.15


@needs_netns
def test_heal_closes_the_connections_through_the_proxy_at_once(cluster: NetnsBackend) -> None:
    """A heal must not black-hole the broker's connections through the proxy: they end at
    once (FIN from the proxy while Redis's service address is still local), so the broker
    reconnects straight to Redis in milliseconds, not after a 5 s socket timeout or a beat's
    deadline (slow-link: a step of a reconnect hung there and the broker's presence expired)."""
    cluster.degrade_redis_link("b1", LinkFault(latency_ms=50))
    endpoint = {e.name: e for e in cluster.endpoints()}["b1"]

    def connects() -> float:
        return scrape(endpoint.http_port, host=endpoint.host).value(
            "mcloudtt_cluster_connects_total"
        )

    try:
        _delivered(cluster, "b0", "b1")  # b1's link is up through the proxy
        before = connects()
    finally:
        cluster.heal("b1")
    healed = time.monotonic()
    while connects() <= before:
        assert time.monotonic() - healed < 1.5, "b1's connections hung after the heal"
        time.sleep(0.05)


@pytest.fixture
def patient_cluster(tmp_path: Path) -> Iterator[NetnsBackend]:
    """Two brokers whose presence lives 10 s (the default is 5): time for a beat to cross a
    saturated link before their presence is at risk."""
    yield from _two_brokers(tmp_path, 10.0)


@needs_netns
def test_a_saturated_bandwidth_cap_is_slow_not_lost(patient_cluster: NetnsBackend) -> None:
    """The kernel's cap (tbf) is shared by all of a broker's Redis connections: its outbox
    writes, more than the cap, queue its heartbeat behind them past the beat's deadline, and
    the cap drops what overflows its 1 s queue (TCP resends it after its backoff, on every
    connection). The link still answers (the writes are acknowledged, slowly): it must not
    count as lost while the broker's presence is not at risk. (With a presence of 3 s, as the
    other tests here have, a beat took more than the 2.4 s left before it expires in 2 of 8
    runs: a link lost then is the design, peers would otherwise see the presence expire.)"""
    cluster = patient_cluster
    endpoint = {e.name: e for e in cluster.endpoints()}["b0"]

    def losses() -> float:
        return scrape(endpoint.http_port, host=endpoint.host).value(
            "mcloudtt_cluster_link_losses_total"
        )

    _delivered(cluster, "b0", "b1")  # b0 routes to a subscriber on b1
    sub, pub = Client(cluster, "b1"), Client(cluster, "b0")
    try:
        sub.client.subscribe("netns/flood", qos=0)
        time.sleep(0.5)
        before = losses()
        cluster.degrade_redis_link("b0", LinkFault(bandwidth_bytes_per_s=20_000))
        try:
            payload = bytes(1000)
            end = time.monotonic() + 6.0
            while time.monotonic() < end:  # about 100 kB/s for a 20 kB/s link
                for _ in range(10):
                    pub.client.publish("netns/flood", payload, qos=0)
                time.sleep(0.1)
            assert losses() == before, "b0's slow but answering link was declared lost"
        finally:
            cluster.heal("b0")
    finally:
        sub.close()
        pub.close()


SENDER = """
import socket, sys
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
conn.sendall(bytes(int(sys.argv[2])))
conn.close()
"""


@needs_netns
def test_a_bandwidth_cap_is_the_kernels_and_holds(cluster: NetnsBackend) -> None:
    cluster.degrade_redis_link("b0", LinkFault(bandwidth_bytes_per_s=100_000))
    b0 = cluster.broker("b0")
    try:
        if not b0.tbf:
            pytest.skip("this kernel has no tc tbf: the proxy caps instead")
        assert b0.proxy is None  # a cap alone needs no proxy, and resets nothing
        # 150 kB sent from the broker's namespace over its capped backplane veth.
        sender = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                b0.ns,
                sys.executable,
                "-c",
                SENDER,
                b0.backplane_addr,
                "150000",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sender.stdout is not None
        port = int(sender.stdout.readline())
        sender.stdout.close()
        start, received = time.monotonic(), 0
        with socket.create_connection((b0.backplane_addr, port), timeout=10) as conn:
            while chunk := conn.recv(65536):
                received += len(chunk)
        rate = received / (time.monotonic() - start)
        sender.wait(timeout=10)
        assert received == 150_000
        assert 75_000 < rate < 125_000, rate
    finally:
        cluster.heal("b0")
    assert "tbf" not in _qdiscs(b0.host_backplane_veth)
    cluster.wait_ready("b0")


def _qdiscs(dev: str) -> str:
    return subprocess.run(
        ["tc", "qdisc", "show", "dev", dev], capture_output=True, text=True
    ).stdout


def _delivery_time(
    backend: NetnsBackend, source: str, target: str, *, timeout: float = 20.0
) -> float:
    """Seconds from a publish on `source` to its delivery on `target`, once routing flows."""
    _delivered(backend, source, target, timeout=timeout)
    topic = f"netns/{uuid.uuid4().hex[:8]}"
    sub, pub = Client(backend, target), Client(backend, source)
    try:
        sub.client.subscribe(topic, qos=1)
        # Until the subscription reached the other broker (over a slow link, on a loaded
        # machine, more than a second): probes until one arrives, then the timed message.
        deadline = time.monotonic() + timeout
        while True:
            pub.client.publish(topic, b"probe", qos=1)
            try:
                sub.messages.get(timeout=2.0)
                break
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise
        while not sub.messages.empty():  # a late probe is not the timed message
            sub.messages.get_nowait()
        start = time.monotonic()
        pub.client.publish(topic, b"timed", qos=1)
        while sub.messages.get(timeout=10.0) != b"timed":
            pass
        return time.monotonic() - start
    finally:
        sub.close()
        pub.close()


def _wait_status(backend: NetnsBackend, broker: str, status: int) -> tuple[int, str]:
    deadline = time.monotonic() + 30.0
    while (answer := backend.readyz(broker))[0] != status:
        assert time.monotonic() < deadline, f"{broker} /readyz still {answer} after 30s"
        time.sleep(0.2)
    return answer


RUN = """
import sys, time
from mcloudtt_chaos.backend import ClusterSpec
from mcloudtt_chaos.backends.netns import NetnsBackend
backend = NetnsBackend(sys.argv[1])
backend.setup(ClusterSpec(brokers=1))
print(backend.run_id, flush=True)
time.sleep(600)
"""


def _start_run(workdir: Path) -> tuple[subprocess.Popen[str], str, list[str]]:
    """A run in another process, set up: (process, run id, pids in its broker's namespace)."""
    run = subprocess.Popen(
        [sys.executable, "-c", RUN, str(workdir)], stdout=subprocess.PIPE, text=True
    )
    assert run.stdout is not None
    run_id = run.stdout.readline().strip()
    run.stdout.close()
    assert run_id and _leftovers(run_id)
    pids = subprocess.run(
        ["ip", "netns", "pids", f"mctt{run_id}-b0"], capture_output=True, text=True
    ).stdout.split()
    assert pids
    return run, run_id, pids


@needs_netns
def test_a_terminated_run_removes_everything(tmp_path: Path) -> None:
    run, run_id, pids = _start_run(tmp_path)
    run.terminate()  # SIGTERM: the run's finally and atexit hook still tear down
    assert run.wait(timeout=30) == 128 + 15
    assert _leftovers(run_id) == []
    assert not any(_alive(int(pid)) for pid in pids)


@needs_netns
def test_teardown_and_cleanup_after_a_crash_leave_nothing(tmp_path: Path) -> None:
    # A run SIGKILLed after setup: no finally, no atexit; its namespaces and processes stay.
    crashed, run_id, broker_pids = _start_run(tmp_path)
    crashed.kill()
    crashed.wait()
    assert _leftovers(run_id)  # what a crash leaves
    assert run_id in cleanup_stale()
    assert _leftovers(run_id) == []
    for pid in broker_pids:  # its broker, in a session of its own, is gone too
        assert not _alive(int(pid))


@needs_netns
def test_the_next_run_removes_what_a_crashed_one_left(tmp_path: Path) -> None:
    crashed, run_id, broker_pids = _start_run(tmp_path / "crashed")
    crashed.kill()
    crashed.wait()
    assert _leftovers(run_id)
    with NetnsBackend(tmp_path / "next") as backend:
        backend.setup(ClusterSpec(brokers=1))
        assert _leftovers(run_id) == []
        assert not any(_alive(int(pid)) for pid in broker_pids)


@needs_netns
def test_cleanup_stale_spares_a_live_run(cluster: NetnsBackend) -> None:
    assert cluster.run_id not in cleanup_stale()
    assert cluster.readyz("b0")[0] == 200


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
