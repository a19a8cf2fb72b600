"""MQTT 5.0 enhanced authentication with SCRAM-SHA-256 (RFC 5802, RFC 7677), sans-IO.

Theory of operation. The broker keeps, per user, only what RFC 5802 section 3 calls the stored
credentials: a random salt, an iteration count, StoredKey = H(HMAC(SaltedPassword, "Client
Key")) and ServerKey = HMAC(SaltedPassword, "Server Key"), never the password. The text form of
a credential (a password file line's hash, a Redis user's value) is::

    $scram-sha-256$i=4096$<salt, base64>$<StoredKey, base64>$<ServerKey, base64>

The exchange over MQTT (section 4.12): CONNECT (or AUTH 0x19 Re-authenticate) carries the
Authentication Method `SCRAM-SHA-256` and the client-first message as Authentication Data; the
server answers AUTH 0x18 Continue authentication with the server-first message (its nonce, the
salt, the iteration count); the client sends AUTH 0x18 with the client-final message (the
proof); the server checks the proof against StoredKey and sends its signature (server-final)
in the CONNACK, or in AUTH 0x00 after a re-authentication.

`ScramExchange` is one server-side exchange; the message parsing and the proof check are
scramp's. The credential lookup may answer later (Redis), so the username is read first
(`username_of`), the store is asked, then `server_first` goes on with what it found. A user the
store does not know gets a made-up salt and fails at the proof, like a wrong password, so the
exchange does not tell which usernames exist (RFC 5802 section 5.1, "e=unknown-user" is
optional and not used).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from scramp import ScramException, ScramMechanism  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from .auth import Authorizer, Outcome

METHOD = "SCRAM-SHA-256"
PREFIX = "$scram-sha-256$"
ITERATIONS = 4096  # RFC 7677 section 4: at least 4096
_MECHANISM = ScramMechanism(METHOD)
# The secret behind the made-up salts of unknown users: stable (asking twice shows no
# difference) but not predictable. Per process unless `use_decoy_key` gives one shared by the
# cluster: otherwise asking two brokers, or one before and after a restart, would tell an
# unknown username (two different salts) from a real one.
_decoy_key = os.urandom(32)


def use_decoy_key(secret: bytes) -> None:
    """Derive the made-up salts from `secret` (the cluster key: the same on every broker)."""
    global _decoy_key
    _decoy_key = hmac.digest(secret, b"mcloudtt scram decoy salts", "sha256")


class ScramError(ValueError):
    """A broken message, a bad proof or a replayed one: the exchange fails."""


@dataclass(frozen=True, slots=True)
class ScramCredential:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def make_credential(password: bytes, *, iterations: int = ITERATIONS) -> str:
    """The stored text of a new credential for `password` (a fresh random salt)."""
    salt, stored_key, server_key, i = _MECHANISM.make_auth_info(
        password.decode("utf-8"), iteration_count=iterations
    )
    b64 = base64.b64encode
    return (
        f"{PREFIX}i={i}${b64(salt).decode()}${b64(stored_key).decode()}${b64(server_key).decode()}"
    )


def parse_credential(text: str) -> ScramCredential:
    """Raises ValueError for anything but a well-formed `$scram-sha-256$` credential."""
    if not text.startswith(PREFIX):
        raise ValueError("not a $scram-sha-256$ credential")
    params, salt, stored, server = text[len(PREFIX) :].split("$")
    name, _, value = params.partition("=")
    if name != "i" or not value.isdigit() or not 4096 <= int(value) <= 10_000_000:
        raise ValueError("SCRAM iteration count out of range")
    b64 = base64.b64decode
    credential = ScramCredential(
        b64(salt, validate=True), int(value), b64(stored, validate=True), b64(server, validate=True)
    )
    if len(credential.salt) < 12 or len(credential.stored_key) != 32:
        raise ValueError("SCRAM salt or key of the wrong size")
    if len(credential.server_key) != 32:
        raise ValueError("SCRAM salt or key of the wrong size")
    return credential


def verify_password(password: bytes, credential: ScramCredential) -> bool:
    """A plain password (CONNECT's password field) against a SCRAM credential."""
    salted = hashlib.pbkdf2_hmac("sha256", password, credential.salt, credential.iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), credential.stored_key)


def _decoy(username: str) -> ScramCredential:
    salt = hmac.digest(_decoy_key, username.encode(), "sha256")[:16]
    # Keys nobody can match (a proof would need a SHA-256 preimage of random bytes).
    return ScramCredential(salt, ITERATIONS, os.urandom(32), os.urandom(32))


# A credential store's answer: the outcome (ALLOW: found; IGNORE: not its user; DENY: its user
# but without a SCRAM credential; UNAVAILABLE: cannot be asked), the credential, the user's
# own rights (a Redis user's).
Lookup = tuple["Outcome", "ScramCredential | None", "Authorizer | None"]


class ScramSource(Protocol):
    """An authenticator that also holds SCRAM credentials (the password file, Redis users).

    `scram_credential` answers at once, or returns None and calls `answer` once later.
    """

    name: str

    def scram_credential(
        self, username: str, answer: Callable[[Lookup], None]
    ) -> Lookup | None: ...


class Phase(enum.IntEnum):
    LOOKUP = 0  # client-first read, the store asked
    PROOF = 1  # server-first sent, waiting for the client-final
    DONE = 2


class ScramExchange:
    """One exchange on the server side, fed the client's Authentication Data."""

    __slots__ = ("_found", "_server", "client_first", "phase", "reauth", "rights", "username")

    def __init__(self, client_first: bytes | None, *, reauth: bool, nonce: str | None = None):
        """Raises ScramError when `client_first` is not a client-first message."""
        self.reauth = reauth
        self.phase = Phase.LOOKUP
        self.rights: Authorizer | None = None
        try:
            self.client_first = (client_first or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError("client-first is not UTF-8") from None
        self.username = _username_of(self.client_first)
        self._server = _MECHANISM.make_server(self._credential, s_nonce=nonce)
        self._found: ScramCredential | None = None

    def _credential(self, username: str) -> tuple[bytes, bytes, bytes, int]:
        found = self._found if self._found is not None else _decoy(username)
        return found.salt, found.stored_key, found.server_key, found.iterations

    def server_first(self, credential: ScramCredential | None) -> bytes:
        """The server-first message, for the credential found (None: a made-up one)."""
        if self.phase != Phase.LOOKUP:
            raise ScramError("server-first out of turn")
        self._found = credential
        try:
            self._server.set_client_first(self.client_first)
            message: str = self._server.get_server_first()
        except ScramException as error:
            raise ScramError(str(error)) from None
        self.phase = Phase.PROOF
        return message.encode()

    def server_final(self, client_final: bytes | None) -> bytes:
        """Check the client's proof; the server-final message, or ScramError."""
        if self.phase != Phase.PROOF:
            raise ScramError("client-final out of turn")
        self.phase = Phase.DONE
        if self._found is None:
            raise ScramError("unknown user")
        try:
            self._server.set_client_final((client_final or b"").decode("utf-8"))
            message: str = self._server.get_server_final()
        except (ScramException, UnicodeDecodeError) as error:
            raise ScramError(str(error)) from None
        return message.encode()


def _username_of(client_first: str) -> str:
    """The `n=` attribute of a client-first message (RFC 5802 section 5.1), unescaped."""
    # gs2-header = cbind-flag "," [authzid] "," ; then "n=" saslname "," "r=" nonce ...
    parts = client_first.split(",", 3)
    if len(parts) < 4 or parts[0] not in ("n", "y") or not parts[2].startswith("n="):
        # "p=...": channel binding is not offered (MQTT has no channel to bind to here).
        raise ScramError("not a client-first message without channel binding")
    name = parts[2][2:]
    if not name or "=" in name.replace("=2C", "").replace("=3D", ""):
        raise ScramError("bad username in client-first")
    return name.replace("=2C", ",").replace("=3D", "=")
