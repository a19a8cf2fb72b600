"""The Redis user store shared by the cluster: a user written to Redis logs in on every broker
within a second; a changed password and a removed user too; Redis down refuses with 0x88."""

from __future__ import annotations

import time

import redis
from broker.clients import PahoClient, wait_until
from broker.mqttraw import RawClient
from mcloudtt_broker.auth.passwords import hash_password
from redisproc import RedisProcess

from .conftest import start_broker, wait_ready


def code(port: int, user: str, password: bytes, version: int = 5) -> int:
    client = RawClient(port, version=version)
    try:
        return client.connect(f"c-{user}", username=user, password=password).code
    finally:
        client.close()


def test_users_in_redis_are_seen_by_every_broker_within_a_second(tmp_path) -> None:
    server = RedisProcess().start()
    brokers = []
    try:
        brokers = [start_broker(server.url, f"ru{i}", "--auth-chain", "redis") for i in (1, 2)]
        wait_ready(brokers)
        a, b = brokers
        store = redis.Redis.from_url(server.url)
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
        # Redis gone: refused as unavailable, not as a bad password (and no trace in the log).
        server.stop()
        wait_until(lambda: code(a.port, "erin", b"pw2") == 0x88, 5)
        assert code(a.port, "erin", b"pw2", version=4) == 3
    finally:
        for broker in brokers:
            broker.stop()
        server.close()
    assert "Traceback" not in brokers[0].output()
