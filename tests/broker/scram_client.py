"""The client side of SCRAM-SHA-256 over MQTT 5 AUTH packets, for tests.

paho-mqtt 2.2 can put an Authentication Method and Data in CONNECT but drops an AUTH packet from
the broker (its packet handler has no AUTH case: MQTT_ERR_PROTOCOL), so it cannot finish the
exchange; aiomqtt is built on paho. The exchange runs on the project's independent client codec
(`RawClient`) over real TCP. The proof is computed here from RFC 5802 section 3's formulas with
hashlib, not with scramp, so the broker's side (scramp) is checked against a second reading of
the RFC.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass, field

from .mqttraw import (
    AUTH,
    AUTH_DATA,
    AUTH_METHOD,
    CONNACK,
    DISCONNECT,
    Packet,
    RawClient,
    auth,
    connect,
)

METHOD = "SCRAM-SHA-256"


@dataclass
class ScramClient:
    username: str
    password: bytes
    nonce: str = field(default_factory=lambda: base64.b64encode(os.urandom(18)).decode())
    client_final: bytes = b""  # the last one sent (a test may replay it)
    expected_signature: bytes = b""

    def first(self) -> bytes:
        self.bare = f"n={self.username.replace('=', '=3D').replace(',', '=2C')},r={self.nonce}"
        return f"n,,{self.bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        attrs = dict(part.split("=", 1) for part in server_first.decode().split(","))
        assert attrs["r"].startswith(self.nonce) and len(attrs["r"]) > len(self.nonce)
        salted = hashlib.pbkdf2_hmac(
            "sha256", self.password, base64.b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={attrs['r']}"
        auth_message = f"{self.bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.expected_signature = hmac.digest(server_key, auth_message, "sha256")
        self.client_final = f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
        return self.client_final

    def check_server_final(self, data: object) -> None:
        """The server proves it knows the credential (RFC 5802 section 3, ServerSignature)."""
        assert data == b"v=" + base64.b64encode(self.expected_signature), data


def auth_props(data: bytes, method: str = METHOD) -> list[tuple[int, object]]:
    return [(AUTH_METHOD, method), (AUTH_DATA, data)]


def scram_connect(
    client: RawClient,
    client_id: str,
    scram: ScramClient,
    *,
    method: str = METHOD,
    tamper: bool = False,
    replay: bytes | None = None,
) -> Packet:
    """CONNECT with SCRAM, through the AUTH exchange; the CONNACK (or whatever ended it)."""
    client.send(connect(client_id, version=5, props=auth_props(scram.first(), method)))
    reply = client.recv()
    if reply.type != AUTH:
        return reply
    assert reply.code == 0x18 and reply.prop(AUTH_METHOD) == method  # MQTT-4.12.0-2, -5
    server_first = reply.prop(AUTH_DATA)
    assert isinstance(server_first, bytes)
    final = scram.final(server_first)
    if tamper:
        final = final[:-3] + (b"AAA" if final[-3:] != b"AAA" else b"BBB")
    client.send(auth(0x18, auth_props(replay if replay is not None else final, method)))
    return client.recv()


def reauthenticate(client: RawClient, scram: ScramClient, *, tamper: bool = False) -> Packet:
    """AUTH 0x19 and the exchange; the broker's last answer (AUTH 0x00, or DISCONNECT)."""
    client.send(auth(0x19, auth_props(scram.first())))
    reply = client._await(AUTH)  # deliveries that come first wait in `pending`
    assert reply.code == 0x18
    server_first = reply.prop(AUTH_DATA)
    assert isinstance(server_first, bytes)
    final = scram.final(server_first)
    if tamper:
        final = final[:-3] + b"AAA"
    client.send(auth(0x18, auth_props(final)))
    while True:
        p = client._recv_wire(client.timeout)
        if p.type in (AUTH, CONNACK, DISCONNECT):
            return p
        client.pending.append(p)
