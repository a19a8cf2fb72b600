"""Redis tap sources: the durable stream (consumer group, XACK after commit) or the `sync` channel.

Both carry cluster envelopes (docs/cluster-envelope.md), decoded with the broker's codec. An
envelope names its origin broker and sequence, so `message_id` is `origin:sequence`: the same
message read twice (a redelivery after a crash) has the same id, which the BigQuery insertId and
the de-duplicating analysis queries rely on.

Stream: XGROUP CREATE (MKSTREAM; from `start_id`, default 0 = everything still in the stream),
then this consumer's own pending entries (delivered before a crash, never acknowledged), then new
entries with XREADGROUP `>`. Entries a dead replica left pending for `claim_idle` are taken over
with XAUTOCLAIM. XACK only after the sink committed. Redis going away is retried with capped,
jittered backoff; acknowledgements that could not be sent are sent after the reconnect.

Sharded tap (`--tap-streams N`, the brokers' N): one stream source per tap stream, each with the
group on its own key, under one `ShardedStreamSource`; every replica reads every stream, and each
stream's group splits its entries between the replicas that are up, so replicas come and go
without a coordinator and what a dead one left pending is claimed by the others.

Redis Cluster: a URL that reaches a node with `cluster_enabled:1` gets redis-py's `RedisCluster`
client (the topology from that seed node, MOVED and ASK followed by redis-py); every command of a
stream source names one key, so one slot.

Pub/Sub: fire-and-forget by nature; whatever is published while the adapter is disconnected is
lost (use the stream for at-least-once). On a Redis Cluster, or with `sharded=True` (the brokers'
`--sharded-pubsub`), the channel is read with SSUBSCRIBE (on a cluster only its shard carries it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from mcloudtt_broker.backoff import Backoff
from mcloudtt_broker.cluster.envelope import EnvelopeError, unpack_envelope
from mcloudtt_broker.cluster.keys import ClusterKeys, strip_unverified
from mcloudtt_broker.cluster.redis_url import link_error_reason, parse_redis_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..records import Record
from .mqtt import properties_json

if TYPE_CHECKING:
    from ..pipeline import Pipeline

log = logging.getLogger("mcloudtt.adapter.redis")

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError, ConnectionError)


def envelope_record(source: Any, ack: Any, data: bytes) -> Record:
    origin, sequence, received_at, client_id, topic, payload, qos, retain, props = unpack_envelope(
        data
    )
    return Record(
        source,
        ack,
        f"{origin}:{sequence}",
        topic,
        bytes(payload),
        qos,
        retain,
        received_at,
        origin,
        client_id or None,
        properties_json(props),
    )


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """The entries of an XREADGROUP reply, RESP2 ([[name, entries]]) or RESP3 ({name: ...})."""
    if not reply:
        return []
    out: list[tuple[bytes, dict[bytes, bytes] | None]] = []
    if isinstance(reply, dict):
        for value in reply.values():
            out.extend(value[0] if value and isinstance(value[0], list) else value)
        return out
    for _name, entries in reply:
        out.extend(entries)
    return out


class _LinkState:
    """Why the Redis link is down: logged once per reason (not per retry), shown in /readyz."""

    def __init__(self, url: str) -> None:
        self.options = parse_redis_url(url)  # the broker's parser: the same URL, the same link
        self.last_error = ""

    def client(self) -> aioredis.Redis:
        return self.options.client(socket_connect_timeout=5)

    async def connect(self) -> Any:
        """A client for the URL: redis-py's `RedisCluster` when the node is in a cluster (the
        broker's way of making one: the URL's seeds, its user, password and TLS on every node)."""
        plain = self.client()
        try:
            info = await plain.info("cluster")
        except ResponseError:
            info = {}  # a server without the section (or a proxy that refuses it)
        except BaseException:
            await plain.aclose()
            raise
        if not info.get("cluster_enabled"):
            return plain
        await plain.aclose()
        cluster = self.options.cluster_client(socket_connect_timeout=5)
        await cluster.initialize()
        return cluster

    def failed(self, error: BaseException, delay: float | None = None) -> None:
        reason = link_error_reason(error, self.options)
        if reason != self.last_error:
            retry = f"; retrying in {delay:.1f}s" if delay is not None else "; retrying"
            log.warning("redis: %s%s", reason, retry)
        self.last_error = reason

    def up(self) -> None:
        if self.last_error:
            log.info("redis %s: connected", self.options.address)
        self.last_error = ""


class _RedisSource:
    """What both Redis sources share: the link, the pipeline they feed, their state."""

    def __init__(self, url: str, backoff_cap: float) -> None:
        self.url = url
        self.link = _LinkState(url)
        self.backoff_cap = backoff_cap
        self.pipeline: Pipeline | None = None
        self._redis: Any = None  # aioredis.Redis, or RedisCluster on a cluster
        self._stopping = False
        self._connected = False

    def attach(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def last_error(self) -> str:
        return self.link.last_error

    def pause(self) -> None:
        pass  # a pull source waits for room itself; Pub/Sub cannot be paused

    def resume(self) -> None:
        pass

    def stop_receiving(self) -> None:
        self._stopping = True


class RedisStreamSource(_RedisSource):
    name = "stream"

    def __init__(
        self,
        url: str,
        *,
        stream: str = "mcloudtt:tap",
        group: str = "mcloudtt-adapter",
        consumer: str,
        start_id: str = "0",
        count: int = 2000,
        block_ms: int = 500,
        claim_idle: float = 60.0,
        backoff_cap: float = 10.0,
        keys: ClusterKeys | None = None,
    ) -> None:
        super().__init__(url, backoff_cap)
        self.stream = stream
        self.keys = keys  # with the cluster key: an entry without a valid tag `t` is bad
        self._context = stream.encode()
        self.group = group
        self.consumer = consumer
        self.start_id = start_id
        self.count = count
        self.block_ms = block_ms
        self.claim_idle = claim_idle
        self._acks: list[bytes] = []
        self._ack_event = asyncio.Event()
        self._inflight: set[bytes] = set()
        self._ack_task: asyncio.Task[None] | None = None
        self._last_claim = 0.0
        self.bad = 0
        self.acked = 0

    def ack(self, tokens: list[Any]) -> None:
        self._acks.extend(tokens)
        self._ack_event.set()

    async def close(self) -> None:
        self._stopping = True
        if self._ack_task is not None:
            self._ack_event.set()
            try:
                await asyncio.wait_for(self._flush_acks(), 5.0)
            except (TimeoutError, *_REDIS_DOWN) as error:
                log.warning("could not send %d XACKs before exit: %s", len(self._acks), error)
            self._ack_task.cancel()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        self._connected = False

    # ------------------------------------------------------------ loops

    async def run(self) -> None:
        assert self.pipeline is not None
        backoff = Backoff(base=0.2, cap=self.backoff_cap)
        self._ack_task = asyncio.create_task(self._ack_loop(), name="mcloudtt-xack")
        while not self._stopping:
            try:
                if self._redis is None:
                    self._redis = await self.link.connect()
                await self._setup()
                self._connected = True
                self.link.up()
                backoff.reset()
                try:
                    await self._flush_acks()
                except ResponseError:
                    self._acks.clear()  # the group was recreated: old ids mean nothing now
                await self._read("0")  # our own pending entries first (delivered, never acked)
                while not self._stopping:
                    await self.pipeline.wait_for_room()
                    if self._stopping:
                        break
                    if time.monotonic() - self._last_claim > max(1.0, self.claim_idle / 2):
                        await self._claim()
                    await self._read(">")
            except _REDIS_DOWN as error:
                self._connected = False
                if self._stopping:
                    break
                delay = backoff.next()
                self.link.failed(error, delay)
                await asyncio.sleep(delay)
            except ResponseError as error:
                self._connected = False
                if self._stopping:
                    break
                self.link.failed(error)
                await asyncio.sleep(backoff.next())

    async def _setup(self) -> None:
        assert self._redis is not None
        try:
            await self._redis.xgroup_create(
                self.stream, self.group, id=self.start_id, mkstream=True
            )
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def _read(self, start: str) -> None:
        """Read new entries (`>`), or all of this consumer's pending ones (`0`), into the pipeline."""
        assert self._redis is not None and self.pipeline is not None
        while not self._stopping:
            count = max(1, min(self.count, self.pipeline.room))
            reply = await self._redis.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: start},
                count=count,
                block=self.block_ms if start == ">" else None,
            )
            entries = _entries(reply)
            if start == "0":
                entries = [e for e in entries if e[0] not in self._inflight]
            self._submit(entries)
            if start == ">" or not entries:
                return
            start = entries[-1][0].decode()

    async def _claim(self) -> None:
        assert self._redis is not None
        self._last_claim = time.monotonic()
        reply = await self._redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            int(self.claim_idle * 1000),
            "0-0",
            count=self.count,
        )
        entries = reply[1] if reply and len(reply) > 1 else []
        entries = [e for e in entries if e[0] not in self._inflight]
        if entries:
            log.info("claimed %d entries left pending by another consumer", len(entries))
        self._submit(entries)

    def _submit(self, entries: list[tuple[bytes, dict[bytes, bytes] | None]]) -> None:
        assert self.pipeline is not None
        records: list[Record] = []
        poison: list[bytes] = []
        inflight = self._inflight
        for entry_id, fields in entries:
            data = fields.get(b"e") if fields else None
            if data is None:
                poison.append(entry_id)  # trimmed away, or not an envelope entry
                continue
            try:
                keys = self.keys
                assert fields is not None
                if keys is not None and not keys.valid(self._context, data, fields.get(b"t")):
                    raise EnvelopeError("no valid tag under the cluster key")
                records.append(envelope_record(self, entry_id, data))
            except EnvelopeError as error:
                self.bad += 1
                self.pipeline.metrics.inc("mcloudtt_adapter_bad_messages_total", source=self.name)
                log.debug("bad envelope %s: %s", entry_id, error)
                poison.append(entry_id)
                continue
            inflight.add(entry_id)
        if poison:
            self.ack(poison)  # never becomes valid: acknowledge so it is not redelivered forever
        self.pipeline.submit(records)

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_event.wait()
            self._ack_event.clear()
            if not self._acks or self._redis is None:
                continue
            try:
                await self._flush_acks()
            except _REDIS_DOWN:
                await asyncio.sleep(0.2)  # kept; sent again after the reconnect
            except ResponseError as error:
                # e.g. NOGROUP after Redis lost its data: these entries can never be acked.
                log.warning(
                    "XACK refused (%s); dropping %d acknowledgements", error, len(self._acks)
                )
                for entry_id in self._acks:
                    self._inflight.discard(entry_id)
                self._acks.clear()

    async def _flush_acks(self) -> None:
        while self._acks and self._redis is not None:
            ids = self._acks[:5000]
            await self._redis.xack(self.stream, self.group, *ids)
            del self._acks[: len(ids)]
            self.acked += len(ids)
            for entry_id in ids:
                self._inflight.discard(entry_id)

    async def stream_pending(self) -> int | None:
        if self._redis is None:
            return None
        try:
            info = await self._redis.xpending(self.stream, self.group)
        except (*_REDIS_DOWN, ResponseError):
            return None
        return int(info["pending"]) if isinstance(info, dict) else int(info[0])


class ShardedStreamSource:
    """The sharded tap: one `RedisStreamSource` per stream, seen by the pipeline as one source.

    Records keep their own stream source, so each XACK goes to the stream it came from."""

    name = "stream"

    def __init__(self, parts: list[RedisStreamSource]) -> None:
        self.parts = parts

    def attach(self, pipeline: Pipeline) -> None:
        for part in self.parts:
            part.attach(pipeline)

    async def run(self) -> None:
        await asyncio.gather(*(part.run() for part in self.parts))

    def pause(self) -> None:
        pass  # pull sources wait for room themselves

    def resume(self) -> None:
        pass

    def ack(self, tokens: list[Any]) -> None:
        raise AssertionError("records are acknowledged to their own stream")  # pragma: no cover

    def stop_receiving(self) -> None:
        for part in self.parts:
            part.stop_receiving()

    async def close(self) -> None:
        await asyncio.gather(*(part.close() for part in self.parts))

    @property
    def connected(self) -> bool:
        return all(part.connected for part in self.parts)

    @property
    def last_error(self) -> str:
        return "; ".join(f"{p.stream}: {p.last_error}" for p in self.parts if p.last_error)

    @property
    def bad(self) -> int:
        return sum(part.bad for part in self.parts)

    @property
    def acked(self) -> int:
        return sum(part.acked for part in self.parts)

    async def stream_pending(self) -> int | None:
        counts = await asyncio.gather(*(part.stream_pending() for part in self.parts))
        known = [count for count in counts if count is not None]
        return sum(known) if known else None


def stream_source(
    url: str, *, stream: str = "mcloudtt:tap", streams: int = 1, **kwargs: Any
) -> RedisStreamSource | ShardedStreamSource:
    """The tap source for the brokers' `--tap-stream` and `--tap-streams`."""
    from mcloudtt_broker.cluster.tap import tap_streams

    keys = tap_streams(stream, streams)
    if len(keys) == 1:
        return RedisStreamSource(url, stream=keys[0], **kwargs)
    return ShardedStreamSource([RedisStreamSource(url, stream=key, **kwargs) for key in keys])


class RedisPubSubSource(_RedisSource):
    """The broadcast channel: every envelope of every broker, at most once."""

    name = "pubsub"

    def __init__(
        self,
        url: str,
        *,
        channel: str = "sync",
        backoff_cap: float = 10.0,
        keys: ClusterKeys | None = None,
        sharded: bool = False,
    ) -> None:
        super().__init__(url, backoff_cap)
        self.channel = channel
        self.sharded = sharded
        self.keys = keys
        self.bad = 0
        self.subscribed = asyncio.Event()

    def ack(self, tokens: list[Any]) -> None:
        pass  # at most once: nothing to acknowledge

    async def close(self) -> None:
        self._stopping = True
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        self._connected = False

    async def run(self) -> None:
        assert self.pipeline is not None
        backoff = Backoff(base=0.2, cap=self.backoff_cap)
        while not self._stopping:
            pubsub = None
            try:
                self._redis = await self.link.connect()
                cluster = isinstance(self._redis, aioredis.RedisCluster)
                if cluster:
                    # Brokers broadcast on sharded Pub/Sub there: SSUBSCRIBE on the primary of
                    # the channel's slot, on a connection of our own (as the broker does).
                    node = self._redis.get_node_from_key(self.channel)
                    await self._redis.aclose()
                    self._redis = self.link.options.for_node(node.host, node.port).client(
                        socket_connect_timeout=5
                    )
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                get_message = pubsub.get_message
                if self.sharded or cluster:
                    await pubsub.ssubscribe(self.channel)
                else:
                    await pubsub.subscribe(self.channel)
                self._connected = True
                self.link.up()
                self.subscribed.set()
                backoff.reset()
                while not self._stopping:
                    await self.pipeline.wait_for_room()
                    message = await get_message(timeout=0.5)
                    if message is None:
                        continue
                    batch = [message]
                    while len(batch) < 2000:
                        more = await get_message(timeout=0)
                        if more is None:
                            break
                        batch.append(more)
                    self._submit(batch)
            except _REDIS_DOWN as error:
                self._connected = False
                self.subscribed.clear()
                if self._stopping:
                    break
                delay = backoff.next()
                self.link.failed(error, delay)
                await asyncio.sleep(delay)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                if self._redis is not None:
                    with contextlib.suppress(Exception):
                        await self._redis.aclose()
                    self._redis = None

    def _submit(self, messages: list[dict[str, Any]]) -> None:
        assert self.pipeline is not None
        records = []
        for message in messages:
            if message.get("type") not in ("message", "smessage"):
                continue
            data = message["data"]
            try:
                if self.keys is not None:
                    # Envelope version 2 (the tag inside), see docs/cluster-envelope.md.
                    data = self.keys.open_envelope(self.channel.encode(), data)
                    if data is None:
                        raise EnvelopeError("no valid tag under the cluster key")
                else:
                    data = strip_unverified(data)  # a keyed cluster, read without checking
                records.append(envelope_record(self, None, data))
            except EnvelopeError:
                self.bad += 1
                self.pipeline.metrics.inc("mcloudtt_adapter_bad_messages_total", source=self.name)
        self.pipeline.submit(records)
