"""`GET /clients` on the broker's HTTP port: one session by ClientId (what the dashboard's client
lookup shows: connected or not, subscriptions, inflight and queued counts), or the ClientIds
that start with a prefix."""

from __future__ import annotations

import json
import time

from .clients import mcloudtt_only
from .mqttraw import RawClient, codec


def _get(broker, query: str) -> dict:  # type: ignore[no-untyped-def]
    status, body = broker.http_get(f"/clients?{query}")
    assert status == 200, body
    return json.loads(body)


@mcloudtt_only
def test_a_session_its_subscriptions_and_inflight(mq, uid) -> None:  # type: ignore[no-untyped-def]
    sub_id, pub_id = f"{uid}-sub", f"{uid}-pub"
    with RawClient(mq.port, version=4) as sub, RawClient(mq.port, version=4) as pub:
        sub.connect(sub_id, clean=False)
        sub.subscribe((f"{uid}/a/#", 1), (f"{uid}/b", 0))
        pub.connect(pub_id)
        for n in range(3):
            pub.publish(f"{uid}/a/x", b"%d" % n, qos=1)
        # Delivered, never acknowledged: three QoS 1 messages in flight.
        got = [sub.next_publish(ack_it=False) for _ in range(3)]
        assert all(p.qos == 1 for p in got)
        info = _get(mq, f"id={sub_id}")
        assert info["found"] and info["connected"] and info["protocol"] == "3.1.1"
        assert sorted((s["filter"], s["qos"]) for s in info["subscriptions"]) == [
            (f"{uid}/a/#", 1),
            (f"{uid}/b", 0),
        ]
        assert info["inflight"] == 3
        for p in got:
            sub.send(codec.ack(codec.PUBACK, p.packet_id, version=4))
        deadline = time.monotonic() + 5
        while _get(mq, f"id={sub_id}")["inflight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _get(mq, f"id={sub_id}")["inflight"] == 0
        assert _get(mq, f"prefix={uid}-")["clients"] == sorted([sub_id, pub_id])
    # The persistent session outlives its connection (MQTT-3.1.2-4); a clean one does not.
    deadline = time.monotonic() + 5
    while _get(mq, f"id={sub_id}").get("connected") and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = _get(mq, f"id={sub_id}")
    assert gone["found"] and not gone["connected"] and len(gone["subscriptions"]) == 2
    assert not _get(mq, f"id={pub_id}")["found"]
    assert _get(mq, "id=no-such-client")["found"] is False
