"""The tests' Redis Cluster: `mcloudtt_chaos.procs.RedisClusterProcess` (one home, shared with
`mcloudtt-cluster-bench --backplane cluster`), re-exported under the names the tests import."""

from mcloudtt_chaos.procs import (
    SLOTS,
    ClusterNode,
    RedisClusterProcess,
    RedisTls,
    redis_cli_binary,
    running_redis_cluster,
    slot_of,
)

__all__ = [
    "SLOTS",
    "ClusterNode",
    "RedisClusterProcess",
    "RedisTls",
    "redis_cli_binary",
    "running_redis_cluster",
    "slot_of",
]
