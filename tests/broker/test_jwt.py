"""JWT in the password field against real brokers: HS256 with a secret file, RS256 and ES256
with a JWKS file; expired, not yet valid, wrong audience, wrong signature; rights in claims."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from .clients import PahoClient, mcloudtt_only
from .mqttraw import RawClient

pytestmark = mcloudtt_only

SECRET = b"a shared secret of the test, long enough for HS256"


def code(
    port: int, password: str | bytes | None, username: str | None = "dana", version: int = 5
) -> int:
    """The CONNACK code (3.1.1 has no password without a username, MQTT-3.1.2-22)."""
    client = RawClient(port, version=version)
    try:
        pw = password.encode() if isinstance(password, str) else password  # type: ignore[union-attr]
        return client.connect("j1", username=username, password=pw).code
    finally:
        client.close()


def claims(**extra: object) -> dict[str, object]:
    now = int(time.time())
    return {"sub": "dana", "exp": now + 300, "aud": "mqtt", **extra}


@pytest.fixture
def hs_broker(broker_factory, tmp_path: Path):
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(SECRET + b"\n")
    return broker_factory("--jwt-secret-file", str(secret), "--jwt-audience", "mqtt")


@pytest.mark.parametrize(("version", "refused"), [(5, 0x86), (4, 4)])
def test_hs256_accepts_valid_tokens_and_refuses_bad_ones(hs_broker, version, refused) -> None:
    port = hs_broker.port
    now = int(time.time())
    good = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert code(port, good, version=version) == 0
    if version == 5:
        assert code(port, good, None, version=version) == 0  # known by its sub
    assert code(port, good, "someone-else", version=version) == refused
    bad = {
        "expired": jwt.encode(claims(exp=now - 10), SECRET, algorithm="HS256"),
        "not yet": jwt.encode(claims(nbf=now + 300), SECRET, algorithm="HS256"),
        "audience": jwt.encode(claims(aud="other"), SECRET, algorithm="HS256"),
        "no audience": jwt.encode({"sub": "dana", "exp": now + 300}, SECRET, algorithm="HS256"),
        "no exp": jwt.encode({"sub": "dana", "aud": "mqtt"}, SECRET, algorithm="HS256"),
        "signature": jwt.encode(claims(), b"another secret, also long enough!!", algorithm="HS256"),
        "alg none": jwt.encode(claims(), None, algorithm="none"),
    }
    assert {
        name: code(port, token, version=version) for name, token in bad.items()
    } == dict.fromkeys(bad, refused)
    # Not a JWT and no other authenticator: a wrong password; no password: not authorised.
    assert code(port, "plain password", "dana", version=version) == refused
    assert code(port, None, None, version=version) == (0x87 if version == 5 else 5)
    assert hs_broker.metric("mcloudtt_auth_total", result="success") == (2 if version == 5 else 1)


def test_rs256_and_es256_from_a_jwks_file(broker_factory, tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_jwk = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    ec_jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    rsa_jwk.update(kid="r1", alg="RS256", use="sig")
    ec_jwk.update(kid="e1", alg="ES256", use="sig")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [rsa_jwk, ec_jwk]}))
    b = broker_factory("--jwks-file", str(jwks), "--jwt-audience", "mqtt")
    rs = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "r1"})
    es = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "e1"})
    assert code(b.port, rs, None) == 0
    assert code(b.port, es, version=4) == 0
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "r1"})
    assert code(b.port, forged) == 0x86
    # An HS256 token signed with the public key as secret is not accepted (no secret here).
    assert code(b.port, jwt.encode(claims(), SECRET, algorithm="HS256")) == 0x86
    expired = jwt.encode(
        claims(exp=int(time.time()) - 5), ec_key, algorithm="ES256", headers={"kid": "e1"}
    )
    assert code(b.port, expired) == 0x86


@pytest.mark.parametrize(("version", "denied"), [(5, 0x87), (4, 0x80)])
def test_rights_from_claims(hs_broker, version, denied) -> None:
    token = jwt.encode(
        claims(acl={"pub": ["dana/out/#"], "sub": ["dana/in/#"], "all": ["shared/+"]}),
        SECRET,
        algorithm="HS256",
    )
    dana = PahoClient(hs_broker.port, "d1", version=version, username="dana", password=token)
    free = PahoClient(
        hs_broker.port,
        "f1",
        version=version,
        username="free",
        password=jwt.encode(claims(sub="free"), SECRET, algorithm="HS256"),
    )
    try:
        assert dana.reason == 0
        assert dana.subscribe("dana/in/#", 1) == [1]
        assert dana.subscribe("shared/x", 1) == [1]
        assert dana.subscribe("dana/out/#", 1) == [denied]
        assert dana.subscribe("#", 1) == [denied]
        # A token without rights: everything (no ACL file).
        assert free.subscribe("#", 1) == [1]
        dana.publish("dana/out/a", b"ok", qos=1)
        dana.publish("dana/in/a", b"not hers to write", qos=1)
        free.publish("dana/in/b", b"for dana", qos=1)
        assert [m.payload for m in free.get_n(2)] == [b"ok", b"for dana"]
        assert dana.get().payload == b"for dana"
    finally:
        dana.disconnect()
        free.disconnect()
