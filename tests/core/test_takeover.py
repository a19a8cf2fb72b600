"""Takeover in process (issue 16): which session state and which will survive a new connection
for the same ClientId, on one core and across two, in virtual time."""

from __future__ import annotations

import pytest
from broker.mqttraw import DISCONNECT, SESSION_EXPIRY, WILL_DELAY, Will
from broker.takeovers import TAKEOVER_FIELDS, TAKEOVERS, session_kw

from .harness import Cluster


@pytest.mark.parametrize("where", ["one-core", "across-cores"])
@pytest.mark.parametrize(TAKEOVER_FIELDS, TAKEOVERS)
def test_takeover_session_state(where, version, old_clean, old_exp, new_clean, new_exp, present):
    cluster = Cluster(("a", "b"))
    old = cluster.client("a", version=version)
    old.connect("dev", **session_kw(version, old_clean, old_exp))
    old.subscribe(("dev/s", 1))
    new = cluster.client("a" if where == "one-core" else "b", version=version)
    ack = new.connect("dev", **session_kw(version, new_clean, new_exp))
    assert (ack.code, ack.session_present) == (0, present)
    assert not old.open
    if version == 5:
        assert [p.code for p in old.take(DISCONNECT)] == [0x8E]  # Session taken over
    pub = cluster.client("a")
    pub.connect("pub")
    pub.publish("dev/s", b"after", qos=1)
    assert new.payloads() == ([b"after"] if present else [])
    # One session for the ClientId in the cluster, the new connection's.
    holder = "a" if where == "one-core" else "b"
    assert cluster.cores[holder].sessions["dev"].connection is new.conn
    if where == "across-cores":
        assert "dev" not in cluster.cores["a"].sessions


@pytest.mark.parametrize("where", ["one-core", "across-cores"])
@pytest.mark.parametrize(
    ("old_expiry", "new_clean", "published"),
    [
        pytest.param(60, False, False, id="session-continues-will-dropped"),
        pytest.param(0, False, True, id="old-expiry0-will-at-once"),
        pytest.param(60, True, True, id="new-clean-start-will-at-once"),
    ],
)
def test_delayed_will_on_takeover(where, old_expiry, new_clean, published):
    cluster = Cluster(("a", "b"))
    watcher = cluster.client("a")
    watcher.connect("watcher")
    watcher.subscribe(("will/#", 1))
    old = cluster.client("a")
    will = Will("will/dev", b"gone", qos=1, props=[(WILL_DELAY, 30)])
    old.connect("dev", clean=False, will=will, props=[(SESSION_EXPIRY, old_expiry)])
    new = cluster.client("a" if where == "one-core" else "b")
    new.connect("dev", clean=new_clean, props=[(SESSION_EXPIRY, 60)])
    # At once when the session ended with the takeover; never when it continued, not even
    # once the will delay has passed (MQTT-3.1.3-9).
    assert watcher.payloads() == ([b"gone"] if published else [])
    cluster.advance(31)
    assert watcher.payloads() == []
    assert not any(core.pending_wills for core in cluster.cores.values())
