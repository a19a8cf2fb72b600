"""Scenario files: a fleet described as device classes, read from TOML.

A scenario names regions (network areas that fail together), device classes and, optionally,
backend consumers (subscribers such as the adapter) and regional outages. Each class has a share
of the fleet, a client-id template, keepalive, clean-session flag, optional retained status topic
(an "online" message on connect, a will of "offline"), command subscriptions, connection churn and
clock error, and one or more *streams*: a topic template, QoS, retain flag, a schedule and a
payload generator. `simulator/README.md` lists every key; the shipped files
(`scenarios/*.toml`) use nearly all of them.

Schedules:
- `interval`: a renewal process; the gap between two messages is drawn from a distribution
  (`constant`, `exponential`, `uniform`, `lognormal`, `gamma`) with a given mean.
- `events`: a Poisson process of events (`per_hour` per device), each a burst of `burst_min` to
  `burst_max` messages `burst_gap` seconds apart.
- `aligned`: wall-clock aligned reports (every `period` seconds on the device's clock, plus a
  random firmware delay in [0, `spread`]); the device's clock error spreads the peak.

`interval` and `events` streams may carry a `diurnal` profile: 24 hourly multipliers of the rate
(a built-in name or a list).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "DIURNAL_PROFILES",
    "Churn",
    "ClockError",
    "Consumer",
    "DeviceClass",
    "Distribution",
    "OutageSpec",
    "Region",
    "Scenario",
    "ScenarioError",
    "Schedule",
    "ScheduledOutage",
    "Stream",
    "list_scenarios",
    "load_scenario",
    "parse_scenario",
]


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the offending key."""


# Hourly rate multipliers (index = hour of day, local time of the fleet).
DIURNAL_PROFILES: dict[str, tuple[float, ...]] = {
    "flat": (1.0,) * 24,
    # office buildings: people arrive 7-9, lunch dip, leave 17-19
    "office": (
        0.1,
        0.1,
        0.1,
        0.1,
        0.1,
        0.15,
        0.4,
        1.2,
        1.8,
        1.7,
        1.6,
        1.5,
        1.2,
        1.6,
        1.7,
        1.6,
        1.5,
        1.2,
        0.6,
        0.3,
        0.2,
        0.15,
        0.1,
        0.1,
    ),
    # road traffic: morning and evening rush hours
    "traffic": (
        0.15,
        0.1,
        0.1,
        0.1,
        0.2,
        0.5,
        1.2,
        1.9,
        1.8,
        1.3,
        1.1,
        1.1,
        1.2,
        1.1,
        1.1,
        1.3,
        1.7,
        1.9,
        1.5,
        1.0,
        0.7,
        0.5,
        0.3,
        0.2,
    ),
    # homes: busy mornings and evenings
    "residential": (
        0.3,
        0.2,
        0.2,
        0.2,
        0.3,
        0.6,
        1.2,
        1.5,
        1.1,
        0.8,
        0.7,
        0.8,
        0.9,
        0.8,
        0.8,
        0.9,
        1.1,
        1.5,
        1.8,
        1.9,
        1.7,
        1.3,
        0.8,
        0.5,
    ),
}

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BUILTIN_VARS = {"n", "client_id", "region", "class"}


@dataclass(frozen=True, kw_only=True)
class Distribution:
    """A positive random variable with a known mean (seconds)."""

    kind: str
    mean: float
    cv: float = 0.0  # coefficient of variation (lognormal, gamma)
    low: float = 0.0  # uniform
    high: float = 0.0  # uniform

    KINDS = ("constant", "exponential", "uniform", "lognormal", "gamma")

    @property
    def variance(self) -> float:
        if self.kind == "constant":
            return 0.0
        if self.kind == "exponential":
            return self.mean**2
        if self.kind == "uniform":
            return (self.high - self.low) ** 2 / 12.0
        return (self.cv * self.mean) ** 2

    def sample(self, rng: Any) -> float:
        """One draw; `rng` is a `random.Random`."""
        k = self.kind
        if k == "constant":
            return self.mean
        if k == "exponential":
            return float(rng.expovariate(1.0 / self.mean))
        if k == "uniform":
            return float(rng.uniform(self.low, self.high))
        if k == "lognormal":
            s2 = math.log1p(self.cv**2)
            return float(rng.lognormvariate(math.log(self.mean) - s2 / 2, math.sqrt(s2)))
        shape = 1.0 / self.cv**2
        return float(rng.gammavariate(shape, self.mean / shape))

    def sample_residual(self, rng: Any) -> float:
        """Time to the next renewal seen from a random instant (the equilibrium distribution).

        Starting a device's stream with this draw makes it stationary at once, so a device that
        (re)connects publishes at exactly rate 1/mean from then on, as the cohort model assumes.
        The residual is U * X' where X' is the size-biased interval (density x f(x) / mean).
        """
        k = self.kind
        if k == "constant":
            biased = self.mean
        elif k == "exponential":
            return float(rng.expovariate(1.0 / self.mean))
        elif k == "uniform":
            biased = math.sqrt(self.low**2 + rng.random() * (self.high**2 - self.low**2))
        elif k == "lognormal":
            s2 = math.log1p(self.cv**2)
            biased = rng.lognormvariate(math.log(self.mean) + s2 / 2, math.sqrt(s2))
        else:
            shape = 1.0 / self.cv**2
            biased = rng.gammavariate(shape + 1.0, self.mean / shape)
        return float(rng.random() * biased)


@dataclass(frozen=True, kw_only=True)
class Schedule:
    kind: str  # interval | events | aligned
    interval: Distribution | None = None  # interval
    per_hour: float = 0.0  # events: events per device per hour
    burst_min: int = 1
    burst_max: int = 1
    burst_gap: float = 0.0
    period: float = 0.0  # aligned
    spread: float = 0.0  # aligned: firmware delay, uniform in [0, spread]
    diurnal: tuple[float, ...] = DIURNAL_PROFILES["flat"]

    @property
    def mean_burst(self) -> float:
        return (self.burst_min + self.burst_max) / 2.0

    def base_rate(self) -> float:
        """Messages per second of one online device when the diurnal multiplier is 1."""
        if self.kind == "interval":
            assert self.interval is not None
            return 1.0 / self.interval.mean
        if self.kind == "events":
            return self.per_hour / 3600.0 * self.mean_burst
        return 1.0 / self.period


@dataclass(frozen=True, kw_only=True)
class Stream:
    name: str
    topic: str
    qos: int = 0
    retain: bool = False
    schedule: Schedule
    payload: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Churn:
    """Sessions and offline periods, both exponential (a two-state Markov chain per device)."""

    session: float  # mean online period, seconds
    offline: float  # mean offline period, seconds
    ungraceful: float = 0.5  # fraction of disconnects without DISCONNECT (the will fires)

    @property
    def online_fraction(self) -> float:
        return self.session / (self.session + self.offline)


@dataclass(frozen=True, kw_only=True)
class ClockError:
    """Device clock = true time + offset + drift * (time since the last NTP resync)."""

    offset_sd: float = 0.0  # seconds
    drift_ppm_sd: float = 0.0  # parts per million
    resync: float = 86400.0  # seconds between resyncs (clock drift restarts from the offset)

    def sd_at(self, since_resync: float) -> float:
        return math.hypot(self.offset_sd, self.drift_ppm_sd * 1e-6 * since_resync)


@dataclass(frozen=True, kw_only=True)
class DeviceClass:
    name: str
    share: float
    client_id: str
    keepalive: int = 60
    clean_session: bool = True
    status_topic: str | None = None
    subscriptions: tuple[str, ...] = ()
    labels: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    churn: Churn | None = None
    clock: ClockError = field(default_factory=ClockError)
    streams: tuple[Stream, ...] = ()

    @property
    def online_fraction(self) -> float:
        return 1.0 if self.churn is None else self.churn.online_fraction

    def detection_window(self) -> tuple[float, float] | None:
        """When the broker notices a connection that died silently, in seconds after the death.

        A dropped device sends no FIN or RST (power loss, lost radio): the broker closes the
        connection 1.5 keepalives after the last packet it got (MQTT-3.1.2-24) and only then
        publishes the will. The last packet came at most one keepalive (a PINGREQ), or one
        message gap, before the drop. None when keepalive is 0 (the broker never notices).
        """
        k = float(self.keepalive)
        if k <= 0:
            return None
        gaps = [k]
        for st in self.streams:
            if st.schedule.kind == "interval" and st.schedule.interval is not None:
                gaps.append(st.schedule.interval.mean)
            elif st.schedule.kind == "aligned":
                gaps.append(st.schedule.period)
        return 1.5 * k - min(gaps), 1.5 * k


@dataclass(frozen=True, kw_only=True)
class Region:
    name: str
    weight: float = 1.0
    lat: float = 0.0
    lon: float = 0.0
    radius_km: float = 20.0


@dataclass(frozen=True, kw_only=True)
class ScheduledOutage:
    region: str
    duration: float
    at: float  # seconds after midnight (time of day) ...
    offset: bool = False  # ... or, when True, seconds after the start of the run


@dataclass(frozen=True, kw_only=True)
class OutageSpec:
    per_day: float = 0.0  # random regional outages, Poisson in time
    duration: Distribution = field(
        default_factory=lambda: Distribution(kind="lognormal", mean=600.0, cv=0.5)
    )
    reconnect_jitter: float = 60.0  # devices come back uniformly over this window
    scheduled: tuple[ScheduledOutage, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Consumer:
    """A backend subscriber: every matching message is delivered `count` times."""

    filter: str
    count: int = 1
    qos: int = 1


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    description: str = ""
    seed: int = 0
    devices: int = 1000
    regions: tuple[Region, ...] = (Region(name="default"),)
    classes: tuple[DeviceClass, ...] = ()
    outages: OutageSpec = field(default_factory=OutageSpec)
    consumers: tuple[Consumer, ...] = ()
    source: str = ""

    def region_index(self, name: str) -> int:
        for i, r in enumerate(self.regions):
            if r.name == name:
                return i
        raise ScenarioError(f"unknown region {name!r}")

    def class_counts(self, devices: int) -> list[int]:
        """Devices per class for a fleet of `devices` (largest-remainder rounding of the shares)."""
        return apportion(devices, [c.share for c in self.classes])

    def region_counts(self, devices_in_class: int) -> list[int]:
        return apportion(devices_in_class, [r.weight for r in self.regions])


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` proportionally to `weights` into integers that add up to `total`."""
    wsum = float(sum(weights))
    if total < 0 or wsum <= 0:
        raise ScenarioError("cannot split a fleet by non-positive weights")
    quotas = [total * w / wsum for w in weights]
    counts = [int(q) for q in quotas]
    rest = total - sum(counts)
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    return counts


# --- parsing -------------------------------------------------------------------------------------


def _duration(value: Any, where: str) -> float:
    """Seconds from a number or a string such as "90s", "15m", "2h", "1d"."""
    if isinstance(value, bool):
        raise ScenarioError(f"{where}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*", value)
        if m:
            unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2) or "s"]
            return float(m.group(1)) * unit
    raise ScenarioError(f"{where}: expected a duration such as 30, '30s', '15m', got {value!r}")


def _time_of_day(value: Any, where: str) -> float:
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*", value)
        if m and int(m.group(1)) < 24 and int(m.group(2)) < 60:
            return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3) or 0)
    raise ScenarioError(f"{where}: expected a time of day 'HH:MM', got {value!r}")


def _check_keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise ScenarioError(
            f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
        )


def _positive(value: Any, where: str, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{where}: expected a number, got {value!r}")
    if value < 0 or (value == 0 and not zero) or not math.isfinite(value):
        raise ScenarioError(f"{where}: must be {'>= 0' if zero else '> 0'}, got {value!r}")
    return float(value)


def _distribution(d: Any, where: str) -> Distribution:
    if isinstance(d, int | float | str) and not isinstance(d, bool):
        return Distribution(kind="constant", mean=_duration(d, where))
    if not isinstance(d, Mapping):
        raise ScenarioError(f"{where}: expected a table {{dist = ..., mean = ...}}")
    _check_keys(d, {"dist", "mean", "cv", "min", "max", "median", "sigma"}, where)
    kind = d.get("dist", "exponential")
    if kind not in Distribution.KINDS:
        raise ScenarioError(f"{where}.dist: one of {Distribution.KINDS}, got {kind!r}")
    if kind == "uniform":
        low = _duration(d.get("min", 0), f"{where}.min")
        high = _duration(d.get("max"), f"{where}.max") if "max" in d else None
        if high is None or not (0 <= low < high):
            raise ScenarioError(f"{where}: uniform needs 0 <= min < max")
        return Distribution(kind=kind, mean=(low + high) / 2, low=low, high=high)
    if kind == "lognormal" and "median" in d:
        median = _duration(d["median"], f"{where}.median")
        sigma = _positive(d.get("sigma", 0.5), f"{where}.sigma")
        mean = median * math.exp(sigma**2 / 2)
        return Distribution(kind=kind, mean=mean, cv=math.sqrt(math.expm1(sigma**2)))
    if "mean" not in d:
        raise ScenarioError(f"{where}: 'mean' is required")
    mean = _duration(d["mean"], f"{where}.mean")
    if mean <= 0:
        raise ScenarioError(f"{where}.mean must be > 0")
    cv = 0.0
    if kind in ("lognormal", "gamma"):
        cv = _positive(d.get("cv", 0.5), f"{where}.cv")
    return Distribution(kind=kind, mean=mean, cv=cv)


def _diurnal(value: Any, where: str) -> tuple[float, ...]:
    if value is None:
        return DIURNAL_PROFILES["flat"]
    if isinstance(value, str):
        if value not in DIURNAL_PROFILES:
            raise ScenarioError(
                f"{where}: unknown profile {value!r}; one of {sorted(DIURNAL_PROFILES)}"
            )
        return DIURNAL_PROFILES[value]
    if isinstance(value, list) and len(value) == 24:
        return tuple(_positive(v, f"{where}[{i}]", zero=True) for i, v in enumerate(value))
    raise ScenarioError(f"{where}: a profile name or a list of 24 hourly multipliers")


def _schedule(d: Any, where: str) -> Schedule:
    if not isinstance(d, Mapping):
        raise ScenarioError(f"{where}: expected a table")
    kind = d.get("kind")
    if kind == "interval":
        _check_keys(
            d, {"kind", "dist", "mean", "cv", "min", "max", "median", "sigma", "diurnal"}, where
        )
        dist = _distribution({k: v for k, v in d.items() if k not in ("kind", "diurnal")}, where)
        return Schedule(
            kind=kind, interval=dist, diurnal=_diurnal(d.get("diurnal"), f"{where}.diurnal")
        )
    if kind == "events":
        _check_keys(
            d, {"kind", "per_hour", "burst_min", "burst_max", "burst_gap", "diurnal"}, where
        )
        bmin = int(d.get("burst_min", 1))
        bmax = int(d.get("burst_max", bmin))
        if not 1 <= bmin <= bmax <= 1000:
            raise ScenarioError(f"{where}: need 1 <= burst_min <= burst_max <= 1000")
        return Schedule(
            kind=kind,
            per_hour=_positive(d.get("per_hour"), f"{where}.per_hour"),
            burst_min=bmin,
            burst_max=bmax,
            burst_gap=_duration(d.get("burst_gap", 0.2), f"{where}.burst_gap"),
            diurnal=_diurnal(d.get("diurnal"), f"{where}.diurnal"),
        )
    if kind == "aligned":
        _check_keys(d, {"kind", "period", "spread"}, where)
        period = _duration(d.get("period"), f"{where}.period")
        if period <= 0:
            raise ScenarioError(f"{where}.period must be > 0")
        return Schedule(
            kind=kind, period=period, spread=_duration(d.get("spread", 0), f"{where}.spread")
        )
    raise ScenarioError(f"{where}.kind: one of 'interval', 'events', 'aligned', got {kind!r}")


def _qos(value: Any, where: str) -> int:
    if value not in (0, 1, 2) or isinstance(value, bool):
        raise ScenarioError(f"{where}: QoS must be 0, 1 or 2, got {value!r}")
    return int(value)


def _template_vars(template: str) -> set[str]:
    return set(_PLACEHOLDER.findall(template))


def _check_template(template: Any, labels: Mapping[str, Any], where: str, *, unique: bool) -> None:
    if not isinstance(template, str) or not template:
        raise ScenarioError(f"{where}: expected a non-empty string")
    names = _template_vars(template)
    unknown = names - _BUILTIN_VARS - set(labels)
    if unknown:
        raise ScenarioError(f"{where}: unknown placeholder(s) {sorted(unknown)} in {template!r}")
    if unique and not names & {"n", "client_id"}:
        raise ScenarioError(
            f"{where}: must contain {{client_id}} or {{n}} so that each device has its own topic"
        )
    if any(ch in template for ch in "+#\0"):
        raise ScenarioError(f"{where}: a topic name cannot contain '+', '#' or NUL")


def _labels(d: Any, where: str) -> dict[str, dict[str, Any]]:
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise ScenarioError(f"{where}: expected a table")
    out: dict[str, dict[str, Any]] = {}
    for name, spec in d.items():
        w = f"{where}.{name}"
        if name in _BUILTIN_VARS:
            raise ScenarioError(f"{w}: {name!r} is a built-in placeholder")
        if isinstance(spec, Mapping) and "range" in spec:
            lo, hi = spec["range"]
            if not (isinstance(lo, int) and isinstance(hi, int) and lo <= hi):
                raise ScenarioError(f"{w}.range: two integers [low, high]")
            out[name] = {"range": (lo, hi)}
        elif isinstance(spec, Mapping) and "choice" in spec and spec["choice"]:
            out[name] = {"choice": tuple(str(x) for x in spec["choice"])}
        else:
            raise ScenarioError(f"{w}: expected {{range = [low, high]}} or {{choice = [...]}}")
    return out


def _share(d: Mapping[str, Any], where: str) -> float:
    """`share` (a weight) or `count` (devices at the scenario's default size): the same thing,
    since `--devices` rescales every class in proportion."""
    if "share" in d and "count" in d:
        raise ScenarioError(f"{where}: give 'share' or 'count', not both")
    key = "count" if "count" in d else "share"
    return _positive(d.get(key, 1.0), f"{where}.{key}")


def _device_class(d: Any, where: str) -> DeviceClass:
    if not isinstance(d, Mapping):
        raise ScenarioError(f"{where}: expected a table")
    _check_keys(
        d,
        {
            "name",
            "share",
            "count",
            "client_id",
            "keepalive",
            "clean_session",
            "status_topic",
            "subscriptions",
            "labels",
            "churn",
            "clock",
            "streams",
        },
        where,
    )
    name = d.get("name")
    if not isinstance(name, str) or not name:
        raise ScenarioError(f"{where}.name: required")
    where = f"class {name!r}"
    labels = _labels(d.get("labels"), f"{where}.labels")
    client_id = d.get("client_id", name + "-{n}")
    _check_template(client_id, labels, f"{where}.client_id", unique=True)
    if "client_id" in _template_vars(client_id):
        raise ScenarioError(f"{where}.client_id cannot refer to itself")
    status = d.get("status_topic")
    if status is not None:
        _check_template(status, labels, f"{where}.status_topic", unique=True)
    subs = tuple(d.get("subscriptions", ()))
    for i, s in enumerate(subs):
        _check_template(s, labels, f"{where}.subscriptions[{i}]", unique=False)
    churn = None
    if d.get("churn") is not None:
        c = d["churn"]
        _check_keys(c, {"session", "offline", "ungraceful"}, f"{where}.churn")
        ungraceful = float(c.get("ungraceful", 0.5))
        if not 0 <= ungraceful <= 1:
            raise ScenarioError(f"{where}.churn.ungraceful: a fraction in [0, 1]")
        churn = Churn(
            session=_positive(
                _duration(c.get("session"), f"{where}.churn.session"), f"{where}.churn.session"
            ),
            offline=_positive(
                _duration(c.get("offline"), f"{where}.churn.offline"), f"{where}.churn.offline"
            ),
            ungraceful=ungraceful,
        )
    clock = ClockError()
    if d.get("clock") is not None:
        c = d["clock"]
        _check_keys(c, {"offset_sd", "drift_ppm_sd", "resync"}, f"{where}.clock")
        clock = ClockError(
            offset_sd=_positive(
                _duration(c.get("offset_sd", 0), f"{where}.clock.offset_sd"), "offset_sd", zero=True
            ),
            drift_ppm_sd=_positive(
                c.get("drift_ppm_sd", 0), f"{where}.clock.drift_ppm_sd", zero=True
            ),
            resync=_positive(
                _duration(c.get("resync", 86400), f"{where}.clock.resync"), f"{where}.clock.resync"
            ),
        )
    streams = []
    raw_streams = d.get("streams")
    if not isinstance(raw_streams, list) or not raw_streams:
        raise ScenarioError(f"{where}.streams: at least one [[classes.streams]] table")
    for i, s in enumerate(raw_streams):
        sw = f"{where}.streams[{i}]"
        if not isinstance(s, Mapping):
            raise ScenarioError(f"{sw}: expected a table")
        _check_keys(s, {"name", "topic", "qos", "retain", "schedule", "payload"}, sw)
        sname = s.get("name", f"s{i}")
        topic = s.get("topic")
        _check_template(topic, labels, f"{sw}.topic", unique=True)
        assert isinstance(topic, str)
        payload = s.get("payload", {"kind": "sensor"})
        if not isinstance(payload, Mapping) or payload.get("kind") not in PAYLOAD_KINDS:
            raise ScenarioError(f"{sw}.payload.kind: one of {PAYLOAD_KINDS}")
        streams.append(
            Stream(
                name=str(sname),
                topic=topic,
                qos=_qos(s.get("qos", 0), f"{sw}.qos"),
                retain=bool(s.get("retain", False)),
                schedule=_schedule(s.get("schedule"), f"{sw}.schedule"),
                payload=dict(payload),
            )
        )
    if len({s.name for s in streams}) != len(streams):
        raise ScenarioError(f"{where}: stream names must be unique")
    keepalive = int(d.get("keepalive", 60))
    if not 0 <= keepalive <= 65535:
        raise ScenarioError(f"{where}.keepalive: 0..65535 seconds")
    return DeviceClass(
        name=name,
        share=_share(d, where),
        client_id=client_id,
        keepalive=keepalive,
        clean_session=bool(d.get("clean_session", True)),
        status_topic=status,
        subscriptions=subs,
        labels=labels,
        churn=churn,
        clock=clock,
        streams=tuple(streams),
    )


PAYLOAD_KINDS = ("sensor", "gps", "counter", "event", "blob")


def parse_scenario(data: Mapping[str, Any], *, source: str = "<dict>") -> Scenario:
    """Validate a decoded scenario document and build the `Scenario`."""
    _check_keys(
        data,
        {"name", "description", "seed", "devices", "regions", "classes", "outages", "consumers"},
        source,
    )
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ScenarioError(f"{source}: 'name' is required")
    regions = []
    for i, r in enumerate(data.get("regions", [{"name": "default"}])):
        _check_keys(r, {"name", "weight", "lat", "lon", "radius_km"}, f"regions[{i}]")
        regions.append(
            Region(
                name=str(r.get("name", f"r{i}")),
                weight=_positive(r.get("weight", 1.0), f"regions[{i}].weight"),
                lat=float(r.get("lat", 0.0)),
                lon=float(r.get("lon", 0.0)),
                radius_km=_positive(r.get("radius_km", 20.0), f"regions[{i}].radius_km"),
            )
        )
    if not regions or len({r.name for r in regions}) != len(regions):
        raise ScenarioError("regions: at least one, with unique names")
    classes = tuple(
        _device_class(c, f"classes[{i}]") for i, c in enumerate(data.get("classes", []))
    )
    if not classes:
        raise ScenarioError(f"{source}: at least one [[classes]] table")
    if len({c.name for c in classes}) != len(classes):
        raise ScenarioError("classes: names must be unique")
    o = data.get("outages", {})
    _check_keys(o, {"per_day", "duration", "reconnect_jitter", "scheduled"}, "outages")
    scheduled = []
    names = {r.name for r in regions}
    for i, s in enumerate(o.get("scheduled", [])):
        w = f"outages.scheduled[{i}]"
        _check_keys(s, {"region", "at", "offset", "duration"}, w)
        if s.get("region") not in names:
            raise ScenarioError(f"{w}.region: one of {sorted(names)}")
        if ("at" in s) == ("offset" in s):
            raise ScenarioError(
                f"{w}: give exactly one of 'at' (time of day) or 'offset' (after start)"
            )
        at = (
            _time_of_day(s["at"], f"{w}.at") if "at" in s else _duration(s["offset"], f"{w}.offset")
        )
        scheduled.append(
            ScheduledOutage(
                region=s["region"],
                at=at,
                offset="offset" in s,
                duration=_positive(_duration(s.get("duration"), f"{w}.duration"), f"{w}.duration"),
            )
        )
    outages = OutageSpec(
        per_day=_positive(o.get("per_day", 0.0), "outages.per_day", zero=True),
        duration=_distribution(
            o.get("duration", {"dist": "lognormal", "mean": 600, "cv": 0.5}), "outages.duration"
        ),
        reconnect_jitter=_duration(o.get("reconnect_jitter", 60), "outages.reconnect_jitter"),
        scheduled=tuple(scheduled),
    )
    consumers = []
    for i, c in enumerate(data.get("consumers", [])):
        _check_keys(c, {"filter", "count", "qos"}, f"consumers[{i}]")
        consumers.append(
            Consumer(
                filter=str(c["filter"]),
                count=int(c.get("count", 1)),
                qos=_qos(c.get("qos", 1), f"consumers[{i}].qos"),
            )
        )
    devices = data.get("devices", 1000)
    if not isinstance(devices, int) or devices < 1:
        raise ScenarioError("devices: a positive integer")
    seed = data.get("seed", 0)
    if not isinstance(seed, int):
        raise ScenarioError("seed: an integer")
    return Scenario(
        name=name,
        description=str(data.get("description", "")),
        seed=seed,
        devices=devices,
        regions=tuple(regions),
        classes=classes,
        outages=outages,
        consumers=tuple(consumers),
        source=source,
    )


def list_scenarios() -> list[str]:
    """Names of the scenarios shipped with the package."""
    folder = resources.files("mcloudtt_simulator") / "scenarios"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A shipped scenario by name (`smart-building`) or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ScenarioError(f"no scenario file {str(path)!r}")
        text = path.read_text(encoding="utf-8")
        source = str(path)
    else:
        res = resources.files("mcloudtt_simulator") / "scenarios" / f"{name_or_path}.toml"
        if not res.is_file():
            raise ScenarioError(
                f"no scenario named {str(name_or_path)!r}; shipped: {', '.join(list_scenarios())}"
            )
        text = res.read_text(encoding="utf-8")
        source = f"{name_or_path}.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{source}: {e}") from None
    return parse_scenario(data, source=source)


def topic_filter(template: str) -> str:
    """The subscription filter that matches every topic of a template ({x} -> +)."""
    levels = template.split("/")
    return "/".join("+" if _PLACEHOLDER.search(level) else level for level in levels)


def filter_matches(filt: str, topic: str) -> bool:
    """MQTT topic-filter matching (`+` one level, `#` the rest; `$` topics need explicit levels)."""
    f = filt.split("/")
    t = topic.split("/")
    if topic.startswith("$") and f and f[0] in ("+", "#"):
        return False  # MQTT-4.7.2-1
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)
