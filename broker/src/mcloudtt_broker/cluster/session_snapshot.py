"""A session snapshot as bytes, for the move of a session from one broker to another.

JSON with the messages as base64 envelopes (docs/cluster-envelope.md); version 1:

    {"v": 1, "client_id": str, "expiry": int,
     "subs": [[filter, qos, no_local, retain_as_published, retain_handling, identifier|null]],
     "inflight": [[packet_id, qos, retain, [identifiers], awaiting_pubcomp, envelope]],
     "queue": [[qos, retain, [identifiers], envelope]],
     "awaiting_release": [packet_id, ...]}

Message expiry travels as the seconds remaining when the snapshot was made.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

from ..core.message import Message, Redelivery
from ..core.session import InflightRecord, SessionSnapshot, SubscriptionRecord
from ..mqtt.properties import EMPTY_PROPERTIES
from .envelope import Envelope, EnvelopeError, decode_envelope, encode_envelope


class SnapshotError(ValueError):
    """Bytes that are not a session snapshot."""


def _pack(message: Message, origin: str, now: float) -> str:
    props = message.properties
    if message.expires_at is not None:
        props = props.replace(message_expiry_interval=message.remaining_expiry(now))
    raw = encode_envelope(
        Envelope(
            origin=origin,
            # (Unused in a snapshot otherwise.) 1: a possible re-delivery, DUP 1 when sent.
            sequence=1 if message.redelivered else 0,
            received_at_us=time.time_ns() // 1000,
            client_id=message.origin,
            topic=message.topic,
            payload=message.payload,
            qos=message.qos,
            retain=message.retain,
            properties=props,
        )
    )
    return base64.b64encode(raw).decode()


def _unpack(text: str, now: float) -> Message:
    envelope = decode_envelope(base64.b64decode(text))
    props = envelope.properties
    expires_at = None
    if props is not EMPTY_PROPERTIES and props.message_expiry_interval is not None:
        expires_at = now + props.message_expiry_interval
    return (Redelivery if envelope.sequence == 1 else Message)(
        envelope.topic,
        envelope.payload,
        envelope.qos,
        envelope.retain,
        props,
        expires_at=expires_at,
        origin=envelope.client_id,
    )


def encode_will(will: Message, origin: str, now: float) -> str:
    """A will as stored in `{prefix}:wills:{id}` (published if its broker dies)."""
    return _pack(will, origin, now)


def decode_will(data: bytes | str, now: float) -> Message:
    try:
        return _unpack(data.decode() if isinstance(data, bytes) else data, now)
    except (ValueError, EnvelopeError) as error:
        raise SnapshotError(f"bad stored will: {error}") from error


def encode_snapshot(
    snapshot: SessionSnapshot, origin: str, now: float, marks: object = None
) -> bytes:
    document: dict[str, Any] = {
        "v": 1,
        "client_id": snapshot.client_id,
        "expiry": snapshot.expiry_interval,
        "subs": [
            [
                s.topic_filter,
                s.qos,
                s.no_local,
                s.retain_as_published,
                s.retain_handling,
                s.identifier,
            ]
            for s in snapshot.subscriptions
        ],
        "inflight": [
            [
                e.packet_id,
                e.qos,
                e.retain,
                list(e.identifiers),
                e.awaiting_comp,
                _pack(e.message, origin, now),
            ]
            for e in snapshot.inflight
        ],
        "queue": [
            [qos, retain, list(ids), _pack(message, origin, now)]
            for message, qos, retain, ids in snapshot.queue
        ],
        "awaiting_release": list(snapshot.awaiting_release),
    }
    if marks is not None:
        document["marks"] = marks  # where it stood in its broker's inbox (replay.py)
    return json.dumps(document, separators=(",", ":")).encode()


def snapshot_marks(data: bytes) -> object:
    """The marks stored with a snapshot (None without)."""
    try:
        document = json.loads(data)
    except ValueError:
        return None
    return document.get("marks") if isinstance(document, dict) else None


def decode_snapshot(data: bytes, clock: Callable[[], float]) -> SessionSnapshot:
    now = clock()
    try:
        document: dict[str, Any] = json.loads(data)
        if document.get("v") != 1:
            raise SnapshotError(f"unknown snapshot version {document.get('v')!r}")
        return SessionSnapshot(
            client_id=str(document["client_id"]),
            expiry_interval=int(document["expiry"]),
            subscriptions=tuple(
                SubscriptionRecord(
                    topic_filter=str(f),
                    qos=int(q),
                    no_local=bool(nl),
                    retain_as_published=bool(rap),
                    retain_handling=int(rh),
                    identifier=None if ident is None else int(ident),
                )
                for f, q, nl, rap, rh, ident in document["subs"]
            ),
            inflight=tuple(
                InflightRecord(
                    packet_id=int(pid),
                    message=_unpack(env, now),
                    qos=int(q),
                    retain=bool(r),
                    identifiers=tuple(int(i) for i in ids),
                    awaiting_comp=bool(comp),
                )
                for pid, q, r, ids, comp, env in document["inflight"]
            ),
            queue=tuple(
                (_unpack(env, now), int(q), bool(r), tuple(int(i) for i in ids))
                for q, r, ids, env in document["queue"]
            ),
            awaiting_release=tuple(int(p) for p in document["awaiting_release"]),
        )
    except SnapshotError:
        raise
    except (ValueError, KeyError, TypeError, EnvelopeError) as error:
        raise SnapshotError(f"malformed session snapshot: {error}") from None
