"""The outbox: what this broker sends to the others, as Redis commands (sans-IO).

Theory of operation.

* `forward()` (the hot path, called by the core for every publish other brokers may want) packs
  the message once: a plain inbox record for the common case, an envelope for the rest (retained,
  shared groups, broadcast mode, a tap), and buffers it. It calls `wake(urgent)` once per batch:
  urgent when a whole batch is waiting (write now, mid-burst), else "write soon".
* `flush(sent)` turns the buffer and the subscription announcements into `Commands`, one XADD
  per destination per batch of FLUSH_BATCH messages, for the caller to write in order on one
  connection that has written `sent` commands so far. What was written stays *unanswered* until
  `answered(replies)` says Redis answered it; `link_lost()` puts it back at the front of the
  buffer. Records of QoS 1/2 stay *unconfirmed* per destination until that broker reports having
  handled their sequence (`confirm(progress)`); `resend(progress)` after a reconnect writes them
  again, all of them if Redis lost the progress (receivers drop what they already handled).
* The buffer is bounded (`ClusterSettings.buffer_limit`): QoS 0 is dropped first, then the
  oldest; so is the unconfirmed store. Every drop is counted in `dropped` by reason.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from ..core.message import Message
from .envelope import EnvelopePacker
from .keys import cluster_keys
from .keyspace import retained_key
from .records import encode_record
from .resp import Commands
from .settings import BROADCAST, ClusterSettings
from .tap import tap_index, tap_streams

# Messages per write: small enough that the next hop starts while we read the rest of a burst.
FLUSH_BATCH = 256


@dataclass(slots=True)
class _Outbound:
    """A message for other brokers that needs more than one plain record (retained, shared
    groups, broadcast mode or a tap): its envelope, records are made when it is written."""

    message: Message
    envelope: bytes
    sequence: int
    targets: Sequence[str]
    groups: Mapping[str, list[str]]
    # Retained, already in Redis: set on these brokers only, with no write of the hash
    # (`retained_to`).
    only: Collection[str] | None = None


# The common case, a message for plain subscriptions on other brokers only, with its inbox
# record built at once: (QoS, sequence, record, destination broker ids).
_PlainOutbound = tuple[int, int, bytes, Sequence[str]]
Item = _Outbound | _PlainOutbound


def _never_woken(urgent: bool) -> None:
    return None


class Outbox:
    def __init__(
        self,
        settings: ClusterSettings,
        *,
        peers: set[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wake: Callable[[bool], None] = _never_woken,
        stats: Counter[str] | None = None,
        dropped: Counter[str] | None = None,
        sequence: int | None = None,
    ) -> None:
        self.settings = settings
        self.me = settings.broker_id
        prefix = settings.prefix
        self.k_control = f"{prefix}:control"
        self.k_retained = f"{prefix}:retained"
        self.retained_shards = 0  # on a Redis Cluster: retained hashes by topic (keyspace.py)
        # Broadcast with SPUBLISH: --sharded-pubsub, or set by the bus on a Redis Cluster.
        self.sharded_pubsub = settings.sharded_pubsub
        self.k_subs = f"{prefix}:subs:{{{self.me}}}"
        self.packer = EnvelopePacker(self.me.encode())
        self.keys = cluster_keys(settings.keys)
        # Live peers (kept by the membership): where retained and broadcast publishes go.
        self.peers: set[str] = peers if peers is not None else set()
        self.clock = clock  # the core's clock, for what remains of a Message Expiry Interval
        self.wake = wake
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.dropped: Counter[str] = dropped if dropped is not None else Counter()
        # Envelope sequences start at the boot time in microseconds: never reused by a later
        # incarnation of this broker id.
        self.sequence = time.time_ns() // 1000 if sequence is None else sequence
        # Every publish goes to Redis in these settings, whether or not a peer subscribed.
        self._forward_all = settings.mode == BROADCAST or bool(settings.tap_stream)
        self._taps = (
            tap_streams(settings.tap_stream, settings.tap_streams) if settings.tap_stream else ()
        )
        self.outbound: deque[Item] = deque()
        self.control: list[tuple[str, str]] = []  # ("add"|"del", filter) to announce
        self.unconfirmed: dict[str, deque[tuple[int, bytes]]] = {}
        # Written, not yet answered: (commands written after it, items, announcements).
        self._unanswered: deque[tuple[int, list[Item], list[tuple[str, str]]]] = deque()
        self.wake_pending = False  # `wake(False)` was called and no flush has run since

    # ------------------------------------------------------------------ the hot path

    def forward(
        self, message: Message, targets: Sequence[str], groups: Mapping[str, list[str]]
    ) -> None:
        retain = message.retain
        if not (targets or groups or retain or self._forward_all):
            return  # nobody else wants it: no envelope, no Redis traffic
        self.sequence += 1
        sequence = self.sequence
        qos = message.qos
        properties = message.properties
        if message.expires_at is not None:
            # Message Expiry Interval as what remains (MQTT-3.3.2-6).
            remaining = message.remaining_expiry(self.clock())
            properties = properties.replace(message_expiry_interval=remaining)
        item: Item
        if groups or retain or self._forward_all:
            envelope = self.packer.envelope(
                sequence,
                time.time_ns() // 1000,
                message.origin,
                message.topic_wire,
                message.payload,
                qos,
                retain,
                properties,
            )
            item = _Outbound(message, envelope, sequence, targets, groups)
        else:
            record = self.packer.plain_record(
                sequence,
                time.time_ns() // 1000,
                message.origin,
                message.topic_wire,
                message.payload,
                qos,
                properties,
            )
            item = (qos, sequence, record, targets)
        outbound = self.outbound
        if len(outbound) >= self.settings.buffer_limit and not self._make_room(qos):
            return
        outbound.append(item)
        if len(outbound) >= FLUSH_BATCH:
            self.wake(True)  # mid-burst: the next broker starts on these while we read the rest
        elif not self.wake_pending:
            self.wake_pending = True
            self.wake(False)

    def retained_buffered(self) -> list[Message]:
        """The retained messages waiting to be written (published while the link was down),
        in order."""
        return [
            item.message
            for item in self.outbound
            if isinstance(item, _Outbound) and item.message.retain and item.only is None
        ]

    def retained_to(self, message: Message, dests: Collection[str]) -> None:
        """A retained message whose hash entry we wrote already, for brokers it did not reach
        (they loaded the retained set before we wrote it): a record that sets it there only,
        under a new sequence (receivers drop one not above what they handled from us)."""
        self.sequence += 1
        properties = message.properties
        if message.expires_at is not None:
            remaining = message.remaining_expiry(self.clock())  # MQTT-3.3.2-6
            properties = properties.replace(message_expiry_interval=remaining)
        envelope = self.packer.envelope(
            self.sequence,
            time.time_ns() // 1000,
            message.origin,
            message.topic_wire,
            message.payload,
            message.qos,
            True,
            properties,
        )
        self.outbound.append(_Outbound(message, envelope, self.sequence, (), {}, set(dests)))
        self.wake(True)

    def announce(self, op: str, full_filter: str) -> None:
        """`op` "add" or "del": a filter gained its first or lost its last local subscriber."""
        self.control.append((op, full_filter))
        if not self.wake_pending:
            self.wake_pending = True
            self.wake(False)

    def announce_adoption(self, dead: str, filters: Sequence[str]) -> None:
        """We adopt `dead`'s sessions: their filters and the adoption in one control message
        (`adopted`: every broker stops routing to `dead` and routes them to us, in one step)."""
        self.control.append(("adopted", "\x00".join([dead, *filters])))
        self.wake(True)

    def mark(self, dest: str, token: str = "") -> None:
        """We stopped routing to `dest` (adopted), or route a session's filters elsewhere now
        (`token`: that hand-over's): an end marker in its inbox, after every record we sent
        there (call after a flush: announcements are written first)."""
        self.control.append(("mark", f"{dest}\x00{token}" if token else dest))
        self.wake(True)

    def announce_move(self, requester: str, token: str, filters: Sequence[str]) -> None:
        """We handed a session to `requester`: every broker routes its filters there and
        marks our inbox (`moved`), announced before our own `del` of any of them."""
        entry = ("moved", "\x00".join([requester, token, *filters]))
        control = self.control
        index = next(
            (i for i, (op, f) in enumerate(control) if op == "del" and f in filters),
            len(control),
        )
        control.insert(index, entry)
        self.wake(True)

    def clear_announcements(self) -> None:
        """The whole table is being announced again (after a reconnect)."""
        self.control = [c for c in self.control if c[0] not in ("add", "del")]

    def _make_room(self, qos: int) -> bool:
        """The buffer is full: drop QoS 0 first (MQTT allows it), then the oldest message."""
        if qos == 0:
            self.dropped["buffer_full_qos0"] += 1
            return False
        for index, item in enumerate(self.outbound):
            if (item[0] if isinstance(item, tuple) else item.message.qos) == 0:
                del self.outbound[index]
                self.dropped["buffer_full_qos0"] += 1
                return True
        self.outbound.popleft()
        self.dropped["buffer_full"] += 1
        return True

    # ------------------------------------------------------------------ writing

    def flush(self, sent: int) -> list[Commands]:
        """Everything buffered, as command batches to write in this order on a connection that
        has written `sent` commands so far."""
        self.wake_pending = False
        batches: list[Commands] = []
        while self.outbound or self.control:
            control, self.control = self.control, []
            count = min(len(self.outbound), FLUSH_BATCH)
            items = [self.outbound.popleft() for _ in range(count)]
            commands = Commands()
            self._add_control(commands, control)
            confirmable = self._add_items(commands, items)
            batches.append(commands)
            sent += commands.count
            # Kept until Redis answered, to be written again if the connection breaks first.
            self._unanswered.append((sent, items, control))
            self.stats["forwarded"] += count
            self.stats["flushes"] += 1
            for dest, records in confirmable.items():
                queue = self.unconfirmed.get(dest)
                if queue is None:
                    queue = self.unconfirmed[dest] = deque()
                queue.extend(records)
        if batches:
            self._bound_unconfirmed()
        return batches

    def answered(self, replies: int) -> None:
        """The connection has read `replies` replies: forget what they answer."""
        unanswered = self._unanswered
        while unanswered and unanswered[0][0] <= replies:
            unanswered.popleft()

    def link_lost(self, replies: int) -> None:
        """The connection broke after `replies` replies: what Redis may not have got goes back
        to the front of the buffer."""
        self.answered(replies)
        for _, items, control in reversed(self._unanswered):
            self.outbound.extendleft(reversed(items))
            self.control[:0] = control
        self._unanswered.clear()

    def _add_control(self, commands: Commands, control: list[tuple[str, str]]) -> None:
        for op, full_filter in control:
            if op == "add":
                commands.sadd(self.k_subs, full_filter)
            elif op == "del":
                commands.srem(self.k_subs, full_filter)
            elif op == "mark":
                dest, _, token = full_filter.partition("\x00")
                inbox = f"{self.settings.prefix}:inbox:{{{dest}}}"
                value = f"{self.me}\x00{token}" if token else self.me
                self._xadd(commands, inbox, "m", value.encode(), self.settings.inbox_maxlen)
                continue
            elif op == "moved":
                pass  # only the control message
            else:  # adopted: the dead broker, then the filters we took with its sessions
                for adopted_filter in full_filter.split("\x00")[1:]:
                    commands.sadd(self.k_subs, adopted_filter)
            text = f"{op}\x00{self.me}\x00{full_filter}"
            keys = self.keys
            commands.publish(
                self.k_control,
                text if keys is None else keys.sign_text(self.k_control.encode(), text),
            )

    def _xadd(self, commands: Commands, key: str, name: str, value: bytes, maxlen: int) -> None:
        """One stream entry, with its tag in field `t` when a cluster key is set (keys.py)."""
        keys = self.keys
        if keys is None:
            commands.xadd(key, name, value, maxlen)
        else:
            commands.xadd_tagged(key, name, value, keys.tag(key.encode(), value), maxlen)

    def _add_items(
        self, commands: Commands, items: list[Item]
    ) -> dict[str, list[tuple[int, bytes]]]:
        """Add the commands for `items`; return the QoS 1/2 records written per destination
        (sequence, record), which are kept until the destination confirms them."""
        settings = self.settings
        broadcast = settings.mode == BROADCAST
        batches: dict[str, list[bytes]] = {}
        confirmable: dict[str, list[tuple[int, bytes]]] = {}
        live_peers = self.peers
        me = self.me
        for item in items:
            if isinstance(item, tuple):
                # The common case: the same plain record for every broker with a subscriber.
                qos, sequence, record, targets = item
                for dest in targets:
                    if dest != me:
                        batch = batches.get(dest)
                        if batch is None:
                            batch = batches[dest] = []
                        batch.append(record)
                        if qos:
                            kept = confirmable.get(dest)
                            if kept is None:
                                kept = confirmable[dest] = []
                            kept.append((sequence, record))
                continue
            message = item.message
            envelope = item.envelope
            sequence = item.sequence
            qos = message.qos
            if item.only is not None:
                for dest in item.only:
                    if dest != me:
                        record = encode_record(envelope, False, ())
                        batches.setdefault(dest, []).append(record)
                        if qos:
                            confirmable.setdefault(dest, []).append((sequence, record))
                continue
            if broadcast:
                keys = self.keys
                (commands.spublish if self.sharded_pubsub else commands.publish)(
                    settings.sync_channel,
                    envelope
                    if keys is None
                    else keys.sign_envelope(settings.sync_channel.encode(), envelope),
                )
                # QoS 0 is delivered from `sync`; QoS 1/2 also go to every inbox.
                if qos or message.retain:
                    dests: set[str] = set(live_peers)
                else:
                    dests = set(item.groups)
                plain_to = dests if qos else set()
            else:
                dests = set(item.targets) | set(item.groups)
                if message.retain:
                    dests |= live_peers  # every broker keeps the same retained state
                plain_to = set(item.targets)
            for dest in dests:
                if dest == me:
                    continue
                record = encode_record(envelope, dest in plain_to, item.groups.get(dest, ()))
                batches.setdefault(dest, []).append(record)
                if qos:
                    confirmable.setdefault(dest, []).append((sequence, record))
            if message.retain:
                k_retained = self.k_retained
                if self.retained_shards:
                    k_retained = retained_key(settings.prefix, message.topic, self.retained_shards)
                if message.payload:
                    keys = self.keys
                    commands.hset(
                        k_retained,
                        message.topic,
                        envelope
                        if keys is None
                        else keys.sign_envelope(k_retained.encode(), envelope),
                    )
                else:
                    commands.hdel(k_retained, message.topic)
            taps = self._taps
            if taps:
                tap = taps[0] if len(taps) == 1 else taps[tap_index(message.topic_wire, len(taps))]
                self._xadd(commands, tap, "e", envelope, settings.tap_maxlen)
        for dest, records in batches.items():
            self._xadd(
                commands,
                f"{settings.prefix}:inbox:{{{dest}}}",
                "b",
                b"".join(records),
                settings.inbox_maxlen,
            )
        return confirmable

    # ------------------------------------------------------------------ confirmations

    def destinations(self) -> list[str]:
        """The brokers with unconfirmed records: whose progress to read."""
        return list(self.unconfirmed)

    def confirm(self, progress: Mapping[str, int]) -> None:
        """Forget the records each destination has handled (its highest sequence from us)."""
        for dest, queue in list(self.unconfirmed.items()):
            confirmed = progress.get(dest, 0)
            while queue and queue[0][0] <= confirmed:
                queue.popleft()
            if not queue:
                del self.unconfirmed[dest]

    def resend(self, progress: Mapping[str, int]) -> Commands | None:
        """After a reconnect: the commands that write every unconfirmed record again, in
        sequence order, before anything newer. With no progress (Redis lost it), all of them."""
        self.confirm(progress)
        if not self.unconfirmed:
            return None
        commands = Commands()
        resent = 0
        for dest, queue in self.unconfirmed.items():
            self._xadd(
                commands,
                f"{self.settings.prefix}:inbox:{{{dest}}}",
                "b",
                b"".join(record for _, record in queue),
                self.settings.inbox_maxlen,
            )
            resent += len(queue)
        self.stats["resent"] += resent
        return commands

    def forget_destination(self, dest: str) -> None:
        """`dest` left the cluster: its unconfirmed records will never be confirmed."""
        dropped = self.unconfirmed.pop(dest, None)
        if dropped:
            self.dropped["peer_gone"] += len(dropped)

    def _bound_unconfirmed(self) -> None:
        total = sum(len(q) for q in self.unconfirmed.values())
        limit = self.settings.buffer_limit
        while total > limit:
            dest = max(self.unconfirmed, key=lambda d: len(self.unconfirmed[d]))
            self.unconfirmed[dest].popleft()
            self.dropped["unconfirmed_overflow"] += 1
            total -= 1

    # ------------------------------------------------------------------ metrics

    def buffered(self) -> int:
        return len(self.outbound)

    def unconfirmed_count(self) -> int:
        return sum(len(q) for q in self.unconfirmed.values())
