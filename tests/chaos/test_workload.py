"""The chaos workload against a real 3-broker cluster (real redis-server, real broker processes,
paho-mqtt clients over TCP), no faults: its history passes the checker, and the report renders."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mcloudtt_chaos.backend import Endpoint
from mcloudtt_chaos.checker import INVARIANTS, check
from mcloudtt_chaos.history import (
    Acked,
    ConnAck,
    Connect,
    Delivered,
    Disconnect,
    FaultEnd,
    FaultStart,
    HistoryWriter,
    Record,
    Sent,
    Snapshot,
    Subscribed,
    WillPublished,
    read_history,
)
from mcloudtt_chaos.procs import (
    Process,
    RedisServer,
    console_script,
    free_block,
    scrape,
    wait_for,
)
from mcloudtt_chaos.report import ScenarioResult, timeline, write_html, write_json
from mcloudtt_chaos.workload import Workload, WorkloadSpec

BROKERS = 3
ARGS = ("--presence-ttl", "2", "--sys-interval", "0", "--redis-backoff-max", "0.5")


@contextmanager
def running_cluster(workdir: Path, count: int = BROKERS) -> Iterator[list[Process]]:
    """Redis and `count` brokers named b0, b1, ... on free ports, every one seeing its peers."""
    redis = RedisServer(appendonly=True, data_dir=workdir / "redis").start()
    brokers: list[Process] = []
    try:
        for i in range(count):
            port = free_block(2)  # MQTT and HTTP, two distinct free ports
            http_port = port + 1
            name = f"b{i}"
            cmd = [
                *console_script("mcloudtt-broker", "mcloudtt_broker"),
                *("--bind", f"127.0.0.1:{port}", "--http", f"127.0.0.1:{http_port}"),
                *("--redis", redis.url, "--id", name, *ARGS),
            ]
            proc = Process(
                cmd, name=name, log_path=workdir / f"{name}.log", port=port, http_port=http_port
            )
            brokers.append(proc.start())
        for proc in brokers:
            proc.wait_port().wait_http()
        for proc in brokers:
            port = proc.http_port
            assert port is not None
            wait_for(
                lambda port=port: scrape(port).value("mcloudtt_cluster_peers") == count - 1,
                timeout=10,
                what=f"{proc.name} to see its peers",
            )
        yield brokers
    finally:
        for proc in brokers:
            proc.stop()
        redis.stop()


def endpoints_of(brokers: list[Process]) -> list[Endpoint]:
    out = []
    for proc in brokers:
        assert proc.port is not None and proc.http_port is not None
        out.append(
            Endpoint(
                name=proc.name, host="127.0.0.1", mqtt_port=proc.port, http_port=proc.http_port
            )
        )
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Endpoint]]:
    with running_cluster(tmp_path_factory.mktemp("workload-cluster")) as brokers:
        yield endpoints_of(brokers)


SPEC = WorkloadSpec(rate=120, seed=7, will_hold_s=(0.3, 0.6))


def run_workload(cluster: list[Endpoint], path: Path, seconds: float = 3.0) -> Workload:
    with HistoryWriter(path) as writer:
        workload = Workload(cluster, writer, SPEC)
        try:
            workload.start()
            time.sleep(seconds)
            workload.stop_publishing()
            assert workload.drain(10.0), workload.counters_json()
            workload.snapshot()
        finally:
            workload.stop()
    return workload


@pytest.fixture(scope="module")
def history(cluster: list[Endpoint], tmp_path_factory: pytest.TempPathFactory) -> list[Record]:
    path = tmp_path_factory.mktemp("workload") / "history.jsonl"
    run_workload(cluster, path)
    return read_history(path)


def test_history_passes_the_checker(history: list[Record]) -> None:
    report = check(history)
    assert report.passed, json.dumps(report.to_json(), indent=1)[:4000]
    assert report.lost == [] and report.invariants["no_lost"].checked > 0
    assert report.invariants["qos0_counted"].checked > 0  # QoS 0 counted (not judged)
    assert report.invariants["qos2_once"].checked > 0
    delivered = {d.subscriber: d for d in history if isinstance(d, Delivered)}
    kinds = {
        "sub311": lambda n: "sub311-" in n,
        "sub5": lambda n: "sub5-" in n,
        "shared": lambda n: "shared-" in n,
    }
    for kind, match in kinds.items():
        assert any(match(name) for name in delivered), f"no delivery to a {kind} subscriber"
    assert any(d.group == SPEC.shared_group for d in delivered.values())
    # Every QoS 1/2 message reached each plain subscriber on a broker other than its publisher's
    # in at least one case: the traffic crossed the cluster.
    connects = [r for r in history if isinstance(r, Connect)]
    assert {c.broker for c in connects} == {"b0", "b1", "b2"}


def test_wills_both_ways(history: list[Record]) -> None:
    wills = [r for r in history if isinstance(r, WillPublished)]
    ends = [r for r in history if isinstance(r, Disconnect) and "will-" in r.client]
    assert any(not d.normal for d in ends) and any(d.normal for d in ends)
    assert wills, "the watcher saw no will"
    abnormal = {(d.client, d.conn) for d in ends if not d.normal}
    assert {(w.client, w.conn) for w in wills} <= abnormal
    assert check(history).invariants["wills"].checked >= len(abnormal)


def test_snapshot_records_retained_and_filters(history: list[Record]) -> None:
    snaps = [r for r in history if isinstance(r, Snapshot)]
    assert {s.broker for s in snaps} == {"b0", "b1", "b2"}
    for s in snaps:
        assert sorted(s.retained) == [f"chaos/retained/{i}" for i in range(SPEC.retained_topics)]
    assert len({tuple(sorted(s.retained.items())) for s in snaps}) == 1
    # The cluster's filters, as every broker counts them (its own + its peers'): chaos/data/#
    # and chaos/will/# on b2, the shared group's filter on b2 and on b0.
    assert {s.subscriptions for s in snaps} == {(("cluster", "distinct-filters", 4),)}
    report = check(history)
    assert report.invariants["retained_equal"].checked == BROKERS
    assert report.invariants["subscriptions_equal"].passed


def test_subscriptions_recorded(history: list[Record]) -> None:
    subs = [r for r in history if isinstance(r, Subscribed)]
    shared = [s for s in subs if s.group is not None]
    assert len(shared) == SPEC.shared_members
    assert all(s.qos == 2 for s in subs)


def test_dropped_deliveries_are_reported_lost(history: list[Record]) -> None:
    victim = next(
        d.subscriber for d in history if isinstance(d, Delivered) and "sub5-" in d.subscriber
    )
    dropped = [
        d for d in history if isinstance(d, Delivered) and d.subscriber == victim and d.qos >= 1
    ][5:9]
    assert len(dropped) == 4
    broken = [r for r in history if r not in dropped]
    report = check(broken)
    assert not report.passed
    assert "no_lost" in report.failed()
    for d in dropped:
        assert d.seq in report.lost_seqs(victim, d.publisher)
    assert report.to_json()["lost"] == len(dropped)


def test_reconnects_elsewhere_keep_the_session(cluster: list[Endpoint], tmp_path: Path) -> None:
    """A subscriber whose connection is dropped comes back on the next broker with its
    session (clean start off) and the history still passes."""
    path = tmp_path / "history.jsonl"
    spec = dataclasses.replace(SPEC, will_clients=0, will_watchers=0, shared_members=0)
    with HistoryWriter(path) as writer:
        workload = Workload(cluster, writer, spec)
        try:
            workload.start()
            time.sleep(1.0)
            sub = workload.subscribers[0]
            first = sub.broker
            workload.hold_reconnects(0.8)  # back only after 0.8 s, not after its backoff
            workload.drop(sub.name)
            wait_for(
                lambda: sub.connected.is_set() and sub.broker != first,
                timeout=10,
                what="the subscriber back elsewhere",
            )
            time.sleep(1.0)
            workload.stop_publishing()
            drained = workload.drain(10.0)
        finally:
            workload.stop()
    records = read_history(path)
    report = check(records)
    others = [name for name in report.failed() if name != "no_lost"]
    assert not others, {n: report.invariants[n].examples for n in others}
    # Known cluster race (reported, not the workload's): a message published elsewhere while
    # the session moves (between the drop and the new CONNACK) may be lost. Anything lost
    # outside that window fails here.
    gone = next(r.t for r in records if isinstance(r, Disconnect) and r.client == sub.name)
    back = next(
        r.t for r in records if isinstance(r, ConnAck) and r.client == sub.name and r.conn == 2
    )
    again = next(
        r for r in records if isinstance(r, Connect) and r.client == sub.name and r.conn == 2
    )
    assert again.t - gone >= 0.7 and not again.clean_start and again.broker != first
    sent = {(r.publisher, r.seq): r.t for r in records if isinstance(r, Sent)}
    outside = [x for x in report.lost if not gone - 0.05 <= sent[(x.publisher, x.seq)] <= back]
    assert not outside, outside
    assert drained or report.lost, workload.awaited()
    assert report.invariants["sessions_kept"].checked >= 1


def with_fault(history: list[Record]) -> list[Record]:
    """The history with a fault window over its middle (bands and recovery to draw)."""
    sent = [r.t for r in history if isinstance(r, Sent)]
    middle = (sent[0] + sent[-1]) / 2
    return [
        *history,
        FaultStart(t=middle - 0.5, fault="marker", target="b1"),
        FaultEnd(t=middle + 0.5, fault="marker", target="b1"),
    ]


def test_report_json_and_html(history: list[Record], tmp_path: Path) -> None:
    good = ScenarioResult.from_history("no-fault", with_fault(history), backend="local")
    victim = next(
        d
        for d in history
        if isinstance(d, Delivered) and "sub311-" in d.subscriber and d.qos >= 1 and not d.dup
    )
    broken = [r for r in history if not (isinstance(r, Delivered) and r == victim)]
    bad = ScenarioResult.from_history("broken", broken)

    data = json.loads(write_json(tmp_path / "report.json", [good, bad]).read_text())
    assert data["passed"] is False
    first, second = data["scenarios"]
    assert first["scenario"] == "no-fault" and first["passed"] is True
    assert first["backend"] == "local"
    assert set(first["invariants"]) == set(INVARIANTS)
    assert first["lost"] == 0 and first["duplicates"] == 0
    assert first["recovery_s"] is not None and 0 <= first["recovery_s"] < 2
    assert second["passed"] is False and second["lost"] == 1
    assert second["lost_messages"] == [
        {"subscriber": victim.subscriber, "publisher": victim.publisher, "seqs": [victim.seq]}
    ]
    assert sum(second["timeline"]["lost"]) == 1  # drawn at the time it was sent
    line = first["timeline"]
    assert line["bin_s"] == 0.5 and len(line["t"]) == len(line["publish_rate"])
    # SPEC.rate messages per second, give or take the start and the scheduling.
    busy = sorted(line["publish_rate"])[len(line["publish_rate"]) // 2]
    assert 0.5 * SPEC.rate <= busy <= 1.3 * SPEC.rate, line["publish_rate"]
    assert max(line["delivery_rate"]) > max(line["publish_rate"])  # fan-out to subscribers
    assert line["backlog"][-1] == 0  # drained: everything acknowledged
    assert line["faults"][0]["fault"] == "marker" and line["faults"][0]["end"] is not None

    page = write_html(tmp_path / "report.html", [good, bad]).read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 2
    assert "no-fault" in page and "broken" in page
    assert 'class="fail"' in page and 'class="pass"' in page
    assert f"<code>{victim.seq}</code>" in page  # the lost seq named in the page
    # Self-contained: nothing to fetch.
    assert not any(x in page for x in ('src="http', 'href="http', "<link", "<script", "<img"))


def test_timeline_counts_backlog() -> None:
    records: list[Record] = [
        Sent(t=0.0, publisher="p", topic="t", qos=1, seq=1),
        Sent(t=0.1, publisher="p", topic="t", qos=1, seq=2),
        Sent(t=0.2, publisher="p", topic="t", qos=0, seq=3),
        Acked(t=0.7, publisher="p", seq=1),
        Sent(t=0.8, publisher="p", topic="t", qos=1, seq=2, dup=True),
        Acked(t=1.2, publisher="p", seq=2),
    ]
    line = timeline(records)
    assert line.t == [0.0, 0.5, 1.0]
    assert line.publish_rate == [6.0, 0.0, 0.0]  # a resend is not a new publish
    assert line.backlog == [2, 2, 1]  # the peak outstanding in each bin


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_html_renders_in_chromium(history: list[Record], tmp_path: Path) -> None:
    page = write_html(
        tmp_path / "report.html",
        [ScenarioResult.from_history("no-fault", with_fault(history))],
    )
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium", "--headless", "--no-sandbox", "--disable-gpu",
            f"--screenshot={shot}", "--window-size=1200,1400", page.as_uri(),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("MCLOUDTT_CHAOS_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_clients_of_a_killed_broker_reconnect_elsewhere(tmp_path: Path) -> None:
    """SIGKILL the broker holding the subscribers: each of its clients writes an abnormal
    disconnect and comes back, same client id, without a clean start, on another broker;
    publishing and deliveries go on. (Whether nothing was lost is the broker's part, judged by
    the scenarios; here the workload's own records must stay consistent.)"""
    with running_cluster(tmp_path) as brokers:
        endpoints = endpoints_of(brokers)
        path = tmp_path / "history.jsonl"
        spec = dataclasses.replace(SPEC, will_clients=0, will_watchers=0)
        with HistoryWriter(path) as writer:
            workload = Workload(endpoints, writer, spec)
            try:
                workload.start()
                time.sleep(1.0)
                victims = set(workload.clients_on("b2"))
                assert victims, workload.placement()
                workload.fault_start("broker-kill", "b2")
                brokers[2].kill()
                workload.fault_end("broker-kill", "b2")
                wait_for(
                    lambda: all(
                        c.connected.is_set() and c.broker != "b2"
                        for c in workload.clients
                        if c.name in victims
                    ),
                    timeout=15,
                    what="the killed broker's clients back elsewhere",
                )
                time.sleep(1.0)
                workload.stop_publishing()
                workload.drain(5.0)
            finally:
                workload.stop()
    records = read_history(path)
    end = next(r.t for r in records if isinstance(r, FaultEnd))
    for name in victims:
        gone = [r for r in records if isinstance(r, Disconnect) and r.client == name]
        assert not gone[0].normal and gone[0].t >= end - 1
        again = [r for r in records if isinstance(r, Connect) and r.client == name and r.t > end]
        assert again and again[0].broker != "b2" and not again[0].clean_start
        assert again[0].conn == gone[0].conn + 1
    assert any(isinstance(r, Sent) and r.t > end for r in records)
    after = {r.subscriber for r in records if isinstance(r, Delivered) and r.t > end}
    assert {s.name for s in [*workload.subscribers, *workload.shared]} <= after
    report = check(records)
    # What only the workload could break: every delivery names a message it sent, in order.
    assert report.invariants["delivered_were_sent"].passed
    assert report.invariants["ordered"].passed, report.invariants["ordered"].examples
    assert report.recovery_s is not None


def test_a_stalled_broker_stops_the_publisher_at_its_window(tmp_path: Path) -> None:
    """SIGSTOP the only broker: the publisher sends `window` messages, then only counts the
    turns it skipped (no unbounded backlog); after SIGCONT everything is acknowledged and
    delivered, and the schedule resumes without a burst."""
    port = free_block(2)
    broker = Process(
        [
            *console_script("mcloudtt-broker", "mcloudtt_broker"),
            *("--bind", f"127.0.0.1:{port}", "--http", f"127.0.0.1:{port + 1}"),
        ],
        name="b0",
        log_path=tmp_path / "b0.log",
        port=port,
        http_port=port + 1,
    )
    endpoint = Endpoint(name="b0", host="127.0.0.1", mqtt_port=port, http_port=port + 1)
    spec = WorkloadSpec(
        rate=200,
        qos1_publishers=1,
        qos2_publishers=0,
        qos0_publishers=0,
        subscribers_v5=0,
        shared_members=0,
        will_clients=0,
        will_watchers=0,
        retained_topics=0,
        window=20,
        keepalive=30,
    )
    with broker.start(), HistoryWriter(tmp_path / "history.jsonl") as writer:
        broker.wait_port()
        with Workload([endpoint], writer, spec) as workload:
            workload.start()
            time.sleep(0.5)
            broker.pause()
            try:
                frozen = workload.counters_json()
                time.sleep(1.5)
                stalled = workload.counters_json()
            finally:
                broker.resume()
            time.sleep(0.5)
            workload.stop_publishing()
            assert workload.drain(10.0), workload.counters_json()
            after = workload.counters_json()
    assert stalled["unacked"] <= spec.window
    # PUBACKs the broker sent just before it froze still arrive, and each frees a place in
    # the window: past those, nothing more than the window goes out (CI once saw 21 = 20 + 1).
    acked_since = stalled["acked"] - frozen["acked"]
    assert stalled["sent"] - frozen["sent"] <= spec.window + acked_since
    assert acked_since <= spec.window
    assert stalled["throttled"] >= 200  # ~1.5 s of turns at 200/s, skipped
    # After SIGCONT: no catching up on 1.5 s of skipped turns in one burst.
    assert after["sent"] - stalled["sent"] <= 0.5 * 200 * 1.5
    report = check(read_history(tmp_path / "history.jsonl"))
    assert report.passed, report.failed()
