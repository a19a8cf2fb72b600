"""--cluster-key-file: brokers accept only what a holder of the key wrote to Redis.

Real redis-server, real brokers, real paho clients; forged entries written with redis-py."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import redis
from mcloudtt_broker.cluster.envelope import Envelope, encode_envelope
from mcloudtt_broker.cluster.keys import ClusterKeys
from mcloudtt_broker.cluster.records import encode_record

from .conftest import start_broker, wait_filters, wait_ready, wait_until

BAD = "mcloudtt_cluster_bad_tags_total"


def key_file(tmp_path: Path, name: str, *keys: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(b"\n".join(keys) + b"\n")
    return str(path)


def forged_record(topic: str, payload: bytes, sequence: int = 1) -> bytes:
    envelope = Envelope(
        origin="intruder",
        sequence=sequence,
        received_at_us=0,
        client_id="",
        topic=topic,
        payload=payload,
        qos=1,
    )
    return encode_record(encode_envelope(envelope), True, ())


@pytest.mark.parametrize("mode", ["routed", "broadcast"])
def test_same_key_delivers_and_forged_entries_are_dropped_and_counted(
    cluster_factory, clients, redis_server, tmp_path, mode
):
    key = secrets.token_hex(32).encode()
    a, b = cluster_factory(
        2, "--cluster-key-file", key_file(tmp_path, "k", key), "--cluster-mode", mode
    )
    sub = clients(b.port, "sink")
    sub.subscribe("t/#", qos=1)
    wait_filters([a], at_least=1)
    publisher = clients(a.port, "pub")
    publisher.publish("t/1", b"real", qos=1)
    publisher.publish("t/0", b"real0", qos=0)
    assert {sub.get().payload, sub.get().payload} == {b"real", b"real0"}
    assert b.metric(BAD) == 0

    r = redis.Redis(port=redis_server.port)
    inbox = "mcloudtt:inbox:{b2}"
    r.xadd(inbox, {"b": forged_record("t/forged", b"no tag")})
    r.xadd(inbox, {"b": forged_record("t/forged", b"bad tag", 2), "t": b"\x00" * 32})
    # A valid tag from another inbox's context does not verify here (bound to the key name).
    moved = forged_record("t/forged", b"moved", 3)
    r.xadd(inbox, {"b": moved, "t": ClusterKeys([key]).tag(b"mcloudtt:inbox:{b1}", moved)})
    # A control message that would route every topic to a broker that does not exist.
    r.publish("mcloudtt:control", b"add\x00intruder\x00#")
    r.publish(
        "sync",
        encode_envelope(
            Envelope(
                origin="intruder",
                sequence=9,
                received_at_us=0,
                client_id="",
                topic="t/forged",
                payload=b"sync",
                qos=0,
            )
        ),
    )
    expected = 5 if mode == "broadcast" else 4
    wait_until(lambda: b.metric(BAD) >= expected, what="forged entries counted on b")
    assert a.metric(BAD) >= 1  # a saw the forged control message too
    publisher.publish("t/2", b"after", qos=1)
    assert sub.get().payload == b"after"  # real traffic flows; no forged message came first
    with pytest.raises(AssertionError):
        sub.get(timeout=0.3)
    assert b.metric("mcloudtt_cluster_peers") == 1  # "intruder" was not added as a peer
    assert b.metric("mcloudtt_cluster_remote_filters") == 0

    # What the brokers write carries the tag (field `t`), and verifies under the key.
    for _entry_id, fields in r.xrange("mcloudtt:inbox:{b2}"):
        if (
            b"m" not in fields
            and fields.get(b"t") != b"\x00" * 32
            and b"intruder" not in fields[b"b"]
        ):
            assert ClusterKeys([key]).valid(inbox.encode(), fields[b"b"], fields[b"t"])


def test_a_broker_with_another_key_cannot_inject(cluster_factory, clients, redis_server, tmp_path):
    a, b = cluster_factory(2, "--cluster-key-file", key_file(tmp_path, "k", b"k" * 32))
    sub = clients(a.port, "sink")
    sub.subscribe("t/#", qos=1)
    wait_filters([b], at_least=1)
    # Started after the subscription: it reads a's filter from Redis and routes to a's inbox.
    stranger = start_broker(
        redis_server.url, "b3", "--cluster-key-file", key_file(tmp_path, "x", b"x" * 32)
    )
    try:
        wait_until(lambda: stranger.http_get("/readyz")[0] == 200, what="stranger ready")
        wait_until(lambda: stranger.metric("mcloudtt_cluster_remote_filters") >= 1)
        baseline = a.metric(BAD)
        intruder = clients(stranger.port, "intruder")
        for n in range(5):
            intruder.publish("t/x", f"bad-{n}".encode(), qos=1)
        wait_until(lambda: a.metric(BAD) > baseline, what="the stranger's batch counted on a")
        clients(b.port, "pub").publish("t/y", b"good", qos=1)
        assert sub.get().payload == b"good"
        with pytest.raises(AssertionError):
            sub.get(timeout=0.3)
        assert a.metric("mcloudtt_cluster_received_total") == 1
    finally:
        stranger.stop()


def test_key_rotation_old_and_new_accepted_then_old_removed(
    cluster_factory, clients, redis_server, tmp_path
):
    old, new = b"o" * 32, b"n" * 32
    # Mid-rotation: signs with new, accepts old and new.
    (rotating,) = cluster_factory(1, "--cluster-key-file", key_file(tmp_path, "r", new, old))
    brokers = [rotating]
    try:
        on_rotating = clients(rotating.port, "s1")
        on_rotating.subscribe("r/#", qos=1)
        done = start_broker(
            redis_server.url, "b2", "--cluster-key-file", key_file(tmp_path, "n", new)
        )
        brokers.append(done)
        wait_ready([rotating, done])
        on_done = clients(done.port, "s2")
        on_done.subscribe("r/#", qos=1)
        wait_filters([rotating, done], at_least=1)
        # Started last: it reads both filters from Redis (it cannot read the signed control
        # messages), so it routes to both.
        behind = start_broker(
            redis_server.url, "b3", "--cluster-key-file", key_file(tmp_path, "o", old)
        )
        brokers.append(behind)
        wait_until(lambda: behind.http_get("/readyz")[0] == 200)
        wait_filters([behind], at_least=2)
        baseline = done.metric(BAD)
        # A broker still on the old key: accepted where old is still accepted...
        clients(behind.port, "p-old").publish("r/old", b"from-old", qos=1)
        assert on_rotating.get().payload == b"from-old"
        # ...and dropped and counted where the old key was removed.
        wait_until(lambda: done.metric(BAD) > baseline, what="old key refused on b2")
        # The rotating broker signs with the new key: accepted by the broker that has only it.
        clients(rotating.port, "p-new").publish("r/new", b"from-new", qos=1)
        assert on_done.get().payload == b"from-new"
        with pytest.raises(AssertionError):
            on_done.get(timeout=0.3)  # never the old key's message
    finally:
        for broker in brokers[1:]:
            broker.stop()


def test_an_unusable_key_file_is_refused_at_start(tmp_path):
    from brokerproc import BrokerProcess

    short = key_file(tmp_path, "short", b"tiny")
    proc = BrokerProcess("--redis", "redis://127.0.0.1:1", "--cluster-key-file", short)
    command = proc._command()
    import subprocess

    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "shorter than 16 bytes" in result.stderr
    assert "Traceback" not in result.stderr


def test_broker_kill_with_a_cluster_key_loses_no_acknowledged_message(cluster_factory, tmp_path):
    """The replay of a dead broker's inbox (tagged batches and end markers) works under a key."""
    from .test_noloss import QUEUE, check, run_kill

    brokers = cluster_factory(3, *QUEUE, "--cluster-key-file", key_file(tmp_path, "k", b"z" * 32))
    pub, sub = run_kill(brokers, 5, 1, "after-expiry")
    check(pub, sub, 1)
    assert all(b.metric(BAD) == 0 for b in brokers if b.alive())
