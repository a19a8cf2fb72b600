"""The chaos checker on hand-made histories: one that breaks each rule, and ones that pass."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mcloudtt_chaos.checker import check, topic_matches
from mcloudtt_chaos.history import (
    Acked,
    ConnAck,
    Connect,
    Delivered,
    Disconnect,
    FaultEnd,
    FaultStart,
    HistoryError,
    Record,
    Sent,
    SessionExpired,
    Snapshot,
    Subscribed,
    WillPublished,
    decode_payload,
    encode_payload,
    read_history,
    write_history,
)


def publish(
    t: float,
    seq: int,
    *,
    publisher: str = "p1",
    topic: str = "t/a",
    qos: int = 1,
    acked: bool = True,
    dup: bool = False,
) -> list[Record]:
    out: list[Record] = [
        Sent(t=t, publisher=publisher, topic=topic, qos=qos, seq=seq, broker="a", dup=dup)
    ]
    if acked and qos > 0:
        out.append(Acked(t=t + 0.001, publisher=publisher, seq=seq))
    return out


def subscriber(
    client: str = "s1",
    *,
    t: float = 0.0,
    topic_filter: str = "t/#",
    qos: int = 1,
    group: str | None = None,
    conn: int = 1,
    clean_start: bool = False,
    session_present: bool = False,
) -> list[Record]:
    return [
        Connect(t=t, client=client, conn=conn, broker="b", clean_start=clean_start),
        ConnAck(t=t, client=client, conn=conn, broker="b", session_present=session_present),
        Subscribed(t=t + 0.01, client=client, filter=topic_filter, qos=qos, group=group),
    ]


def reconnect(
    client: str, t: float, conn: int, *, session_present: bool = True, broker: str = "c"
) -> list[Record]:
    return [
        Disconnect(t=t, client=client, conn=conn - 1, normal=False, reason="broker killed"),
        Connect(t=t + 0.1, client=client, conn=conn, broker=broker, clean_start=False),
        ConnAck(
            t=t + 0.2, client=client, conn=conn, broker=broker, session_present=session_present
        ),
    ]


def deliver(
    t: float,
    seq: int,
    *,
    to: str = "s1",
    publisher: str = "p1",
    topic: str = "t/a",
    qos: int = 1,
    dup: bool = False,
    group: str | None = None,
    broker: str = "b",
) -> Delivered:
    return Delivered(
        t=t,
        subscriber=to,
        broker=broker,
        topic=topic,
        qos=qos,
        publisher=publisher,
        seq=seq,
        dup=dup,
        group=group,
    )


def stream(
    seqs: range, *, start: float = 1.0, qos: int = 1, skip: frozenset[int] | set[int] = frozenset()
) -> list[Record]:
    """Messages `seqs` published one per 0.1 s; every one not in `skip` delivered to s1."""
    out: list[Record] = []
    for seq in seqs:
        t = start + seq * 0.1
        out += publish(t, seq, qos=qos)
        if seq not in skip:
            out.append(deliver(t + 0.05, seq, qos=qos))
    return out


# --- no_lost -------------------------------------------------------------------------------


def test_a_clean_run_passes_and_serialises() -> None:
    report = check([*subscriber(), *stream(range(1, 11))])
    assert report.passed, report.failed()
    assert report.lost == []
    assert report.duplicates == 0
    assert report.invariants["no_lost"].checked == 10
    data = json.loads(json.dumps(report.to_json()))
    assert data["passed"] is True
    assert data["lost"] == 0
    assert data["duplicates"] == 0
    assert data["recovery_s"] is None
    assert set(data["invariants"]) >= {"no_lost", "qos2_once", "ordered", "shared_once", "wills"}


def test_acknowledged_messages_missing_are_reported_with_their_sequence_numbers() -> None:
    report = check([*subscriber(), *stream(range(1, 11), skip={4, 7, 8})])
    assert not report.passed
    assert report.failed() == ["no_lost"]
    assert report.lost_seqs("s1", "p1") == [4, 7, 8]
    data = report.to_json()
    assert data["lost"] == 3
    assert data["lost_messages"] == [{"subscriber": "s1", "publisher": "p1", "seqs": [4, 7, 8]}]
    assert [e["seq"] for e in data["invariants"]["no_lost"]["examples"]] == [4, 7, 8]


def test_lost_qos2_messages_are_reported_too() -> None:
    records = [*subscriber(qos=2), *stream(range(1, 6), qos=2, skip={2})]
    report = check(records)
    assert report.lost_seqs("s1", "p1") == [2]
    assert report.lost[0].qos == 2


def test_unacknowledged_messages_may_be_lost() -> None:
    records = [*subscriber(), *stream(range(1, 4)), *publish(2.0, 4, acked=False)]
    report = check(records)
    assert report.passed, report.failed()
    assert report.invariants["no_lost"].counts["unacknowledged"] == 1


def test_messages_sent_before_the_suback_are_not_expected() -> None:
    records = [*publish(0.0, 1), *subscriber(t=0.5), *stream(range(2, 5))]
    assert check(records).passed


def test_an_expired_session_takes_its_queue_but_the_next_session_is_judged() -> None:
    records: list[Record] = [*subscriber()]
    records += [p for seq in range(1, 6) for p in publish(1 + seq * 0.1, seq)]  # never delivered
    records.append(SessionExpired(t=3.0, client="s1"))
    records += subscriber(t=4.0, conn=2, clean_start=True)
    for seq in range(6, 11):
        records += publish(5 + seq * 0.1, seq)
        if seq != 9:
            records.append(deliver(5.05 + seq * 0.1, seq))
    report = check(records)
    assert report.lost_seqs("s1", "p1") == [9]
    assert report.invariants["no_lost"].counts["session_ended"] == 5


def test_a_clean_start_discards_the_session_like_an_expiry() -> None:
    records: list[Record] = [*subscriber(), *publish(1.0, 1)]
    records += subscriber(t=2.0, conn=2, clean_start=True)
    report = check(records)
    assert report.lost == []
    assert report.invariants["no_lost"].counts["session_ended"] == 1


def test_qos0_losses_are_counted_not_judged() -> None:
    records = [*subscriber(), *stream(range(1, 11), qos=0, skip={3, 5})]
    report = check(records)
    assert report.passed
    assert report.qos0_lost == 2
    assert report.invariants["qos0_counted"].counts["lost"] == 2
    assert report.invariants["qos0_counted"].judged is False


def test_a_qos0_subscription_downgrades_a_qos1_message_to_counted() -> None:
    records = [*subscriber(qos=0), *stream(range(1, 4), skip={2})]
    report = check(records)
    assert report.passed
    assert report.qos0_lost == 1


def test_skipped_invariants_are_reported_but_do_not_fail() -> None:
    report = check([*subscriber(), *stream(range(1, 5), skip={2})], skip={"no_lost"})
    assert report.passed
    assert report.lost_seqs("s1", "p1") == [2]
    assert report.invariants["no_lost"].judged is False


# --- qos2_once and duplicates --------------------------------------------------------------


def test_qos2_delivered_twice_fails() -> None:
    records = [*subscriber(qos=2), *stream(range(1, 5), qos=2)]
    records += reconnect("s1", 2.0, 2)
    records.append(deliver(2.5, 3, qos=2, dup=True))
    report = check(records)
    assert report.failed() == ["qos2_once"]
    examples = report.invariants["qos2_once"].examples
    assert examples == [{"subscriber": "s1", "publisher": "p1", "seq": 3, "copies": 2}]


def test_qos1_redelivery_after_a_resumed_session_is_allowed_and_counted() -> None:
    records = [*subscriber(), *stream(range(1, 6))]
    records += reconnect("s1", 2.0, 2)
    records += [deliver(2.3, 4, dup=True, broker="c"), deliver(2.31, 5, dup=True, broker="c")]
    for seq in (6, 7):
        records += publish(2.4 + seq * 0.01, seq)
        records.append(deliver(2.5 + seq * 0.01, seq, broker="c"))
    report = check(records)
    assert report.passed, report.failed()
    assert report.duplicates == 2


# --- ordered -------------------------------------------------------------------------------


def test_out_of_order_delivery_fails() -> None:
    records: list[Record] = [*subscriber()]
    for seq in range(1, 5):
        records += publish(1 + seq * 0.1, seq)
    records += [deliver(2.0, 1), deliver(2.1, 2), deliver(2.2, 4), deliver(2.3, 3)]
    report = check(records)
    assert report.failed() == ["ordered"]
    (example,) = report.invariants["ordered"].examples
    assert (example["seq"], example["after"]) == (3, 4)


def test_order_is_per_topic() -> None:
    records: list[Record] = [*subscriber()]
    records += publish(1.0, 1, topic="t/a") + publish(1.1, 2, topic="t/b")
    records += [deliver(2.0, 2, topic="t/b"), deliver(2.1, 1, topic="t/a")]
    assert check(records).passed


def test_a_redelivery_without_dup_flag_fails() -> None:
    records = [*subscriber(), *stream(range(1, 6))]
    records += reconnect("s1", 2.0, 2)
    records.append(deliver(2.3, 4, dup=False))
    assert check(records).failed() == ["ordered"]


def test_a_dup_redelivery_without_reconnect_fails() -> None:
    # MQTT-4.4.0-1: a resend on the same connection is not allowed.
    records = [*subscriber(), *stream(range(1, 6)), deliver(2.0, 4, dup=True)]
    assert check(records).failed() == ["ordered"]


def test_a_dup_redelivery_when_the_session_was_not_present_is_judged_as_new() -> None:
    # A lost session restarts the stream: seq 4 again is then no ordering fault, but the
    # reconnect that found no session is one.
    records = [*subscriber(), *stream(range(1, 6))]
    records += reconnect("s1", 2.0, 2, session_present=False)
    records.append(deliver(2.3, 4, dup=True))
    report = check(records)
    assert report.failed() == ["sessions_kept"]


def test_a_redelivery_after_new_messages_of_the_stream_fails() -> None:
    # MQTT-4.6.0-1: the resent messages come first, in their original order.
    records = [*subscriber(), *stream(range(1, 6))]
    records += reconnect("s1", 2.0, 2)
    records += publish(2.25, 6)
    records += [deliver(2.3, 6), deliver(2.4, 5, dup=True)]
    assert check(records).failed() == ["ordered"]


def test_resent_messages_go_back_only_once() -> None:
    records = [*subscriber(), *stream(range(1, 6))]
    records += reconnect("s1", 2.0, 2)
    records += [deliver(2.3, 4, dup=True), deliver(2.4, 3, dup=True)]
    assert check(records).failed() == ["ordered"]


def test_a_publisher_retransmission_may_arrive_again_at_qos1() -> None:
    records = [*subscriber(), *stream(range(1, 4))]
    records += publish(1.5, 3, dup=True)
    records += [deliver(1.6, 3)]
    records += publish(1.7, 4)
    records.append(deliver(1.8, 4))
    report = check(records)
    assert report.passed, report.failed()
    assert report.duplicates == 1


# --- shared groups -------------------------------------------------------------------------


def _group(qos: int = 1) -> list[Record]:
    return [*subscriber("m1", group="g", qos=qos), *subscriber("m2", group="g", qos=qos)]


def test_each_shared_message_reaches_one_member() -> None:
    records = _group(qos=2)
    for seq in range(1, 7):
        records += publish(1 + seq * 0.1, seq, qos=2)
        records.append(deliver(1.05 + seq * 0.1, seq, to=f"m{seq % 2 + 1}", qos=2, group="g"))
    report = check(records)
    assert report.passed, report.failed()
    assert report.invariants["shared_once"].checked == 6


def test_a_qos2_shared_message_to_two_members_fails() -> None:
    records = [*_group(qos=2), *publish(1.0, 1, qos=2)]
    records += [
        deliver(1.1, 1, to="m1", qos=2, group="g"),
        deliver(1.2, 1, to="m2", qos=2, group="g"),
    ]
    report = check(records)
    assert report.failed() == ["shared_once"]
    assert report.invariants["shared_once"].examples[0]["members"] == ["m1", "m2"]


def test_a_qos1_shared_message_to_two_members_is_a_counted_duplicate() -> None:
    records = [*_group(), *publish(1.0, 1)]
    records += [deliver(1.1, 1, to="m1", group="g"), deliver(1.2, 1, to="m2", group="g")]
    report = check(records)
    assert report.passed
    assert report.duplicates == 1


def test_a_shared_message_to_no_member_is_lost() -> None:
    records = _group()
    for seq in range(1, 6):
        records += publish(1 + seq * 0.1, seq)
        if seq != 2:
            records.append(deliver(1.05 + seq * 0.1, seq, to="m1", group="g"))
    report = check(records)
    assert report.failed() == ["no_lost"]
    assert report.lost_seqs("$share/g/t/#", "p1") == [2]


# --- wills ---------------------------------------------------------------------------------


def _will_client(normal: bool | None) -> list[Record]:
    records: list[Record] = [
        *subscriber("watcher", topic_filter="will/#"),
        Connect(t=1.0, client="w", conn=1, broker="a", clean_start=True, will_topic="will/w"),
        ConnAck(t=1.0, client="w", conn=1, broker="a", session_present=False),
    ]
    if normal is not None:
        records.append(Disconnect(t=2.0, client="w", conn=1, normal=normal))
    return records


def _will(t: float = 2.1) -> WillPublished:
    return WillPublished(t=t, watcher="watcher", client="w", conn=1, broker="b")


def test_one_will_per_abnormal_disconnect_passes() -> None:
    report = check([*_will_client(normal=False), _will()])
    assert report.passed, report.failed()
    assert report.invariants["wills"].checked == 1


@pytest.mark.parametrize(
    ("normal", "wills", "why"),
    [
        (False, 0, "abnormal"),
        (False, 2, "abnormal"),
        (True, 1, "normal disconnect"),
        (None, 1, "connection still open"),
    ],
)
def test_a_will_missing_doubled_or_unwarranted_fails(
    normal: bool | None, wills: int, why: str
) -> None:
    records = [*_will_client(normal), *(_will(2.1 + i) for i in range(wills))]
    report = check(records)
    assert report.failed() == ["wills"]
    (example,) = report.invariants["wills"].examples
    assert (example["wills"], example["disconnect"]) == (wills, why)


def _watcher_back(t: float, *, broke: bool, resumed: bool) -> list[Record]:
    """The watcher's first connection ends at `t`; a second one comes right after."""
    return [
        Disconnect(t=t, client="watcher", conn=1, normal=not broke),
        Connect(t=t + 0.5, client="watcher", conn=2, broker="b", clean_start=False),
        ConnAck(t=t + 0.5, client="watcher", conn=2, broker="b", session_present=resumed),
    ]


def _will_on(t: float, watcher_conn: int, dup: bool = False) -> WillPublished:
    return WillPublished(
        t=t, watcher="watcher", client="w", conn=1, broker="b", watcher_conn=watcher_conn, dup=dup
    )


def test_a_will_again_on_the_watchers_resumed_session_after_its_broker_died_passes() -> None:
    """QoS 1: the broker that delivered it died before it stored the PUBACK (MQTT-4.4.0-1)."""
    records = [
        *_will_client(normal=False),
        _will_on(2.1, 1),
        *_watcher_back(2.2, broke=True, resumed=True),
        _will_on(2.8, 2, dup=True),
    ]
    report = check(records)
    assert report.passed, report.failed()
    assert report.invariants["wills"].counts["redelivered"] == 1


@pytest.mark.parametrize(
    ("broke", "resumed", "second_on"),
    [
        (True, False, 2),  # a fresh session has nothing to resend: a second will
        (False, True, 2),  # a DISCONNECT acknowledged everything before it
        (True, True, 1),  # twice on one connection
    ],
    ids=["not-resumed", "normal-end", "same-connection"],
)
def test_a_will_again_other_than_a_resend_on_a_resumed_session_fails(
    broke: bool, resumed: bool, second_on: int
) -> None:
    records = [
        *_will_client(normal=False),
        _will_on(2.1, 1),
        *_watcher_back(2.2, broke=broke, resumed=resumed),
        _will_on(2.8, second_on, dup=True),
    ]
    report = check(records)
    # (Not resumed also fails `sessions_kept`: the watcher's session was not due to end.)
    assert report.failed()[0] == "wills"
    (example,) = report.invariants["wills"].examples
    assert example["wills"] == 2


@pytest.mark.parametrize("wills", [0, 1])
def test_the_will_of_a_connection_never_acknowledged_is_not_judged(wills: int) -> None:
    """No CONNACK: the broker may or may not have taken the will; neither way fails."""
    records = [r for r in _will_client(normal=False) if not isinstance(r, ConnAck)]
    report = check([*records, *(_will() for _ in range(wills))])
    assert report.passed, report.failed()
    assert report.invariants["wills"].counts["not_accepted"] == 1


def test_a_will_from_a_connection_without_one_fails() -> None:
    records: list[Record] = [
        Connect(t=1.0, client="w", conn=1, broker="a", clean_start=True),
        Disconnect(t=2.0, client="w", conn=1, normal=False),
        _will(),
    ]
    assert check(records).failed() == ["wills"]


# --- sessions, phantoms --------------------------------------------------------------------


def test_a_resumed_session_that_is_not_present_fails() -> None:
    records = [*subscriber(), *reconnect("s1", 1.0, 2, session_present=False)]
    report = check(records)
    assert report.failed() == ["sessions_kept"]


def test_a_delivery_of_something_never_sent_fails() -> None:
    report = check([*subscriber(), deliver(1.0, 99)])
    assert report.failed() == ["delivered_were_sent"]


# --- tables after healing ------------------------------------------------------------------


def _snapshots(t: float, *, retained_c: str = "h1", sub_c: str = "t/#") -> list[Record]:
    rows = (("s1", "t/#", 1),)
    return [
        Snapshot(t=t, broker="a", retained={"r/1": "h1"}, subscriptions=rows),
        Snapshot(t=t, broker="b", retained={"r/1": "h1"}, subscriptions=rows),
        Snapshot(t=t, broker="c", retained={"r/1": retained_c}, subscriptions=(("s1", sub_c, 1),)),
    ]


def test_equal_tables_after_healing_pass_and_earlier_snapshots_are_ignored() -> None:
    records = [
        FaultStart(t=1.0, fault="partition", target="c"),
        *_snapshots(1.5, retained_c="stale", sub_c="x"),
        FaultEnd(t=2.0, fault="partition", target="c"),
        *_snapshots(3.0),
    ]
    report = check(records)
    assert report.passed, report.failed()
    assert report.invariants["retained_equal"].checked == 3


def test_diverging_retained_messages_fail() -> None:
    report = check(_snapshots(3.0, retained_c="stale"))
    assert report.failed() == ["retained_equal"]
    assert report.invariants["retained_equal"].examples[0]["topics"] == ["r/1"]


def test_diverging_subscription_tables_fail() -> None:
    report = check(_snapshots(3.0, sub_c="t/+"))
    assert report.failed() == ["subscriptions_equal"]
    example = report.invariants["subscriptions_equal"].examples[0]
    assert example["missing"] == [["s1", "t/#", 1]]
    assert example["extra"] == [["s1", "t/+", 1]]


# --- recovery ------------------------------------------------------------------------------


def test_recovery_time_runs_from_the_fault_end_to_the_first_new_delivery() -> None:
    records: list[Record] = [*subscriber(), FaultStart(t=5.0, fault="broker-kill", target="b")]
    records += [*publish(9.0, 1), deliver(12.0, 1)]  # sent during the fault
    records.append(FaultEnd(t=10.0, fault="broker-kill", target="b"))
    records += [*publish(10.2, 2), deliver(12.5, 2)]
    report = check(records)
    assert report.passed, report.failed()
    assert report.recovery_s == pytest.approx(2.5)
    assert report.to_json()["recoveries"][0]["fault"] == "broker-kill"


def test_recovery_waits_for_the_slowest_subscriber() -> None:
    records: list[Record] = [*subscriber("s1"), *subscriber("s2")]
    records += [FaultStart(t=5.0, fault="broker-kill", target="b")]
    records.append(FaultEnd(t=10.0, fault="broker-kill", target="b"))
    records += publish(10.0, 1)
    records += [deliver(10.01, 1, to="s2"), deliver(11.5, 1, to="s1")]
    report = check(records)
    assert report.passed, report.failed()
    (recovery,) = report.recoveries
    assert recovery["recovery_s"] == pytest.approx(1.5)
    assert recovery["first_delivery_s"] == pytest.approx(0.01)
    assert recovery["slowest"] == "s1"


def test_a_subscriber_that_never_flows_again_fails_recovery() -> None:
    records: list[Record] = [*subscriber("s1"), *subscriber("s2")]
    records.append(FaultEnd(t=10.0, fault="partition", target="b"))
    records += [*publish(10.0, 1), deliver(10.01, 1, to="s2")]
    report = check(records, skip={"no_lost"})
    assert report.failed() == ["recovered"]
    assert report.invariants["recovered"].examples[0]["stuck"] == ["s1"]
    assert report.recovery_s is None


def test_no_delivery_after_the_fault_fails_recovery() -> None:
    records: list[Record] = [*subscriber(), FaultEnd(t=1.0, fault="redis-freeze")]
    records += publish(2.0, 1)
    report = check(records)
    assert set(report.failed()) == {"recovered", "no_lost"}
    assert report.recovery_s is None


# --- history files and helpers -------------------------------------------------------------


def test_history_round_trips_through_json_lines(tmp_path: Path) -> None:
    records: list[Record] = [
        *subscriber(),
        *stream(range(1, 3)),
        *_will_client(normal=False),
        _will(),
        SessionExpired(t=9.0, client="s1"),
        FaultStart(t=1.0, fault="slow-link", target="a"),
        FaultEnd(t=2.0, fault="slow-link", target="a"),
        *_snapshots(3.0),
    ]
    path = tmp_path / "history.jsonl"
    write_history(path, records)
    assert read_history(path) == records
    assert len(path.read_text().splitlines()) == len(records)


def test_a_bad_line_names_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text('{"kind":"fault_end","t":1.0,"fault":"x"}\n{"kind":"nope","t":2}\n')
    with pytest.raises(HistoryError, match=r"history.jsonl:2: unknown record kind 'nope'"):
        read_history(path)


def test_payload_carries_publisher_sequence_and_time() -> None:
    payload = encode_payload("p7", 42, 12.5, size=100)
    assert len(payload) == 100
    assert decode_payload(payload) == ("p7", 42, 12.5)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("t/#", "t", True),
        ("t/#", "t/a/b", True),
        ("t/+", "t/a", True),
        ("t/+", "t/a/b", False),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
    ],
)
def test_topic_matching(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


def _broker_kill_history(*, replayed: bool) -> list[Record]:
    """The issue's known loss, as a history: a publisher on a at 300 msg/s, a persistent QoS 1
    subscriber on b; b is killed at 2 s and the subscriber resumes its session on c at 3 s.
    Without replay of b's inbox, what was routed to b meanwhile never arrives."""
    records: list[Record] = [
        *subscriber("s1", t=0.0),
        Connect(t=0.0, client="p1", conn=1, broker="a", clean_start=True),
        ConnAck(t=0.0, client="p1", conn=1, broker="a", session_present=False),
    ]
    records.append(FaultStart(t=2.0, fault="broker-kill", target="b"))
    records.append(Disconnect(t=2.0, client="s1", conn=1, normal=False, reason="broker killed"))
    records.append(Connect(t=3.0, client="s1", conn=2, broker="c", clean_start=False))
    records.append(ConnAck(t=3.0, client="s1", conn=2, broker="c", session_present=True))
    records.append(FaultEnd(t=3.0, fault="broker-kill", target="b"))
    for seq in range(1, 1201):  # 4 s at 300 msg/s
        t = seq / 300
        records += publish(t, seq)
        if t < 2.0:
            records.append(deliver(t + 0.002, seq))
        elif t >= 3.0:
            records.append(deliver(t + 0.002, seq, broker="c"))
        elif replayed:
            records.append(deliver(3.001 + seq * 1e-6, seq, broker="c"))
    return records


def test_the_known_broker_kill_loss_is_reported_with_its_sequence_numbers(tmp_path: Path) -> None:
    path = tmp_path / "broker-kill.jsonl"
    write_history(path, _broker_kill_history(replayed=False))
    report = check(read_history(path))
    assert report.failed() == ["no_lost"]
    # Sent while b was dead and before the subscriber came back: seq 600 (t=2.0) to 899.
    assert report.lost_seqs("s1", "p1") == list(range(600, 900))
    assert report.to_json()["lost"] == 300
    assert report.recovery_s == pytest.approx(0.002, abs=1e-3)


def test_the_same_run_with_the_inbox_replayed_passes() -> None:
    report = check(_broker_kill_history(replayed=True))
    assert report.passed, report.failed()
    assert report.invariants["ordered"].checked == 1200


def test_a_long_history_is_checked_quickly() -> None:
    records: list[Record] = []
    for n in range(5):
        records += subscriber(f"s{n}")
    for seq in range(1, 20_001):
        t = 1 + seq / 1000
        records += publish(t, seq, topic=f"t/{seq % 10}")
        records += [deliver(t + 0.01, seq, to=f"s{n}", topic=f"t/{seq % 10}") for n in range(5)]
    start = time.perf_counter()
    report = check(records)
    assert report.passed
    assert report.invariants["no_lost"].checked == 100_000
    assert time.perf_counter() - start < 10
