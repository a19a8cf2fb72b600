"""Key names that depend on the backplane: one Redis, or a Redis Cluster (sans-IO, no redis).

Per-broker keys carry the broker id as a hash tag (`{prefix}:inbox:{b1}`, `...:progress:{b1}`,
`...:broker:{b1}`, `...:adopter:{b1}`, ...): on a cluster all of one broker's keys are in one
slot, so forwarding to a destination touches one shard, and the scripts that read two of them
(presence and adoption lock) stay in one slot. The braces are part of the name on one Redis too.

Retained messages are one hash `{prefix}:retained` on one Redis; on a cluster they are spread
over RETAINED_SHARDS hashes `{prefix}:retained:{rN}` by topic, so no one key (and shard) holds
them all.
"""

from __future__ import annotations

import zlib

RETAINED_SHARDS = 16


def retained_key(prefix: str, topic: str, shards: int) -> str:
    """Where a topic's retained message is kept (`shards` 0: the one hash)."""
    if not shards:
        return f"{prefix}:retained"
    return f"{prefix}:retained:{{r{zlib.crc32(topic.encode()) % shards}}}"


def retained_keys(prefix: str, shards: int) -> list[str]:
    """Every hash that holds retained messages."""
    if not shards:
        return [f"{prefix}:retained"]
    return [f"{prefix}:retained:{{r{n}}}" for n in range(shards)]
