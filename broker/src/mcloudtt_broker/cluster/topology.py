"""Redis Cluster as the backplane: finding the shards, and the lean link spread over them.

* `probe()`: one round trip to the first seed node that answers (`CLUSTER SHARDS`, or
  `CLUSTER SLOTS` before Redis 7): the slot map when it is a cluster node, None for a single
  Redis (whose link stays the plain
  `RespConnection`, with no per-message work added).
* `ShardedConnection`: the same surface as `RespConnection` (`write`, `call`, `submit`,
  `sent`, `replies`, `settled`, `close`) over one pipelined connection per primary. Each
  command goes to the primary of its key's slot (commands re-packed per shard, in order);
  `replies` counts the commands answered without a gap, so the outbox's bookkeeping
  (`answered`, `link_lost`) stays as it is.
* Redirections: `ASK` (a slot being migrated, the key already moved) sends that command again
  to the target with `ASKING`, in the order the replies came, so one stream's entries keep
  their order. `MOVED` to a primary we have a connection to (a slot whose migration ended)
  is followed the same way, in reply order; the slot's new owner is used for new commands
  only once nothing is in flight (the commands still on their way to the old owner would be
  overtaken otherwise). A MOVED elsewhere, `CLUSTERDOWN` and `TRYAGAIN` mean the topology
  changed: the link is closed as if Redis went away, and the bus's retry pattern reconnects
  with a fresh slot map and writes again what was not answered (the receivers drop
  duplicates by sequence).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import hiredis
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterPipeline
from redis.crc import key_slot

from .redis_url import RedisOptions
from .resp import Commands, RespConnection, open_connection

SLOTS = 16_384
Node = tuple[str, int]
# Error replies that say the slot map we use is stale.
_TOPOLOGY_CHANGED = ("MOVED ", "CLUSTERDOWN", "TRYAGAIN", "READONLY", "MASTERDOWN")
# Error replies of a Redis that is not a cluster node (or will not tell).
_NOT_A_CLUSTER = ("cluster support disabled", "unknown command", "NOPERM")


class SlotMap:
    """Which primary serves each slot, and every node the cluster reported."""

    __slots__ = ("_owner", "nodes", "primaries")

    def __init__(self, ranges: Iterable[tuple[int, int, Node]], nodes: Iterable[Node]) -> None:
        self._owner: list[Node | None] = [None] * SLOTS
        primaries: dict[Node, None] = {}
        for start, end, primary in ranges:
            primaries[primary] = None
            self._owner[start : end + 1] = [primary] * (end - start + 1)
        self.primaries = list(primaries)
        self.nodes = list(dict.fromkeys([*self.primaries, *nodes]))

    def complete(self) -> bool:
        return None not in self._owner

    def node_for_slot(self, slot: int) -> Node:
        node = self._owner[slot]
        if node is None:
            raise ConnectionError(f"Redis Cluster: no primary serves slot {slot}")
        return node

    def node_for_key(self, key: bytes) -> Node:
        return self.node_for_slot(key_slot(key))

    def moved(self, moves: dict[int, Node]) -> SlotMap:
        """A copy with these slots given to these primaries (a copy: other connections share
        this map and may still have commands on their way to the old owners)."""
        copy = SlotMap((), self.nodes)
        copy._owner = list(self._owner)
        for slot, node in moves.items():
            copy._owner[slot] = node
        copy.primaries = list(dict.fromkeys([*self.primaries, *moves.values()]))
        return copy

    @classmethod
    def from_cluster_slots(cls, reply: Sequence[Any], seed: Node) -> SlotMap:
        """From the `CLUSTER SLOTS` reply: [start, end, [host, port, id, ...], replicas...]."""
        ranges: list[tuple[int, int, Node]] = []
        nodes: list[Node] = []
        for entry in reply:
            start, end, *servers = entry
            found = [_node(server, seed) for server in servers]
            ranges.append((int(start), int(end), found[0]))
            nodes.extend(found)
        return cls(ranges, nodes)

    @classmethod
    def from_cluster_shards(cls, reply: Sequence[Any], seed: Node, tls: bool) -> SlotMap:
        """From the `CLUSTER SHARDS` reply (Redis 7; `CLUSTER SLOTS` is deprecated there):
        per shard its slot ranges and its nodes, each with role, endpoint and port (the TLS
        port where the link is TLS: a TLS-only node has no plain one)."""
        ranges: list[tuple[int, int, Node]] = []
        nodes: list[Node] = []
        for shard in reply:
            fields = _fields(shard)
            bounds = [int(bound) for bound in fields.get("slots") or ()]
            primary: Node | None = None
            for member in fields.get("nodes") or ():
                info = _fields(member)
                port = info.get("tls-port") if tls else None
                port = port or info.get("port")
                if not port:
                    continue
                host = _text(info.get("endpoint") or info.get("ip") or b"")
                node = (host if host and host != "?" else seed[0]), int(port)
                nodes.append(node)
                if _text(info.get("role") or b"") in ("master", "primary"):
                    primary = node
            if primary is not None:
                ranges.extend(
                    (bounds[i], bounds[i + 1], primary) for i in range(0, len(bounds) - 1, 2)
                )
        return cls(ranges, nodes)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(entry: Any) -> dict[str, Any]:
    """A RESP2 flat key/value array (or a RESP3 map) as a dict with text keys."""
    if isinstance(entry, dict):
        return {_text(key): value for key, value in entry.items()}
    return {_text(entry[i]): entry[i + 1] for i in range(0, len(entry) - 1, 2)}


def _node(server: Sequence[Any], seed: Node) -> Node:
    host = server[0].decode() if isinstance(server[0], bytes) else str(server[0])
    # An empty or "?" host: the node does not know its address; it is the one we asked.
    return (host if host and host != "?" else seed[0]), int(server[1])


async def probe(
    options: RedisOptions, known: Sequence[Node] = (), timeout: float = 2.0
) -> SlotMap | None:
    """The slot map when the URL's Redis is a Redis Cluster, None when it is one Redis.

    The URL's nodes are tried first, then `known` (nodes an earlier probe reported: a seed
    that died is not needed once the cluster was found). Raises the last connection error
    when no node answers."""
    if options.scheme == "unix":
        return None
    last: BaseException = ConnectionError("no Redis node to ask")
    for node in dict.fromkeys([*options.nodes, *known]):
        try:
            link = await open_connection(options.for_node(*node), lambda error: None, timeout)
        except (OSError, ConnectionError, TimeoutError) as error:
            last = error
            continue
        try:
            # CLUSTER SHARDS (Redis 7, what Memorystore documents); CLUSTER SLOTS before 7.
            probe = Commands()
            probe.add("CLUSTER", "SHARDS")
            probe.add("CLUSTER", "SLOTS")
            shards, slot_ranges = await asyncio.wait_for(link.call(probe), timeout)
        except (OSError, ConnectionError, TimeoutError) as error:
            last = error
            continue
        finally:
            link.close()
        reply = slot_ranges if isinstance(shards, hiredis.ReplyError) else shards
        if isinstance(reply, hiredis.ReplyError):
            if any(text in str(reply) for text in _NOT_A_CLUSTER):
                return None
            last = ConnectionError(f"Redis Cluster at {node[0]}:{node[1]}: {reply}")
            continue
        if reply is shards:
            slots = SlotMap.from_cluster_shards(reply or [], node, options.tls)
        else:
            slots = SlotMap.from_cluster_slots(reply or [], node)
        if not slots.complete():  # a cluster being formed, or a shard without a primary
            last = ConnectionError(
                f"Redis Cluster at {node[0]}:{node[1]} does not serve every slot"
            )
            continue
        return slots
    raise last


# Cluster mode's half of failover.py's adoption script (KEYS stored hash; ARGV ClientId): the
# ClientId's key lives in another slot, so it is named after (failover's _NAME_ADOPTER_SCRIPT).
TAKE_STORED_SCRIPT = """
local data = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
return data
"""


class BusCluster(RedisCluster):
    """redis-py's cluster client, whose pipelines take PUBLISH (sent after the pipeline, its
    replies last): the bus's pipelines end with an announcement on the control channel."""

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)
        return _BusPipeline(self, transaction)  # type: ignore[abstract]


class _BusPipeline(ClusterPipeline):
    def __init__(self, client: RedisCluster, transaction: bool | None = None) -> None:
        super().__init__(client, transaction)
        self._publishes: list[tuple[Any, Any]] = []

    def publish(self, channel: Any, message: Any, **kwargs: Any) -> _BusPipeline:  # type: ignore[override]
        # Pub/Sub reaches every node of a cluster: no slot, so after the pipeline.
        self._publishes.append((channel, message))
        return self

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        results = await super().execute(raise_on_error, allow_redirections)
        publishes, self._publishes = self._publishes, []
        for channel, message in publishes:
            results.append(await self.cluster_client.publish(channel, message))
        return results


def is_cluster(redis: Any) -> bool:
    """Whether this redis-py client is the cluster client (multi-key steps split by slot)."""
    return isinstance(redis, RedisCluster)


def command_key(args: Sequence[bytes]) -> bytes:
    """The key that picks the slot: the first argument, or the stream of an XREADGROUP (the
    commands the bus writes name one key each)."""
    if args[0].upper() == b"XREADGROUP":
        return args[[a.upper() for a in args].index(b"STREAMS") + 1]
    return args[1] if len(args) > 1 else b""


Sink = Callable[[int, Any], None]


class ShardedConnection:
    """The lean link to a Redis Cluster: one pipelined `RespConnection` per primary."""

    def __init__(self, slots: SlotMap, on_lost: Callable[[BaseException], None]) -> None:
        self.slots = slots
        self.on_lost = on_lost
        self.links: dict[Node, RespConnection] = {}
        self.sent = 0
        self.replies = 0  # commands answered, without a gap
        self.errors = 0
        self.last_error = ""
        self.closed = False
        self._ahead: set[int] = set()  # answered beyond the first gap
        self._moves: dict[int, Node] = {}  # slots MOVED, to use once nothing is in flight
        self._calls: set[asyncio.Future[list[Any]]] = set()

    @classmethod
    async def open(
        cls,
        options: RedisOptions,
        slots: SlotMap,
        on_lost: Callable[[BaseException], None],
        timeout: float = 2.0,
    ) -> ShardedConnection:
        connection = cls(slots, on_lost)
        try:
            for node in slots.primaries:
                connection.links[node] = await open_connection(
                    options.for_node(*node), connection._lost, timeout
                )
        except BaseException:
            connection.close()
            raise
        return connection

    # ---------------------------------------------------------------- sending

    def write(self, commands: Commands) -> None:
        """Send without waiting; the replies are only counted."""
        self._send(commands, None)

    def submit(self, commands: Commands) -> asyncio.Future[list[Any]]:
        if self.closed:
            raise ConnectionError("Redis connection closed")
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        first = self.sent
        results: list[Any] = [None] * commands.count
        remaining = [commands.count]

        def sink(index: int, reply: Any) -> None:
            results[index - first] = reply
            remaining[0] -= 1
            if not remaining[0] and not future.done():
                self._calls.discard(future)
                future.set_result(results)

        self._calls.add(future)
        self._send(commands, sink)
        if not commands.count:
            future.set_result([])
        return future

    async def call(self, commands: Commands) -> list[Any]:
        return await self.submit(commands)

    def _send(self, commands: Commands, sink: Sink | None) -> None:
        if self.closed:
            raise ConnectionError("Redis connection closed")
        if self._moves and self.replies == self.sent:
            self.slots, self._moves = self.slots.moved(self._moves), {}
        reader = hiredis.Reader()  # our own commands, read back to find their keys
        reader.feed(bytes(commands.data))
        shards: dict[Node, tuple[Commands, list[int], list[list[bytes]]]] = {}
        index = self.sent
        node_for_key = self.slots.node_for_key
        while (args := reader.gets()) is not False:
            try:
                node = node_for_key(command_key(args))
            except ConnectionError as error:  # the slot lost its primary: a new map is needed
                self._lost(error)
                return
            shard = shards.get(node)
            if shard is None:
                shard = shards[node] = (Commands(), [], [])
            shard[0].add(*args)
            shard[1].append(index)
            shard[2].append(args)
            index += 1
        self.sent = index
        for node, (batch, indices, args_list) in shards.items():
            future = self.links[node].submit(batch)
            future.add_done_callback(functools.partial(self._answered, indices, args_list, sink))

    # ---------------------------------------------------------------- replies

    def _answered(
        self,
        indices: list[int],
        args_list: list[list[bytes]],
        sink: Sink | None,
        done: asyncio.Future[list[Any]],
    ) -> None:
        if done.cancelled() or done.exception() is not None or self.closed:
            return  # the connection was lost: `_lost` handles it
        for index, args, reply in zip(indices, args_list, done.result(), strict=True):
            if isinstance(reply, hiredis.ReplyError):
                text = str(reply)
                if text.startswith("ASK "):
                    if not self._redirect(text, index, args, sink, asking=True):
                        return
                    continue
                if text.startswith("MOVED ") and self._follow(text):
                    if not self._redirect(text, index, args, sink, asking=False):
                        return
                    continue
                if text.startswith(_TOPOLOGY_CHANGED):
                    self._lost(ConnectionError(f"Redis Cluster topology changed: {text}"))
                    return
                self.errors += 1
                self.last_error = text
            self._complete(index, reply, sink)

    def _follow(self, text: str) -> bool:
        """`MOVED slot host:port` to a primary we are connected to: noted for new commands."""
        _, slot, address = text.split()
        host, _, port = address.rpartition(":")
        node = (host, int(port))
        link = self.links.get(node)
        if link is None or link.closed:
            return False  # a new primary (a failover): a fresh slot map, by reconnecting
        self._moves[int(slot)] = node
        return True

    def _redirect(
        self, text: str, index: int, args: list[bytes], sink: Sink | None, *, asking: bool
    ) -> bool:
        """`ASK slot host:port` (with `ASKING`: the slot's importing node) or `MOVED`: this
        one command to that node, in the order the redirections came."""
        host, _, port = text.split()[2].rpartition(":")
        link = self.links.get((host, int(port)))
        if link is None or link.closed:
            self._lost(ConnectionError(f"Redis Cluster redirects to a node we do not know: {text}"))
            return False
        asked = Commands()
        if asking:
            asked.add("ASKING")
        asked.add(*args)
        future = link.submit(asked)

        def answered(done: asyncio.Future[list[Any]]) -> None:
            if done.cancelled() or done.exception() is not None or self.closed:
                return
            reply = done.result()[-1]
            if isinstance(reply, hiredis.ReplyError):
                error = str(reply)
                if error.startswith(("ASK ", *_TOPOLOGY_CHANGED)):
                    self._lost(ConnectionError(f"Redis Cluster redirection failed: {error}"))
                    return
                self.errors += 1  # the command's own error (an UNBLOCKED read, say)
                self.last_error = error
            self._complete(index, reply, sink)

        future.add_done_callback(answered)
        return True

    def _complete(self, index: int, reply: Any, sink: Sink | None) -> None:
        if index == self.replies:
            replies = index + 1
            ahead = self._ahead
            while replies in ahead:
                ahead.discard(replies)
                replies += 1
            self.replies = replies
        else:
            self._ahead.add(index)
        if sink is not None:
            sink(index, reply)

    # ---------------------------------------------------------------- life cycle

    def _lost(self, error: BaseException) -> None:
        if self.closed:
            return
        self._shut(error)
        self.on_lost(error)

    def _shut(self, error: BaseException) -> None:
        self.closed = True
        for link in self.links.values():
            link.close()
        calls, self._calls = self._calls, set()
        for future in calls:
            if not future.done():
                lost = ConnectionError(f"Redis connection lost: {error}")
                lost.__cause__ = error
                future.set_exception(lost)

    def close(self) -> None:
        if not self.closed:
            self._shut(ConnectionError("closed"))

    async def settled(self, timeout: float) -> bool:
        """Wait until every command written so far has its reply."""
        target = self.sent
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.replies < target and not self.closed and loop.time() < deadline:
            await asyncio.sleep(0.001)
        return self.replies >= target


async def open_link(
    options: RedisOptions,
    slots: SlotMap | None,
    on_lost: Callable[[BaseException], None],
    timeout: float = 2.0,
) -> RespConnection | ShardedConnection:
    """The lean link: one connection to a single Redis, or one per primary of a cluster."""
    if slots is None:
        return await open_connection(options, on_lost, timeout)
    return await ShardedConnection.open(options, slots, on_lost, timeout)


def close_quietly(connection: RespConnection | ShardedConnection | None) -> None:
    if connection is not None:
        with contextlib.suppress(Exception):
            connection.close()
