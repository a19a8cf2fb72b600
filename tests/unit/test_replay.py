"""The replay's sans-IO half (issue 11): a dead broker's inbox, as an outbox wrote it, handed
to the sessions taken from it past their marks, once, in order, up to every origin's marker;
its own unconfirmed records added without doubles; what the taker's inbox delivers skipped."""

from __future__ import annotations

from collections.abc import Iterable

import hiredis
from mcloudtt_broker.cluster.envelope import EnvelopeFields
from mcloudtt_broker.cluster.outbox import Outbox
from mcloudtt_broker.cluster.replay import Marks, Replay
from mcloudtt_broker.cluster.resp import Commands
from mcloudtt_broker.cluster.settings import ClusterSettings
from mcloudtt_broker.core.message import Message


class Core:
    def __init__(self) -> None:
        self.replayed: list[tuple[list[str], bytes]] = []
        self.shared: list[tuple[bytes, list[str], str]] = []
        self.redelivered: list[bool] = []

    def replay_to(
        self, client_ids: Iterable[str], message: Message, *, redelivered: bool = True
    ) -> None:
        self.replayed.append((sorted(client_ids), message.payload))
        self.redelivered.append(redelivered)

    def replay_shared(self, message: Message, keys: Iterable[str], gone: str) -> None:
        self.shared.append((message.payload, list(keys), gone))


def to_message(fields: EnvelopeFields) -> Message:
    return Message(fields[4], bytes(fields[5]), fields[6], fields[7], fields[8], origin=fields[3])


def xadds(dest: str, batches: list[Commands]) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries the commands add to `dest`'s inbox, with made-up stream ids 1-0, 2-0, ..."""
    reader = hiredis.Reader()
    for batch in batches:
        reader.feed(bytes(batch.data))
    out = []
    while (command := reader.gets()) is not False:
        if command[0] == b"XADD" and command[1] == f"mcloudtt:inbox:{{{dest}}}".encode():
            out.append((f"{len(out) + 1}-0".encode(), {command[-2]: command[-1]}))
    return out


def outbox(broker: str) -> Outbox:
    return Outbox(ClusterSettings(url="redis://unused", broker_id=broker), sequence=0)


def publish(box: Outbox, payloads: Iterable[int], qos: int = 1) -> list[Commands]:
    for n in payloads:
        box.forward(Message("t", str(n).encode(), qos, False, origin="pub"), ("dead",), {})
    return box.flush(0)


def test_past_each_sessions_marks_in_order_up_to_the_markers() -> None:
    a = outbox("a")
    entries = xadds("dead", publish(a, range(6)))  # one entry per flush: 6 records in one
    a2 = outbox("a")
    a2.sequence = a.sequence
    entries += [(b"2-0", fields) for _, fields in xadds("dead", publish(a2, range(6, 8)))]
    a2.mark("dead")
    entries += [(b"9-0", {b"m": b"a"})]
    core = Core()
    # s1 had seen a's 1..3 (sequences start at 1); s2 nothing; s3's marks are past entry 1.
    replay = Replay(
        core,  # type: ignore[arg-type]
        to_message,
        {"s1": Marks((0, 0), {"a": 3}), "s2": Marks(), "s3": Marks((1, 0), {})},
        {"a"},
    )
    assert not replay.done
    for entry_id, fields in entries:
        replay.feed(entry_id, fields)
    assert replay.done
    replay.deliver(set())
    assert core.replayed == [
        (["s2"], b"0"),
        (["s2"], b"1"),
        (["s2"], b"2"),
        (["s1", "s2"], b"3"),
        (["s1", "s2"], b"4"),
        (["s1", "s2"], b"5"),
        (["s1", "s2", "s3"], b"6"),
        (["s1", "s2", "s3"], b"7"),
    ]


def test_resends_own_records_and_the_takers_inbox_are_not_delivered_twice() -> None:
    a = outbox("a")
    entries = xadds("dead", publish(a, range(3)))
    resend = a.resend({})  # the origin resent everything (a reconnect)
    assert resend is not None
    entries += [(b"5-0", fields) for _, fields in xadds("dead", [resend])]
    core = Core()
    replay = Replay(core, to_message, {"s": Marks()}, ())  # type: ignore[arg-type]
    for entry_id, fields in entries:
        replay.feed(entry_id, fields)
    # The taker's own unconfirmed records for the dead broker: 2 (seen) and 3 (new).
    mine = outbox("b")
    publish(mine, range(10, 12))
    replay.feed_records(record for _, record in mine.unconfirmed["dead"])
    # The taker's inbox already holds a's sequence 2 (routed to it too): skipped here.
    assert replay.deliver({("a", 2)}) == 4
    assert [payload for _, payload in core.replayed] == [b"0", b"2", b"10", b"11"]


def test_qos0_is_not_replayed() -> None:
    a = outbox("a")
    a.forward(Message("t", b"q0", 0, False, origin="pub"), ("dead",), {})
    core = Core()
    replay = Replay(core, to_message, {"s": Marks()}, ())  # type: ignore[arg-type]
    for entry_id, fields in xadds("dead", a.flush(0)):
        replay.feed(entry_id, fields)
    assert replay.deliver(set()) == 0


def test_shared_group_records_go_to_the_group_past_its_members_marks_or_the_progress() -> None:
    # The dead broker was chosen for two groups: "$share/g/t", whose member there was a claimed
    # session that had seen a's 1; "$share/h/t", whose member was a clean session (nothing
    # claimed), its inbox having reported a's 1..2 handled. Plain records are for "s".
    a = outbox("a")
    for n in range(4):
        a.forward(
            Message("t", str(n).encode(), 1, False, origin="pub"),
            (),
            {"dead": ["$share/g/t", "$share/h/t"]},
        )
    core = Core()
    replay = Replay(
        core,  # type: ignore[arg-type]
        to_message,
        {"s": Marks()},
        (),
        groups={"$share/g/t": Marks((0, 0), {"a": 1})},
        handled={"a": 2},
        gone="dead",
    )
    for entry_id, fields in xadds("dead", a.flush(0)):
        replay.feed(entry_id, fields)
    assert replay.deliver(set()) == 3
    assert core.replayed == []  # no plain subscription was routed there
    assert core.shared == [
        (b"1", ["$share/g/t"], "dead"),
        (b"2", ["$share/g/t", "$share/h/t"], "dead"),
        (b"3", ["$share/g/t", "$share/h/t"], "dead"),
    ]


def test_marks_round_trip_and_bad_marks_mean_from_the_start() -> None:
    marks = Marks((12, 3), {"a": 7})
    assert Marks.decode(marks.encode()) == marks
    assert Marks.decode(None) == Marks()
    assert Marks.decode({"pos": "x-y"}) == Marks()


def test_a_live_hand_over_waits_for_its_own_markers_only() -> None:
    """Issue 11, the live hand-over: the new holder drains the old holder's inbox past the
    snapshot's marks up to every origin's marker for this hand-over ("{origin}\\x00{token}");
    an adoption's bare marker or another hand-over's does not end it, and what it delivers is
    not a re-delivery (the old holder never sent it)."""
    a = outbox("a")
    entries = xadds("old", [*publish_to(a, "old", range(3))])
    a.mark("old", "tok1")
    a.mark("old", "other")
    a.mark("old")
    marks = [cmd for cmd in xadds_marks("old", a.flush(0))]
    assert marks == [b"a\x00tok1", b"a\x00other", b"a"]
    core = Core()
    replay = Replay(
        core,  # type: ignore[arg-type]
        to_message,
        {"s": Marks((0, 0), {"a": 1})},  # the snapshot had a's first message
        {"a", "c"},
        token="tok1",
        redelivered=False,
    )
    for entry_id, fields in entries:
        replay.feed(entry_id, fields)
    replay.feed(b"5-0", {b"m": b"c\x00other"})
    replay.feed(b"6-0", {b"m": b"c"})
    assert not replay.done  # neither is c's marker for this hand-over
    replay.feed(b"7-0", {b"m": b"a\x00tok1"})
    replay.feed(b"8-0", {b"m": b"c\x00tok1"})
    assert replay.done
    replay.deliver(set())
    assert core.replayed == [(["s"], b"1"), (["s"], b"2")]
    assert core.redelivered == [False, False]


def test_a_live_hand_over_takes_nothing_an_origin_sent_after_its_marker() -> None:
    """After an origin's marker for the hand-over it routes the session's filters to the new
    holder: what it still sends the old holder (for another session there with the same
    filter, or the new holder's own publishes, delivered to the session locally) reaches the
    session another way. Taken from the drain too, a QoS 2 message would arrive twice."""
    a, c = outbox("a"), outbox("c")
    before_a = xadds("old", publish_to(a, "old", range(2)))
    before_c = xadds("old", publish_to(c, "old", range(10, 12)))
    after_c = xadds("old", publish_to(c, "old", range(12, 14)))
    after_a = xadds("old", publish_to(a, "old", range(2, 4)))
    core = Core()
    replay = Replay(
        core,  # type: ignore[arg-type]
        to_message,
        {"s": Marks((0, 0), {})},
        {"a", "c"},
        token="tok",
        redelivered=False,
    )
    stream = [
        *before_a,
        *before_c,
        (b"m-c", {b"m": b"c\x00tok"}),
        *after_c,  # c delivers these to the session itself
        *after_a,  # a's marker is still to come: these are the session's here
        (b"m-a", {b"m": b"a\x00tok"}),
    ]
    for n, (_entry_id, fields) in enumerate(stream):
        replay.feed(f"{n + 1}-0".encode(), fields)
    assert replay.done
    replay.deliver(set())
    assert [payload for _, payload in core.replayed] == [b"0", b"1", b"10", b"11", b"2", b"3"]


def test_a_moved_announcement_goes_before_the_del_of_its_filters() -> None:
    """The old holder's `moved` (route these filters to the new holder) is written before its
    own `del` of them: no broker is left routing them nowhere in between."""
    a = outbox("a")
    a.announce("del", "x/#")
    a.announce("del", "t")
    a.announce_move("c", "tok", ["t"])
    assert [op for op, _ in a.control] == ["del", "moved", "del"]
    assert a.control[1] == ("moved", "c\x00tok\x00t")


def publish_to(box: Outbox, dest: str, payloads: Iterable[int]) -> list[Commands]:
    for n in payloads:
        box.forward(Message("t", str(n).encode(), 1, False, origin="pub"), (dest,), {})
    return box.flush(0)


def xadds_marks(dest: str, batches: list[Commands]) -> list[bytes]:
    """The marker values the commands add to `dest`'s inbox."""
    reader = hiredis.Reader()
    for batch in batches:
        reader.feed(bytes(batch.data))
    out = []
    while (command := reader.gets()) is not False:
        if command[0] == b"XADD" and command[1] == f"mcloudtt:inbox:{{{dest}}}".encode():
            if b"m" in command:
                out.append(command[command.index(b"m") + 1])
    return out
