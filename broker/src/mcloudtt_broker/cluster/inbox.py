"""The inbox: what other brokers sent this one, read from `{prefix}:inbox:{me}`, delivered here.

The stream is read with a consumer group on its own lean connection: one round trip acknowledges
the last batch, reports progress (`{prefix}:progress:{me}`: origin -> highest sequence handled,
what the origins' outboxes confirm against) and asks for the next. Each origin's sequences are
handled in order; one not above the last handled from that origin is a duplicate (a resend) and
dropped. Broadcast mode's QoS 0 publishes come from the Pub/Sub channel instead (`on_sync`).
A record for a shared group whose member left this broker since its origin chose it (handed
over, adopted, unsubscribed) goes on to a member broker in our table, not to nobody.

Handled entries are trimmed only REPLAY_WINDOW_MS behind the last one, so that if this broker
dies, the broker that takes its sessions can replay what its clients had not acknowledged yet
(`replay.py`). `pause()` holds deliveries (the reader waits before its next entry) while such a
replay runs, or a session comes in from another broker, so that what this inbox delivers next
comes after the replayed or handed-over messages.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import hiredis
from redis.exceptions import ResponseError

from ..core.message import Message
from ..core.ports import ClusterCore
from ..mqtt.properties import EMPTY_PROPERTIES
from .envelope import EnvelopeError, EnvelopeFields, EnvelopeReader, unpack_envelope
from .keys import cluster_keys
from .keyspace import retained_keys
from .link import GROUP, LinkError, RedisClient, stream_id
from .records import InboxError, iter_records
from .redis_url import RedisOptions
from .replay import REPLAY_WINDOW_MS
from .resp import Commands
from .settings import ClusterSettings
from .topology import SlotMap, open_link

# How long one inbox read blocks in Redis, and how long past that an answer may take before the
# link counts as lost.
INBOX_BLOCK_MS = 1000
REPLY_TIMEOUT = 5.0


class Inbox:
    def __init__(
        self,
        settings: ClusterSettings,
        core: ClusterCore,
        stats: Counter[str],
        options: RedisOptions,
    ) -> None:
        self.settings = settings
        self.options = options
        self.slots: SlotMap | None = None  # the bus sets it when Redis is a cluster
        self.retained_shards = 0  # and this (keyspace.py)
        self.me = settings.broker_id
        self.k_inbox = f"{settings.prefix}:inbox:{{{self.me}}}"
        self.k_inbox_bytes = self.k_inbox.encode()
        self.k_progress = f"{settings.prefix}:progress:{{{self.me}}}"
        self.k_retained = f"{settings.prefix}:retained"
        self.core = core
        self.stats = stats
        self.reader = EnvelopeReader()
        self.keys = cluster_keys(settings.keys)
        self.handled: dict[str, int] = {}  # origin -> highest sequence delivered from my inbox
        self.position: tuple[int, int] = (0, 0)  # id of the last inbox entry handled
        self.pauses = 0  # deliveries wait while this is above 0
        # Sessions handed to us by a live broker that had delivered some of what this inbox
        # still holds for them (an origin sent it to both of us): client id -> (its highest
        # sequence per origin there, the entry of ours past which none of that remains).
        self.handed_in: dict[str, tuple[dict[str, int], tuple[int, int]]] = {}
        # After a rejoin whose sessions were adopted meanwhile: our entries up to here were
        # replayed by the adopter, shared groups' records included (`groups_replayed`).
        self.groups_replayed_until: tuple[int, int] | None = None
        self._resumed = asyncio.Event()

    def delivered_before(
        self, client_id: str, seen: dict[str, int], until: tuple[int, int]
    ) -> None:
        """The session `client_id` came with what its old holder delivered: up to `seen`
        (origin -> sequence); our entries up to `until` may hold the same records."""
        if self.position < until:
            self.handed_in[client_id] = (seen, until)

    def pause(self) -> None:
        """Deliver nothing more until `resume()` (pauses nest)."""
        self.pauses += 1
        self._resumed.clear()

    def resume(self) -> None:
        self.pauses = max(0, self.pauses - 1)
        if not self.pauses:
            self._resumed.set()

    async def ensure_group(self, redis: RedisClient) -> None:
        try:
            await redis.xgroup_create(self.k_inbox, GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def skip_backlog(self, redis: RedisClient) -> None:
        """Read only what comes from now on: what the stream holds (pending entries of our
        previous run included) was replayed by the broker that adopted its sessions, and
        delivering it here again would repeat it (a shared group's records, passed on)."""
        pipe = redis.pipeline(transaction=True)
        pipe.xgroup_destroy(self.k_inbox, GROUP)
        pipe.xgroup_create(self.k_inbox, GROUP, id="$", mkstream=True)
        await pipe.execute()

    async def groups_replayed(self, redis: RedisClient) -> None:
        """We rejoin after another broker adopted our sessions and replayed our inbox: its
        plain records are still ours to deliver to the sessions we kept (clean ones), but its
        shared groups' records went to a member through the adopter, and delivering or passing
        them on again would give a group a message twice (MQTT-4.8.2-2). Up to the stream's
        last entry now: the origins route to us again only once our table is announced."""
        last = await redis.xrevrange(self.k_inbox, count=1)
        self.groups_replayed_until = stream_id(last[0][0]) if last else None

    async def load_retained(self, redis: RedisClient) -> None:
        """The cluster's retained messages, `{prefix}:retained` (topic -> envelope), into the
        core: at start and after each reconnect."""
        messages = []
        keys = self.keys
        for k_retained in retained_keys(self.settings.prefix, self.retained_shards):
            context = k_retained.encode()
            async for _topic, stored in redis.hscan_iter(k_retained):
                envelope_raw = stored if keys is None else keys.open_envelope(context, stored)
                if envelope_raw is None:
                    self.stats["bad_tag"] += 1
                    continue
                try:
                    fields = unpack_envelope(envelope_raw)
                except EnvelopeError:
                    self.stats["bad_envelopes"] += 1
                    continue
                message = self.to_message(fields)
                if message is not None:
                    messages.append(message)
        self.core.load_retained(messages)

    async def run(self, redis: RedisClient) -> None:
        """Read and deliver until the link breaks (the bus translates the errors)."""
        last_id = b"0"  # first what was delivered to us before and not acknowledged
        acks: list[bytes] = []
        inbox = await open_link(self.options, self.slots, lambda error: None)
        try:
            while True:
                # Acknowledge the last batch, report progress and ask for the next: one trip.
                commands = Commands()
                if acks:
                    commands.xack(self.k_inbox, GROUP, acks)
                    if self.handled:
                        commands.hset_many(self.k_progress, self.handled)
                    # Keep what was handled a while: a replay may need it (replay.py).
                    last_ms = int(acks[-1].partition(b"-")[0])
                    commands.xtrim_minid(self.k_inbox, b"%d-0" % max(0, last_ms - REPLAY_WINDOW_MS))
                commands.xreadgroup(GROUP, self.me, self.k_inbox, last_id, 16, INBOX_BLOCK_MS)
                async with asyncio.timeout(INBOX_BLOCK_MS / 1000 + REPLY_TIMEOUT):
                    replies = await inbox.call(commands)
                acks = []
                errors = [str(r) for r in replies if isinstance(r, hiredis.ReplyError)]
                if errors:
                    if any("NOGROUP" in error for error in errors):  # Redis restarted empty
                        await self.ensure_group(redis)
                        last_id = b"0"
                        continue
                    if all(error.startswith("UNBLOCKED") for error in errors):
                        # Our stream was migrated to another node while we waited on it
                        # (its slot is being resharded): read again, ASK takes us there.
                        self.stats["inbox_unblocked"] += 1
                        continue
                    raise LinkError(f"inbox read refused: {errors[0]}")
                response = replies[-1]
                entries = response[0][1] if response else []
                if not entries:
                    if last_id == b"0":
                        last_id = b">"
                    continue
                self.stats["inbox_reads"] += 1
                for entry_id, fields in entries:
                    if self.pauses:
                        await self._resumed.wait()
                    replayed = self.groups_replayed_until
                    if replayed is not None and stream_id(entry_id) > replayed:
                        self.groups_replayed_until = replayed = None
                    self.handle_entry(fields, groups_replayed=replayed is not None)
                    acks.append(entry_id)
                    self.position = stream_id(entry_id)
                    # Let deliveries flush to subscribers between batches.
                    await asyncio.sleep(0)
                if self.handed_in:
                    position = self.position
                    self.handed_in = {
                        c: held for c, held in self.handed_in.items() if held[1] > position
                    }
        finally:
            inbox.close()

    def handle_entry(self, fields: list[bytes] | None, groups_replayed: bool = False) -> None:
        """One inbox entry: its field list, `b` then the batch (None if it was deleted).
        `groups_replayed`: its shared groups' records were delivered by our adopter."""
        handled = self.handled
        deliver = self.core.deliver_remote
        read = self.reader.read
        batch = None
        tag = None
        if isinstance(fields, list):
            for index in range(0, len(fields) - 1, 2):
                if fields[index] == b"b" and isinstance(fields[index + 1], bytes):
                    batch = fields[index + 1]
                elif fields[index] == b"t":
                    tag = fields[index + 1]
        if batch is None:
            if isinstance(fields, list) and fields[:1] == [b"m"]:
                return  # an origin's end marker, for a replay (replay.py)
            self.stats["bad_batches"] += 1
            return
        keys = self.keys
        # One tag per batch (keys.py): a batch someone without the key wrote is dropped whole.
        if keys is not None and not keys.valid(self.k_inbox_bytes, batch, tag):
            self.stats["bad_tag"] += 1
            return
        received = 0
        handed_in = self.handed_in  # empty but for a moment after a live hand-over
        try:
            for plain, groups, start, stop in iter_records(batch):
                try:
                    envelope = read(batch, start, stop)
                except EnvelopeError:
                    self.stats["bad_envelopes"] += 1
                    continue
                origin, sequence, _, client_id, topic, payload, qos, retain, props = envelope
                if sequence <= handled.get(origin, 0):
                    self.stats["duplicates"] += 1
                    continue
                handled[origin] = sequence
                if groups_replayed:
                    if not plain:
                        continue
                    groups = ()
                if props is EMPTY_PROPERTIES:  # nothing expires: the common case, inline
                    message: Message | None = Message(
                        topic, payload, qos, retain, props, origin=client_id
                    )
                else:
                    message = self.to_message(envelope)
                if message is not None:
                    received += 1
                    if handed_in:
                        skip = [
                            c
                            for c, (seen, _) in handed_in.items()
                            if sequence <= seen.get(origin, 0)
                        ]
                        orphaned = deliver(message, plain, groups, skip)
                    else:
                        orphaned = deliver(message, plain, groups)
                    if orphaned:
                        # Groups whose members left here since the origin chose us (handed
                        # over, say): to a member broker in our table, the origin included.
                        # (No ping-pong: our table no longer lists ourselves, and the other
                        # broker's lists us only until our `del` reaches it.)
                        self.core.replay_shared(message, orphaned, "")
        except InboxError:
            self.stats["bad_batches"] += 1
        self.stats["received"] += received

    def on_sync(self, data: bytes) -> None:
        """A publish on the broadcast channel (broadcast mode)."""
        keys = self.keys
        if keys is not None:
            opened = keys.open_envelope(self.settings.sync_channel.encode(), data)
            if opened is None:
                self.stats["bad_tag"] += 1
                return
            data = opened
        try:
            fields = unpack_envelope(data)
        except EnvelopeError:
            self.stats["bad_envelopes"] += 1
            return
        if fields[0] == self.me or fields[6] or fields[7]:
            return  # our own, or it comes through the inbox (QoS 1/2 and retained)
        message = self.to_message(fields)
        if message is not None:
            self.stats["received"] += 1
            self.core.deliver_remote(message, plain=True, groups=())

    def to_message(self, envelope: EnvelopeFields) -> Message | None:
        """The message an envelope carries, None if it expired on the way (MQTT-3.3.2-5)."""
        _, _, received_at_us, client_id, topic, payload, qos, retain, props = envelope
        expires_at = None
        if props is not EMPTY_PROPERTIES and props.message_expiry_interval is not None:
            age = max(0.0, time.time() - received_at_us / 1e6)
            remaining = props.message_expiry_interval - age
            if remaining <= 0:
                self.stats["expired"] += 1
                return None
            expires_at = self.core.clock() + remaining
        return Message(topic, payload, qos, retain, props, expires_at=expires_at, origin=client_id)
