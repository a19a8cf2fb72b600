"""A CONNECT storm on a cluster broker (issue 11, reconnect-storm), with a real redis-server and
real TCP clients: the Redis work each CONNECT brings waits for one of a bounded number of
connections instead of failing ("Too many connections" took the link down with it); past
--max-locating a CONNECT is told Server busy; none is silently given a fresh session."""

from __future__ import annotations

import asyncio
import time
from signal import SIGCONT, SIGSTOP

from broker.mqttraw import CONNACK
from broker.mqttraw import connect as connect_packet
from mcloudtt_chaos.backend import Endpoint
from mcloudtt_chaos.probe import ProbeClient

STORM = 600  # more at once than redis-py's default pool of 100 connections


async def _storm(port: int, count: int) -> list[tuple[bool, int]]:
    endpoint = Endpoint(name="a", host="127.0.0.1", mqtt_port=port, http_port=0)
    clients = [ProbeClient(endpoint, f"storm-{i}", clean=False) for i in range(count)]
    try:
        async with asyncio.timeout(60):
            return await asyncio.gather(*(c.connect() for c in clients))
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def test_a_connect_storm_is_queued_not_refused(cluster_factory):
    [a] = cluster_factory(1)
    answers = asyncio.run(_storm(a.port, STORM))
    assert [code for _, code in answers] == [0] * STORM
    # Reconnected at once, all of them: each finds its session (none started afresh).
    again = asyncio.run(_storm(a.port, STORM))
    assert again == [(True, 0)] * STORM
    assert a.metric("mcloudtt_cluster_link_losses_total") == 0
    assert "Too many connections" not in a.output()


def test_past_max_locating_a_connect_is_told_server_busy(cluster_factory, raw):
    a, b = cluster_factory(2, "--max-locating", "1")
    held = raw(b.port, version=4)
    assert held.connect("storm-held", version=4, clean=False).code == 0
    held.subscribe(("storm/held", 1))
    time.sleep(0.3)  # stored, and b named in the registry
    b.signal(SIGSTOP)  # its hand-over answer is late: a's CONNECT waits for it
    try:
        waiting = raw(a.port, version=4)
        waiting.send(connect_packet("storm-held", version=4, clean=False))
        time.sleep(0.3)
        busy5 = raw(a.port, version=5)
        assert busy5.connect("storm-other5", version=5).code == 0x89  # Server busy
        busy4 = raw(a.port, version=4)
        assert busy4.connect("storm-other4", version=4).code == 3  # Server unavailable
    finally:
        b.signal(SIGCONT)
    # The one that waited gets its session, handed over late.
    ack = waiting._await(CONNACK)
    assert ack.code == 0 and ack.session_present
    assert a.metric("mcloudtt_cluster_link_losses_total") == 0
