"""The inbox's sans-IO half without Redis: what an outbox writes is delivered once, in order;
a resend after a reconnect (or after Redis lost its data) is recognised and dropped."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import hiredis
from mcloudtt_broker.cluster.inbox import Inbox
from mcloudtt_broker.cluster.outbox import Outbox
from mcloudtt_broker.cluster.redis_url import parse_redis_url
from mcloudtt_broker.cluster.resp import Commands
from mcloudtt_broker.cluster.settings import ClusterSettings
from mcloudtt_broker.core.message import Message
from mcloudtt_broker.mqtt.properties import Properties


class Core:
    """The two things an inbox uses of the core: its clock and `deliver_remote`."""

    def __init__(self) -> None:
        self.now = 50.0
        self.delivered: list[tuple[Message, bool, Sequence[str]]] = []

    def clock(self) -> float:
        return self.now

    def deliver_remote(self, message: Message, plain: bool, groups: Sequence[str]) -> None:
        self.delivered.append((message, plain, groups))


def entries_for(dest: str, batches: list[Commands]) -> list[list[bytes]]:
    """The field lists XREADGROUP would return for `dest`'s inbox."""
    reader = hiredis.Reader()
    for batch in batches:
        reader.feed(bytes(batch.data))
    out = []
    while (command := reader.gets()) is not False:
        if command[0] == b"XADD" and command[1] == f"mcloudtt:inbox:{{{dest}}}".encode():
            out.append(command[-2:])
    return out


def pair() -> tuple[Outbox, Inbox, Core]:
    outbox = Outbox(ClusterSettings(url="redis://unused", broker_id="a"), sequence=0)
    core = Core()
    settings = ClusterSettings(url="redis://unused", broker_id="b")
    inbox = Inbox(settings, core, Counter(), parse_redis_url(settings.url))  # type: ignore[arg-type]
    return outbox, inbox, core


def test_delivered_once_in_order_and_a_resend_is_dropped() -> None:
    outbox, inbox, core = pair()
    for n in range(5):
        outbox.forward(Message("t", str(n).encode(), 1, False, origin="pub"), ("b",), {})
    for fields in entries_for("b", outbox.flush(0)):
        inbox.handle_entry(fields)
    assert [m.payload for m, _, _ in core.delivered] == [b"0", b"1", b"2", b"3", b"4"]
    assert all(plain and groups == () for _, plain, groups in core.delivered)
    assert core.delivered[0][0].origin == "pub"
    assert inbox.handled == {"a": 5}  # the progress the inbox reports to the origin
    # Redis lost the progress: the origin resends everything; nothing is delivered twice.
    resend = outbox.resend({})
    assert resend is not None
    for fields in entries_for("b", [resend]):
        inbox.handle_entry(fields)
    assert len(core.delivered) == 5
    assert inbox.stats["duplicates"] == 5 and inbox.stats["received"] == 5


def test_an_expired_message_is_not_delivered_and_expiry_counts_on() -> None:
    outbox, inbox, core = pair()
    props = Properties(message_expiry_interval=60)
    outbox.forward(Message("t", b"late", 1, False, props), ("b",), {})
    outbox.forward(
        Message("t", b"gone", 1, False, Properties(message_expiry_interval=0)), ("b",), {}
    )
    for fields in entries_for("b", outbox.flush(0)):
        inbox.handle_entry(fields)
    ((message, _, _),) = core.delivered
    assert message.payload == b"late"
    assert message.expires_at is not None and 109 < message.expires_at <= 110  # now + 60
    assert inbox.stats["expired"] == 1


def test_garbage_is_counted_and_dropped() -> None:
    _, inbox, core = pair()
    inbox.handle_entry([b"x", b"no batch field"])
    inbox.handle_entry([b"b", b"\x00\x00\x00\x09\x01\x00short"])
    inbox.handle_entry(None)  # an entry deleted before it was read
    assert core.delivered == []
    assert inbox.stats["bad_batches"] == 3
