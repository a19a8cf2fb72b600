"""The shared backoff: growth, cap, jitter bounds, reset, and the same delays for the same seed."""

from __future__ import annotations

import random

import pytest
from mcloudtt_broker.backoff import Backoff


def test_without_jitter_the_delay_doubles_up_to_the_cap_and_stays_there() -> None:
    backoff = Backoff(base=0.1, cap=1.0, jitter=0)
    delays = [backoff.next() for _ in range(8)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])
    assert backoff.attempt == 8


def test_a_long_outage_stays_at_the_cap() -> None:
    backoff = Backoff(base=0.05, cap=2.0, factor=1.5)
    for _ in range(100_000):  # base * factor**attempt would overflow a float long before this
        assert backoff.next() <= 2.0
    assert backoff.ceiling() == 2.0


@pytest.mark.parametrize("jitter", [1.0, 0.5, 0.2])
def test_each_delay_lies_within_its_jitter_band(jitter: float) -> None:
    backoff = Backoff(base=0.2, cap=5.0, jitter=jitter, rng=random.Random(7))
    seen = []
    for _ in range(2_000):
        top = backoff.ceiling()
        delay = backoff.next()
        assert top * (1 - jitter) <= delay <= top
        seen.append(delay / top)
        if backoff.attempt == 10:
            backoff.reset()
    # The band is really used, not a point in it.
    assert min(seen) < 1 - jitter * 0.9 and max(seen) > 1 - jitter * 0.1


def test_reset_after_a_success_starts_again_from_the_base() -> None:
    backoff = Backoff(base=0.1, cap=10.0, jitter=0)
    for _ in range(5):
        backoff.next()
    assert backoff.ceiling() == pytest.approx(3.2)
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next() == pytest.approx(0.1)


def test_the_same_seed_gives_the_same_delays() -> None:
    def run(seed: int) -> list[float]:
        backoff = Backoff(base=0.05, cap=1.0, rng=random.Random(seed))
        return [backoff.next() for _ in range(12)]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_a_cap_below_the_base_caps_the_first_delay_too() -> None:
    backoff = Backoff(base=0.2, cap=0.05, jitter=0)
    assert [backoff.next(), backoff.next()] == [0.05, 0.05]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base": 0, "cap": 1},
        {"base": 0.1, "cap": 0},
        {"base": 0.1, "cap": 1, "factor": 0.5},
        {"base": 0.1, "cap": 1, "jitter": 1.5},
    ],
)
def test_nonsense_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)  # type: ignore[arg-type]
