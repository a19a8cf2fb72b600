"""Inbox records: how envelopes travel to one broker's inbox stream, batched.

An inbox stream entry has one field `b` holding one or more records, each

    4 bytes   length of the rest of the record
    1 byte    flags: bit 0 = deliver to plain (non-shared) subscriptions
    1 byte    g = number of shared groups this broker was chosen to serve
    g times   2 bytes length + `$share/{name}/{filter}` (UTF-8)
    rest      the envelope (docs/cluster-envelope.md)

Pure functions, no I/O; `InboxError` for anything that does not parse.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

PLAIN = 0x01
_RECORD_HEAD = struct.Struct(">IBB")  # length of the rest, flags, number of groups


class InboxError(ValueError):
    """A malformed batch or record in an inbox stream."""


def encode_record(envelope: bytes, plain: bool, groups: Sequence[str]) -> bytes:
    if not groups:  # the common case, on the hot path
        return b"".join(
            (
                (len(envelope) + 2).to_bytes(4, "big"),
                b"\x01\x00" if plain else b"\x00\x00",
                envelope,
            )
        )
    parts = [b"", bytes((PLAIN if plain else 0, len(groups)))]
    for key in groups:
        raw = key.encode()
        parts.append(len(raw).to_bytes(2, "big"))
        parts.append(raw)
    parts.append(envelope)
    body = b"".join(parts)
    return len(body).to_bytes(4, "big") + body


def iter_records(batch: bytes) -> Iterator[tuple[bool, tuple[str, ...], int, int]]:
    """Yield (plain, groups, start, stop) for each record of a batch: its envelope is
    batch[start:stop] (left in place for `EnvelopeReader.read`)."""
    pos = 0
    end = len(batch)
    while pos < end:
        if pos + 6 > end:
            raise InboxError("record header runs past the batch")
        length, flags, count = _RECORD_HEAD.unpack_from(batch, pos)
        stop = pos + 4 + length
        if length < 2 or stop > end:
            raise InboxError("record length runs past the batch")
        cursor = pos + 6
        if count:
            groups = []
            for _ in range(count):
                if cursor + 2 > stop:
                    raise InboxError("group key runs past the record")
                key_len = int.from_bytes(batch[cursor : cursor + 2], "big")
                cursor += 2
                if cursor + key_len > stop:
                    raise InboxError("group key runs past the record")
                try:
                    groups.append(batch[cursor : cursor + key_len].decode())
                except UnicodeDecodeError:
                    raise InboxError("group key is not UTF-8") from None
                cursor += key_len
            yield bool(flags & PLAIN), tuple(groups), cursor, stop
        else:
            yield bool(flags & PLAIN), (), cursor, stop
        pos = stop
