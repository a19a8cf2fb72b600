"""`mcloudtt-broker migrate-keys`: an older version's per-broker key names (`P:sessions:ID`)
renamed to the hash-tagged ones (`P:sessions:{ID}`), so that a persistent session stored before
the upgrade is there after it. A real broker stores the session; its keys are put back under the
old names (what the older version wrote); the command renames them; the broker, started again,
finds the session and delivers what was queued for it."""

from __future__ import annotations

import subprocess
import time

import redis
from broker.clients import PahoClient
from brokerproc import BrokerProcess, broker_command
from mcloudtt_broker.cluster.migrate import new_name
from redisproc import RedisProcess

from .conftest import start_broker, wait_until


def migrate(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*broker_command(), "migrate-keys", "--redis", url, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_names() -> None:
    assert new_name("mcloudtt", "mcloudtt:sessions:b1") == "mcloudtt:sessions:{b1}"
    assert new_name("mcloudtt", "mcloudtt:inbox:mcloudtt-broker-0") == (
        "mcloudtt:inbox:{mcloudtt-broker-0}"
    )
    for other in ("mcloudtt:sessions:{b1}", "mcloudtt:client:c1", "mcloudtt:retained", "x:inbox:b"):
        assert new_name("mcloudtt", other) is None


def test_a_session_stored_under_the_old_names_survives_the_upgrade() -> None:
    with RedisProcess() as server:
        store = redis.Redis.from_url(server.url, decode_responses=True)
        broker = start_broker(server.url, "m1")
        try:
            wait_until(lambda: broker.http_get("/readyz")[0] == 200, 10, "ready")
            keep = PahoClient(broker.port, "keep", version=4, clean=False)
            assert keep.subscribe("keep/#", qos=1) == [1]
            keep.disconnect()
            other = PahoClient(broker.port, "other")
            other.publish("keep/x", b"queued while away", qos=1)
            other.disconnect()
        finally:
            broker.stop()
        wait_until(lambda: not store.exists("mcloudtt:broker:{m1}"), 5, "presence to expire")
        # What the older version wrote: the same keys without the hash tag.
        tagged = sorted(store.scan_iter(match="mcloudtt:*:{m1}"))
        assert "mcloudtt:sessions:{m1}" in tagged
        for key in tagged:
            store.rename(key, key.replace("{m1}", "m1"))

        dry = migrate(server.url)
        assert dry.returncode == 0, dry.stderr
        assert "would rename mcloudtt:sessions:m1 -> mcloudtt:sessions:{m1}" in dry.stdout
        assert store.exists("mcloudtt:sessions:m1")  # nothing renamed yet
        done = migrate(server.url, "--apply")
        assert done.returncode == 0, done.stderr
        assert f"{len(tagged)} key(s) renamed" in done.stdout
        assert sorted(store.scan_iter(match="mcloudtt:*:{m1}")) == tagged
        assert not list(store.scan_iter(match="mcloudtt:*:m1"))
        again = migrate(server.url, "--apply")
        assert again.returncode == 0 and "0 key(s) renamed" in again.stdout

        broker = BrokerProcess("--redis", server.url, "--id", "m1", "--presence-ttl", "2").start()
        try:
            wait_until(lambda: broker.http_get("/readyz")[0] == 200, 10, "ready")
            back = PahoClient(broker.port, "keep", version=4, clean=False)
            try:
                assert back.session_present  # MQTT-3.2.2-2
                assert back.get().payload == b"queued while away"
            finally:
                back.disconnect()
        finally:
            broker.stop()


def test_refused_while_a_broker_runs() -> None:
    with RedisProcess() as server:
        broker = start_broker(server.url, "live")
        try:
            wait_until(lambda: broker.http_get("/readyz")[0] == 200, 10, "ready")
            time.sleep(0.2)
            refused = migrate(server.url, "--apply")
            assert refused.returncode == 1
            assert "refused: a broker looks alive (mcloudtt:broker:{live} exists)" in refused.stdout
        finally:
            broker.stop()
