"""Replaying a dead broker's inbox to the sessions taken from it (sans-IO).

Every inbox keeps what it handled for REPLAY_WINDOW_MS more (`inbox.py` trims behind it), so it
holds what was routed to its broker and not yet acknowledged by the clients there. Each stored
session carries its *marks*: the inbox entry and the highest sequence per origin its broker had
handled when the session was stored, or, fresher, when it was last seen idle (online, nothing in
flight or queued: everything before was acknowledged). The broker that takes the sessions feeds
the dead inbox's entries to a `Replay`: each record past a session's marks goes to that session
(per origin in sequence order, resends dropped), until every origin's end marker (`m` entries,
written when an origin stopped routing to the dead broker) has been read. A record that chose the
dead broker for a shared group goes to another member of the group (`replay_shared`), past the
marks of the group's claimed members, or past the dead inbox's reported progress.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from ..core.message import Message
from ..core.ports import ClusterCore
from .envelope import EnvelopeError, EnvelopeFields, EnvelopeReader
from .keys import ClusterKeys
from .link import stream_id
from .records import InboxError, iter_records

_AFTER_ALL = (1 << 63, 0)

# How long an inbox keeps the entries it handled, for a replay after its broker died.
REPLAY_WINDOW_MS = 10_000


@dataclass
class Marks:
    """Where a session stood in its broker's inbox."""

    position: tuple[int, int] = (0, 0)
    seen: dict[str, int] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        return {"pos": f"{self.position[0]}-{self.position[1]}", "seen": self.seen}

    @staticmethod
    def decode(document: Any) -> Marks:
        if not isinstance(document, dict):
            return Marks()
        try:
            seen = {str(k): int(v) for k, v in dict(document.get("seen", {})).items()}
            return Marks(stream_id(str(document.get("pos", "0-0"))), seen)
        except (TypeError, ValueError):
            return Marks()


def entry_fields(fields: Any) -> dict[bytes, bytes]:
    """An entry's fields as a dict, from redis-py's dict or a flat RESP list."""
    if isinstance(fields, dict):
        return fields
    if isinstance(fields, list):
        return dict(zip(fields[0::2], fields[1::2], strict=False))
    return {}


class Replay:
    def __init__(
        self,
        core: ClusterCore,
        to_message: Callable[[EnvelopeFields], Message | None],
        sessions: Mapping[str, Marks],
        origins: Iterable[str],
        *,
        keys: ClusterKeys | None = None,
        inbox: str = "",
        groups: Mapping[str, Marks] | None = None,
        handled: Mapping[str, int] | None = None,
        gone: str = "",
        token: str = "",
        redelivered: bool = True,
        shared: bool = True,
    ) -> None:
        self.core = core
        self.keys = keys  # with a cluster key: entries of `inbox` without a valid tag are skipped
        self.context = inbox.encode()
        self.to_message = to_message
        self.sessions = {
            client_id: Marks(m.position, dict(m.seen)) for client_id, m in sessions.items()
        }
        # Shared groups the dead broker was chosen to serve: each group's record is replayed
        # past the marks of the claimed sessions that are its members there, or, for a group
        # with none (clean members), past what the dead broker's inbox reported handled.
        self.groups = {key: Marks(m.position, dict(m.seen)) for key, m in (groups or {}).items()}
        self.handled = dict(handled or {})
        self.gone = gone
        self.pending = set(origins)  # origins whose end marker is still to come
        # A live hand-over's markers are "{origin}\x00{token}" (a dead inbox's: "{origin}").
        self.suffix = f"\x00{token}" if token else ""
        # False for a live hand-over: the old holder never sent what is past its snapshot.
        self.redelivered = redelivered
        # Origins whose marker for this hand-over was read: what they sent the old holder
        # after it went to the new one too (another session there has the filter) or was
        # delivered there locally. Taking it as well would deliver it twice.
        self.ended: set[str] = set()
        # False for a live hand-over: the old holder is alive and serves its groups' records.
        self.replay_groups = shared
        self.reader = EnvelopeReader()
        # What to deliver, in stream order: (origin, sequence, message, client ids, groups).
        self.found: list[tuple[str, int, Message, list[str], list[str]]] = []
        self.bad = 0
        self.read_to: bytes | str = "-"  # XRANGE start past the last entry read (a check's)

    @property
    def done(self) -> bool:
        return not self.pending

    def feed(self, entry_id: bytes | str, raw_fields: Any) -> None:
        fields = entry_fields(raw_fields)
        keys = self.keys
        marker = fields.get(b"m")
        if marker is not None:
            if keys is not None and not keys.valid(self.context, marker, fields.get(b"t")):
                self.bad += 1
                return
            value = marker.decode(errors="replace")
            suffix = self.suffix
            if suffix:
                if value.endswith(suffix):
                    origin = value[: -len(suffix)]
                    self.pending.discard(origin)
                    self.ended.add(origin)
            else:
                self.pending.discard(value)
            return
        batch = fields.get(b"b")
        if not isinstance(batch, bytes):
            return
        if keys is not None and not keys.valid(self.context, batch, fields.get(b"t")):
            self.bad += 1
            return
        self._feed_batch(stream_id(entry_id), batch)

    def feed_records(self, records: Iterable[bytes]) -> None:
        """Our own records for the dead broker (unconfirmed in our outbox): after everything
        in its inbox, duplicates of what was found there dropped."""
        self._feed_batch(_AFTER_ALL, b"".join(records))

    def _feed_batch(self, position: tuple[int, int], batch: bytes) -> None:
        try:
            for plain, groups, start, stop in iter_records(batch):
                try:
                    envelope = self.reader.read(batch, start, stop)
                except EnvelopeError:
                    self.bad += 1
                    continue
                origin, sequence = envelope[0], envelope[1]
                if not envelope[6] or origin in self.ended:
                    continue  # QoS 0 is not kept for absent clients anyway
                takers = []
                if plain:
                    for client_id, marks in self.sessions.items():
                        if position > marks.position and sequence > marks.seen.get(origin, 0):
                            marks.seen[origin] = sequence
                            takers.append(client_id)
                shared = []
                for key in groups if self.replay_groups else ():
                    group = self.groups.get(key)
                    if group is None:
                        group = self.groups[key] = Marks((0, 0), dict(self.handled))
                    if position > group.position and sequence > group.seen.get(origin, 0):
                        group.seen[origin] = sequence
                        shared.append(key)
                if takers or shared:
                    message = self.to_message(envelope)
                    if message is not None:
                        self.found.append((origin, sequence, message, takers, shared))
        except InboxError:
            self.bad += 1

    def deliver(self, delivered_elsewhere: Set[Delivered]) -> int:
        """Hand what was found to the sessions, but for what the taker's own inbox will
        deliver anyway (`origins_and_sequences`). Returns how many messages were replayed."""
        count = 0
        for origin, sequence, message, found_takers, found_shared in self.found:
            # Only the part that our inbox delivers itself (to the restored sessions too): a
            # record there for a shared group only does not reach the plain takers.
            takers = [] if (origin, sequence) in delivered_elsewhere else found_takers
            shared = [k for k in found_shared if (origin, sequence, k) not in delivered_elsewhere]
            if not (takers or shared):
                continue
            if takers:
                self.core.replay_to(takers, message, redelivered=self.redelivered)
            if shared:
                self.core.replay_shared(message, shared, self.gone)
            count += 1
        self.found.clear()
        return count


# What an inbox delivers of a record itself: (origin, sequence) to its plain subscriptions,
# (origin, sequence, group) to a shared group.
Delivered = tuple[str, int] | tuple[str, int, str]


def origins_and_sequences(entries: Iterable[tuple[Any, Any]]) -> set[Delivered]:
    """What the inbox these entries are from delivers of their records itself: (origin,
    sequence) of every plain record, (origin, sequence, group) for each group of each."""
    reader = EnvelopeReader()
    found: set[Delivered] = set()
    for _entry_id, raw in entries:
        batch = entry_fields(raw).get(b"b")
        if not isinstance(batch, bytes):
            continue
        try:
            for plain, groups, start, stop in iter_records(batch):
                try:
                    envelope = reader.read(batch, start, stop)
                except EnvelopeError:
                    continue
                origin, sequence = envelope[0], envelope[1]
                if plain:
                    found.add((origin, sequence))
                found.update((origin, sequence, key) for key in groups)
        except InboxError:
            continue
    return found
