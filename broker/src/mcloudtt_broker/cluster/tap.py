"""The tap's stream keys: today's one key, or N keys by topic hash (sans-IO).

One tap stream is one Redis key, so on a Redis Cluster it is one shard's hot spot whatever the
cluster size. With `--tap-streams N` (N > 1) a publish goes to stream `crc32(topic) % N`: every
message of a topic lands in the same stream, so a topic keeps its order. The N keys carry hash
tags chosen so stream i hashes to a slot in the middle of the i-th of N equal slot ranges; a
Redis Cluster with N (or N/k) primaries and evenly split slots, as `redis-cli --cluster create`
and Memorystore lay them out, puts each stream on its own shard. N = 1 is today's key, unchanged.

Broker and adapter compute the same names from the same (base, N); both must be given the same N
(docs/deploy.md, "Choosing the Redis").
"""

from __future__ import annotations

import functools
from zlib import crc32

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

__all__ = ["tap_index", "tap_streams"]


@functools.cache
def tap_streams(base: str, count: int = 1) -> tuple[str, ...]:
    """The keys of `count` tap streams named after `base` (just `base` when count is 1)."""
    if count < 1:
        raise ValueError("at least one tap stream")
    if count == 1:
        return (base,)
    if "{" in base:
        # A hash tag in the base would put every stream on the same slot.
        raise ValueError(f"a sharded tap's base key {base!r} must not hold a hash tag")
    width = REDIS_CLUSTER_HASH_SLOTS / count
    keys = []
    for index in range(count):
        # The middle half of the range: robust to ranges that differ by a slot or two.
        low = index * width + width / 4
        high = index * width + 3 * width / 4
        attempt = 0
        while True:
            key = f"{base}:{index}:{{t{index}.{attempt}}}"
            if low <= key_slot(key.encode()) < high:
                break
            attempt += 1
        keys.append(key)
    return tuple(keys)


def tap_index(topic_wire: bytes, count: int) -> int:
    """Which of `count` streams a topic's messages go to (any stable form of the topic)."""
    return crc32(topic_wire) % count
