"""The password file: one `USER:HASH` a line, salted scrypt hashes (`mcloudtt-broker passwd`).

Line format (blank lines and lines starting with `#` are ignored; a username has no `:`)::

    alice:$scrypt$ln=14,r=8,p=1$<salt, base64>$<key, base64>

`ln` is log2 of scrypt's N; the key is 32 bytes, the salt 16 random bytes. Parameters live in
each line, so stronger ones can come later without breaking old files.

A line may instead hold SCRAM-SHA-256 stored credentials (`mcloudtt-broker passwd --scram`)::

    bob:$scram-sha-256$i=4096$<salt>$<StoredKey>$<ServerKey>

Such a user logs in with the plain password too, and also through MQTT 5.0 enhanced
authentication (`mcloudtt_broker.core.scram`); a `$scrypt$` user cannot do SCRAM (scrypt's key
is not SCRAM's StoredKey).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Callable
from pathlib import Path

from ..core.auth import Answer, Credentials, Outcome, Result
from ..core.scram import PREFIX as SCRAM_PREFIX
from ..core.scram import Lookup, make_credential, parse_credential
from ..core.scram import verify_password as verify_scram

LN, R, P = 14, 8, 1
KEY_BYTES = 32
PREFIX = "$scrypt$"


class PasswordFileError(ValueError):
    """A line of the password file that cannot be read (the message names the line)."""


def _scrypt(password: bytes, salt: bytes, ln: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password, salt=salt, n=1 << ln, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=KEY_BYTES
    )


def hash_password(password: bytes, *, ln: int = LN, scram: bool = False) -> str:
    if scram:
        return make_credential(password)
    salt = os.urandom(16)
    key = _scrypt(password, salt, ln, R, P)
    b64 = base64.b64encode
    return f"{PREFIX}ln={ln},r={R},p={P}${b64(salt).decode()}${b64(key).decode()}"


def _parse_hash(text: str) -> tuple[int, int, int, bytes, bytes]:
    if text.startswith(SCRAM_PREFIX):
        parse_credential(text)
        return 0, 0, 0, b"", b""
    if not text.startswith(PREFIX):
        raise ValueError("not a $scrypt$ hash")
    params, salt, key = text[len(PREFIX) :].split("$")
    values = dict(item.split("=", 1) for item in params.split(","))
    ln, r, p = int(values["ln"]), int(values["r"]), int(values["p"])
    if not (1 <= ln <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
        raise ValueError("scrypt parameters out of range")
    return ln, r, p, base64.b64decode(salt, validate=True), base64.b64decode(key, validate=True)


def verify_password(password: bytes, stored: str) -> bool:
    try:
        if stored.startswith(SCRAM_PREFIX):
            return verify_scram(password, parse_credential(stored))
        ln, r, p, salt, key = _parse_hash(stored)
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(_scrypt(password, salt, ln, r, p), key)


def parse_lines(text: str, source: str = "password file") -> dict[str, str]:
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        try:
            if not sep or not user:
                raise ValueError("expected USER:HASH")
            _parse_hash(stored)
        except (ValueError, KeyError) as error:
            # The line itself is not shown: it holds a hash.
            raise PasswordFileError(f"{source} line {number}: {error}") from None
        users[user] = stored
    return users


def read_file(path: str | Path) -> dict[str, str]:
    return parse_lines(Path(path).read_text(encoding="utf-8"), str(path))


def write_file(path: str | Path, users: dict[str, str]) -> None:
    """Replace the file atomically (a broker reloading on SIGHUP never reads half of it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.writelines(f"{user}:{stored}\n" for user, stored in users.items())
    os.replace(tmp, path)


class PasswordFile:
    """The `password-file` authenticator: users of the file, their passwords checked."""

    name = "password-file"

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        # Successful checks (user, stored hash) -> sha256 of the password: a reconnecting client
        # does not pay scrypt again on the event loop; a changed hash no longer matches.
        self._verified: dict[tuple[str, str], bytes] = {}

    @classmethod
    def load(cls, path: str | Path) -> PasswordFile:
        return cls(read_file(path))

    def authenticate(self, credentials: Credentials, answer: Answer) -> Result:
        username = credentials.username
        if username is None:
            return Outcome.IGNORE, None
        stored = self.users.get(username)
        if stored is None:
            return Outcome.IGNORE, None
        password = credentials.password or b""
        digest = hashlib.sha256(password).digest()
        seen = self._verified.get((username, stored))
        if seen is not None and hmac.compare_digest(seen, digest):
            return Outcome.ALLOW, username
        if not verify_password(password, stored):
            return Outcome.DENY, None
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[username, stored] = digest
        return Outcome.ALLOW, username

    def scram_credential(self, username: str, answer: Callable[[Lookup], None]) -> Lookup:
        stored = self.users.get(username)
        if stored is None:
            return Outcome.IGNORE, None, None
        if not stored.startswith(SCRAM_PREFIX):
            return Outcome.DENY, None, None  # a $scrypt$ user: no SCRAM for them
        return Outcome.ALLOW, parse_credential(stored), None
