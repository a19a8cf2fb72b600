"""Issue 11, found by the chaos harness (rolling-restart, broker-restart-same-id): brokers
SIGTERMed or restarted under their id while their clients move to other brokers.

Real brokers on a real redis-server, real paho clients.
"""

from __future__ import annotations

import signal
import time

from broker.clients import PahoClient

from .conftest import wait_filters, wait_until

TOPIC = "roll/t"


def test_a_stopped_broker_publishes_the_wills_of_the_clients_it_closes(cluster_factory, clients):
    """SIGTERM closes every connection without a DISCONNECT from the client: their wills are
    due (MQTT-3.1.2-8) and reach watchers on the other brokers before this one leaves."""
    a, b = cluster_factory(2)
    watcher = clients(a.port, "will-watcher")
    watcher.subscribe("wills/#", 1)
    wait_filters([b], 1)
    clients(b.port, "will-311", version=4, will=("wills/will-311", b"gone-4", 1, False))
    clients(b.port, "will-5", will=("wills/will-5", b"gone-5", 1, False))
    b.signal(signal.SIGTERM)
    got = {m.topic: m.payload for m in watcher.get_n(2, timeout=10)}
    assert got == {"wills/will-311": b"gone-4", "wills/will-5": b"gone-5"}


def test_clients_of_a_stopped_broker_find_their_sessions_on_the_adopter(
    redis_server, cluster_factory
):
    """B is SIGTERMed; a survivor adopts B's stored sessions as soon as B leaves, and
    announces it (`adopted`) before it has read B's inbox to every origin's end marker and
    restored them. Clients that come back to the adopter in that window: each CONNECT waits
    until its claimed session is restored, instead of starting a fresh session that the
    adopted copy then replaces under it (found by rolling-restart)."""
    import redis

    brokers = cluster_factory(3, "--drain-timeout", "1")
    # cluster_factory names them b1, b2, b3
    b = brokers[1]
    b_id = "b2"
    ids = [f"roll-{i}" for i in range(6)]
    subs = [PahoClient(b.port, cid, clean=False, session_expiry=600) for cid in ids]
    for sub in subs:
        sub.subscribe(TOPIC, 1)
    wait_filters([brokers[0], brokers[2]], 1)
    time.sleep(0.3)  # the sessions stored
    control = redis.Redis.from_url(redis_server.url).pubsub(ignore_subscribe_messages=True)
    control.subscribe("mcloudtt:control")
    # C answers late (frozen for a moment, well within its presence TTL): A's replay waits
    # for C's end marker in B's inbox, which holds the window open.
    a, c = brokers[0], brokers[2]
    c.signal(signal.SIGSTOP)
    try:
        b.signal(signal.SIGTERM)
        adopted = False
        deadline = time.monotonic() + 10
        while not adopted and time.monotonic() < deadline:
            message = control.get_message(timeout=1.0)
            if message is not None:
                op, who, argument = message["data"].split(b"\x00", 2)
                adopted = op == b"adopted" and argument.startswith(f"{b_id}\x00".encode())
        assert adopted and who == b"b1", "no adoption by A announced"
        for sub in subs:
            sub.kill()
        back = [PahoClient(a.port, cid, clean=False, session_expiry=600) for cid in ids]
    finally:
        c.signal(signal.SIGCONT)
    adopter = a
    try:
        fresh = [cid for cid, client in zip(ids, back, strict=True) if not client.session_present]
        assert not fresh, f"sessions not found on the adopter: {fresh}"
        # The sessions route to the adopter: a publish elsewhere reaches each of them once.
        other = next(x for x in brokers if x is not b and x is not adopter)
        pub = PahoClient(other.port, "roll-pub")
        pub.publish(TOPIC, b"after", 1)
        for client in back:
            assert client.get(timeout=10).payload == b"after"
        pub.stop()
    finally:
        control.close()
        for client in back:
            client.stop()


def test_a_stopped_broker_leaves_no_stored_will_for_its_adopter_to_publish_again(
    cluster_factory, clients, redis_server
):
    """A SIGTERMed broker publishes the wills of the connections it closes; whoever adopts its
    sessions must not publish them again from `{prefix}:wills:{id}` (once per abnormal
    disconnect, MQTT-3.1.2-8). Found by rolling-restart: a will's entry whose removal was not
    yet written when the broker left was published by the adopter a second time. The entry is
    planted here as that unwritten removal leaves it."""
    import redis
    from mcloudtt_broker.cluster.session_snapshot import encode_will
    from mcloudtt_broker.core.message import Message

    a, b = cluster_factory(2)
    watcher = clients(a.port, "stale-watcher")
    watcher.subscribe("wills/#", 1)
    wait_filters([b], 1)
    clients(b.port, "closed-will", will=("wills/closed-will", b"once", 1, False))
    time.sleep(0.5)  # its will stored
    stale = Message("wills/stale", b"published at shutdown", 1, False)
    redis.Redis.from_url(redis_server.url).hset(
        "mcloudtt:wills:{b2}", "stale", encode_will(stale, "b2", time.monotonic())
    )
    b.signal(signal.SIGTERM)
    message = watcher.get(timeout=10)
    assert (message.topic, message.payload) == ("wills/closed-will", b"once")
    wait_until(lambda: a.metric("mcloudtt_cluster_peers") == 0, 10.0, "b2 gone")
    watcher.nothing_more(2, "a will published again after a graceful stop")
    # Its own close at the end of a graceful stop is not a lost link (no warning, no count).
    b.proc.wait(10)  # type: ignore[union-attr]
    assert "lost Redis" not in b.output()


def test_wills_of_a_killed_broker_are_published_by_its_adopter_or_its_restart(
    cluster_factory, clients
):
    """SIGKILL takes a broker's in-memory wills with it. Each broker stores the wills due for
    its connections (`{prefix}:wills:{id}`); whoever takes its sessions publishes them once:
    the survivor that adopts them, or the broker itself restarted under its id."""
    a, b = cluster_factory(2)
    watcher = clients(a.port, "kill-watcher")
    watcher.subscribe("wills/#", 1)
    wait_filters([b], 1)
    # A normal DISCONNECT deletes a will (MQTT-3.1.2-10): that one is not stored any more.
    clients(b.port, "polite", will=("wills/polite", b"never", 1, False)).disconnect()
    first = clients(b.port, "restart-will", version=4, will=("wills/restart-will", b"r", 1, False))
    time.sleep(0.5)  # stored
    b.signal(signal.SIGKILL)
    b.proc.wait()  # type: ignore[union-attr]
    b.start()  # the same id, at once: before anyone adopted it
    message = watcher.get(timeout=15)
    assert (message.topic, message.payload) == ("wills/restart-will", b"r")
    wait_until(lambda: b.http_get("/readyz")[0] == 200, 10.0, "b back")
    # paho reconnects to the restarted B by itself (a new connection with the same will):
    # it ends with DISCONNECT, so that will is not due again.
    first.c.disconnect()
    first.c.loop_stop()
    time.sleep(0.3)
    clients(b.port, "adopted-will", will=("wills/adopted-will", b"a", 1, False))
    time.sleep(0.5)
    b.signal(signal.SIGKILL)  # for good: A adopts once the presence expired
    message = watcher.get(timeout=15)
    assert (message.topic, message.payload) == ("wills/adopted-will", b"a")
    watcher.nothing_more(1, "a will published twice or after DISCONNECT")


def test_a_restart_after_its_sessions_were_adopted_does_not_deliver_its_backlog_again(
    cluster_factory, clients
):
    """B is SIGKILLed with a shared group's member and records in flight; A adopts B's
    sessions and replays B's inbox (the group's records to a member). B then starts again
    under its id: the backlog of its inbox is the adopter's now, and is not delivered (passed
    on to a member) a second time. QoS 2: each group message reaches one member once."""
    a, b = cluster_factory(2, "--max-queued-messages", "10000")
    group = "$share/g/grp/#"
    here = clients(a.port, "member-a", clean=False, session_expiry=600)
    here.subscribe(group, 2)
    there = clients(b.port, "member-b", clean=False, session_expiry=600)
    there.subscribe(group, 2)
    wait_filters([a, b], 1)
    there.kill()  # offline: its share queues at B
    pub = clients(a.port, "grp-pub")
    for seq in range(400):
        pub.publish("grp/t", str(seq).encode(), 2, wait=seq % 50 == 49)
    b.signal(signal.SIGKILL)
    b.proc.wait()  # type: ignore[union-attr]
    wait_until(lambda: a.metric("mcloudtt_cluster_sessions_adopted_total") >= 1, 15.0, "B adopted")
    b.start()
    wait_until(lambda: b.http_get("/readyz")[0] == 200, 10.0, "B back")
    time.sleep(1.0)  # B's inbox read, whatever it holds
    back = clients(a.port, "member-b", clean=False, session_expiry=600)
    assert back.session_present
    seqs: list[int] = []
    for member in (here, back):
        while True:
            try:
                seqs.append(int(member.get(timeout=2).payload))
            except AssertionError:
                break
    twice = sorted(seq for seq in set(seqs) if seqs.count(seq) > 1)
    assert not twice, f"delivered twice: {twice[:20]}"
    assert set(seqs) == set(range(400)), sorted(set(range(400)) - set(seqs))[:20]


def test_a_will_published_just_before_its_broker_is_killed_is_not_published_again(
    cluster_factory, clients
):
    """A client drops without DISCONNECT, B publishes its will, and B is SIGKILLed a moment
    later and restarted under its id. The will's stored copy goes from Redis with the will's
    own forward, not a session-write delay (0.1 s) later: the restart must not find it and
    publish it a second time (once per abnormal disconnect, MQTT-3.1.2-8). Found by
    broker-restart-same-id, the kill 8 ms after the will."""
    a, b = cluster_factory(2)
    watcher = clients(a.port, "late-watcher")
    watcher.subscribe("wills/#", 1)
    wait_filters([b], 1)
    dropping = clients(b.port, "late-will", will=("wills/late-will", b"once", 1, False))
    time.sleep(0.5)  # stored
    dropping.kill()  # no DISCONNECT: the will is due
    message = watcher.get(timeout=5)
    assert (message.topic, message.payload) == ("wills/late-will", b"once")
    time.sleep(0.02)  # well inside the session-write delay
    b.signal(signal.SIGKILL)
    b.proc.wait()  # type: ignore[union-attr]
    b.start()  # the same id: it publishes the wills its previous run stored
    wait_until(lambda: b.http_get("/readyz")[0] == 200, 10.0, "b back")
    watcher.nothing_more(2, "a will published twice")


def test_the_will_of_a_client_that_just_connected_survives_its_broker_killed_at_once(
    cluster_factory, clients
):
    """A client with a will connects to B, and B is SIGKILLed 20 ms after its CONNACK and
    restarted under its id: the will is stored as the client is let in, not a session-write
    delay (0.1 s) later, so the restart publishes it (MQTT-3.1.2-8: its connection ended
    without DISCONNECT). Found by broker-restart-same-id, the kill 2 ms after the CONNACK."""
    a, b = cluster_factory(2)
    watcher = clients(a.port, "new-watcher")
    watcher.subscribe("wills/#", 1)
    wait_filters([b], 1)
    fresh = clients(b.port, "new-will", will=("wills/new-will", b"kept", 1, False))
    fresh.c.reconnect_delay_set(60, 60)
    time.sleep(0.02)
    b.signal(signal.SIGKILL)
    b.proc.wait()  # type: ignore[union-attr]
    b.start()
    message = watcher.get(timeout=15)
    assert (message.topic, message.payload) == ("wills/new-will", b"kept")
    watcher.nothing_more(1, "a will published twice")
