"""Issue 11, found by the chaos harness (broker-kill-after-expiry): the adopter skips, in its
replay of a dead broker's inbox, what its own waiting inbox delivers itself, but only that part
of a message. An origin that sent a message's plain record to the dead broker (its persistent
subscribers) and the shared group's record to the adopter (a member there) wrote one sequence
into both inboxes: the adopter's inbox gives it to the group only, the replay must still give it
to the adopted plain subscribers (they lost every other message of the run)."""

from __future__ import annotations

from mcloudtt_broker.cluster.replay import Marks, Replay, origins_and_sequences
from mcloudtt_broker.core.message import Message
from test_replay import Core, outbox, to_message, xadds

GROUP = "$share/g/t"


def test_a_group_record_in_the_takers_inbox_does_not_keep_the_plain_one_from_the_sessions() -> None:
    a = outbox("a")
    for n in range(4):
        # Plain subscribers on the dead broker; the group's turn: the taker, then the dead one.
        turn = "taker" if n % 2 == 0 else "dead"
        a.forward(Message("t", str(n).encode(), 1, False, origin="pub"), ("dead",), {turn: [GROUP]})
    batches = a.flush(0)
    core = Core()
    replay = Replay(
        core,  # type: ignore[arg-type]
        to_message,
        {"s": Marks()},
        (),
        groups={GROUP: Marks()},
        gone="dead",
    )
    for entry_id, fields in xadds("dead", batches):
        replay.feed(entry_id, fields)
    ours = origins_and_sequences(xadds("taker", batches))
    assert replay.deliver(ours) == 4
    assert core.replayed == [(["s"], b"0"), (["s"], b"1"), (["s"], b"2"), (["s"], b"3")]
    # The group: what chose the dead broker, not what the taker's inbox gives it (0 and 2).
    assert core.shared == [(b"1", [GROUP], "dead"), (b"3", [GROUP], "dead")]


def test_a_plain_record_in_the_takers_inbox_is_not_replayed_to_the_sessions_again() -> None:
    a = outbox("a")
    for n in range(2):
        # Plain subscribers on both brokers (the taker's inbox delivers to the adopted ones
        # too); the group chose the dead broker: replayed to the group.
        a.forward(
            Message("t", str(n).encode(), 1, False, origin="pub"),
            ("dead", "taker"),
            {"dead": [GROUP]},
        )
    batches = a.flush(0)
    core = Core()
    replay = Replay(
        core,  # type: ignore[arg-type]
        to_message,
        {"s": Marks()},
        (),
        groups={GROUP: Marks()},
        gone="dead",
    )
    for entry_id, fields in xadds("dead", batches):
        replay.feed(entry_id, fields)
    assert replay.deliver(origins_and_sequences(xadds("taker", batches))) == 2
    assert core.replayed == []
    assert core.shared == [(b"0", [GROUP], "dead"), (b"1", [GROUP], "dead")]
