"""The cluster's tests on a real Redis Cluster (3 primaries, 3 replicas) instead of one Redis.

The tests of the other modules imported here run again with `redis_server` standing for the
cluster (its `url` is one node's, as Memorystore's discovery endpoint): the brokers find the
shards themselves.
"""

from __future__ import annotations

import pytest
from rediscluster import RedisClusterProcess

from .test_cluster import (  # noqa: F401 (collected again here, on the cluster)
    test_a_client_of_a_dead_broker_resumes_its_session_elsewhere,
    test_clean_start_on_b_discards_the_session_on_a,
    test_connect_on_b_takes_over_a_live_connection_on_a,
    test_offline_session_survives_the_death_of_its_broker,
    test_publish_on_a_reaches_b_and_c_once_at_every_qos,
    test_retained_set_on_a_seen_on_b_cleared_on_b_gone_on_a,
    test_session_resumes_on_another_broker_with_what_was_queued,
    test_shared_subscription_across_brokers_delivers_each_message_once,
)


@pytest.fixture
def redis_server(redis_cluster: RedisClusterProcess) -> RedisClusterProcess:
    return redis_cluster
