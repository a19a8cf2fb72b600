"""Issue 11: the adopter of a dead broker looks at its inbox again after the adoption and
counts what another broker wrote there after the replay read it (each origin writes its end
marker after its last record there, so nothing should come; what does reaches no session).

Real brokers on a real redis-server: a persistent subscriber on the victim, SIGKILL, and a
record written to the dead inbox as soon as the adoption is announced."""

from __future__ import annotations

import signal
import time

import paho.mqtt.client as mqtt
import redis
from mcloudtt_broker.cluster.envelope import EnvelopePacker
from mcloudtt_broker.mqtt.properties import EMPTY_PROPERTIES
from paho.mqtt.enums import CallbackAPIVersion
from redisproc import RedisProcess

from .conftest import start_broker, wait_filters, wait_ready, wait_until

PREFIX = "mcloudtt"


def test_a_record_in_the_dead_inbox_after_the_replay_is_counted(redis_server: RedisProcess) -> None:
    brokers = [start_broker(redis_server.url, f"t{i}") for i in range(3)]
    try:
        wait_ready(brokers)
        a, c, victim = brokers
        sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tail-sub", clean_session=False)
        sub.connect("127.0.0.1", victim.port)
        sub.loop_start()
        sub.subscribe("tail/#", qos=1)
        wait_filters([a, c], 1)
        time.sleep(0.5)  # the session is stored (SESSION_WRITE_DELAY)
        victim.signal(signal.SIGKILL)
        victim.proc.wait()  # type: ignore[union-attr]
        sub.loop_stop()
        client = redis.Redis.from_url(redis_server.url)
        wait_until(
            lambda: client.exists(f"{PREFIX}:adopted:{{t2}}") == 1, 15.0, "the adoption of t2"
        )
        record = EnvelopePacker(b"ghost").plain_record(
            1, time.time_ns() // 1000, "pub", b"\x00\x06tail/x", b"late", 1, EMPTY_PROPERTIES
        )
        client.xadd(f"{PREFIX}:inbox:{{t2}}", {"b": record})

        def missed() -> float:
            return sum(b.metric("mcloudtt_cluster_replay_missed_total") for b in (a, c))

        wait_until(lambda: missed() == 1, 5.0, "the late record counted")
    finally:
        for b in brokers:
            b.stop()
