"""Authentication and ACLs against real broker processes: paho (3.1.1, 5.0), aiomqtt, raw
clients over TCP and TLS; the `passwd` console script; SIGHUP reloads."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from pathlib import Path
from signal import SIGHUP

import aiomqtt
import pytest
from brokerproc import broker_command, free_port, wait_for_port
from mcloudtt_broker.auth.passwords import read_file, verify_password
from redisproc import TlsFiles

from .clients import PahoClient, mcloudtt_only, wait_until
from .mqttraw import PUBACK, RawClient, publish

pytestmark = mcloudtt_only


def passwd(path: Path, user: str, password: str | None = None, *flags: str) -> int:
    """The real console script, the password on standard input (not a terminal)."""
    done = subprocess.run(
        [*broker_command(), "passwd", str(path), user, *flags],
        input=(password + "\n").encode() if password is not None else b"",
        capture_output=True,
        timeout=30,
    )
    return done.returncode


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "passwords"
    assert passwd(path, "alice", "secret") == 0
    assert passwd(path, "bob", "hunter2") == 0
    return path


def test_passwd_adds_changes_and_deletes_users(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    assert passwd(path, "alice", "one") == 0
    assert (path.stat().st_mode & 0o777) == 0o600
    first = read_file(path)["alice"]
    assert first.startswith("$scrypt$ln=14,r=8,p=1$") and "one" not in path.read_text()
    assert verify_password(b"one", first)
    assert passwd(path, "alice", "two") == 0  # change
    assert verify_password(b"two", read_file(path)["alice"])
    assert passwd(path, "carol", "three") == 0
    assert passwd(path, "alice", None, "--delete") == 0
    assert list(read_file(path)) == ["carol"]
    assert passwd(path, "alice", None, "--delete") == 1  # no such user
    assert passwd(path, "bad:name", "x") == 2


def raw_codes(port: int, version: int) -> list[int]:
    out = []
    for user, password in (
        ("alice", b"secret"),
        ("alice", b"wrong"),
        ("nobody", b"x"),
        (None, None),
    ):
        client = RawClient(port, version=version)
        try:
            out.append(client.connect("c", username=user, password=password).code)
        finally:
            client.close()
    return out


@pytest.mark.parametrize(
    ("version", "codes"), [(5, [0, 0x86, 0x86, 0x87]), (4, [0, 4, 4, 5]), (3, [0, 4, 4, 5])]
)
def test_password_file_codes_per_version(broker_factory, password_file, version, codes) -> None:
    b = broker_factory("--password-file", str(password_file))
    assert raw_codes(b.port, version) == codes
    assert b.metric("mcloudtt_auth_total", result="success") == 1
    assert b.metric("mcloudtt_auth_total", result="bad_username_or_password") == 2
    assert b.metric("mcloudtt_auth_total", result="not_authorized") == 1
    b.stop()
    log = b.output()
    assert "CONNECT refused" in log and "bad_username_or_password" in log
    assert "wrong" not in log and "secret" not in log  # never the password


@pytest.mark.parametrize("version", [4, 5])
def test_paho_logs_in_with_the_right_password_only(broker_factory, password_file, version) -> None:
    b = broker_factory("--password-file", str(password_file))
    ok = PahoClient(b.port, "p1", version=version, username="bob", password="hunter2")
    try:
        assert ok.reason == 0
        assert ok.subscribe("bob/x", 1) == [1]
    finally:
        ok.disconnect()
    bad = PahoClient(b.port, "p2", version=version, username="bob", password="hunter3")
    # paho reports 3.1.1's return code 4 as the 5.0 reason 0x86 too.
    assert bad.reason == 0x86
    bad.disconnect()
    anon = PahoClient(b.port, "p3", version=version)
    assert anon.reason == 0x87
    anon.disconnect()


def test_allow_anonymous_beside_a_password_file(broker_factory, password_file) -> None:
    b = broker_factory(
        env={"MCLOUDTT_PASSWORD_FILE": str(password_file), "MCLOUDTT_ALLOW_ANONYMOUS": "true"}
    )
    assert raw_codes(b.port, 5) == [0, 0x86, 0x86, 0]


def test_a_broken_password_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("alice:$scrypt$ln=14,r=8,p=1$AAAA$AAAA\nbroken line\n")
    done = subprocess.run(
        [*broker_command(), "--bind", f"127.0.0.1:{free_port()}", "--password-file", str(path)],
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.decode().strip().splitlines() == [
        f"mcloudtt-broker: error: {path} line 2: expected USER:HASH"
    ]
    done = subprocess.run(
        [*broker_command(), "--auth-chain", "password-file"], capture_output=True, timeout=30
    )
    assert done.returncode == 2 and b"--password-file is not given" in done.stderr


@pytest.mark.parametrize("protocol", [aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5])
def test_aiomqtt_over_tcp_and_tls(broker_factory, password_file, tmp_path, protocol) -> None:
    tls = TlsFiles(tmp_path / "tls")
    tls_port = free_port()
    b = broker_factory(
        "--password-file", str(password_file), "--tls-bind", f"127.0.0.1:{tls_port}",
        "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key),
    )  # fmt: skip
    wait_for_port(tls_port)
    context = ssl.create_default_context(cafile=str(tls.ca))

    async def attempt(port: int, password: str, tls_context: ssl.SSLContext | None) -> str:
        try:
            async with aiomqtt.Client(
                "127.0.0.1",
                port,
                username="alice",
                password=password,
                protocol=protocol,
                tls_context=tls_context,
            ) as client:
                await client.publish("alice/t", b"x", qos=1)
                return "ok"
        except aiomqtt.MqttCodeError as error:
            return f"refused: {int(getattr(error.rc, 'value', error.rc))}"

    for port, tls_context in ((b.port, None), (tls_port, context)):
        assert asyncio.run(attempt(port, "secret", tls_context)) == "ok"
        # 0x86 (paho reports 3.1.1's return code 4 as the 5.0 reason too)
        assert asyncio.run(attempt(port, "bad", tls_context)) == "refused: 134"
    assert b.metric("mcloudtt_auth_total", result="success") == 2


ACL = """\
topic read public/#
user alice
topic readwrite alice/#
topic read feed/#
user bob
topic write feed/#
pattern readwrite devices/%c/#
pattern read home/%u/#
"""


@pytest.fixture
def acl_file(tmp_path: Path) -> Path:
    path = tmp_path / "acl"
    path.write_text(ACL)
    return path


@pytest.mark.parametrize(("version", "denied"), [(5, 0x87), (4, 0x80)])
def test_acl_subscribe_publish_and_patterns(
    broker_factory, password_file, acl_file, version, denied
) -> None:
    b = broker_factory("--password-file", str(password_file), "--acl-file", str(acl_file))
    alice = PahoClient(b.port, "dev1", version=version, username="alice", password="secret")
    try:
        assert alice.subscribe("alice/#", 1) == [1]
        assert alice.subscribe("bob/#", 1) == [denied]
        assert alice.subscribe("devices/dev1/#", 1) == [1]  # %c
        assert alice.subscribe("devices/dev2/#", 1) == [denied]
        assert alice.subscribe("home/alice/+", 1) == [1]  # %u
        assert alice.subscribe("home/bob/+", 1) == [denied]
    finally:
        alice.disconnect()
    # A denied publish: 5.0 PUBACK 0x87, 3.1.1 PUBACK and dropped.
    raw = RawClient(b.port, version=version)
    try:
        assert raw.connect("bobraw", username="bob", password=b"hunter2").code == 0
        raw.send(publish("alice/x", b"no", version=version, qos=1, packet_id=9))
        ack = raw.expect(PUBACK)
        assert (ack.packet_id, ack.code) == (9, 0x87 if version == 5 else 0)
    finally:
        raw.close()
    assert b.metric("mcloudtt_acl_decisions_total", action="subscribe", result="deny") == 3
    assert b.metric("mcloudtt_acl_decisions_total", action="write", result="deny") == 1


def test_acl_delivery_and_sighup_reload(broker_factory, password_file, acl_file) -> None:
    b = broker_factory("--password-file", str(password_file), "--acl-file", str(acl_file))
    alice = PahoClient(b.port, "a1", username="alice", password="secret")
    bob = PahoClient(b.port, "b1", username="bob", password="hunter2")
    try:
        assert alice.subscribe("feed/#", 1) == [1]
        bob.publish("feed/news", b"one", qos=1)
        assert alice.get().payload == b"one"
        # Take alice's read right on feed/secret away while she stays connected.
        acl_file.write_text(
            ACL.replace("topic read feed/#", "topic read feed/#\ntopic deny feed/secret")
        )
        b.signal(SIGHUP)

        def held_back() -> bool:
            bob.publish("feed/secret", b"hidden", qos=1)
            bob.publish("feed/news", b"marker", qos=1)
            return [m.payload for m in alice.until("feed/news")] == []

        wait_until(held_back, what="the reloaded ACL holding back feed/secret")
        assert b.metric("mcloudtt_acl_decisions_total", action="read", result="deny") >= 1
        # The password file is read again too: a user added now can log in.
        assert passwd(password_file, "carol", "pw") == 0
        b.signal(SIGHUP)

        def carol_in() -> bool:
            c = RawClient(b.port, version=5)
            try:
                return c.connect("c1", username="carol", password=b"pw").code == 0
            finally:
                c.close()

        wait_until(carol_in, what="carol, added by passwd, logging in after SIGHUP")
    finally:
        alice.disconnect()
        bob.disconnect()


def test_deny_action_disconnect(broker_factory, password_file, acl_file) -> None:
    b = broker_factory(
        "--password-file", str(password_file), "--acl-file", str(acl_file),
        "--acl-deny-action", "disconnect",
    )  # fmt: skip
    bob = PahoClient(b.port, "b1", username="bob", password="hunter2")
    bob.publish("alice/x", b"no", qos=0, wait=False)
    assert bob.disconnected.wait(5)
    assert bob.disconnect_reason.value == 0x87
    bob.disconnect()


# -- mutual TLS ------------------------------------------------------------------------------


class ClientCerts:
    """A CA, a server certificate for 127.0.0.1, and client certificates by common name."""

    def __init__(self, directory: Path) -> None:
        import trustme

        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.ca = trustme.CA(organization_name="mcloudtt mTLS test CA")
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.server_cert, self.server_key = directory / "server.pem", directory / "server.key"
        server.cert_chain_pems[0].write_to_path(str(self.server_cert))
        server.private_key_pem.write_to_path(str(self.server_key))

    def context(self, common_name: str | None, *, ca: object | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if common_name is not None:
            issuer = ca or self.ca
            cert = issuer.issue_cert(f"{common_name}.example", common_name=common_name)  # type: ignore[attr-defined]
            pem = self.dir / f"{common_name}-{id(issuer)}.pem"
            pem.write_bytes(
                b"".join(b.bytes() for b in (cert.private_key_pem, *cert.cert_chain_pems))
            )
            context.load_cert_chain(str(pem))
        return context


def _tls_connect(port: int, context: ssl.SSLContext, version: int, **kw: object) -> int:
    """The CONNACK code of a raw client over TLS with this context (its certificate)."""
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="127.0.0.1"
    )
    client = RawClient(port, version=version, sock=sock)
    try:
        return client.connect("m1", **kw).code  # type: ignore[arg-type]
    finally:
        client.close()


@pytest.mark.parametrize("version", [4, 5])
def test_mtls_certificate_name_is_the_username(
    broker_factory, password_file, acl_file, tmp_path, version
) -> None:
    certs = ClientCerts(tmp_path / "mtls")
    tls_port = free_port()
    b = broker_factory(
        "--tls-bind", f"127.0.0.1:{tls_port}", "--tls-cert", str(certs.server_cert),
        "--tls-key", str(certs.server_key), "--tls-ca", str(certs.ca_file),
        "--password-file", str(password_file), "--acl-file", str(acl_file),
    )  # fmt: skip
    wait_for_port(tls_port)
    not_authorized = 0x87 if version == 5 else 5
    # A certificate named alice: alice, without a password (and her ACL rights apply).
    assert _tls_connect(tls_port, certs.context("alice"), version) == 0
    # Naming itself as in the certificate is fine; another name falls to the password file.
    assert _tls_connect(tls_port, certs.context("alice"), version, username="alice") == 0
    assert (
        _tls_connect(tls_port, certs.context("alice"), version, username="bob", password=b"x") != 0
    )
    assert (
        _tls_connect(tls_port, certs.context("alice"), version, username="bob", password=b"hunter2")
        == 0
    )
    # Without a certificate (optional here): anonymous is off, the password file still works.
    assert _tls_connect(tls_port, certs.context(None), version) == not_authorized
    assert (
        _tls_connect(tls_port, certs.context(None), version, username="bob", password=b"hunter2")
        == 0
    )
    assert b.metric("mcloudtt_auth_total", result="success") == 4

    # aiomqtt with the certificate: subscribes under alice's ACL rights.
    async def as_alice() -> list[int]:
        async with aiomqtt.Client(
            "127.0.0.1", tls_port, tls_context=certs.context("alice"), identifier="am"
        ) as c:
            await c.subscribe("alice/#", qos=1)
            await c.publish("alice/x", b"hi", qos=1)
            async with asyncio.timeout(5):
                async for m in c.messages:
                    return [len(m.payload)]
        return []

    assert asyncio.run(as_alice()) == [2]


def test_mtls_required_refuses_clients_without_a_valid_certificate(
    broker_factory, tmp_path
) -> None:
    import trustme

    certs = ClientCerts(tmp_path / "mtls")
    tls_port = free_port()
    broker_factory(
        "--tls-bind", f"127.0.0.1:{tls_port}", "--tls-cert", str(certs.server_cert),
        "--tls-key", str(certs.server_key), "--tls-ca", str(certs.ca_file),
        "--tls-require-client-cert",
    )  # fmt: skip
    wait_for_port(tls_port)
    assert _tls_connect(tls_port, certs.context("dev1"), 5) == 0
    for context in (certs.context(None), certs.context("dev2", ca=trustme.CA())):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError, AssertionError)):
            _tls_connect(tls_port, context, 5)


def test_chain_order_decides_who_answers(broker_factory, password_file, tmp_path) -> None:
    """alice's certificate with a wrong password: tls-cert first lets her in, the password file
    first refuses her (it knows alice, and the password is wrong)."""
    certs = ClientCerts(tmp_path / "mtls")
    results = {}
    for chain in ("tls-cert,password-file", "password-file,tls-cert"):
        tls_port = free_port()
        broker_factory(
            "--tls-bind", f"127.0.0.1:{tls_port}", "--tls-cert", str(certs.server_cert),
            "--tls-key", str(certs.server_key), "--tls-ca", str(certs.ca_file),
            "--password-file", str(password_file), "--auth-chain", chain,
        )  # fmt: skip
        wait_for_port(tls_port)
        results[chain] = _tls_connect(
            tls_port, certs.context("alice"), 5, username="alice", password=b"wrong"
        )
    assert results == {"tls-cert,password-file": 0, "password-file,tls-cert": 0x86}
