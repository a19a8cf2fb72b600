"""SCRAM-SHA-256, the core's exchange (sans-IO): RFC 7677's test vector, a wrong password, an
unknown user, a replayed and a tampered proof, and the stored credential's text form."""

from __future__ import annotations

import base64

import pytest
from mcloudtt_broker.core.scram import (
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
