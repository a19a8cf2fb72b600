"""From a fleet's load to a cluster: broker pods and Redis sizing.

Every constant below is a default that a flag overrides; where it comes from is said beside it.
Replace the broker figures with your own benchmark of the broker build you deploy (the load-test
member measures them the same way as `shared/design/anchors.md`).

Brokers: one broker's capacity is the benchmark's *delivered* msg/s in the fan-in test (one
publish in, one delivery out). A publish with F deliveries costs about (1 + F) / 2 benchmark
messages; forwarding through Redis to another pod adds `cluster_overhead`. Pods are the largest
of what the message load, the connection count and the connect rate (reconnect storms) need, each
at `headroom` of capacity, plus `spare` pods so that losing one (a node drain, a crash) keeps the
rest under capacity, and never fewer than `min_pods`.

Redis: memory = retained messages + persistent sessions + the client registry + the stream
backlog of the acked hop, times a fragmentation factor, and twice that to be provisioned so that
an RDB/AOF rewrite fork's copy-on-write fits. Commands per second per publish, connect and
disconnect are set out in `REDIS_OPS_*` (the per-message ones measured on real brokers). One
primary's worth is one Memorystore for Redis instance; more is Memorystore for Redis Cluster
with a shard count, printed as the terraform.tfvars lines `terraform/` takes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "BrokerSizing",
    "Rates",
    "RedisSizing",
    "SizingInputs",
    "redis_ops_per_cross",
    "size_brokers",
    "size_redis",
]

# Broker: our asyncio probe core's QoS 1 fan-in (anchors.md: 36,200 delivered msg/s; QoS 0 was
# 49,000). Conservative for mixed QoS traffic until the broker member's benchmark replaces it.
BROKER_CAPACITY_MSG_S = 36_000.0
# Peak utilisation we plan for: the machine-to-machine noise of the benchmarks is 10-40 %.
HEADROOM = 0.6
# Connect handshakes per second one broker sustains (anchors.md: 2,841/s for the probe core).
CONNECT_RATE_PER_BROKER = 2_800.0
# Connections per pod: 2.5 KB per idle connection in the probe core; keepalive timers and TLS
# make busy ones dearer. 50k keeps a pod well inside 1 GiB.
MAX_CONNECTIONS_PER_BROKER = 50_000
# Extra work per message that crosses pods through Redis (encode + decode of the envelope).
CLUSTER_OVERHEAD = 0.25
SPARE_PODS = 1
MIN_PODS = 2
# Seconds over which a rate must hold to count as the peak a broker must sustain: brokers and
# TCP buffers absorb shorter spikes (the 1 s peak is reported as well).
PEAK_WINDOW_S = 10.0

# Redis commands per event, routed mode. The per-message figures are measured, not guessed:
# tests/simulator/test_redis_ops.py counts `INFO commandstats` on a real Redis while two real
# brokers exchange a known number of messages and keeps these within 20 % of it. A message that
# crosses to another broker costs, when it is alone in its batch: XADD to that broker's inbox;
# there XREADGROUP, XACK, HSET of the progress, XTRIM of the handled entries (5, QoS 0 and 1
# alike: QoS 1 is confirmed from the progress the receiver writes anyway). Brokers batch (up to
# 256 records per XADD, 16 entries per read), which lowers this as the rate grows:
# `redis_ops_per_cross` below. Each publish is counted as crossing to one other broker.
REDIS_OPS_PER_CROSS_QOS0 = 5.0
REDIS_OPS_PER_CROSS_QOS1 = 5.0
# Batching. A broker's outbox writes what it buffered since its last write (one XADD per
# destination, at most FLUSH_BATCH records each: cluster/outbox.py); a receiver reads up to
# INBOX_READ_COUNT entries per XREADGROUP and pays XACK, HSET and XTRIM once per read
# (cluster/inbox.py). While one write or read is on its way, what arrives waits for the next:
# about 1 + rate x REDIS_BATCH_WINDOW_S messages go together. The window is measured: fitted
# (least squares of the log) to the median Redis commands per message of 3 runs at Poisson-paced
# rates of 100 to 30,000 msg/s between two brokers on one Redis (loopback, 2 cores),
# recorded in tests/simulator/data/redis_batching.json with the command that made it
# (`python -m mcloudtt_loadtest.batching`); tests/simulator/test_redis_ops.py holds the model
# within 20 % of it. A saturated broker batches further (0.017 commands per message at its full
# rate, mcloudtt-cluster-bench --backplane): the plan sizes brokers below saturation, so the
# model is not taken there and errs towards more commands.
REDIS_BATCH_WINDOW_S = 0.00028
FLUSH_BATCH = 256
INBOX_READ_COUNT = 16
REDIS_OPS_PER_TAP = 1.0  # XADD to the adapter's tap stream (measured with it on)
REDIS_OPS_PER_RETAINED = 1.0  # HSET / HDEL of the retained hash
REDIS_OPS_PER_CONNECT = 4.0  # claim the ClientId, load session + subscriptions, presence
REDIS_OPS_PER_DISCONNECT = 2.0  # release the ClientId, save the session
# One Redis primary's sustainable commands/s for small commands without pipelining.
REDIS_OPS_CAPACITY = 80_000.0
# Memory model (bytes): hash field overhead, session base, per subscription, registry entry.
REDIS_ENTRY_OVERHEAD = 64
REDIS_SESSION_BASE = 256
REDIS_SUBSCRIPTION = 96
REDIS_CLIENT_ENTRY = 96
REDIS_STREAM_BACKLOG_S = 30.0  # QoS >= 1 hop messages kept until trimmed
REDIS_FRAGMENTATION = 1.5
REDIS_FORK_FACTOR = 2.0
# Past one primary (by commands or memory): Memorystore for Redis Cluster. A shard's memory
# for the default node type (REDIS_HIGHMEM_MEDIUM: 13 GB); at least three shards, so that the
# tap's streams and the inboxes spread and a failover moves a third of the load, not half.
REDIS_INSTANCE_MAX_GB = 300  # the largest Memorystore for Redis instance
REDIS_SHARD_MEMORY_GB = 13
REDIS_MIN_SHARDS = 3
REDIS_REPLICAS = 1  # per shard: automatic failover to another zone


@dataclass(frozen=True, kw_only=True)
class Rates:
    """Events per second into the cluster (a peak over PEAK_WINDOW_S, or a mean)."""

    in_msg_s: float  # publishes from devices (data + status) and wills
    deliveries_s: float  # deliveries to subscribers
    qos_msg_s: float  # publishes at QoS >= 1
    retained_s: float  # retained publishes (status, wills, retained streams)
    connects_s: float
    disconnects_s: float  # graceful and not


@dataclass(frozen=True, kw_only=True)
class SizingInputs:
    peak: Rates
    mean: Rates
    peak_connections: int
    retained_topics: int
    retained_bytes: float  # sum over retained topics of topic + payload bytes
    sessions: int  # persistent sessions
    subscriptions_per_session: float
    subscription_filter_bytes: float
    mean_message_bytes: float
    tap: bool = True


@dataclass(frozen=True, kw_only=True)
class BrokerSizing:
    brokers_recommended: int
    binding: str  # which limit decided: messages, connections, connects, minimum
    by_messages: int
    by_connections: int
    by_connects: int
    capacity_msg_s: float
    headroom: float
    spare: int
    peak_load_msg_s: float  # in benchmark messages
    utilisation_at_peak: float  # with all recommended pods up

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class RedisSizing:
    memory_bytes: int
    maxmemory_gb: int
    ops_s_peak: float
    ops_s_mean: float
    primaries: int
    breakdown: dict[str, int]
    backend: str = "instance"  # or "cluster": terraform's redis_backend
    shards: int = 0  # Memorystore for Redis Cluster shards (0 with an instance)
    replicas: int = 0
    ops_per_message: float = 0.0  # commands per published message at the peak mix
    ops_per_cross: float = REDIS_OPS_PER_CROSS_QOS1  # per crossing message, batching counted

    def tfvars(self) -> list[str]:
        """The terraform.tfvars lines of this recommendation (terraform/variables.tf)."""
        if self.backend == "instance":
            return [
                'redis_backend        = "instance"',
                f"redis_memory_size_gb = {self.maxmemory_gb}",
            ]
        return [
            'redis_backend       = "cluster"',
            f"redis_shard_count   = {self.shards}",
            f"redis_replica_count = {self.replicas}",
        ]

    def broker_settings(self) -> list[str]:
        """What brokers and the adapter need for it: the tap sharded one stream per shard."""
        if self.backend == "instance":
            return []
        return [
            f"MCLOUDTT_TAP_STREAMS={self.shards}",
            f"MCLOUDTT_ADAPTER_TAP_STREAMS={self.shards}",
        ]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tfvars": self.tfvars(), "settings": self.broker_settings()}


def redis_ops_per_cross(
    broker_msg_s: float,
    destinations: int = 1,
    *,
    window_s: float = REDIS_BATCH_WINDOW_S,
    lone: float = REDIS_OPS_PER_CROSS_QOS1,
) -> float:
    """Redis commands per message that crosses brokers when each broker sends `broker_msg_s`
    of them, spread evenly over `destinations` other brokers (and, the fleet being symmetric,
    receives as many). `lone` at low rates (one XADD, then XREADGROUP, XACK, HSET, XTRIM
    per message), falling as writes and reads carry more."""
    if broker_msg_s <= 0 or window_s <= 0:
        return lone
    destinations = max(1, destinations)
    per_write = 1.0 + broker_msg_s * window_s  # messages one outbox write carries
    # The destinations those messages go to (expected distinct ones, each equally likely).
    spread = destinations * (1.0 - math.pow(1.0 - 1.0 / destinations, per_write))
    per_xadd = min(float(FLUSH_BATCH), per_write / spread)
    # Entries reach a receiver at broker_msg_s / per_xadd per second; one read takes those
    # that arrived while the previous read was on its way.
    per_read = min(float(INBOX_READ_COUNT), 1.0 + broker_msg_s / per_xadd * window_s)
    return 1.0 / per_xadd + (lone - 1.0) / (per_xadd * per_read)


def size_brokers(
    x: SizingInputs,
    *,
    capacity_msg_s: float = BROKER_CAPACITY_MSG_S,
    headroom: float = HEADROOM,
    spare: int = SPARE_PODS,
    min_pods: int = MIN_PODS,
    max_connections: int = MAX_CONNECTIONS_PER_BROKER,
    connect_rate: float = CONNECT_RATE_PER_BROKER,
    cluster_overhead: float = CLUSTER_OVERHEAD,
) -> BrokerSizing:
    if capacity_msg_s <= 0 or not 0 < headroom <= 1:
        raise ValueError("capacity must be > 0 and headroom in (0, 1]")
    load = (x.peak.in_msg_s + x.peak.deliveries_s) / 2.0 * (1.0 + cluster_overhead)
    by_msgs = math.ceil(load / (capacity_msg_s * headroom))
    by_conns = math.ceil(x.peak_connections / (max_connections * headroom))
    by_connects = math.ceil(x.peak.connects_s / (connect_rate * headroom))
    need = max(by_msgs, by_conns, by_connects, 1)
    binding = next(
        name
        for name, n in (
            ("messages", by_msgs),
            ("connections", by_conns),
            ("connects", by_connects),
            ("messages", 1),
        )
        if n == need
    )
    pods = need + spare
    if pods < min_pods:
        pods, binding = min_pods, "minimum"
    return BrokerSizing(
        brokers_recommended=pods,
        binding=binding,
        by_messages=by_msgs,
        by_connections=by_conns,
        by_connects=by_connects,
        capacity_msg_s=capacity_msg_s,
        headroom=headroom,
        spare=spare,
        peak_load_msg_s=round(load, 1),
        utilisation_at_peak=round(load / (capacity_msg_s * pods), 4),
    )


def size_redis(
    x: SizingInputs,
    *,
    ops_capacity: float = REDIS_OPS_CAPACITY,
    headroom: float = HEADROOM,
    brokers: int | None = None,
    batch_window_s: float = REDIS_BATCH_WINDOW_S,
) -> RedisSizing:
    """`brokers`: the pods the load is spread over (size_brokers' recommendation); their
    per-pod rate sets how much the brokers batch. None: every message unbatched."""
    retained = x.retained_bytes + x.retained_topics * REDIS_ENTRY_OVERHEAD
    sessions = x.sessions * (
        REDIS_SESSION_BASE
        + x.subscriptions_per_session * (x.subscription_filter_bytes + REDIS_SUBSCRIPTION)
    )
    registry = x.peak_connections * REDIS_CLIENT_ENTRY
    backlog = (
        x.peak.qos_msg_s * REDIS_STREAM_BACKLOG_S * (x.mean_message_bytes + REDIS_ENTRY_OVERHEAD)
    )
    used = (retained + sessions + registry + backlog) * REDIS_FRAGMENTATION
    provision = used * REDIS_FORK_FACTOR
    gb = max(1, math.ceil(provision / 2**30))

    def per_cross(r: Rates, lone: float) -> float:
        if brokers is None or brokers < 2:
            return lone
        return redis_ops_per_cross(
            r.in_msg_s / brokers, brokers - 1, window_s=batch_window_s, lone=lone
        )

    def ops(r: Rates) -> float:
        qos0 = max(0.0, r.in_msg_s - r.qos_msg_s)
        return (
            qos0 * per_cross(r, REDIS_OPS_PER_CROSS_QOS0)
            + r.qos_msg_s * per_cross(r, REDIS_OPS_PER_CROSS_QOS1)
            + (r.in_msg_s * REDIS_OPS_PER_TAP if x.tap else 0.0)
            + r.retained_s * REDIS_OPS_PER_RETAINED
            + r.connects_s * REDIS_OPS_PER_CONNECT
            + r.disconnects_s * REDIS_OPS_PER_DISCONNECT
        )

    peak, mean = ops(x.peak), ops(x.mean)
    primaries = max(1, math.ceil(peak / (ops_capacity * headroom)))
    if primaries == 1 and gb <= REDIS_INSTANCE_MAX_GB:
        backend, shards, replicas = "instance", 0, 0
    else:
        backend, replicas = "cluster", REDIS_REPLICAS
        shards = max(primaries, math.ceil(gb / REDIS_SHARD_MEMORY_GB), REDIS_MIN_SHARDS)
    return RedisSizing(
        memory_bytes=int(used),
        maxmemory_gb=gb,
        ops_s_peak=round(peak, 1),
        ops_s_mean=round(mean, 1),
        primaries=max(primaries, shards),
        backend=backend,
        shards=shards,
        replicas=replicas,
        ops_per_message=round(peak / x.peak.in_msg_s, 2) if x.peak.in_msg_s else 0.0,
        ops_per_cross=round(per_cross(x.peak, REDIS_OPS_PER_CROSS_QOS1), 3),
        breakdown={
            "retained": int(retained),
            "sessions": int(sessions),
            "client_registry": int(registry),
            "stream_backlog": int(backlog),
        },
    )
