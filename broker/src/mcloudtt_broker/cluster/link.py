"""What the parts of the Redis bus share: the link's state, and its one error type.

Redis and socket errors become `LinkError` at the edge (`redis_errors()`); the bus handles
`LinkError` in one place: the link is lost, and reconnected with backoff.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisClusterException, RedisError

from .redis_url import RedisUrlError
from .resp import RespConnection

if TYPE_CHECKING:
    from .topology import ShardedConnection

# redis-py's annotations describe every response shape at once (RESP2 and RESP3, bytes or str);
# we use bytes responses throughout and check shapes where they are read.
RedisClient = Any

# The consumer group every broker reads its inbox with.
GROUP = "brokers"


class LinkError(ConnectionError):
    """Redis is unreachable, went away or refused a command: the link is lost."""


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Turn Redis and socket errors (timeouts included) into `LinkError`; the original stays
    its cause, for the reason the link is down (`redis_url.link_error_reason`)."""
    try:
        yield
    except LinkError:
        raise
    except (RedisError, RedisClusterException, OSError, RedisUrlError) as error:
        raise LinkError(str(error) or type(error).__name__) from error


@dataclass
class Link:
    """The current connection to Redis, shared by the bus's parts."""

    redis: RedisClient | None = None  # redis-py, for the link's own workers
    # redis-py on a bounded pool that waits (never "Too many connections"), for the work each
    # CONNECT brings (session look-ups and hand-overs): a reconnect storm queues there, and
    # neither floods Redis with connections nor starves the workers' heartbeat. None on a
    # Redis Cluster: that work goes through `redis`, the cluster client.
    sessions: RedisClient | None = None
    # The lean pipelined writer for outbound traffic (one connection per shard of a cluster).
    writer: RespConnection | ShardedConnection | None = None
    connected: bool = False

    def writable(self) -> RespConnection | ShardedConnection | None:
        writer = self.writer
        if not self.connected or writer is None or writer.closed:
            return None
        return writer


def stream_id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)
