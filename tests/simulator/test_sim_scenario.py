"""Scenario files: the shipped ones load, bad ones fail with the offending key named."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from mcloudtt_simulator.fleet import Fleet, outage_schedule
from mcloudtt_simulator.scenario import (
    Distribution,
    ScenarioError,
    apportion,
    filter_matches,
    list_scenarios,
    load_scenario,
    parse_scenario,
    topic_filter,
)


def minimal(**overrides: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "name": "t",
        "classes": [
            {
                "name": "c",
                "streams": [
                    {"topic": "x/{client_id}/v", "schedule": {"kind": "interval", "mean": 10}}
                ],
            }
        ],
    }
    doc.update(overrides)
    return doc


def test_shipped_scenarios_load() -> None:
    names = list_scenarios()
    assert {"smart-building", "vehicle-fleet"} <= set(names)
    for name in names:
        s = load_scenario(name)
        assert s.classes and s.seed
        # every stream topic is unique per device and its filter matches it
        fleet = Fleet(s, 200)
        seen: set[str] = set()
        for i in range(fleet.devices):
            ident = fleet.identity(i)
            for topic, stream in zip(ident.topics, s.classes[ident.cls].streams, strict=True):
                assert topic not in seen
                seen.add(topic)
                assert filter_matches(topic_filter(stream.topic), topic)


def test_devices_split_by_share_and_region() -> None:
    s = load_scenario("smart-building")
    assert s.class_counts(1_000_000) == [600_000, 250_000, 50_000, 100_000]
    assert sum(s.class_counts(12_345)) == 12_345
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    fleet = Fleet(s, 1000)
    regions = [fleet.locate(i)[2] for i in range(fleet.class_offsets[1])]
    assert [regions.count(r) for r in range(4)] == [240, 180, 120, 60]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (minimal(name=""), "'name' is required"),
        (minimal(extra=1), "unknown key(s) ['extra']"),
        (minimal(classes=[]), "at least one [[classes]]"),
        (
            minimal(
                classes=[
                    {
                        "name": "c",
                        "streams": [{"topic": "x/v", "schedule": {"kind": "interval", "mean": 1}}],
                    }
                ]
            ),
            "must contain {client_id} or {n}",
        ),
        (
            minimal(
                classes=[
                    {
                        "name": "c",
                        "streams": [
                            {"topic": "x/{nope}/{n}", "schedule": {"kind": "interval", "mean": 1}}
                        ],
                    }
                ]
            ),
            "unknown placeholder(s) ['nope']",
        ),
        (
            minimal(
                classes=[
                    {
                        "name": "c",
                        "streams": [
                            {
                                "topic": "x/{n}",
                                "qos": 3,
                                "schedule": {"kind": "interval", "mean": 1},
                            }
                        ],
                    }
                ]
            ),
            "QoS must be 0, 1 or 2",
        ),
        (
            minimal(
                classes=[
                    {
                        "name": "c",
                        "streams": [{"topic": "x/{n}", "schedule": {"kind": "sometimes"}}],
                    }
                ]
            ),
            "one of 'interval', 'events', 'aligned'",
        ),
        (
            minimal(
                classes=[
                    {
                        "name": "c",
                        "churn": {"session": "1h", "offline": 0},
                        "streams": [
                            {"topic": "x/{n}", "schedule": {"kind": "interval", "mean": 1}}
                        ],
                    }
                ]
            ),
            "churn.offline: must be > 0",
        ),
        (
            minimal(outages={"scheduled": [{"region": "mars", "at": "10:00", "duration": 60}]}),
            "region: one of ['default']",
        ),
    ],
)
def test_bad_scenarios_name_the_key(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ScenarioError) as e:
        parse_scenario(doc)
    assert message in str(e.value)


def test_unknown_scenario_lists_shipped(tmp_path: object) -> None:
    with pytest.raises(ScenarioError, match=r"shipped: .*smart-building"):
        load_scenario("no-such-fleet")


@pytest.mark.parametrize(
    "dist",
    [
        Distribution(kind="constant", mean=5.0),
        Distribution(kind="exponential", mean=5.0),
        Distribution(kind="uniform", mean=5.0, low=2.0, high=8.0),
        Distribution(kind="lognormal", mean=5.0, cv=0.5),
        Distribution(kind="gamma", mean=5.0, cv=0.5),
    ],
)
def test_distribution_means_and_equilibrium(dist: Distribution) -> None:
    """Sample means match the stated mean, and the residual (equilibrium) draw has the renewal
    theorem's mean E[X^2] / (2 E[X]). 40k draws: the standard error is < 1 % of the mean."""
    rng = random.Random(1)
    n = 40_000
    xs = [dist.sample(rng) for _ in range(n)]
    mean = sum(xs) / n
    assert mean == pytest.approx(dist.mean, rel=0.03)
    residual = sum(dist.sample_residual(rng) for _ in range(n)) / n
    expected = (dist.variance + dist.mean**2) / (2 * dist.mean)
    assert residual == pytest.approx(expected, rel=0.04)


def test_outage_schedule_is_seeded_merged_and_daily() -> None:
    s = load_scenario("smart-building")
    a = outage_schedule(s, 3 * 86400, 0.0)
    assert a == outage_schedule(s, 3 * 86400, 0.0)
    # the 14:30 maintenance window of campus-b on each of the three days
    b = s.region_index("campus-b")
    starts = [o.start for o in a if o.region == b]
    for day in range(3):
        assert any(
            math.isclose(t, day * 86400 + 14.5 * 3600) or t < day * 86400 + 14.5 * 3600 < t + 3600
            for t in starts
        )
    for r in range(len(s.regions)):
        spans = [(o.start, o.end) for o in a if o.region == r]
        assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(spans))


def test_topic_filters() -> None:
    assert topic_filter("bld/{region}/b{building}/x/{client_id}/env") == "bld/+/+/x/+/env"
    assert filter_matches("bld/#", "bld/a/b")
    assert filter_matches("bld/#", "bld")
    assert not filter_matches("+/x", "$SYS/x")
    assert not filter_matches("a/+", "a/b/c")
