"""A scenario scaled to a fleet of N devices, with its identities and its outage schedule.

Devices are numbered globally: class by class in scenario order, and within a class by `n`;
within a class the regions take consecutive blocks of `n` in proportion to their weights. Every
per-device draw (labels, clock error, schedule) comes from a `random.Random` seeded by
(seed, class, n), so a device behaves the same in whichever worker process runs it, and in
virtual or real time.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from .scenario import _PLACEHOLDER, DeviceClass, Scenario, ScenarioError, Stream, topic_filter

__all__ = [
    "Fleet",
    "Identity",
    "Outage",
    "outage_schedule",
    "parse_outage_arg",
    "parse_time_of_day",
]


@dataclass(frozen=True, slots=True)
class Outage:
    region: int
    start: float  # model seconds since the start of the run
    end: float


@dataclass(frozen=True, slots=True)
class Identity:
    index: int  # global device index
    cls: int
    n: int  # index within the class
    region: int
    client_id: str
    topics: tuple[str, ...]  # one per stream
    status_topic: str | None
    subscriptions: tuple[str, ...]


def parse_time_of_day(text: str) -> float:
    h, _, m = text.partition(":")
    try:
        hh, mm = int(h), int(m or 0)
    except ValueError:
        raise ScenarioError(f"expected HH:MM, got {text!r}") from None
    if not (0 <= hh < 24 and 0 <= mm < 60):
        raise ScenarioError(f"expected HH:MM, got {text!r}")
    return hh * 3600.0 + mm * 60.0


def parse_outage_arg(text: str, scenario: Scenario) -> Outage:
    """`REGION:START:DURATION` in model seconds, e.g. `north:30:20`."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ScenarioError(f"--outage expects REGION:START_S:DURATION_S, got {text!r}")
    region = scenario.region_index(parts[0])
    try:
        start, duration = float(parts[1]), float(parts[2])
    except ValueError:
        raise ScenarioError(
            f"--outage expects numbers for START and DURATION, got {text!r}"
        ) from None
    if start < 0 or duration <= 0:
        raise ScenarioError("--outage: START >= 0 and DURATION > 0")
    return Outage(region, start, start + duration)


def outage_schedule(
    scenario: Scenario, horizon: float, start_tod: float, extra: Sequence[Outage] = ()
) -> list[Outage]:
    """Regional outages within [0, horizon): random (Poisson in time, per `outages.per_day`),
    scheduled (`at` repeats daily; `offset` once), and `extra` ones; overlapping outages of one
    region are merged."""
    spec = scenario.outages
    raw: list[Outage] = list(extra)
    rng = random.Random(f"{scenario.seed}/outages")
    weights = [r.weight for r in scenario.regions]
    if spec.per_day > 0:
        rate = spec.per_day / 86400.0
        t = rng.expovariate(rate)
        while t < horizon:
            region = rng.choices(range(len(scenario.regions)), weights)[0]
            raw.append(Outage(region, t, t + spec.duration.sample(rng)))
            t += rng.expovariate(rate)
    for s in spec.scheduled:
        region = scenario.region_index(s.region)
        if s.offset:
            starts = [s.at]
        else:
            first = (s.at - start_tod) % 86400.0
            starts = [first + 86400.0 * k for k in range(int(horizon // 86400.0) + 2)]
        raw.extend(Outage(region, t, t + s.duration) for t in starts if t < horizon)
    merged: list[Outage] = []
    for region in range(len(scenario.regions)):
        spans = sorted((o.start, o.end) for o in raw if o.region == region)
        for start, end in spans:
            if merged and merged[-1].region == region and start <= merged[-1].end:
                last = merged.pop()
                merged.append(Outage(region, last.start, max(last.end, end)))
            else:
                merged.append(Outage(region, start, end))
    return sorted(merged, key=lambda o: (o.start, o.region))


def _render(template: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


class Fleet:
    """`scenario` with `devices` devices, run for `horizon` seconds from time of day `start_tod`."""

    def __init__(
        self,
        scenario: Scenario,
        devices: int | None = None,
        *,
        horizon: float = 3600.0,
        start_tod: float = 0.0,
        extra_outages: Sequence[Outage] = (),
        seed: int | None = None,
    ) -> None:
        if seed is not None and seed != scenario.seed:
            from dataclasses import replace

            scenario = replace(scenario, seed=seed)
        self.scenario = scenario
        self.devices = scenario.devices if devices is None else int(devices)
        if self.devices < 1:
            raise ScenarioError("a fleet needs at least one device")
        self.horizon = float(horizon)
        self.start_tod = float(start_tod) % 86400.0
        self.class_counts = scenario.class_counts(self.devices)
        self.region_counts = [scenario.region_counts(n) for n in self.class_counts]
        self.class_offsets = [0]
        for n in self.class_counts:
            self.class_offsets.append(self.class_offsets[-1] + n)
        self.outages = outage_schedule(scenario, self.horizon, self.start_tod, extra_outages)
        self.outages_by_region: list[list[tuple[float, float]]] = [[] for _ in scenario.regions]
        for o in self.outages:
            self.outages_by_region[o.region].append((o.start, o.end))

    @property
    def classes(self) -> tuple[DeviceClass, ...]:
        return self.scenario.classes

    def streams(self) -> Iterator[tuple[int, int, DeviceClass, Stream]]:
        """(class index, stream index, class, stream) over the whole scenario."""
        for c, cls in enumerate(self.classes):
            for s, stream in enumerate(cls.streams):
                yield c, s, cls, stream

    def stream_keys(self) -> list[str]:
        return [f"{cls.name}/{stream.name}" for _, _, cls, stream in self.streams()]

    def stream_filters(self) -> list[str]:
        return [topic_filter(stream.topic) for _, _, _, stream in self.streams()]

    def locate(self, index: int) -> tuple[int, int, int]:
        """(class, n, region) of a global device index."""
        if not 0 <= index < self.devices:
            raise IndexError(index)
        c = bisect.bisect_right(self.class_offsets, index) - 1
        n = index - self.class_offsets[c]
        region, acc = 0, 0
        for r, count in enumerate(self.region_counts[c]):
            acc += count
            if n < acc:
                region = r
                break
        return c, n, region

    def identity(self, index: int) -> Identity:
        c, n, region = self.locate(index)
        cls = self.classes[c]
        rng = random.Random(f"{self.scenario.seed}/{cls.name}/{n}/labels")
        values = {"n": str(n), "class": cls.name, "region": self.scenario.regions[region].name}
        for name, spec in cls.labels.items():
            if "range" in spec:
                lo, hi = spec["range"]
                values[name] = str(rng.randint(lo, hi))
            else:
                values[name] = rng.choice(spec["choice"])
        values["client_id"] = _render(cls.client_id, values)
        return Identity(
            index=index,
            cls=c,
            n=n,
            region=region,
            client_id=values["client_id"],
            topics=tuple(_render(s.topic, values) for s in cls.streams),
            status_topic=_render(cls.status_topic, values) if cls.status_topic else None,
            subscriptions=tuple(_render(f, values) for f in cls.subscriptions),
        )

    def hour_multiplier(self, profile: Sequence[float], t: float) -> float:
        return profile[int(((self.start_tod + t) % 86400.0) // 3600.0)]

    def mean_multiplier(
        self, profile: Sequence[float], t0: float = 0.0, t1: float | None = None
    ) -> float:
        """Time average of an hourly profile over model time [t0, t1)."""
        t1 = self.horizon if t1 is None else t1
        if t1 <= t0:
            return profile[int(((self.start_tod + t0) % 86400.0) // 3600.0)]
        total, t = 0.0, t0
        while t < t1:
            a = self.start_tod + t
            edge = (math.floor(a / 3600.0) + 1) * 3600.0 - self.start_tod
            step = min(edge, t1) - t
            total += profile[int((a % 86400.0) // 3600.0)] * step
            t += step
        return total / (t1 - t0)
