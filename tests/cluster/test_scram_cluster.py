"""SCRAM-SHA-256 across the cluster: credentials stored in Redis (salt, StoredKey, ServerKey),
a client authenticated on broker A and another on broker B exchange messages; the user's rights
in Redis apply; a password changed in Redis fails the next re-authentication; Redis down: 0x88.
On one Redis and on a real Redis Cluster (3+3)."""

from __future__ import annotations

from broker.clients import wait_until
from broker.mqttraw import AUTH, AUTH_DATA, CONNACK, DISCONNECT, RawClient
from broker.scram_client import ScramClient, reauthenticate, scram_connect
from mcloudtt_broker.auth.passwords import hash_password

from .conftest import UserStore, start_broker, wait_ready


def login(port: int, client_id: str, user: str, password: bytes) -> tuple[RawClient, int]:
    client = RawClient(port)
    scram = ScramClient(user, password)
    ack = scram_connect(client, client_id, scram)
    assert ack.type == CONNACK
    if ack.code == 0:
        scram.check_server_final(ack.prop(AUTH_DATA))
    return client, ack.code


def code_of(port: int, user: str, password: bytes) -> int:
    client, code = login(port, "probe", user, password)
    client.close()
    return code


def test_scram_with_credentials_in_redis_on_two_brokers(user_store: UserStore) -> None:
    server = user_store.server
    brokers = []
    try:
        brokers = [start_broker(user_store.url, f"sc{i}", "--auth-chain", "redis") for i in (1, 2)]
        wait_ready(brokers)
        a, b = brokers
        store = user_store.store
        store.hset("mcloudtt:users", "sam", hash_password(b"pw1", scram=True))
        store.hset("mcloudtt:acl:sam", mapping={"sam/#": "readwrite"})
        on_a, code = login(a.port, "sam-a", "sam", b"pw1")
        assert code == 0
        assert on_a.subscribe(("sam/#", 1)).codes == [1]
        assert on_a.subscribe(("other/#", 1)).codes == [0x87]  # the user's rights from Redis
        on_b, code = login(b.port, "sam-b", "sam", b"pw1")
        assert code == 0
        wait_until(lambda: b.metric("mcloudtt_cluster_remote_filters") >= 1, 5)
        assert on_b.publish("sam/x", b"across", qos=1).code == 0
        assert on_a.next_publish().payload == b"across"
        bad, code = login(b.port, "sam-c", "sam", b"wrong")
        assert code == 0x86
        bad.close()
        # Re-authentication on A reads the store again: fine now, refused once the password
        # has changed in Redis (seen within a second).
        assert reauthenticate(on_a, ScramClient("sam", b"pw1")).type == AUTH
        store.hset("mcloudtt:users", "sam", hash_password(b"pw2", scram=True))

        wait_until(lambda: code_of(a.port, "sam", b"pw1") == 0x86, 1.5, "the new password")
        failed = reauthenticate(on_a, ScramClient("sam", b"pw1"))
        assert (failed.type, failed.code) == (DISCONNECT, 0x87)
        assert a.metric("mcloudtt_auth_total", result="reauth_failure") == 1
        on_a.close()
        on_b.close()
        again, code = login(a.port, "sam-d", "sam", b"pw2")
        assert code == 0
        again.close()
        if server is not None:
            # Redis gone: refused as unavailable, not as a bad password.
            server.stop()
            wait_until(lambda: code_of(b.port, "sam", b"pw2") == 0x88, 5)
    finally:
        for broker in brokers:
            broker.stop()
    assert "Traceback" not in brokers[0].output()
