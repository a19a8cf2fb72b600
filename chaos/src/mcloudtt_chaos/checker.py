"""Judge a chaos run's history against the promises of MQTT and of the cluster.

Theory of operation. The checker is a pure function of the history (`check(records)`), in the
manner of Jepsen's checkers: the workload records what each client did and saw, and only
afterwards is it decided whether that was allowed. Every invariant yields a `Verdict` with what
was judged, how many failed and a few examples; the `Report` gathers them with the exact lost
messages, the duplicate count and the recovery time after each fault.

What a subscriber may expect of a message (`no_lost`): the publisher got its PUBACK/PUBCOMP, the
subscriber's SUBACK for a matching filter came before the PUBLISH was sent, both granted QoS >= 1,
and the subscriber's session lived on to the end of the run (an expired or discarded session
takes its queue with it: nothing sent during that session is judged). A shared group is judged as
one subscriber, unless one of its members' sessions ended after the message was sent.

The workload must end drained: every persistent subscriber connected again and given time to
receive its queue, or what is still queued counts as lost.

Redeliveries (`ordered`): per subscriber, publisher, topic and QoS, sequence numbers rise
(MQTT-4.6.0-5/6, ordered topics). Two things may go back: the broker's DUP resend of unacknowledged
messages, only on a connection whose CONNACK said session present and before any new message of
that stream (MQTT-4.4.0-1, MQTT-4.6.0-1); and a copy of a QoS 1 message its publisher retransmitted
(the broker takes that as a new publication, MQTT-4.3.2-5 in 5.0). Shared-group deliveries are not
ordered: the group may hand a member's unacknowledged messages to another member (MQTT-4.8.2).

Recovery (`recovered`, `recovery_s`): after each fault ends, the time until every subscriber with
a session at that moment receives a message sent after it; the slowest subscriber sets it.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from mcloudtt_chaos.history import (
    Acked,
    ConnAck,
    Connect,
    Delivered,
    Disconnect,
    FaultEnd,
    FaultStart,
    Record,
    Sent,
    SessionExpired,
    Snapshot,
    Subscribed,
    WillPublished,
)

INVARIANTS = (
    "no_lost",
    "qos2_once",
    "ordered",
    "shared_once",
    "wills",
    "sessions_kept",
    "delivered_were_sent",
    "retained_equal",
    "subscriptions_equal",
    "recovered",
    "qos0_counted",
)

# Counted and shown, never a reason to fail.
COUNTED_ONLY = frozenset({"qos0_counted"})


def topic_matches(topic_filter: str, topic: str) -> bool:
    # MQTT-4.7.2-1: wildcards at the first level do not match topics starting with "$".
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels = topic.split("/")
    parts = topic_filter.split("/")
    for i, part in enumerate(parts):
        if part == "#":  # MQTT-4.7.1-2: also matches the parent level
            return True
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(parts) == len(levels)


@dataclass
class Verdict:
    name: str
    passed: bool = True
    judged: bool = True
    checked: int = 0
    failures: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    max_examples: int = 10

    def fail(self, example: dict[str, Any]) -> None:
        self.failures += 1
        if self.judged:
            self.passed = False
        if len(self.examples) < self.max_examples:
            self.examples.append(example)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "judged": self.judged,
            "checked": self.checked,
            "failures": self.failures,
            "counts": dict(self.counts),
            "examples": list(self.examples),
        }


@dataclass(frozen=True, order=True)
class Lost:
    subscriber: str
    publisher: str
    seq: int
    topic: str
    qos: int


@dataclass
class Report:
    invariants: dict[str, Verdict]
    lost: list[Lost]
    duplicates: int
    qos0_lost: int
    recoveries: list[dict[str, Any]]

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.invariants.values())

    @property
    def recovery_s(self) -> float | None:
        """The slowest recovery over all faults (None: no fault, or nothing flowed after one)."""
        times = [r["recovery_s"] for r in self.recoveries if r["recovery_s"] is not None]
        return max(times) if times else None

    def lost_seqs(self, subscriber: str, publisher: str) -> list[int]:
        return [x.seq for x in self.lost if x.subscriber == subscriber and x.publisher == publisher]

    def failed(self) -> list[str]:
        return [name for name, v in self.invariants.items() if not v.passed]

    def to_json(self) -> dict[str, Any]:
        grouped: dict[tuple[str, str], list[int]] = defaultdict(list)
        for x in self.lost:
            grouped[(x.subscriber, x.publisher)].append(x.seq)
        return {
            "passed": self.passed,
            "invariants": {name: v.to_json() for name, v in self.invariants.items()},
            "lost": len(self.lost),
            "lost_messages": [
                {"subscriber": s, "publisher": p, "seqs": seqs}
                for (s, p), seqs in sorted(grouped.items())
            ],
            "duplicates": self.duplicates,
            "qos0_lost": self.qos0_lost,
            "recovery_s": self.recovery_s,
            "recoveries": list(self.recoveries),
        }


@dataclass
class _Session:
    """One life of a client's session: from its first SUBACK to expiry or a clean start."""

    start: float
    end: float | None = None
    subs: list[Subscribed] = field(default_factory=list)

    def covers(self, t: float) -> bool:
        return self.start <= t and (self.end is None or t < self.end)


MessageId = tuple[str, int]


class _Index:
    """The history sorted and indexed once for all invariants."""

    def __init__(self, records: Iterable[Record]) -> None:
        self.records: list[Record] = sorted(records, key=lambda r: r.t)
        self.sent: dict[MessageId, Sent] = {}
        self.resent_at: dict[MessageId, float] = {}
        self.acked: set[MessageId] = set()
        self.deliveries: list[Delivered] = []
        self.sessions: dict[str, list[_Session]] = defaultdict(list)
        self.connects: dict[tuple[str, int], Connect] = {}
        self.connacks: list[ConnAck] = []
        self.disconnects: dict[tuple[str, int], Disconnect] = {}
        self.wills: list[WillPublished] = []
        self.snapshots: list[Snapshot] = []
        self.faults: list[FaultStart | FaultEnd] = []
        live: dict[str, _Session] = {}
        for r in self.records:
            if isinstance(r, Sent):
                key = (r.publisher, r.seq)
                if key not in self.sent:
                    self.sent[key] = r
                elif key not in self.resent_at:
                    self.resent_at[key] = r.t
            elif isinstance(r, Acked):
                self.acked.add((r.publisher, r.seq))
            elif isinstance(r, Delivered):
                self.deliveries.append(r)
            elif isinstance(r, Subscribed):
                session = live.get(r.client)
                if session is None:
                    session = live[r.client] = _Session(start=r.t)
                    self.sessions[r.client].append(session)
                session.subs.append(r)
            elif isinstance(r, SessionExpired):
                ended = live.pop(r.client, None)
                if ended is not None:
                    ended.end = r.t
            elif isinstance(r, Connect):
                self.connects.setdefault((r.client, r.conn), r)
                if r.clean_start:  # MQTT-3.1.2-4: a clean start discards the session
                    ended = live.pop(r.client, None)
                    if ended is not None:
                        ended.end = r.t
            elif isinstance(r, ConnAck):
                self.connacks.append(r)
            elif isinstance(r, Disconnect):
                self.disconnects.setdefault((r.client, r.conn), r)
            elif isinstance(r, WillPublished):
                self.wills.append(r)
            elif isinstance(r, Snapshot):
                self.snapshots.append(r)
            else:
                self.faults.append(r)

    def session_at(self, client: str, t: float) -> _Session | None:
        for session in self.sessions.get(client, ()):
            if session.covers(t):
                return session
        return None

    def message_qos(self, d: Delivered) -> int:
        sent = self.sent.get((d.publisher, d.seq))
        return sent.qos if sent is not None else d.qos


def check(
    records: Iterable[Record], *, skip: Collection[str] = (), max_examples: int = 10
) -> Report:
    """Judge a history; invariants named in `skip` are still computed but only counted."""
    index = _Index(records)
    verdicts = {
        name: Verdict(
            name,
            judged=name not in skip and name not in COUNTED_ONLY,
            max_examples=max_examples,
        )
        for name in INVARIANTS
    }
    lost, qos0_lost = _check_lost(index, verdicts["no_lost"], verdicts["qos0_counted"])
    duplicates = _check_duplicates(index, verdicts["qos2_once"])
    duplicates += _check_shared(index, verdicts["shared_once"], verdicts["no_lost"], lost)
    _check_order(index, verdicts["ordered"])
    _check_wills(index, verdicts["wills"])
    _check_sessions(index, verdicts["sessions_kept"])
    _check_phantoms(index, verdicts["delivered_were_sent"])
    _check_tables(index, verdicts["retained_equal"], verdicts["subscriptions_equal"])
    recoveries = _check_recovery(index, verdicts["recovered"])
    lost.sort()
    for x in lost:
        verdicts["no_lost"].fail(
            {"subscriber": x.subscriber, "publisher": x.publisher, "seq": x.seq, "topic": x.topic}
        )
    verdicts["no_lost"].counts["lost"] = len(lost)
    for v in verdicts.values():
        if not v.judged:
            v.passed = True
    return Report(
        invariants=verdicts,
        lost=lost,
        duplicates=duplicates,
        qos0_lost=qos0_lost,
        recoveries=recoveries,
    )


def _check_lost(index: _Index, verdict: Verdict, qos0: Verdict) -> tuple[list[Lost], int]:
    delivered = {(d.subscriber, d.publisher, d.seq) for d in index.deliveries if d.group is None}
    lost: list[Lost] = []
    qos0_lost = 0
    not_judged = Counter[str]()
    for key, m in index.sent.items():
        for client in index.sessions:
            session = index.session_at(client, m.t)
            if session is None:
                continue
            granted = [
                s.qos
                for s in session.subs
                if s.group is None and s.t < m.t and topic_matches(s.filter, m.topic)
            ]
            if not granted:
                continue
            qos = min(m.qos, max(granted))
            got = (client, m.publisher, m.seq) in delivered
            if qos == 0:
                qos0.checked += 1
                if not got:
                    qos0_lost += 1
                    qos0.fail({"subscriber": client, "publisher": m.publisher, "seq": m.seq})
            elif key not in index.acked:
                not_judged["unacknowledged"] += 1
            elif session.end is not None:
                not_judged["session_ended"] += 1
            else:
                verdict.checked += 1
                if not got:
                    lost.append(Lost(client, m.publisher, m.seq, m.topic, qos))
    verdict.counts.update(not_judged)
    qos0.counts["lost"] = qos0_lost
    return lost, qos0_lost


def _check_duplicates(index: _Index, verdict: Verdict) -> int:
    copies = Counter[tuple[str, str, int]]()
    qos2: set[tuple[str, str, int]] = set()
    for d in index.deliveries:
        if d.group is not None or d.retain:
            continue
        key = (d.subscriber, d.publisher, d.seq)
        copies[key] += 1
        if d.qos == 2:
            qos2.add(key)
    verdict.checked = len(qos2)
    for key in sorted(qos2):
        if copies[key] > 1:
            subscriber, publisher, seq = key
            verdict.fail(
                {
                    "subscriber": subscriber,
                    "publisher": publisher,
                    "seq": seq,
                    "copies": copies[key],
                }
            )
    extra = sum(n - 1 for n in copies.values())
    verdict.counts["duplicates"] = extra
    return extra


def _check_shared(index: _Index, verdict: Verdict, no_lost: Verdict, lost: list[Lost]) -> int:
    """Each message for a shared group reaches one member (at least one at QoS 1)."""
    members: dict[tuple[str, str], list[Subscribed]] = defaultdict(list)
    for sessions in index.sessions.values():
        for session in sessions:
            for s in session.subs:
                if s.group is not None:
                    members[(s.group, s.filter)].append(s)
    got: dict[tuple[str, MessageId], list[Delivered]] = defaultdict(list)
    for d in index.deliveries:
        if d.group is not None and not d.retain:
            got[(d.group, (d.publisher, d.seq))].append(d)
    extra = 0
    for (group, topic_filter), subs in sorted(members.items()):
        label = f"$share/{group}/{topic_filter}"
        for key, m in index.sent.items():
            if not topic_matches(topic_filter, m.topic):
                continue
            granted = []
            for s in subs:
                life = index.session_at(s.client, m.t)
                if s.t < m.t and life is not None and s in life.subs:
                    granted.append(s.qos)
            if not granted:
                continue
            qos = min(m.qos, max(granted))
            copies = got.get((group, key), [])
            extra += max(0, len(copies) - 1)
            if qos == 0:
                continue
            verdict.checked += 1
            if qos == 2 and len(copies) > 1:
                verdict.fail(
                    {
                        "group": group,
                        "publisher": m.publisher,
                        "seq": m.seq,
                        "members": sorted(d.subscriber for d in copies),
                    }
                )
            if copies or key not in index.acked:
                continue
            ended = any(
                session.end is not None and session.end >= m.t
                for s in subs
                for session in index.sessions[s.client]
            )
            if ended:
                no_lost.counts["session_ended"] = no_lost.counts.get("session_ended", 0) + 1
                continue
            no_lost.checked += 1
            lost.append(Lost(label, m.publisher, m.seq, m.topic, qos))
    verdict.counts["duplicates"] = extra
    return extra


def _check_order(index: _Index, verdict: Verdict) -> None:
    timeline: dict[str, list[ConnAck | Delivered]] = defaultdict(list)
    for ack in index.connacks:
        timeline[ack.client].append(ack)
    for d in index.deliveries:
        if d.group is None and not d.retain:
            timeline[d.subscriber].append(d)
    for client, events in sorted(timeline.items()):
        events.sort(key=lambda e: e.t)  # stable: a CONNACK logged before its first delivery
        high: dict[tuple[str, str, int], int] = {}
        session_present = False
        fresh: set[tuple[str, str, int]] = set()
        replayed: set[tuple[str, str, int]] = set()
        for e in events:
            if isinstance(e, ConnAck):
                session_present = e.session_present
                fresh.clear()
                replayed.clear()
                if not session_present:
                    high.clear()
                continue
            key = (e.publisher, e.topic, index.message_qos(e))
            verdict.checked += 1
            last = high.get(key)
            if last is None or e.seq > last:
                high[key] = e.seq
                fresh.add(key)
                continue
            resent = index.resent_at.get((e.publisher, e.seq))
            # MQTT-4.4.0-1: the broker resends only on a resumed session, and (MQTT-4.6.0-1)
            # in the original order, before the new messages of that stream.
            replay = e.dup and session_present and key not in fresh and key not in replayed
            retransmitted = key[2] == 1 and resent is not None and resent <= e.t
            if replay or retransmitted:
                high[key] = e.seq
                if replay:
                    replayed.add(key)
                else:
                    fresh.add(key)
                continue
            verdict.fail(
                {
                    "subscriber": client,
                    "publisher": e.publisher,
                    "topic": e.topic,
                    "seq": e.seq,
                    "after": last,
                    "dup": e.dup,
                    "t": e.t,
                }
            )


def _check_wills(index: _Index, verdict: Verdict) -> None:
    """Each will of a connection that ended without DISCONNECT reaches each of its watchers
    once (MQTT-3.1.2-8); none of another. A QoS 1 will may come again on the watcher's next
    connection, when the previous one broke and the session resumed: its broker died before
    it stored the watcher's PUBACK, and the session's new broker sends it again
    (MQTT-4.4.0-1), which is at least once, not a second will."""
    acks = {(a.client, a.conn): a for a in index.connacks}
    copies: dict[tuple[str, int, str], list[WillPublished]] = defaultdict(list)
    for w in index.wills:
        copies[(w.client, w.conn, w.watcher)].append(w)
    seen = Counter[tuple[str, int, str]]()
    for key, got in copies.items():
        seen[key] = 1
        for earlier, later in itertools.pairwise(got):
            ack = acks.get((later.watcher, later.watcher_conn))
            broke = index.disconnects.get((later.watcher, later.watcher_conn - 1))
            if (
                earlier.watcher_conn
                and later.watcher_conn == earlier.watcher_conn + 1
                and ack is not None
                and ack.session_present
                and broke is not None
                and not broke.normal
            ):
                verdict.counts["redelivered"] = verdict.counts.get("redelivered", 0) + 1
            else:
                seen[key] += 1
    watchers_of: dict[tuple[str, int], set[str]] = defaultdict(set)
    for w in index.wills:
        watchers_of[(w.client, w.conn)].add(w.watcher)
    accepted = {(a.client, a.conn) for a in index.connacks if a.reason_code == 0}
    for (client, conn), c in sorted(index.connects.items()):
        if c.will_topic is None:
            continue
        if (client, conn) not in accepted:
            # No CONNACK seen: the client cannot tell whether the broker took the connection
            # (and its will, MQTT-3.1.2-8) or never read the CONNECT; its will is not judged.
            verdict.counts["not_accepted"] = verdict.counts.get("not_accepted", 0) + 1
            continue
        gone = index.disconnects.get((client, conn))
        expected: set[str] = set()
        if gone is not None and not gone.normal:
            expected = {
                watcher
                for watcher, sessions in index.sessions.items()
                for session in sessions
                for s in session.subs
                if s.group is None and s.t < gone.t and topic_matches(s.filter, c.will_topic)
            }
        for watcher in sorted(expected | watchers_of[(client, conn)]):
            verdict.checked += 1
            want = 1 if watcher in expected else 0
            count = seen[(client, conn, watcher)]
            if count != want:
                why = "normal disconnect" if gone is not None and gone.normal else "abnormal"
                if gone is None:
                    why = "connection still open"
                verdict.fail(
                    {
                        "client": client,
                        "conn": conn,
                        "watcher": watcher,
                        "wills": count,
                        "expected": want,
                        "disconnect": why,
                    }
                )
    for w in index.wills:
        carried = index.connects.get((w.client, w.conn))
        if carried is None or carried.will_topic is None:
            verdict.fail({"client": w.client, "conn": w.conn, "watcher": w.watcher, "wills": 1})


def _check_sessions(index: _Index, verdict: Verdict) -> None:
    """A client resuming a session that did not expire finds it (MQTT-3.2.2-2)."""
    for ack in index.connacks:
        c = index.connects.get((ack.client, ack.conn))
        if c is None or c.clean_start or ack.reason_code != 0:
            continue
        had = index.session_at(ack.client, c.t)
        if had is None or had.start >= c.t:
            continue
        verdict.checked += 1
        if not ack.session_present:
            verdict.fail({"client": ack.client, "conn": ack.conn, "broker": ack.broker, "t": ack.t})


def _check_phantoms(index: _Index, verdict: Verdict) -> None:
    for d in index.deliveries:
        verdict.checked += 1
        sent = index.sent.get((d.publisher, d.seq))
        if sent is None or sent.topic != d.topic:
            verdict.fail(
                {"subscriber": d.subscriber, "publisher": d.publisher, "seq": d.seq, "t": d.t}
            )


def _check_tables(index: _Index, retained: Verdict, subscriptions: Verdict) -> None:
    """After the last fault, every broker holds the same retained messages and subscriptions."""
    healed = max((f.t for f in index.faults if isinstance(f, FaultEnd)), default=float("-inf"))
    latest: dict[str, Snapshot] = {}
    for snap in index.snapshots:
        if snap.t >= healed:
            latest[snap.broker] = snap
    if not latest:
        return
    brokers = sorted(latest)
    reference = latest[brokers[0]]
    retained.checked = subscriptions.checked = len(brokers)
    for broker in brokers[1:]:
        snap = latest[broker]
        if snap.retained != reference.retained:
            keys = set(snap.retained) | set(reference.retained)
            differ = sorted(k for k in keys if snap.retained.get(k) != reference.retained.get(k))
            retained.fail({"broker": broker, "reference": reference.broker, "topics": differ})
        mine, theirs = set(snap.subscriptions), set(reference.subscriptions)
        if mine != theirs:
            subscriptions.fail(
                {
                    "broker": broker,
                    "reference": reference.broker,
                    "missing": sorted(map(list, theirs - mine)),
                    "extra": sorted(map(list, mine - theirs)),
                }
            )


def _check_recovery(index: _Index, verdict: Verdict) -> list[dict[str, Any]]:
    """After each fault ends, how long until every subscriber that has a session at that moment
    (and a message sent after it to wait for) gets messages sent after the fault again: the
    slowest one sets the recovery time, as a client of the killed broker comes back last."""
    out: list[dict[str, Any]] = []
    first_after: dict[str, list[tuple[float, float]]] = defaultdict(list)  # (delivered, sent)
    for d in index.deliveries:
        m = index.sent.get((d.publisher, d.seq))
        if not d.retain and d.group is None and m is not None:
            first_after[d.subscriber].append((d.t, m.t))
    for end in (f for f in index.faults if isinstance(f, FaultEnd)):
        waiting: dict[str, float | None] = {}
        for client in index.sessions:
            session = index.session_at(client, end.t)
            if session is None:
                continue
            filters = [s.filter for s in session.subs if s.group is None]
            if any(
                m.t >= end.t and any(topic_matches(f, m.topic) for f in filters)
                for m in index.sent.values()
            ):
                waiting[client] = next(
                    (t - end.t for t, sent in first_after[client] if sent >= end.t and t >= end.t),
                    None,
                )
        flowing = [r for r in waiting.values() if r is not None]
        stuck = sorted(c for c, r in waiting.items() if r is None)
        slowest = max(waiting, key=lambda c: waiting[c] or 0.0, default=None)
        out.append(
            {
                "fault": end.fault,
                "target": end.target,
                "end": end.t,
                "recovery_s": None if stuck or not flowing else max(flowing),
                "first_delivery_s": min(flowing, default=None),
                "slowest": stuck[0] if stuck else slowest,
            }
        )
        if waiting:
            verdict.checked += 1
        if stuck:
            verdict.fail({"fault": end.fault, "target": end.target, "end": end.t, "stuck": stuck})
    return out
