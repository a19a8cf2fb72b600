"""SCRAM-SHA-256, the core's exchange (sans-IO): RFC 7677's test vector, a wrong password, an
unknown user, a replayed and a tampered proof, and the stored credential's text form."""

from __future__ import annotations

import base64
import random
from collections.abc import Callable

import mcloudtt_mqttclient as mqttclient
import pytest
from broker.scram_client import ScramClient, auth_props
from mcloudtt_broker.auth.passwords import PasswordFile
from mcloudtt_broker.core.auth import Answer, AuthChain, Credentials, Outcome, Result
from mcloudtt_broker.core.broker import Broker, BrokerSettings
from mcloudtt_broker.core.connection import ServerConnection
from mcloudtt_broker.core.scram import (
    Lookup,
    ScramCredential,
    ScramError,
    ScramExchange,
    make_credential,
    parse_credential,
    verify_password,
)
from scramp import ScramMechanism

# RFC 7677 section 3.
CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")


def pencil() -> ScramCredential:
    _, stored, server, _ = ScramMechanism().make_auth_info("pencil", 4096, SALT)
    return ScramCredential(SALT, 4096, stored, server)


def test_rfc7677_vector() -> None:
    exchange = ScramExchange(CLIENT_FIRST, reauth=False, nonce=SERVER_NONCE)
    assert exchange.username == "user"
    assert exchange.server_first(pencil()) == SERVER_FIRST
    assert exchange.server_final(CLIENT_FINAL) == SERVER_FINAL


def test_a_wrong_password_an_unknown_user_and_a_tampered_proof_fail() -> None:
    _, stored, server, _ = ScramMechanism().make_auth_info("not-pencil", 4096, SALT)
    other = ScramExchange(CLIENT_FIRST, reauth=False, nonce=SERVER_NONCE)
    assert other.server_first(ScramCredential(SALT, 4096, stored, server)) == SERVER_FIRST
    with pytest.raises(ScramError):
        other.server_final(CLIENT_FINAL)  # the proof of "pencil"
    unknown = ScramExchange(CLIENT_FIRST, reauth=False, nonce=SERVER_NONCE)
    first = unknown.server_first(None)  # a made-up salt, same shape as a real answer
    assert first.startswith(b"r=rOprNGfwEbeRWgbNEkqO" + SERVER_NONCE.encode() + b",s=")
    assert first == ScramExchange(CLIENT_FIRST, reauth=False, nonce=SERVER_NONCE).server_first(
        None
    )  # stable: asking twice does not tell an unknown user from a known one
    with pytest.raises(ScramError):
        unknown.server_final(CLIENT_FINAL)
    tampered = ScramExchange(CLIENT_FIRST, reauth=False, nonce=SERVER_NONCE)
    tampered.server_first(pencil())
    proof = bytearray(base64.b64decode(CLIENT_FINAL.rsplit(b"p=", 1)[1]))
    proof[0] ^= 1
    with pytest.raises(ScramError):
        tampered.server_final(CLIENT_FINAL.rsplit(b"p=", 1)[0] + b"p=" + base64.b64encode(proof))


def test_a_replayed_client_final_fails_against_a_fresh_nonce() -> None:
    exchange = ScramExchange(CLIENT_FIRST, reauth=False)  # a random server nonce
    exchange.server_first(pencil())
    with pytest.raises(ScramError):
        exchange.server_final(CLIENT_FINAL)  # recorded from another exchange
    with pytest.raises(ScramError):
        exchange.server_final(CLIENT_FINAL)  # and the exchange is over


@pytest.mark.parametrize(
    "first", [b"", b"\xff", b"p=tls-unique,,n=user,r=abc", b"n,,r=abc", b"n,,n=a=b,r=x"]
)
def test_broken_client_first_messages_are_refused(first: bytes) -> None:
    with pytest.raises(ScramError):
        ScramExchange(first, reauth=False)


def test_a_username_with_escapes() -> None:
    assert ScramExchange(b"n,,n=a=2Cb=3Dc,r=xyz", reauth=False).username == "a,b=c"


def test_stored_credentials_never_hold_the_password() -> None:
    text = make_credential(b"hunter2")
    assert text.startswith("$scram-sha-256$i=4096$") and "hunter2" not in text
    credential = parse_credential(text)
    assert verify_password(b"hunter2", credential)
    assert not verify_password(b"hunter3", credential)
    for broken in ("$scrypt$x", text.replace("i=4096", "i=10"), text[:-8]):
        with pytest.raises(ValueError):
            parse_credential(broken)


# ------------------------------------------------------------- the connection state machine


class Link:
    def __init__(self) -> None:
        self.closed = False

    def kick(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class LaterStore:
    """A credential store that answers later, as Redis does (the core must wait, not block)."""

    name = "later"

    def __init__(self, stored: str) -> None:
        self.stored = stored
        self.waiting: list[Callable[[Lookup], None]] = []

    def authenticate(self, credentials: Credentials, answer: Answer) -> Result:
        return Outcome.IGNORE, None

    def scram_credential(self, username: str, answer: Callable[[Lookup], None]) -> None:
        self.waiting.append(answer)

    def answer_all(self) -> None:
        for answer in self.waiting:
            answer((Outcome.ALLOW, parse_credential(self.stored), None))
        self.waiting.clear()


def packets(conn: ServerConnection) -> list[mqttclient.Packet]:
    return [mqttclient.parse(*f, version=5) for f in mqttclient.Reader().frames(conn.take_output())]


def exchange(
    conn: ServerConnection, scram: ScramClient, store: LaterStore | None
) -> tuple[bytes, bytes]:
    """The CONNECT and the AUTH of a whole SCRAM exchange fed to `conn`; the CONNACK checked."""
    first = mqttclient.connect("c", version=5, props=auth_props(scram.first()))
    conn.receive_data(first, 1.0)
    if store is not None:
        assert packets(conn) == []  # waiting for the store, nothing sent yet
        store.answer_all()
    (challenge,) = packets(conn)
    final = mqttclient.auth(0x18, auth_props(scram.final(challenge.prop(mqttclient.AUTH_DATA))))
    conn.receive_data(final, 1.0)
    (ack,) = packets(conn)
    assert (ack.type, ack.code) == (mqttclient.CONNACK, 0)
    scram.check_server_final(ack.prop(mqttclient.AUTH_DATA))
    return first, final


def test_the_core_waits_for_a_store_that_answers_later() -> None:
    store = LaterStore(make_credential(b"pw"))
    broker = Broker(BrokerSettings(), clock=lambda: 1.0, auth=AuthChain([store]))
    conn = broker.connect(Link(), 1.0)
    exchange(conn, ScramClient("sam", b"pw"), store)
    assert conn.username == "sam" and broker.stats.auth["success"] == 1


def test_mutated_exchanges_never_crash_the_core() -> None:
    """Seeded fuzzing of the SCRAM paths: a recorded exchange (and a re-authentication) with
    bytes flipped, cut or repeated; every outcome is a reply or a close, never an exception."""
    users = {"sam": make_credential(b"pw")}
    broker = Broker(BrokerSettings(), clock=lambda: 1.0, auth=AuthChain([PasswordFile(users)]))
    conn = broker.connect(Link(), 1.0)
    first, final = exchange(conn, ScramClient("sam", b"pw"), None)
    reauth = mqttclient.auth(0x19, auth_props(ScramClient("sam", b"pw").first()))
    rng = random.Random(13)
    for _ in range(3000):
        connected = rng.random() < 0.3
        # Either a whole CONNECT exchange (replayed: the server's nonce is new each time) with
        # maybe a re-authentication after it, or a re-authentication on a connected client.
        data = bytearray(reauth + final if connected else first + final)
        if not connected and rng.random() < 0.5:
            data += reauth
        for _ in range(rng.randint(1, 4)):
            roll, at = rng.random(), rng.randrange(len(data))
            if roll < 0.6:
                data[at] = rng.randrange(256)
            elif roll < 0.8:
                del data[at : at + rng.randint(1, 8)]
            else:
                data[at:at] = data[at : at + rng.randint(1, 16)]
        link = Link()
        conn = broker.connect(link, 1.0)
        if connected:
            exchange(conn, ScramClient("sam", b"pw"), None)
        step = rng.choice([len(data), 1, 7])
        for i in range(0, len(data), step):
            conn.receive_data(bytes(data[i : i + step]), 1.0)
            conn.take_output()
        conn.connection_lost(1.0)
        assert link.closed
    assert broker.stats.auth["bad_username_or_password"] > 10
    assert broker.stats.protocol_errors > 100
    assert broker.stats.auth["reauth_failure"] > 10
