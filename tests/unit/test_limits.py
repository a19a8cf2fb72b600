"""Token buckets in virtual time (the clock is the `now` passed in)."""

from __future__ import annotations

import pytest
from mcloudtt_broker.core.broker import BrokerSettings
from mcloudtt_broker.core.limits import BucketTable, Throttle, TokenBucket, new_throttle


def test_try_take_spends_the_burst_then_refills_at_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.try_take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.try_take(0.4)  # 0.8 tokens
    assert bucket.try_take(0.5)  # 1.0 token
    assert not bucket.try_take(0.5)
    # Idle time refills only up to the burst.
    assert [bucket.try_take(100.0) for _ in range(4)] == [True, True, True, False]


def test_charge_goes_into_debt_and_says_how_long_to_wait() -> None:
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    assert [bucket.charge(0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.charge(0.0) == pytest.approx(0.1)
    assert bucket.charge(0.0, 9) == pytest.approx(1.0)  # 10 tokens owed at 10 per second
    assert bucket.charge(1.0, 0) == pytest.approx(0.0)  # paid back exactly
    assert bucket.tokens == pytest.approx(0.0)


def test_a_clock_going_backwards_does_not_mint_tokens() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
    assert bucket.try_take(10.0)
    assert not bucket.try_take(5.0)
    assert not bucket.try_take(10.5)
    assert bucket.try_take(11.0)


def test_looking_at_a_bucket_keeps_its_refill() -> None:
    bucket = TokenBucket(rate=1.0, burst=2, now=0.0)
    assert bucket.try_take(0.0) and bucket.try_take(0.0)
    assert not bucket.full(1.0)  # (a prune looking) must not lose the second that passed
    assert bucket.try_take(1.0)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0.0, burst=1, now=0.0)


def test_bucket_table_is_per_key_and_forgets_full_buckets() -> None:
    table = BucketTable(rate=1.0, burst=1)
    assert table.try_take("10.0.0.1", 0.0)
    assert not table.try_take("10.0.0.1", 0.1)
    assert table.try_take("10.0.0.2", 0.1)  # another address has its own bucket
    table.prune(0.5)
    assert set(table.buckets) == {"10.0.0.1", "10.0.0.2"}  # still refilling
    table.prune(2.0)
    assert table.buckets == {}


def test_throttle_says_when_a_publish_puts_the_client_in_debt() -> None:
    throttle = Throttle(TokenBucket(100.0, 1, 0.0), TokenBucket(1000.0, 1000, 0.0))
    assert not throttle.on_publish(500, 0.0)
    assert throttle.on_publish(10, 0.0)  # one publish owed: 10 ms
    assert throttle.reason == "publish_rate"
    assert throttle.take_wait() == pytest.approx(0.01)
    assert throttle.wait == 0.0
    assert throttle.on_publish(1490, 0.01)  # 990 bytes owed: 0.99 s, longer than the publish
    assert throttle.reason == "bandwidth"
    assert throttle.take_wait() == pytest.approx(0.99)
    assert not Throttle(None, None).on_publish(10**6, 0.0)


def test_no_throttle_without_a_rate_limit() -> None:
    assert new_throttle(BrokerSettings(), 0.0) is None
    throttle = new_throttle(BrokerSettings(publish_rate=5.0), 0.0)
    assert throttle is not None and throttle.bytes is None
    assert throttle.publishes is not None and throttle.publishes.burst == 5.0
