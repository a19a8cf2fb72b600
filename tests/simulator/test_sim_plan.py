"""Virtual time: determinism, agreement with the closed form, peaks, outages, sizing, the CLI."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mcloudtt_simulator import sizing
from mcloudtt_simulator.cli import main
from mcloudtt_simulator.device import simulate_devices
from mcloudtt_simulator.fleet import Fleet, Outage
from mcloudtt_simulator.plan import PlanRun, expected_rates, simulate_cohorts
from mcloudtt_simulator.report import summarize
from mcloudtt_simulator.scenario import OutageSpec, Scenario, load_scenario

GOLDEN = Path(__file__).parent / "golden" / "plan-smart-building.json"
# the summary fields a golden run pins (runtime and paths vary)
GOLDEN_KEYS = (
    "messages_total",
    "data_messages_total",
    "status_messages_total",
    "wills_total",
    "mean_msg_s",
    "peak_msg_s",
    "peak_time",
    "peak_msg_s_window",
    "connects_total",
    "connections_min",
    "connections_max",
    "broker_connections_max",
    "peak_connects_s",
    "retained_topics",
    "brokers_recommended",
    "outages",
)


def quiet(scenario: Scenario) -> Scenario:
    """The scenario without regional outages (the closed form has none)."""
    return replace(scenario, outages=OutageSpec(per_day=0.0, scheduled=()))


def golden_summary() -> dict[str, Any]:
    fleet = Fleet(load_scenario("smart-building"), 20_000, horizon=3 * 3600, start_tod=13 * 3600)
    summary, _ = summarize(simulate_cohorts(fleet))
    out = {k: summary[k] for k in GOLDEN_KEYS}
    out["topics"] = {t["stream"]: t["messages"] for t in summary["topics"]}
    return out


def test_plan_matches_golden_summary() -> None:
    """A seeded run is reproducible to the message. After a deliberate change to the model,
    regenerate with `MCLOUDTT_UPDATE_GOLDEN=1 pytest tests/simulator -k golden` and review the diff."""
    got = golden_summary()
    if os.environ.get("MCLOUDTT_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=2) + "\n")
    assert got == json.loads(GOLDEN.read_text())


def test_plan_is_deterministic_and_seeded() -> None:
    s = load_scenario("vehicle-fleet")
    runs = [simulate_cohorts(Fleet(s, 5000, horizon=1800, seed=seed)).rec for seed in (1, 1, 2)]
    assert np.array_equal(runs[0].msgs, runs[1].msgs)
    assert np.array_equal(runs[0].connections, runs[1].connections)
    assert not np.array_equal(runs[0].msgs, runs[2].msgs)


def _sigma(fleet: Fleet, c: int, s: int) -> float:
    """Standard deviation of a stream's total count in the model: the Poisson (or burst)
    variance of the messages plus that of the time-averaged online count under churn."""
    cls = fleet.classes[c]
    stream = cls.streams[s]
    sch = stream.schedule
    n = fleet.class_counts[c]
    total = expected_rates(fleet)[f"{cls.name}/{stream.name}"] * fleet.horizon
    if sch.kind == "events":
        sizes = np.arange(sch.burst_min, sch.burst_max + 1)
        var = total / sizes.mean() * float((sizes**2).mean())
    else:
        var = total
    if cls.churn is not None:
        p = cls.online_fraction
        tau = cls.churn.session * cls.churn.offline / (cls.churn.session + cls.churn.offline)
        per_device = total / (n * p)
        var += per_device**2 * n * p * (1 - p) * min(1.0, 2 * tau / fleet.horizon)
    return math.sqrt(var)


@pytest.mark.parametrize("name", ["smart-building", "vehicle-fleet"])
def test_cohort_rates_match_the_closed_form(name: str) -> None:
    """Each stream's simulated count is within 5 sigma of the analytic expectation, where sigma
    (`_sigma`) is the model's own sampling spread: for these sizes 0.1-1 % of the count, so a
    modelling error of a percent or more (a wrong diurnal hour, a renewal started at the wrong
    phase, a lost burst message) fails, while the test fails by chance about once in 10^6 runs."""
    fleet = Fleet(quiet(load_scenario(name)), 200_000, horizon=2 * 3600, start_tod=7.5 * 3600 + 7)
    run = simulate_cohorts(fleet)
    expected = expected_rates(fleet)
    for k, (c, s, cls, stream) in enumerate(fleet.streams()):
        got = float(run.rec.msgs[k].sum())
        want = expected[f"{cls.name}/{stream.name}"] * fleet.horizon
        assert abs(got - want) <= 5 * _sigma(fleet, c, s), (cls.name, stream.name, got, want)
    connects = float(run.rec.connects.sum())
    want = expected["connects"] * fleet.horizon
    assert abs(connects - want) <= 5 * math.sqrt(want) + 0.01 * want


def test_device_model_matches_closed_form_and_cohorts() -> None:
    """The per-device simpy model (what the real-time driver runs) against the same closed form,
    with the same 5 sigma bound, and against the cohort model's connection counts."""
    fleet = Fleet(
        quiet(load_scenario("smart-building")), 1_000, horizon=3600, start_tod=8 * 3600 + 7 * 60
    )
    rec = simulate_devices(fleet)
    expected = expected_rates(fleet)
    for k, (c, s, cls, stream) in enumerate(fleet.streams()):
        got = float(rec.msgs[k].sum())
        want = expected[f"{cls.name}/{stream.name}"] * fleet.horizon
        assert abs(got - want) <= 5 * _sigma(fleet, c, s) + 2, (cls.name, stream.name, got, want)
    online = (
        fleet.devices
        * sum(
            cls.online_fraction * n
            for cls, n in zip(fleet.classes, fleet.class_counts, strict=True)
        )
        / fleet.devices
    )
    mean_online = float(rec.connections.sum(axis=0).mean())
    assert abs(mean_online - online) < 0.01 * fleet.devices
    cohort = simulate_cohorts(fleet).rec
    assert abs(float(cohort.connections.sum(axis=0).mean()) - mean_online) < 0.01 * fleet.devices


def test_aligned_meters_make_quarter_hour_peaks_that_drift_widens() -> None:
    s = quiet(load_scenario("smart-building"))
    meters_only = replace(s, classes=tuple(c for c in s.classes if c.name == "energy-meter"))

    def burst_widths(start_tod: float) -> list[float]:
        fleet = Fleet(meters_only, 100_000, horizon=3600, start_tod=start_tod)
        meters = simulate_cohorts(fleet).rec.msgs[0].astype(float)
        # every message falls within seconds of a quarter hour (t = 0 is a quarter hour here)
        t = np.nonzero(meters)[0]
        assert np.minimum(t % 900, 900 - t % 900).max() <= 30
        widths = []
        for b in (900, 1800, 2700):
            window = meters[b - 60 : b + 60]
            x = np.arange(-60, 60)
            mean = (window * x).sum() / window.sum()
            widths.append(float(np.sqrt((window * (x - mean) ** 2).sum() / window.sum())))
            assert window.max() > 100 * np.median(meters)  # a burst, not a trickle
        return widths

    # the clocks drift away from their midnight resync: bursts widen during the day
    # (sd of offset 2 s, drift 50 ppm -> at 23:00 sqrt(2^2 + 4.1^2) + the 3 s firmware delay)
    early, late = burst_widths(1 * 3600), burst_widths(22 * 3600)
    assert max(early) < 2.6 < 3.6 < min(late)


def test_outage_drops_a_region_then_storms_back() -> None:
    s = quiet(load_scenario("vehicle-fleet"))
    berlin = s.region_index("berlin")
    fleet = Fleet(
        s,
        100_000,
        horizon=3600,
        start_tod=10 * 3600,
        extra_outages=[Outage(berlin, 1200.0, 1500.0)],
    )
    rec = simulate_cohorts(fleet).rec
    conns = rec.connections.sum(axis=0)
    in_berlin = sum(counts[berlin] for counts in fleet.region_counts)
    before, during = conns[1190], conns[1400]
    assert 0.9 * in_berlin < before - during < 1.02 * in_berlin
    jitter = fleet.scenario.outages.reconnect_jitter
    connects = rec.connects.sum(axis=0)
    storm = connects[1500 : 1500 + int(jitter)]
    assert storm.sum() > 0.95 * in_berlin
    assert storm.mean() > 5 * connects[600:1100].mean()
    # the broker sees the dead connections only a keepalive or so later: wills are not all at 1200
    wills = rec.wills.sum(axis=0)
    truck = fleet.classes[0].detection_window()
    assert truck is not None
    assert wills[1200:1205].sum() < 0.05 * wills[1200:1300].sum()
    assert wills[1200 + int(truck[0]) : 1200 + int(truck[1]) + 2].sum() > 0.3 * in_berlin
    assert conns[1700] == pytest.approx(before, rel=0.01)


def test_sizing_arithmetic() -> None:
    peak = sizing.Rates(
        in_msg_s=50_000,
        deliveries_s=50_000,
        qos_msg_s=10_000,
        retained_s=1_000,
        connects_s=100,
        disconnects_s=100,
    )
    x = sizing.SizingInputs(
        peak=peak,
        mean=peak,
        peak_connections=10_000,
        retained_topics=100_000,
        retained_bytes=100_000 * 150,
        sessions=1000,
        subscriptions_per_session=2,
        subscription_filter_bytes=40,
        mean_message_bytes=150,
    )
    b = sizing.size_brokers(x, capacity_msg_s=36_000, headroom=0.6, spare=1, cluster_overhead=0.25)
    # 50k in + 50k out = 50k benchmark messages, x1.25 for the Redis hop = 62.5k; / (36k * 0.6) = 2.9
    assert (b.by_messages, b.binding, b.brokers_recommended) == (3, "messages", 4)
    more = sizing.size_brokers(replace(x, peak_connections=200_000))
    assert more.binding == "connections" and more.brokers_recommended > b.brokers_recommended
    r = sizing.size_redis(x)
    assert r.breakdown["retained"] == 100_000 * (150 + sizing.REDIS_ENTRY_OVERHEAD)
    assert r.maxmemory_gb >= 1 and r.memory_bytes > sum(r.breakdown.values())
    # Measured per-message commands (test_redis_ops.py): 5 per crossing message, 1 for the tap.
    assert r.ops_s_peak == pytest.approx(
        40_000 * 5 + 10_000 * 5 + 50_000 * 1 + 1_000 + 100 * 4 + 100 * 2
    )
    # 301,600 ops/s at 60 % of 80k per primary: 7 primaries, so a cluster of 7 shards.
    assert (r.backend, r.shards, r.replicas, r.primaries) == ("cluster", 7, 1, 7)
    assert r.tfvars()[1] == "redis_shard_count   = 7"
    small = sizing.size_redis(replace(x, peak=replace(peak, in_msg_s=5_000, qos_msg_s=1_000)))
    assert (small.backend, small.shards) == ("instance", 0) and small.broker_settings() == []


def test_cli_plan_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "plan",
            "--scenario",
            "vehicle-fleet",
            "--devices",
            "20000",
            "--hours",
            "1",
            "--json",
            "--broker-capacity",
            "20000",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "messages_total",
        "mean_msg_s",
        "peak_msg_s",
        "brokers_recommended",
        "redis",
        "topics",
    ):
        assert key in out
    assert out["brokers"]["capacity_msg_s"] == 20000
    assert out["messages_total"] == pytest.approx(out["mean_msg_s"] * 3600, rel=1e-3)
    png = Path(out["plots"][0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        json.loads((tmp_path / "summary.json").read_text())["messages_total"]
        == out["messages_total"]
    )


def test_cli_plan_human_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "plan",
                "--scenario",
                "smart-building",
                "--devices",
                "1000",
                "--hours",
                "0.25",
                "--no-plot",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "pods" in text and "per stream" in text and "env-sensor/env" in text


def test_cli_rejects_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--scenario", "nope", "--hours", "1", "--json"]) == 2
    assert "no scenario named 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--scenario", "smart-building", "--hours", "-1"])


def test_plan_runtime_does_not_grow_with_the_fleet() -> None:
    """The cohort model costs O(classes x steps): 1,000 and 1,000,000 devices take about the same
    time. The full benchmark (1,000,000 devices x 24 h, about 10-20 s on the 2-core CI machine):
        uv run mcloudtt-sim plan --scenario smart-building --devices 1000000 --hours 24 --json"""
    s = load_scenario("smart-building")
    times = []
    for n in (1_000, 1_000_000):
        began = time.perf_counter()
        run: PlanRun = simulate_cohorts(Fleet(s, n, horizon=1800))
        times.append(time.perf_counter() - began)
        assert run.rec.msgs.sum() > 0
    assert times[1] < 3 * times[0] + 0.5
    assert times[1] < 10  # 30 virtual minutes; the whole day is 48 times this
