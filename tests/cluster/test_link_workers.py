"""The link's workers and a reconnect: one that does not end when cancelled must not keep the
link down for good.

Seen under a slot migration over TLS (`test_redis_cluster_tls.py`, about 1 run in 10 under
load): a worker on redis-py's cluster client (the confirm loop, the heartbeat) was cancelled
when the inbox met MOVED and took seconds to end; the bus waited for it without a bound, never
reconnected, and the subscriber got nothing more. Here a real bus on a real redis-server with
a heartbeat that ignores its cancellation for a minute: the link still comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from mcloudtt_broker.cluster import redis_bus
from mcloudtt_broker.cluster.link import LinkError
from mcloudtt_broker.cluster.redis_bus import RedisBus
from mcloudtt_broker.cluster.settings import ClusterSettings
from mcloudtt_broker.core.broker import Broker
from redisproc import RedisProcess


def test_a_worker_that_will_not_stop_does_not_keep_the_link_down(
    redis_server: RedisProcess, monkeypatch: Any
) -> None:
    monkeypatch.setattr(redis_bus, "STOP_TIMEOUT", 0.5, raising=False)  # not the default 2 s

    async def scenario() -> None:
        settings = ClusterSettings(url=redis_server.url, broker_id="w1", backoff_max=0.2)
        bus = RedisBus(settings)
        bus.attach(Broker(bus=bus))
        beating = bus.membership.heartbeat
        stuck: list[asyncio.Task[Any]] = []

        async def heartbeat(redis: Any) -> None:
            try:
                await beating(redis)
            except asyncio.CancelledError:
                # As a redis-py call can: the cancellation is taken, the task goes on a while.
                stuck.append(asyncio.current_task())  # type: ignore[arg-type]
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(60)
                raise

        bus.membership.heartbeat = heartbeat  # type: ignore[method-assign]
        await bus.start()
        try:
            async with asyncio.timeout(10):
                while not bus.ready():
                    await asyncio.sleep(0.02)
                bus._link_lost(LinkError("lost on purpose"))
                while bus.stats["connects"] < 2 or not bus.ready():
                    await asyncio.sleep(0.02)
            assert stuck, "the heartbeat was cancelled and did not stop"
            assert (
                bus.metrics()["link_workers_stuck_total"] >= 1
            )  # (redis-py's pub/sub may be slow too)
        finally:
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
            await bus.stop()

    asyncio.run(scenario())
