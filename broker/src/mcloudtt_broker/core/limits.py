"""Rate limits, sans-IO: token buckets driven by the caller's clock (`now` is passed in).

A bucket holds up to `burst` tokens and refills at `rate` tokens per second. Two ways to spend:
`try_take` refuses when the tokens are not there (CONNECT rate per source address: the CONNECT is
refused), `charge` always spends and may go into debt, returning how long the caller must wait
for the debt to be paid (publish rate and bandwidth: the bytes were already read, so the client
is slowed by not reading its socket for that long, never dropped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .broker import BrokerSettings


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("a token bucket needs a positive rate and burst")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> float:
        tokens = self.tokens
        if now > self.stamp:
            tokens = self.tokens = min(self.burst, tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return tokens

    def try_take(self, now: float, amount: float = 1.0) -> bool:
        tokens = self._refill(now)
        if tokens >= amount:
            self.tokens = tokens - amount
            return True
        self.tokens = tokens
        return False

    def charge(self, now: float, amount: float = 1.0) -> float:
        """Spend `amount` (into debt if need be); the seconds until the balance is back to 0."""
        tokens = self._refill(now) - amount
        self.tokens = tokens
        return 0.0 if tokens >= 0 else -tokens / self.rate

    def full(self, now: float) -> bool:
        return self._refill(now) >= self.burst


class BucketTable:
    """One bucket per key (a source address), created on first use; `prune` forgets the full
    ones, so an idle address costs nothing and a flood of addresses is bounded by the rate."""

    __slots__ = ("buckets", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.buckets: dict[str, TokenBucket] = {}

    def try_take(self, key: str, now: float) -> bool:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.try_take(now)

    def prune(self, now: float) -> None:
        for key in [key for key, bucket in self.buckets.items() if bucket.full(now)]:
            del self.buckets[key]


class Throttle:
    """A client's publish-rate and bandwidth buckets, charged for each PUBLISH read. When one is
    in debt the core stops reading packets and the shell pauses the socket for `wait` seconds."""

    __slots__ = ("bytes", "publishes", "reason", "wait")

    def __init__(self, publishes: TokenBucket | None, bytes_: TokenBucket | None) -> None:
        self.publishes = publishes
        self.bytes = bytes_
        self.wait = 0.0
        self.reason = ""  # the limit behind `wait`: publish_rate or bandwidth

    def on_publish(self, size: int, now: float) -> bool:
        """Charge one PUBLISH of `size` bytes; True when the client must now wait."""
        wait = 0.0
        bucket = self.publishes
        if bucket is not None:
            # TokenBucket.charge inlined: this runs for every PUBLISH of a rate-limited client.
            tokens = bucket.tokens
            if now > bucket.stamp:
                tokens += (now - bucket.stamp) * bucket.rate
                if tokens > bucket.burst:
                    tokens = bucket.burst
                bucket.stamp = now
            tokens -= 1.0
            bucket.tokens = tokens
            if tokens < 0.0:
                wait = -tokens / bucket.rate
                self.reason = "publish_rate"
        if self.bytes is not None:
            byte_wait = self.bytes.charge(now, size)
            if byte_wait > wait:
                wait = byte_wait
                self.reason = "bandwidth"
        self.wait = wait
        return wait > 0.0

    def take_wait(self) -> float:
        wait = self.wait
        self.wait = 0.0
        return wait


def new_throttle(settings: BrokerSettings, now: float) -> Throttle | None:
    """A client's throttle, or None when neither a publish rate nor a bandwidth is set."""
    if not (settings.publish_rate or settings.bandwidth):
        return None
    publishes = None
    if settings.publish_rate:
        burst = settings.publish_burst or max(1.0, settings.publish_rate)
        publishes = TokenBucket(settings.publish_rate, burst, now)
    bytes_ = None
    if settings.bandwidth:
        bytes_ = TokenBucket(settings.bandwidth, settings.bandwidth, now)
    return Throttle(publishes, bytes_)
