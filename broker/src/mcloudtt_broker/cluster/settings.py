"""Settings of the Redis cluster bus: a light module, so a single node never imports redis."""

from __future__ import annotations

from dataclasses import dataclass, field

ROUTED = "routed"
BROADCAST = "broadcast"


class DuplicateBrokerId(RuntimeError):
    """Another live broker already uses this id."""


@dataclass(frozen=True, kw_only=True)
class ClusterSettings:
    url: str
    broker_id: str
    mode: str = ROUTED
    sync_channel: str = "sync"
    prefix: str = "mcloudtt"
    tap_stream: str | None = None
    tap_maxlen: int = 1_000_000
    tap_streams: int = 1  # N > 1: N tap streams by topic hash (tap.py)
    # Broadcast on sharded Pub/Sub (SPUBLISH/SSUBSCRIBE, Redis 7): set on a Redis Cluster,
    # where a classic PUBLISH is copied to every node of the cluster.
    sharded_pubsub: bool = False
    buffer_limit: int = 100_000  # outbound messages kept while Redis is away
    presence_ttl: float = 5.0
    replay: bool = True  # replay a dead broker's inbox to the sessions taken from it
    backoff_max: float = 1.0
    inbox_maxlen: int = 100_000  # entries (batches) kept for a broker that does not read
    handover_timeout: float = 3.0  # how long a CONNECT waits for another broker's session
    # CONNECTs looking for their session in the cluster at once; more get CONNACK 0x89 Server
    # busy (3.1.1: 3, Server unavailable) and come back with their client's backoff.
    max_locating: int = 2_000
    client_ttl: int = 8 * 24 * 3600  # how long Redis remembers which broker had a ClientId
    # --cluster-key-file: the signing key first (keys.py); empty: nothing is tagged.
    keys: tuple[bytes, ...] = field(default=(), repr=False)
