"""The cluster key: an HMAC-SHA256 tag on what brokers write to Redis for each other (sans-IO).

With `--cluster-key-file`, every inbox batch, tap entry, broadcast envelope and control message
carries a tag under the first key of the file; a reader accepts a tag under any key of the file
(two during a rotation) and counts and drops the rest. The tag covers a context (the Redis key
or channel the bytes were written to) and the bytes, so a tagged batch copied into another
broker's inbox, or onto another channel, does not verify. Without a key nothing is tagged and
the wire is unchanged (docs/cluster-envelope.md, "Tags").

Tags are per Redis entry, not per message: one inbox batch (up to FLUSH_BATCH records) costs
one HMAC, from a keyed state copied rather than re-keyed.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from pathlib import Path

TAG_SIZE = 32
# Envelope version 2: the version byte, a tag, then a version-1 envelope; used where no Redis
# field is free for the tag (the broadcast channel).
SIGNED_ENVELOPE_VERSION = 2
MIN_KEY_BYTES = 16


class KeyFileError(ValueError):
    """A cluster key file that cannot be used."""


def read_key_file(path: str) -> tuple[bytes, ...]:
    """The keys in `path`: one per line, the signing key first (at most two, for a rotation)."""
    try:
        text = Path(path).read_bytes()
    except OSError as error:
        raise KeyFileError(f"cannot read --cluster-key-file {path}: {error.strerror}") from None
    keys = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not keys:
        raise KeyFileError(f"--cluster-key-file {path} holds no key")
    if len(keys) > 2:
        raise KeyFileError(f"--cluster-key-file {path}: at most two keys (the new one first)")
    if any(len(key) < MIN_KEY_BYTES for key in keys):
        raise KeyFileError(f"--cluster-key-file {path}: a key shorter than {MIN_KEY_BYTES} bytes")
    return keys


class ClusterKeys:
    __slots__ = ("_states",)

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("no cluster key")
        # Keyed once; each tag starts from a copy (hashlib's C HMAC, no re-keying per tag).
        self._states = [hmac.new(key, digestmod="sha256") for key in keys]

    def tag(self, context: bytes, data: bytes) -> bytes:
        state = self._states[0].copy()
        state.update(context)
        state.update(data)
        return state.digest()

    def valid(self, context: bytes, data: bytes, tag: object) -> bool:
        if not isinstance(tag, bytes) or len(tag) != TAG_SIZE:
            return False
        for keyed in self._states:
            state = keyed.copy()
            state.update(context)
            state.update(data)
            if hmac.compare_digest(state.digest(), tag):
                return True
        return False

    # ---------------------------------------------------------------- framed forms

    def sign_envelope(self, context: bytes, envelope: bytes) -> bytes:
        """Envelope version 2: the version byte, the tag, the version-1 envelope."""
        return b"".join((b"\x02", self.tag(context, envelope), envelope))

    def open_envelope(self, context: bytes, data: bytes) -> bytes | None:
        """The version-1 envelope inside a version-2 one whose tag verifies, else None."""
        if data[:1] != b"\x02" or len(data) < 1 + TAG_SIZE:
            return None
        envelope = data[1 + TAG_SIZE :]
        return envelope if self.valid(context, envelope, data[1 : 1 + TAG_SIZE]) else None

    def sign_text(self, context: bytes, text: str) -> bytes:
        """A control message: the tag, then the message (UTF-8)."""
        body = text.encode()
        return self.tag(context, body) + body

    def open_text(self, context: bytes, data: bytes) -> bytes | None:
        body = data[TAG_SIZE:]
        return body if self.valid(context, body, data[:TAG_SIZE]) else None


def cluster_keys(keys: Sequence[bytes]) -> ClusterKeys | None:
    return ClusterKeys(keys) if keys else None


def strip_unverified(data: bytes) -> bytes:
    """A reader without a key (a tap tool): the version-1 envelope of a version-2 one."""
    return data[1 + TAG_SIZE :] if data[:1] == b"\x02" else data
