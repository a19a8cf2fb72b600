"""Issue 11, found by the chaos harness (broker-kill-after-expiry): a client of a killed broker
that comes back just before the dead broker is declared gone asks it for its session, which
never answers. Once the dead broker is known gone (our heartbeat, its `gone`, or its adoption
announced), the CONNECT goes on to the adopter at once, rather than wait out the hand-over
timeout with its broker's inbox paused (a longer absence for every session waiting there, and
a longer pause for every hand-over asked of that broker meanwhile)."""

from __future__ import annotations

import signal
import threading
import time

import redis

from .conftest import wait_until
from .test_noloss import QUEUE, TOPIC, Publisher, Subscriber, check, received

# Half of the default hand-over timeout (3 s): how long a CONNECT waits for a holder's answer.
HANDOVER_WAIT_S = 1.5


def test_connect_waiting_for_a_dead_holder_goes_on_once_it_is_gone(redis_server, cluster_factory):
    # Two brokers: A, the only survivor, adopts (no live hand-over from a third one here).
    a, b = cluster_factory(2, *QUEUE)
    sub = Subscriber(4)
    sub.connect(b.port)
    assert sub.client is not None
    sub.client.subscribe(TOPIC, 1)
    wait_until(lambda: a.metric("mcloudtt_cluster_remote_filters") >= 1, 5.0, "routing")
    pub = Publisher(a.port, 1)
    pub.start()
    control = redis.Redis.from_url(redis_server.url)
    try:
        wait_until(lambda: len(sub.got) > 100, 10.0, "deliveries before the kill")
        b.signal(signal.SIGKILL)
        b.proc.wait()  # type: ignore[union-attr]
        sub.drop()
        took: list[float] = []

        def reconnect() -> None:
            began = time.monotonic()
            assert sub.connect(a.port), "the session was lost"
            took.append(time.monotonic() - began)

        back = threading.Thread(target=reconnect)
        back.start()
        time.sleep(0.3)  # A asked B (in its table still) for the session
        # B's presence expires and its death is announced (as A's heartbeat would find a
        # second later): A adopts B's sessions, with what B's inbox held for them.
        control.delete("mcloudtt:broker:{b2}")
        control.publish("mcloudtt:control", "gone\x00b2\x00")
        back.join(15.0)
        assert took, "no CONNACK"
        time.sleep(1.0)
    finally:
        pub.finish()
        control.close()
    print(f"CONNACK {took[0]:.2f} s after CONNECT")
    # Not the rest of the hand-over wait after B was known gone.
    assert took[0] < HANDOVER_WAIT_S - 0.2, f"CONNACK {took[0]:.2f} s after CONNECT"
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline and not pub.acked <= set(received(sub)):
        time.sleep(0.05)
    check(pub, sub, 1)
