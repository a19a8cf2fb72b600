"""The sharded tap and sharded Pub/Sub in the outbox, without Redis (issue 15): with
--tap-streams N each publish is one XADD to the stream of its topic's hash, all of a topic's
messages in the same stream; N = 1 writes today's key; --sharded-pubsub broadcasts with
SPUBLISH. Commands are parsed as Redis parses them (hiredis)."""

from __future__ import annotations

import hiredis
import pytest
from mcloudtt_broker.cluster.envelope import unpack_envelope
from mcloudtt_broker.cluster.outbox import Outbox
from mcloudtt_broker.cluster.resp import Commands
from mcloudtt_broker.cluster.settings import BROADCAST, ClusterSettings
from mcloudtt_broker.cluster.tap import tap_index, tap_streams
from mcloudtt_broker.config import ConfigError, resolve
from mcloudtt_broker.core.message import Message


def settings(**overrides: object) -> ClusterSettings:
    return ClusterSettings(url="redis://unused", broker_id="a", **overrides)  # type: ignore[arg-type]


def commands_of(batches: list[Commands]) -> list[list[bytes]]:
    reader = hiredis.Reader()
    for batch in batches:
        reader.feed(bytes(batch.data))
    parsed = []
    while (command := reader.gets()) is not False:
        parsed.append(command)
    return parsed


def _tap_writes(outbox: Outbox) -> list[tuple[str, str]]:
    """(stream key, topic) of every tap XADD in a flush."""
    out = []
    for command in commands_of(outbox.flush(0)):
        if command[0] == b"XADD" and command[1].startswith(b"mcloudtt:tap"):
            envelope = command[command.index(b"e") + 1]
            out.append((command[1].decode(), unpack_envelope(envelope)[4]))
    return out


def test_one_stream_is_todays_key() -> None:
    outbox = Outbox(settings(tap_stream="mcloudtt:tap"))
    for i in range(5):
        outbox.forward(Message(f"devices/d{i}/env", b"x", 0, False), (), {})
    assert _tap_writes(outbox) == [("mcloudtt:tap", f"devices/d{i}/env") for i in range(5)]


def test_n_streams_by_topic_hash() -> None:
    keys = tap_streams("mcloudtt:tap", 3)
    outbox = Outbox(settings(tap_stream="mcloudtt:tap", tap_streams=3))
    topics = [f"devices/d{i % 9}/env" for i in range(45)]
    for topic in topics:
        outbox.forward(Message(topic, b"x", 1, False), (), {})
    writes = _tap_writes(outbox)
    assert [topic for _, topic in writes] == topics  # one entry per publish, in order
    by_topic: dict[str, set[str]] = {}
    for key, topic in writes:
        by_topic.setdefault(topic, set()).add(key)
        raw = topic.encode()
        assert key == keys[tap_index(len(raw).to_bytes(2, "big") + raw, 3)]
    assert all(len(streams) == 1 for streams in by_topic.values())  # a topic keeps its order
    assert {key for key, _ in writes} == set(keys)  # nine topics spread over all three


def test_sharded_pubsub_broadcast_uses_spublish() -> None:
    for sharded, verb in ((False, b"PUBLISH"), (True, b"SPUBLISH")):
        outbox = Outbox(settings(mode=BROADCAST, sharded_pubsub=sharded))
        outbox.forward(Message("devices/d1/env", b"x", 0, False), (), {})
        sent = [c for c in commands_of(outbox.flush(0)) if c[1] == b"sync"]
        assert [c[0] for c in sent] == [verb]


def test_a_hash_tag_in_the_base_key_is_refused() -> None:
    base = {"bind": [("127.0.0.1", 1883)], "id": "b"}
    env = {"MCLOUDTT_TAP_STREAM": "{tap}", "MCLOUDTT_TAP_STREAMS": "3"}
    with pytest.raises(ConfigError, match="hash tag"):
        resolve(base, env, None)
    assert resolve(base, {**env, "MCLOUDTT_TAP_STREAMS": "1"}, None)["tap-streams"] == 1
