"""The cluster outbox without Redis: what it returns is parsed as Redis would parse it (hiredis),
and the inbox batches in it are read back with the receiver's own reader."""

from __future__ import annotations

from dataclasses import dataclass

import hiredis
from mcloudtt_broker.cluster.envelope import EnvelopeReader, unpack_envelope
from mcloudtt_broker.cluster.outbox import FLUSH_BATCH, Outbox
from mcloudtt_broker.cluster.records import iter_records
from mcloudtt_broker.cluster.resp import Commands
from mcloudtt_broker.cluster.settings import ClusterSettings
from mcloudtt_broker.core.message import Message


def settings(**overrides: object) -> ClusterSettings:
    return ClusterSettings(url="redis://unused", broker_id="a", **overrides)  # type: ignore[arg-type]


def commands_of(batches: list[Commands]) -> list[list[bytes]]:
    """Each command as Redis receives it: a list of arguments."""
    reader = hiredis.Reader()
    for batch in batches:
        reader.feed(bytes(batch.data))
    parsed = []
    while (command := reader.gets()) is not False:
        parsed.append(command)
    assert len(parsed) == sum(batch.count for batch in batches)
    return parsed


@dataclass
class Delivery:
    dest: str
    sequence: int
    payload: bytes
    plain: bool
    groups: tuple[str, ...]


def inbox_deliveries(commands: list[list[bytes]]) -> list[Delivery]:
    """What the inbox XADDs carry, in order: per destination and record."""
    reader = EnvelopeReader()
    out = []
    for command in commands:
        if command[0] != b"XADD" or not command[1].startswith(b"mcloudtt:inbox:"):
            continue
        dest = command[1].decode().rsplit(":", 1)[1].strip("{}")
        assert command[-2] == b"b"
        batch = command[-1]
        for plain, groups, start, stop in iter_records(batch):
            fields = reader.read(batch, start, stop)
            assert fields[0] == "a"  # origin
            out.append(Delivery(dest, fields[1], fields[5], plain, groups))
    return out


class Wakes:
    def __init__(self) -> None:
        self.calls: list[bool] = []

    def __call__(self, urgent: bool) -> None:
        self.calls.append(urgent)


def message(n: int, qos: int = 1, retain: bool = False, topic: str = "t") -> Message:
    return Message(topic, str(n).encode(), qos, retain, origin="pub")


def make(**overrides: object) -> tuple[Outbox, Wakes]:
    wakes = Wakes()
    outbox = Outbox(settings(**overrides), peers={"b", "c"}, wake=wakes, sequence=1000)
    return outbox, wakes


def test_nothing_for_nobody() -> None:
    outbox, wakes = make()
    outbox.forward(message(1), (), {})
    assert outbox.buffered() == 0 and wakes.calls == [] and outbox.sequence == 1000
    assert outbox.flush(0) == []


def test_batching_one_xadd_per_destination_per_batch() -> None:
    outbox, wakes = make()
    count = FLUSH_BATCH + 44
    for n in range(count):
        outbox.forward(message(n), ("b", "c", "a"), {})  # "a" is us: never sent to
    # "Soon" once, then "now" each time a whole batch waits.
    assert wakes.calls[0] is False
    assert wakes.calls.count(False) == 1
    assert wakes.calls.count(True) == count - FLUSH_BATCH + 1
    batches = outbox.flush(0)
    assert len(batches) == 2
    commands = commands_of(batches)
    assert [c[0] for c in commands] == [b"XADD"] * 4
    assert {c[1] for c in commands} == {b"mcloudtt:inbox:{b}", b"mcloudtt:inbox:{c}"}
    assert all(c[2:5] == [b"MAXLEN", b"~", b"100000"] for c in commands)
    deliveries = inbox_deliveries(commands)
    for dest in ("b", "c"):
        mine = [d for d in deliveries if d.dest == dest]
        assert [d.payload for d in mine] == [str(n).encode() for n in range(count)]
        assert [d.sequence for d in mine] == list(range(1001, 1001 + count))
        assert all(d.plain and d.groups == () for d in mine)
    assert outbox.stats["forwarded"] == count and outbox.stats["flushes"] == 2
    assert outbox.unconfirmed_count() == 2 * count  # QoS 1, until the receivers confirm
    assert outbox.buffered() == 0 and not outbox.wake_pending


def test_qos0_is_not_kept_for_confirmation() -> None:
    outbox, _ = make()
    outbox.forward(message(1, qos=0), ("b",), {})
    assert len(inbox_deliveries(commands_of(outbox.flush(0)))) == 1
    assert outbox.unconfirmed_count() == 0


def test_announcements_go_first_and_retained_goes_to_every_peer() -> None:
    outbox, _ = make()
    outbox.announce("add", "x/#")
    outbox.forward(message(1, retain=True, topic="r"), (), {})
    outbox.forward(message(2, topic="s"), ("b",), {"c": ["$share/g/s"]})
    commands = commands_of(outbox.flush(0))
    assert commands[0] == [b"SADD", b"mcloudtt:subs:{a}", b"x/#"]
    assert commands[1] == [b"PUBLISH", b"mcloudtt:control", b"add\x00a\x00x/#"]
    hset = [c for c in commands if c[0] == b"HSET"]
    assert len(hset) == 1 and hset[0][1:3] == [b"mcloudtt:retained", b"r"]
    assert unpack_envelope(hset[0][3])[5] == b"1"
    deliveries = inbox_deliveries(commands)
    by = {(d.dest, d.payload): d for d in deliveries}
    # The retained message reaches both peers though neither subscribed (same retained state).
    assert not by[("b", b"1")].plain and not by[("c", b"1")].plain
    assert by[("b", b"2")].plain and by[("b", b"2")].groups == ()
    assert not by[("c", b"2")].plain and by[("c", b"2")].groups == ("$share/g/s",)


def test_retained_to_late_peers_sets_it_there_only_without_writing_the_hash_again() -> None:
    outbox, _ = make()
    outbox.forward(message(1, retain=True, topic="r"), (), {})
    outbox.forward(message(2, topic="s"), ("b",), {})
    assert [m.payload for m in outbox.retained_buffered()] == [b"1"]
    outbox.flush(0)
    # "d" joined after the hash entry was written (it loaded the retained set before).
    outbox.retained_to(message(1, retain=True, topic="r"), {"d", "a"})
    assert outbox.retained_buffered() == []
    commands = commands_of(outbox.flush(0))
    assert [c[0] for c in commands] == [b"XADD"]  # no HSET, no other inbox
    [delivery] = inbox_deliveries(commands)
    # A new sequence: "d" drops none it handled from us; retained state only, no delivery.
    assert (delivery.dest, delivery.sequence, delivery.payload) == ("d", 1003, b"1")
    assert not delivery.plain and delivery.groups == ()
    assert outbox.unconfirmed.get("d") is not None  # QoS 1: kept until "d" confirms


def test_bound_drops_qos0_first_then_the_oldest() -> None:
    outbox, _ = make(buffer_limit=4)
    outbox.forward(message(1, qos=1), ("b",), {})
    outbox.forward(message(2, qos=0), ("b",), {})
    outbox.forward(message(3, qos=1), ("b",), {})
    outbox.forward(message(4, qos=0), ("b",), {})
    outbox.forward(message(5, qos=0), ("b",), {})  # full: a new QoS 0 is the one dropped
    assert outbox.dropped["buffer_full_qos0"] == 1
    outbox.forward(message(6, qos=2), ("b",), {})  # full: the oldest QoS 0 (2) makes room
    outbox.forward(message(7, qos=1), ("b",), {})  # and then the next QoS 0 (4)
    assert outbox.dropped["buffer_full_qos0"] == 3
    outbox.forward(message(8, qos=1), ("b",), {})  # no QoS 0 left: the oldest goes
    assert outbox.dropped["buffer_full"] == 1
    assert outbox.buffered() == 4
    payloads = [d.payload for d in inbox_deliveries(commands_of(outbox.flush(0)))]
    assert payloads == [b"3", b"6", b"7", b"8"]


def test_unconfirmed_records_are_bounded_too() -> None:
    outbox, _ = make(buffer_limit=10)
    for n in range(8):
        outbox.forward(message(n), ("b", "c"), {})
    outbox.flush(0)
    assert outbox.unconfirmed_count() == 10
    assert outbox.dropped["unconfirmed_overflow"] == 6


def test_unanswered_writes_go_back_to_the_front_after_a_reconnect() -> None:
    outbox, _ = make()
    for n in range(3):
        outbox.forward(message(n, qos=0), ("b",), {})
    first = outbox.flush(10)  # the connection had written 10 commands before
    sent = 10 + sum(batch.count for batch in first)
    outbox.answered(sent - 1)  # Redis has not answered the last command yet
    outbox.forward(message(3, qos=0), ("b",), {})  # buffered while the link broke
    outbox.link_lost(sent - 1)
    # A new connection: the unanswered batch is written again, before the newer message.
    payloads = [d.payload for d in inbox_deliveries(commands_of(outbox.flush(0)))]
    assert payloads == [b"0", b"1", b"2", b"3"]


def test_answered_writes_are_not_written_again() -> None:
    outbox, _ = make()
    outbox.announce("add", "x")
    outbox.forward(message(0, qos=0), ("b",), {})
    batches = outbox.flush(0)
    outbox.answered(sum(batch.count for batch in batches))
    outbox.link_lost(sum(batch.count for batch in batches))
    assert outbox.flush(0) == []


def test_resend_after_reconnect_writes_only_what_is_unconfirmed() -> None:
    outbox, _ = make()
    for n in range(5):
        outbox.forward(message(n), ("b", "c"), {})
    outbox.flush(0)
    # b handled up to the third message (sequence 1003), c only the first.
    resend = outbox.resend({"b": 1003, "c": 1001})
    assert resend is not None
    deliveries = inbox_deliveries(commands_of([resend]))
    assert [(d.dest, d.sequence) for d in deliveries if d.dest == "b"] == [("b", 1004), ("b", 1005)]
    assert [d.sequence for d in deliveries if d.dest == "c"] == [1002, 1003, 1004, 1005]
    assert outbox.stats["resent"] == 6
    # The progress read every 0.1 s forgets what is confirmed: nothing left to resend.
    outbox.confirm({"b": 1005, "c": 1005})
    assert outbox.destinations() == [] and outbox.resend({"b": 1005}) is None


def test_redis_lost_its_data_everything_unconfirmed_is_resent_in_order() -> None:
    outbox, _ = make()
    for n in range(FLUSH_BATCH + 10):
        outbox.forward(message(n, qos=1 + n % 2), ("b",), {"c": ["$share/g/t"]})
    outbox.flush(0)
    outbox.confirm({"b": 1100, "c": 1100})  # progress read before Redis lost it
    kept = outbox.unconfirmed_count()
    # Redis restarted empty: no progress at all, so every record still kept goes again.
    resend = outbox.resend({})
    assert resend is not None
    deliveries = inbox_deliveries(commands_of([resend]))
    assert len(deliveries) == kept == 2 * (FLUSH_BATCH + 10 - 100)
    for dest in ("b", "c"):
        sequences = [d.sequence for d in deliveries if d.dest == dest]
        assert sequences == list(range(1101, 1001 + FLUSH_BATCH + 10))
    assert all(d.groups == ("$share/g/t",) for d in deliveries if d.dest == "c")
    # Still unconfirmed: a second loss would resend them again.
    assert outbox.unconfirmed_count() == kept


def test_a_gone_peer_s_records_are_dropped_and_counted() -> None:
    outbox, _ = make()
    for n in range(3):
        outbox.forward(message(n), ("b", "c"), {})
    outbox.flush(0)
    outbox.forget_destination("c")
    assert outbox.dropped["peer_gone"] == 3
    assert outbox.destinations() == ["b"]


def test_remaining_expiry_travels() -> None:
    now = [100.0]
    outbox = Outbox(settings(), peers={"b"}, clock=lambda: now[0], sequence=0)
    expiring = Message("t", b"x", 1, False, origin="p", expires_at=130.0)
    now[0] = 110.0
    outbox.forward(expiring, ("b",), {})
    (command,) = commands_of(outbox.flush(0))
    batch = command[-1]
    ((_, _, start, stop),) = list(iter_records(batch))
    props = EnvelopeReader().read(batch, start, stop)[8]
    assert props.message_expiry_interval == 20  # MQTT-3.3.2-6: what remains
