"""Brokers that act as one through Redis: real redis-server, real brokers, real MQTT clients."""

from __future__ import annotations

import contextlib
import time

import pytest
import redis
from brokerproc import BrokerProcess, free_port
from mcloudtt_broker.cluster.envelope import Envelope, encode_envelope
from mcloudtt_broker.cluster.records import encode_record
from redisproc import RedisProcess

from .conftest import start_broker, wait_filters, wait_ready, wait_until


@pytest.mark.parametrize("mode", ["routed", "broadcast"])
def test_publish_on_a_reaches_b_and_c_once_at_every_qos(cluster_factory, clients, mode):
    a, b, c = cluster_factory(3, "--cluster-mode", mode)
    on_b = clients(b.port, "sub-b")
    on_c = clients(c.port, "sub-c", version=4)
    on_a = clients(a.port, "sub-a")  # the publisher's own broker: must not get an echo twice
    assert on_b.subscribe("sensors/+/temp", qos=2) == [2]
    assert on_c.subscribe("sensors/#", qos=1) == [1]
    assert on_a.subscribe("sensors/1/temp", qos=2) == [2]
    wait_filters([a], at_least=2)
    wait_filters([b, c], at_least=2)
    publisher = clients(a.port, "pub")
    for qos in (0, 1, 2):
        for n in range(5):
            publisher.publish("sensors/1/temp", f"{qos}-{n}".encode(), qos=qos)
    publisher.publish("sensors/1/temp", b"end", qos=1)
    for subscriber, cap in ((on_b, 2), (on_c, 1), (on_a, 2)):
        received = [subscriber.get() for _ in range(16)]
        # paho hands a QoS 2 message to the application at PUBREL, so compare per QoS level.
        for qos in (0, 1, 2):
            in_order = [m.payload for m in received if m.payload.startswith(f"{qos}-".encode())]
            assert in_order == [f"{qos}-{n}".encode() for n in range(5)]
            assert {m.qos for m in received if m.payload.startswith(f"{qos}-".encode())} == {
                min(qos, cap)
            }
        assert sum(m.payload == b"end" for m in received) == 1
        with pytest.raises(AssertionError):
            subscriber.get(timeout=0.3)  # exactly once: nothing more


def test_no_remote_traffic_without_a_remote_subscriber(cluster_factory, clients):
    a, b = cluster_factory(2)
    local = clients(a.port, "local")
    local.subscribe("only/here")
    publisher = clients(a.port, "pub")
    for _ in range(20):
        publisher.publish("only/here", b"x", qos=1)
    assert len(local.get_n(20)) == 20
    assert a.metric("mcloudtt_cluster_forwarded_total") == 0  # routed: nothing crossed
    assert b.metric("mcloudtt_cluster_received_total") == 0


def test_retained_set_on_a_seen_on_b_cleared_on_b_gone_on_a(cluster_factory, clients):
    a, b = cluster_factory(2)
    clients(a.port, "p").publish("status/dev1", b"online", qos=1, retain=True)
    wait_until(lambda: b.metric("mcloudtt_retained_messages") >= 1, what="retained on b")
    late = clients(b.port, "late-b")
    late.subscribe("status/#", qos=1)
    message = late.get()
    assert (message.topic, message.payload, message.retain) == ("status/dev1", b"online", True)

    clients(b.port, "clear").publish("status/dev1", b"", qos=1, retain=True)
    wait_until(lambda: a.metric("mcloudtt_retained_messages") == 0, what="retained cleared on a")
    fresh = clients(a.port, "fresh-a")
    fresh.subscribe("status/#", qos=1)
    with pytest.raises(AssertionError):
        fresh.get(timeout=0.5)


def test_retained_kept_when_every_broker_restarts(redis_server, clients):
    a = start_broker(redis_server.url, "r1")
    try:
        wait_ready([a])
        clients(a.port, "p").publish("config/site", b"v1", qos=1, retain=True)
        wait_until(lambda: redis.Redis(port=redis_server.port).hlen("mcloudtt:retained") == 1)
    finally:
        a.stop()
    b = start_broker(redis_server.url, "r2")
    try:
        wait_ready([b])
        sub = clients(b.port, "after-restart")
        sub.subscribe("config/#", qos=1)
        message = sub.get()
        assert (message.topic, message.payload, message.retain) == ("config/site", b"v1", True)
    finally:
        b.stop()


def test_brokers_started_before_redis_serve_locally_then_join(clients):
    port = free_port()
    brokers = [start_broker(f"redis://127.0.0.1:{port}/0", f"early{i}") for i in (1, 2)]
    redis_server = RedisProcess(port)
    try:
        # No Redis: not ready, but serving local publish/subscribe.
        assert brokers[0].http_get("/readyz")[0] == 503
        assert brokers[0].http_get("/healthz")[0] == 200
        sub = clients(brokers[0].port, "early-sub")
        sub.subscribe("local/#", qos=1)
        clients(brokers[0].port, "early-pub").publish("local/x", b"served", qos=1)
        assert sub.get().payload == b"served"
        assert brokers[0].metric("mcloudtt_cluster_link_up") == 0

        redis_server.start()
        started = time.monotonic()
        for b in brokers:
            wait_until(
                lambda b=b: b.http_get("/readyz")[0] == 200, 2.0, "ready within 2 s of Redis"
            )
        assert time.monotonic() - started < 2.0
        wait_ready(brokers)
        wait_filters([brokers[1]], at_least=1)
        clients(brokers[1].port, "late-pub").publish("local/y", b"across", qos=1)
        assert sub.get().payload == b"across"
    finally:
        for b in brokers:
            b.stop()
        redis_server.close()


def test_ready_without_redis_option(clients):
    port = free_port()
    b = start_broker(f"redis://127.0.0.1:{port}/0", "lonely", "--ready-without-redis", "true")
    try:
        assert b.http_get("/readyz")[0] == 200
        assert b.metric("mcloudtt_cluster_link_up") == 0
    finally:
        b.stop()


def test_duplicate_broker_id_is_refused(redis_server):
    first = start_broker(redis_server.url, "same")
    try:
        wait_ready([first])
        second = BrokerProcess("--redis", redis_server.url, "--id", "same", "--presence-ttl", "2")
        second.start()
        assert second.proc is not None
        assert second.proc.wait(10) == 2
        stderr = second.output()
        assert "already live" in stderr and "same" in stderr
        assert first.proc is not None and first.proc.poll() is None
    finally:
        first.stop()


def test_shared_subscription_across_brokers_delivers_each_message_once(cluster_factory, clients):
    brokers = cluster_factory(3)
    members = []
    for index, b in enumerate(brokers):
        member = clients(b.port, f"worker-{index}")
        member.subscribe("$share/workers/jobs/#", qos=1)
        members.append(member)
    wait_filters(brokers, at_least=2)
    publisher = clients(brokers[0].port, "jobs-pub")
    count = 60
    for n in range(count):
        publisher.publish(f"jobs/{n % 3}", str(n).encode(), qos=1)
    received: list[bytes] = []
    per_member = [0] * len(members)
    deadline = time.monotonic() + 10
    while len(received) < count and time.monotonic() < deadline:
        for index, member in enumerate(members):
            while not member.messages.empty():
                received.append(member.messages.get().payload)
                per_member[index] += 1
        time.sleep(0.02)
    assert sorted(received, key=int) == [str(n).encode() for n in range(count)]  # each exactly once
    time.sleep(0.3)
    assert all(member.messages.empty() for member in members)
    # Round robin over the brokers with members: the publisher's broker and its two peers
    # take turns, so each broker's one member gets exactly a third.
    assert per_member == [count // len(members)] * len(members)
    assert a_share_each(brokers)


def a_share_each(brokers: list[BrokerProcess]) -> bool:
    return all(b.metric("mcloudtt_messages_sent_total", qos="1") > 0 for b in brokers)


def test_garbage_on_redis_is_counted_and_dropped(cluster_factory, clients, redis_server):
    a, b = cluster_factory(2, "--cluster-mode", "broadcast")
    sub = clients(b.port, "sub")
    sub.subscribe("t/#", qos=1)
    wait_filters([a], at_least=1)
    r = redis.Redis(port=redis_server.port)
    r.publish("sync", b"\x00garbage")
    r.publish("sync", b"\x07" + b"\x00" * 40)  # unknown envelope version
    r.xadd("mcloudtt:inbox:{b2}", {"b": b"\xff\xff\xff\xff junk"})
    r.xadd("mcloudtt:inbox:{b2}", {"x": b"no batch field"})
    good = encode_envelope(
        Envelope(
            origin="foreign",
            sequence=1,
            received_at_us=0,
            client_id="",
            topic="t/1",
            payload=b"ok",
            qos=1,
        )
    )
    r.xadd("mcloudtt:inbox:{b2}", {"b": encode_record(good, True, ())})
    assert sub.get().payload == b"ok"  # the good record after the bad ones still arrives
    wait_until(
        lambda: b.metric("mcloudtt_cluster_bad_envelopes_total") >= 4, what="bad data counted"
    )
    clients(a.port, "pub").publish("t/2", b"still", qos=1)
    assert sub.get().payload == b"still"
    assert b.proc is not None and b.proc.poll() is None


def test_redis_killed_under_qos1_load_loses_no_acknowledged_message(
    cluster_factory, clients, redis_server
):
    a, b = cluster_factory(2)
    sub = clients(b.port, "sink", clean=False, session_expiry=300)
    sub.subscribe("load/#", qos=1)
    wait_filters([a], at_least=1)
    publisher = clients(a.port, "load-pub")
    acknowledged: list[bytes] = []
    killed = False
    for n in range(600):
        payload = str(n).encode()
        info = publisher.c.publish("load/x", payload, qos=1)
        info.wait_for_publish(10)
        if info.is_published():
            acknowledged.append(payload)
        if n == 200:
            redis_server.kill()
            killed = True
        if n == 400:
            redis_server.restart()
    assert killed
    wait_until(lambda: a.metric("mcloudtt_cluster_link_up") == 1, 5, "a reconnected")
    received: set[bytes] = set()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not set(acknowledged) <= received:
        with contextlib.suppress(AssertionError):
            received.add(sub.get(timeout=0.5).payload)
    missing = [p for p in acknowledged if p not in received]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:5]}"
    assert len(acknowledged) == 600


def test_qos0_losses_during_redis_outage_are_counted(cluster_factory, clients, redis_server):
    a, b = cluster_factory(2, "--cluster-buffer", "50")
    sub = clients(b.port, "zero")
    sub.subscribe("z/#", qos=0)
    wait_filters([a], at_least=1)
    redis_server.kill()
    wait_until(lambda: a.metric("mcloudtt_cluster_link_up") == 0, 5, "a noticed")
    publisher = clients(a.port, "zpub")
    for n in range(200):
        publisher.publish("z/x", str(n).encode(), qos=0)
    publisher.publish("z/x", b"sync", qos=1)
    wait_until(lambda: "buffer_full_qos0" in a.http_get("/metrics")[1], 5, "drop reason exported")
    assert a.metric("mcloudtt_cluster_dropped_total", reason="buffer_full_qos0") >= 150
    redis_server.restart()
    wait_until(lambda: a.metric("mcloudtt_cluster_link_up") == 1, 5, "a reconnected")


@pytest.mark.parametrize("version", [4, 5])
def test_session_resumes_on_another_broker_with_what_was_queued(cluster_factory, clients, version):
    a, b = cluster_factory(2)
    first = clients(a.port, "roamer", version=version, clean=False, session_expiry=600)
    first.subscribe("roam/#", qos=1)
    first.disconnect()
    wait_filters([b], at_least=1)
    publisher = clients(b.port, "roam-pub")
    for n in range(5):
        publisher.publish(f"roam/{n}", str(n).encode(), qos=1)
    # Queued on a while the client was away; it comes back through b.
    again = clients(b.port, "roamer", version=version, clean=False, session_expiry=600)
    assert again.session_present
    assert [m.payload for m in again.get_n(5)] == [str(n).encode() for n in range(5)]
    # The subscription moved with the session: new messages reach it on b.
    clients(a.port, "roam-pub-2").publish("roam/x", b"after", qos=1)
    assert again.get().payload == b"after"
    # a gave the session up: the only session left there is roam-pub-2's.
    assert a.metric("mcloudtt_sessions") == 1


def test_connect_on_b_takes_over_a_live_connection_on_a(cluster_factory, clients):
    a, b = cluster_factory(2)
    watcher = clients(b.port, "watcher")
    watcher.subscribe("wills/#", qos=1)
    wait_filters([a], at_least=1)
    old = clients(a.port, "device-7", will=("wills/device-7", b"gone", 1, False))
    new = clients(b.port, "device-7")
    assert old.disconnected.wait(5), "the old connection on a was not closed"
    assert old.disconnect_reason is not None and int(old.disconnect_reason.value) == 0x8E
    # MQTT 5.0: the will of the taken-over connection is published (no will delay).
    assert watcher.get().payload == b"gone"
    assert new.c.is_connected()


def test_clean_start_on_b_discards_the_session_on_a(cluster_factory, clients):
    a, b = cluster_factory(2)
    first = clients(a.port, "fresh", clean=False, session_expiry=600)
    first.subscribe("fresh/#", qos=1)
    first.disconnect()
    again = clients(b.port, "fresh", clean=True)
    assert not again.session_present
    wait_until(lambda: a.metric("mcloudtt_sessions") == 0, what="a dropped the session")


def test_sys_statistics_of_every_broker_cross_the_cluster(cluster_factory, clients):
    _, b = cluster_factory(2, "--sys-interval", "0.5")
    watcher = clients(b.port, "sys-watch")
    watcher.subscribe("$SYS/brokers/+/clients/connected")
    seen: set[str] = set()
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        with contextlib.suppress(AssertionError):
            seen.add(watcher.get(timeout=1).topic.split("/")[2])
    assert seen == {"b1", "b2"}


def test_offline_session_survives_the_death_of_its_broker(cluster_factory, clients):
    """A persistent session is stored in Redis: when its broker dies, a survivor takes it over,
    keeps queuing for it, and the client resumes it on any broker with everything queued."""
    a, b, c = cluster_factory(3)
    first = clients(a.port, "sensor-9", version=5, clean=False, session_expiry=600)
    first.subscribe("cmd/sensor-9/#", qos=1)
    first.disconnect()
    wait_filters([b, c], at_least=1)
    publisher = clients(b.port, "commander")
    for n in range(3):
        publisher.publish(f"cmd/sensor-9/{n}", f"before-{n}".encode(), qos=1)
    # Queued on a, which stores the session with its queue within 0.1 s; then a dies.
    time.sleep(0.5)
    assert a.proc is not None
    a.proc.kill()
    a.proc.wait()
    # A survivor notices a is gone (presence TTL 2 s) and adopts the session.
    wait_until(
        lambda: (
            b.metric("mcloudtt_cluster_sessions_adopted_total")
            + c.metric("mcloudtt_cluster_sessions_adopted_total")
            == 1
        ),
        10,
        "a survivor to adopt the session",
    )
    if c.metric("mcloudtt_cluster_sessions_adopted_total"):
        wait_filters([b], at_least=1)  # c subscribes on the session's behalf now
    for n in range(3):
        publisher.publish(f"cmd/sensor-9/{n}", f"after-{n}".encode(), qos=1)
    # The client comes back on c (whichever survivor adopted it, the session follows).
    again = clients(c.port, "sensor-9", version=5, clean=False, session_expiry=600)
    assert again.session_present
    payloads = [m.payload for m in again.get_n(6)]
    assert payloads == [f"before-{n}".encode() for n in range(3)] + [
        f"after-{n}".encode() for n in range(3)
    ]
    # Still subscribed: new messages reach it.
    publisher.publish("cmd/sensor-9/x", b"live", qos=1)
    assert again.get().payload == b"live"


def test_a_client_of_a_dead_broker_resumes_its_session_elsewhere(cluster_factory, clients):
    """Connected on a when a dies: reconnecting to b gives session present, the subscriptions
    back, and messages published after the failover."""
    a, b = cluster_factory(2)
    device = clients(a.port, "gateway-2", version=4, clean=False)  # a 3.1.1 persistent session
    device.subscribe("fleet/gateway-2/#", qos=1)
    wait_filters([b], at_least=1)
    time.sleep(0.5)  # the session is stored within 0.1 s of the subscription
    assert a.proc is not None
    a.proc.kill()
    a.proc.wait()
    again = clients(b.port, "gateway-2", version=4, clean=False)
    assert again.session_present
    assert (
        b.metric("mcloudtt_cluster_sessions_restored_total")
        + b.metric("mcloudtt_cluster_sessions_adopted_total")
        == 1
    )
    clients(b.port, "ops").publish("fleet/gateway-2/reboot", b"now", qos=1)
    assert again.get().payload == b"now"


def test_stored_sessions_follow_their_state(cluster_factory, clients, redis_server):
    """What Redis holds: persistent sessions only, rewritten when they change, gone when they
    end (clean start elsewhere, expiry)."""
    (a,) = cluster_factory(1)
    r = redis.Redis(port=redis_server.port)
    keep = clients(a.port, "keeper", version=5, clean=False, session_expiry=600)
    clients(a.port, "passer-by", version=5, clean=True)  # session expiry 0: not stored
    keep.subscribe("k/1", qos=1)
    wait_until(lambda: r.hexists("mcloudtt:sessions:{b1}", "keeper"), what="session stored")
    assert not r.hexists("mcloudtt:sessions:{b1}", "passer-by")
    keep.subscribe("k/2", qos=0)
    wait_until(
        lambda: b"k/2" in (r.hget("mcloudtt:sessions:{b1}", "keeper") or b""),
        what="new subscription stored",
    )
    keep.disconnect()
    clients(a.port, "keeper", version=5, clean=True)
    wait_until(
        lambda: not r.hexists("mcloudtt:sessions:{b1}", "keeper"),
        what="clean start removed the stored session",
    )


def test_a_broker_restarted_under_its_id_takes_back_its_stored_sessions(redis_server, clients):
    """A pod that restarts keeps its name (StatefulSet): the new run adopts what the old one
    stored, queued messages included."""
    a = start_broker(redis_server.url, "keeper-1")
    try:
        wait_ready([a])
        first = clients(a.port, "meter-4", version=5, clean=False, session_expiry=600)
        first.subscribe("meter/4/#", qos=1)
        first.disconnect()
        clients(a.port, "pub").publish("meter/4/reading", b"17.5", qos=1)
        time.sleep(0.5)  # stored within 0.1 s
        assert a.proc is not None
        a.proc.kill()
        a.proc.wait()
    finally:
        a.stop()
    again = start_broker(redis_server.url, "keeper-1")
    try:
        wait_ready([again], timeout=10)  # waits out the old run's presence
        assert again.metric("mcloudtt_cluster_sessions_adopted_total") == 1
        back = clients(again.port, "meter-4", version=5, clean=False, session_expiry=600)
        assert back.session_present
        assert back.get().payload == b"17.5"
    finally:
        again.stop()
