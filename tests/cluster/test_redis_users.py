"""The Redis user store shared by the cluster: a user written to Redis logs in on every broker
within a second; a changed password and a removed user too; Redis down refuses with 0x88.

Each test runs on one Redis and on a real Redis Cluster (3 primaries, 3 replicas): there the
users hash and the rights hashes live on other shards than the seed node the brokers are given,
so a single-node client would be answered MOVED."""

from __future__ import annotations

import time

from broker.clients import PahoClient, wait_until
from broker.mqttraw import RawClient
from mcloudtt_broker.auth.passwords import hash_password
from mcloudtt_chaos.procs import HOST
from redis.crc import key_slot

from .conftest import UserStore, start_broker, wait_ready


def code(port: int, user: str, password: bytes, version: int = 5) -> int:
    client = RawClient(port, version=version)
    try:
        return client.connect(f"c-{user}", username=user, password=password).code
    finally:
        client.close()


def not_all_on_the_seed(user_store: UserStore, *keys: str) -> None:
    """On a cluster: some key is served by another node than the one in the URL."""
    if not user_store.cluster:
        return
    seed = int(user_store.url.rsplit(":", 1)[1].split("/")[0])
    owners = {user_store.store.get_node_from_key(key).port for key in keys}
    assert owners != {seed}, f"slots {[key_slot(k.encode()) for k in keys]} all on {HOST}:{seed}"


def test_users_in_redis_are_seen_by_every_broker_within_a_second(user_store: UserStore) -> None:
    server = user_store.server
    brokers = []
    try:
        brokers = [start_broker(user_store.url, f"ru{i}", "--auth-chain", "redis") for i in (1, 2)]
        wait_ready(brokers)
        a, b = brokers
        store = user_store.store
        not_all_on_the_seed(user_store, "mcloudtt:users")
        assert code(a.port, "erin", b"pw1") == 0x86  # not there yet
        store.hset("mcloudtt:users", "erin", hash_password(b"pw1"))
        added = time.monotonic()
        for broker in (a, b):
            wait_until(lambda broker=broker: code(broker.port, "erin", b"pw1") == 0, 1.5)
        assert time.monotonic() - added < 1.5
        assert code(b.port, "erin", b"wrong", version=4) == 4
        assert code(a.port, "nobody", b"x") == 0x86
        # paho 3.1.1 and 5.0 through the store
        for version in (4, 5):
            client = PahoClient(
                b.port, f"p{version}", version=version, username="erin", password="pw1"
            )
            assert client.reason == 0
            client.disconnect()
        # A changed password: the old one stops working everywhere within a second.
        store.hset("mcloudtt:users", "erin", hash_password(b"pw2"))
        for broker in (a, b):
            wait_until(lambda broker=broker: code(broker.port, "erin", b"pw1") == 0x86, 1.5)
            assert code(broker.port, "erin", b"pw2") == 0
        store.hdel("mcloudtt:users", "erin")
        wait_until(lambda: code(a.port, "erin", b"pw2") == 0x86, 1.5)
        assert a.metric("mcloudtt_auth_total", result="success") >= 2
        if server is not None:
            # Redis gone: refused as unavailable, not as a bad password (no trace in the log).
            server.stop()
            wait_until(lambda: code(a.port, "erin", b"pw2") == 0x88, 5)
            assert code(a.port, "erin", b"pw2", version=4) == 3
    finally:
        for broker in brokers:
            broker.stop()
    assert "Traceback" not in brokers[0].output()


def test_rights_in_redis_reach_running_clients_within_a_second(user_store: UserStore) -> None:
    brokers = []
    try:
        brokers = [start_broker(user_store.url, f"ra{i}", "--auth-chain", "redis") for i in (1, 2)]
        wait_ready(brokers)
        a, b = brokers
        store = user_store.store
        not_all_on_the_seed(user_store, "mcloudtt:users", "mcloudtt:acl:fay")
        store.hset(
            "mcloudtt:users", mapping={"fay": hash_password(b"pw"), "gus": hash_password(b"pw")}
        )
        store.hset("mcloudtt:acl:fay", mapping={"fay/#": "readwrite", "news/#": "read"})
        fay = PahoClient(a.port, "fay1", username="fay", password="pw")
        fay4 = PahoClient(b.port, "fay2", version=4, username="fay", password="pw")
        gus = PahoClient(b.port, "gus1", username="gus", password="pw")  # no rights of his own
        try:
            assert fay.subscribe("news/#", 1) == [1]
            assert fay.subscribe("gus/#", 1) == [0x87]
            assert fay4.subscribe("gus/#", 1) == [0x80]
            assert gus.subscribe("#", 1) == [1]  # no ACL file: allowed
            gus.publish("news/a", b"one", qos=1)
            assert fay.get().payload == b"one"
            # Take news/secret away from fay in Redis: her running connection is held back.
            store.hset("mcloudtt:acl:fay", "news/secret", "deny")
            changed = time.monotonic()

            def held_back() -> bool:
                gus.publish("news/secret", b"hidden", qos=1)
                gus.publish("news/a", b"marker", qos=1)
                return fay.until("news/a") == []

            wait_until(held_back, 2.0, "fay's new rights from Redis")
            assert time.monotonic() - changed < 2.0
            assert a.metric("mcloudtt_acl_decisions_total", action="read", result="deny") >= 1
        finally:
            for client in (fay, fay4, gus):
                client.disconnect()
    finally:
        for broker in brokers:
            broker.stop()
