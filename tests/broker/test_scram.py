"""MQTT 5.0 enhanced authentication with SCRAM-SHA-256 (section 4.12) against a running broker,
over TCP and TLS: the exchange, a wrong password, an unknown method, re-authentication that
succeeds and one that fails, a replayed and a tampered proof. Credentials from `mcloudtt-broker
passwd --scram`; the client side is `scram_client` on the independent codec (paho cannot answer
AUTH)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from signal import SIGHUP

import pytest
from brokerproc import free_port, wait_for_port
from mcloudtt_broker.auth.passwords import read_file
from redisproc import TlsFiles

from .clients import PahoClient, mcloudtt_only, wait_until
from .mqttraw import AUTH, AUTH_DATA, AUTH_METHOD, CONNACK, DISCONNECT, RawClient, connect, publish
from .mqttraw import auth as auth_packet
from .scram_client import ScramClient, auth_props, reauthenticate, scram_connect
from .test_auth import passwd

pytestmark = mcloudtt_only


@pytest.fixture
def scram_file(tmp_path: Path) -> Path:
    path = tmp_path / "passwords"
    assert passwd(path, "sam", "s3cret", "--scram") == 0
    assert passwd(path, "olga", "scrypt-only") == 0  # an scrypt user: no SCRAM for her
    return path


def test_passwd_scram_stores_keys_not_the_password(scram_file: Path, broker_factory) -> None:
    stored = read_file(scram_file)["sam"]
    assert stored.startswith("$scram-sha-256$i=4096$") and "s3cret" not in scram_file.read_text()
    b = broker_factory("--password-file", str(scram_file))
    # The same entry also logs in with the plain password (paho, 3.1.1 and 5.0).
    for version in (4, 5):
        ok = PahoClient(b.port, f"p{version}", version=version, username="sam", password="s3cret")
        assert ok.reason == 0
        ok.disconnect()


def test_scram_success_wrong_password_and_unknown_users(broker_factory, scram_file) -> None:
    b = broker_factory("--password-file", str(scram_file))
    client = RawClient(b.port)
    scram = ScramClient("sam", b"s3cret")
    ack = scram_connect(client, "sc1", scram)
    assert ack.type == CONNACK and ack.code == 0
    assert ack.prop(AUTH_METHOD) == "SCRAM-SHA-256"  # MQTT-4.12.0-5
    scram.check_server_final(ack.prop(AUTH_DATA))  # the broker proved it knows the credential
    assert client.subscribe(("sam/#", 1)).codes == [1]
    assert client.publish("sam/x", b"hi", qos=1).code == 0
    assert client.next_publish().payload == b"hi"
    client.close()
    for user, password in (("sam", b"wrong"), ("nobody", b"x"), ("olga", b"scrypt-only")):
        client = RawClient(b.port)
        ack = scram_connect(client, "sc2", ScramClient(user, password))
        assert (ack.type, ack.code) == (CONNACK, 0x86), user
        assert ack.prop(AUTH_METHOD) is None
        client.close()
    assert b.metric("mcloudtt_auth_total", result="success") == 1
    assert b.metric("mcloudtt_auth_total", result="bad_username_or_password") == 3
    b.stop()
    assert "s3cret" not in b.output() and "wrong" not in b.output()


def test_unknown_methods_get_0x8c(broker_factory, scram_file, tmp_path) -> None:
    b = broker_factory("--password-file", str(scram_file))
    client = RawClient(b.port)
    ack = scram_connect(client, "m1", ScramClient("sam", b"s3cret"), method="SCRAM-SHA-1")
    assert (ack.type, ack.code) == (CONNACK, 0x8C)  # MQTT-4.12.0-1
    client.close()
    # paho can send an Authentication Method in CONNECT: refused the same way.
    paho = PahoClient(
        b.port,
        "m2",
        connect_props={"AuthenticationMethod": "PLAIN", "AuthenticationData": b"\0sam\0s3cret"},
    )
    assert paho.reason == 0x8C
    paho.disconnect()
    assert b.metric("mcloudtt_auth_total", result="bad_authentication_method") == 2
    # Without any credential store SCRAM is not offered at all.
    open_broker = broker_factory("--allow-anonymous", "true")
    client = RawClient(open_broker.port)
    ack = scram_connect(client, "m3", ScramClient("sam", b"s3cret"))
    assert (ack.type, ack.code) == (CONNACK, 0x8C)
    client.close()


def test_replayed_and_tampered_proofs_are_refused(broker_factory, scram_file) -> None:
    b = broker_factory("--password-file", str(scram_file))
    recorded = ScramClient("sam", b"s3cret")
    client = RawClient(b.port)
    assert scram_connect(client, "r1", recorded).code == 0
    client.close()
    # The same client-final again (same client nonce): the server's nonce is new each time.
    client = RawClient(b.port)
    again = ScramClient("sam", b"s3cret", nonce=recorded.nonce)
    ack = scram_connect(client, "r2", again, replay=recorded.client_final)
    assert (ack.type, ack.code) == (CONNACK, 0x86)
    client.close()
    client = RawClient(b.port)
    ack = scram_connect(client, "r3", ScramClient("sam", b"s3cret"), tamper=True)
    assert (ack.type, ack.code) == (CONNACK, 0x86)
    client.close()


def test_reauthentication_success_and_failure(broker_factory, scram_file) -> None:
    b = broker_factory("--password-file", str(scram_file))
    client = RawClient(b.port)
    assert scram_connect(client, "ra", ScramClient("sam", b"s3cret")).code == 0
    assert client.subscribe("sam/in").codes == [0]
    # Re-authentication (MQTT-4.12.1-1) while traffic goes on.
    scram = ScramClient("sam", b"s3cret")
    client.send(publish("sam/in", b"before", version=5))
    done = reauthenticate(client, scram)
    assert (done.type, done.code) == (AUTH, 0) and done.prop(AUTH_METHOD) == "SCRAM-SHA-256"
    scram.check_server_final(done.prop(AUTH_DATA))
    assert client.publish("sam/in", b"after", qos=1).code == 0
    got = [client.next_publish().payload for _ in range(2)]
    assert got == [b"before", b"after"]
    assert b.metric("mcloudtt_auth_total", result="reauth_success") == 1
    # The password changes on disk; after SIGHUP the old one no longer re-authenticates: the
    # broker sends DISCONNECT 0x87 and closes (MQTT-4.12.1-2).
    assert passwd(scram_file, "sam", "n3w", "--scram") == 0
    b.signal(SIGHUP)
    wait_until(lambda: "reloaded" in b.log_text(), 5)
    failed = reauthenticate(client, ScramClient("sam", b"s3cret"))
    assert (failed.type, failed.code) == (DISCONNECT, 0x87)
    assert b.metric("mcloudtt_auth_total", result="reauth_failure") == 1
    client.close()
    # The new password re-authenticates; a tampered proof fails the same way.
    client = RawClient(b.port)
    assert scram_connect(client, "rb", ScramClient("sam", b"n3w")).code == 0
    assert reauthenticate(client, ScramClient("sam", b"n3w")).code == 0
    failed = reauthenticate(client, ScramClient("sam", b"n3w"), tamper=True)
    assert (failed.type, failed.code) == (DISCONNECT, 0x87)
    client.close()


def test_auth_out_of_turn_is_a_protocol_error(broker_factory, scram_file) -> None:
    b = broker_factory("--password-file", str(scram_file))
    # Connected with a password, not a method: no AUTH may follow (MQTT-4.12.0-7).
    client = RawClient(b.port)
    assert client.connect("pw", username="sam", password=b"s3cret").code == 0
    client.send(auth_packet(0x19, auth_props(ScramClient("sam", b"s3cret").first())))
    assert (client.expect(DISCONNECT).code) == 0x82
    client.close()
    # Mid-exchange, only AUTH or DISCONNECT (MQTT-3.1.2-30): a PUBLISH closes the connection.
    client = RawClient(b.port)
    client.send(connect("mid", version=5, props=auth_props(ScramClient("sam", b"x").first())))
    assert client.expect(AUTH).code == 0x18
    client.send(publish("t", b"x", version=5))
    ack = client.recv()
    assert (ack.type, ack.code) == (CONNACK, 0x82)
    client.close()
    # A different method on re-authentication (MQTT-4.12.1-1).
    client = RawClient(b.port)
    assert scram_connect(client, "m", ScramClient("sam", b"s3cret")).code == 0
    client.send(auth_packet(0x19, auth_props(b"n,,n=sam,r=abc", "SCRAM-SHA-512")))
    assert client.expect(DISCONNECT).code == 0x82
    client.close()


def test_scram_over_tls(broker_factory, scram_file, tmp_path) -> None:
    tls = TlsFiles(tmp_path / "tls")
    tls_port = free_port()
    b = broker_factory(
        "--password-file", str(scram_file), "--tls-bind", f"127.0.0.1:{tls_port}",
        "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key),
    )  # fmt: skip
    wait_for_port(tls_port)
    context = ssl.create_default_context(cafile=str(tls.ca))
    for password, code in ((b"s3cret", 0), (b"wrong", 0x86)):
        raw = socket.create_connection(("127.0.0.1", tls_port), timeout=5)
        client = RawClient(tls_port, sock=context.wrap_socket(raw, server_hostname="127.0.0.1"))
        scram = ScramClient("sam", password)
        ack = scram_connect(client, "tls1", scram)
        assert (ack.type, ack.code) == (CONNACK, code)
        if code == 0:
            scram.check_server_final(ack.prop(AUTH_DATA))
            assert reauthenticate(client, ScramClient("sam", b"s3cret")).type == AUTH
        client.close()
    assert b.metric("mcloudtt_auth_total", result="reauth_success") == 1


def _salt_offered(port: int, user: str) -> str:
    client = RawClient(port)
    try:
        client.send(connect("decoy", version=5, props=auth_props(ScramClient(user, b"x").first())))
        reply = client.recv()
        assert reply.type == AUTH and reply.code == 0x18
        data = reply.prop(AUTH_DATA)
        assert isinstance(data, bytes)
        return dict(part.split("=", 1) for part in data.decode().split(","))["s"]
    finally:
        client.close()


def test_an_unknown_user_gets_the_same_salt_from_every_broker_of_a_cluster(
    broker_factory, scram_file, tmp_path
) -> None:
    # Two brokers offering an unknown user two different salts would tell it from a real user
    # (whose stored salt is the same everywhere): the made-up salts come from the cluster key.
    key, other = tmp_path / "cluster.key", tmp_path / "other.key"
    key.write_text("a" * 64 + "\n")
    other.write_text("b" * 64 + "\n")
    args = ("--password-file", str(scram_file))
    a = broker_factory(*args, "--cluster-key-file", str(key))
    b = broker_factory(*args, "--cluster-key-file", str(key))
    c = broker_factory(*args, "--cluster-key-file", str(other))
    assert _salt_offered(a.port, "nobody") == _salt_offered(b.port, "nobody")
    assert _salt_offered(a.port, "nobody") != _salt_offered(a.port, "somebody-else")
    assert _salt_offered(c.port, "nobody") != _salt_offered(a.port, "nobody")
    # A real user's salt is the stored one, on every broker.
    assert _salt_offered(a.port, "sam") == _salt_offered(c.port, "sam")
