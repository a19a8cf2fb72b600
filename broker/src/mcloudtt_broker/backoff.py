"""Capped exponential backoff with jitter, sans-IO: it says how long to wait, the caller waits.

One helper for every reconnect and retry loop (the broker's Redis link, the adapter's sources
and sinks). The n-th delay after the last success lies in `[c * (1 - jitter), c]` where
`c = min(cap, base * factor**n)`: `jitter=1` is "full jitter" (anywhere from 0 to the ceiling),
which spreads the retries of many clients that lost the same server at the same moment;
`jitter=0` is a plain doubling. The delay never exceeds `cap`.
"""

from __future__ import annotations

import random


class Backoff:
    """`next()` is the delay before the next attempt; `reset()` after a success."""

    __slots__ = ("_ceiling", "attempt", "base", "cap", "factor", "jitter", "rng")

    def __init__(
        self,
        *,
        base: float,
        cap: float,
        factor: float = 2.0,
        jitter: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        if base <= 0 or cap <= 0:
            raise ValueError(f"backoff needs a positive base and cap, got {base} and {cap}")
        if factor < 1:
            raise ValueError(f"backoff factor must be at least 1, got {factor}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"backoff jitter is a fraction in [0, 1], got {jitter}")
        # A cap below the base (a short --redis-backoff-max) caps the first delay too.
        self.base = min(base, cap)
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self.rng = rng if rng is not None else random.Random()
        # Failed attempts since the last success.
        self.attempt = 0
        # Grown step by step, not as base * factor**attempt: that overflows in a long outage.
        self._ceiling = self.base

    def ceiling(self) -> float:
        """The longest the next delay can be."""
        return self._ceiling

    def next(self) -> float:
        """The delay before the next attempt (and one more failed attempt counted)."""
        top = self._ceiling
        self.attempt += 1
        self._ceiling = min(self.cap, top * self.factor)
        if not self.jitter:
            return top
        return self.rng.uniform(top * (1.0 - self.jitter), top)

    def reset(self) -> None:
        """The attempt succeeded: the next failure starts again from `base`."""
        self.attempt = 0
        self._ceiling = self.base
