"""Payload generators: what a device says, as a dict of fields at a model time `t` (seconds).

Every generator is a small stateful object owned by one device stream and driven by that device's
own `random.Random`, so a device says the same things for a seed whatever else runs.

- `sensor`: each field an Ornstein-Uhlenbeck random walk (mean `mean`, stationary sd `sd`,
  reversion time `tau`) plus measurement noise `noise`, rounded to `decimals`.
- `gps`: a vehicle track around its region's centre: speed (km/h) an OU walk, heading a random
  walk, the position dead-reckoned from them and kept within the region, plus GPS noise (metres).
- `counter`: a meter: a cumulative counter growing at `rate_per_hour` with multiplicative noise.
- `event`: one of `types`, with a burst index.
- `blob`: `size` opaque characters (for a payload of a known size).

Any kind accepts `extra` (constant fields added to each message) and `pad_to` (pad the encoded
JSON with a filler field up to that many bytes).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from typing import Any

from .scenario import Region

__all__ = ["PayloadGenerator", "encode_message", "make_generator"]

_EARTH_M_PER_DEG = 111_320.0


class PayloadGenerator:
    """Base: `fields(t)` returns the device's fields for a message sent at model time `t`."""

    def __init__(self, spec: Mapping[str, Any], rng: random.Random) -> None:
        self.rng = rng
        self.extra = dict(spec.get("extra", {}))
        self.pad_to = int(spec.get("pad_to", 0))
        self.last_t: float | None = None

    def _dt(self, t: float) -> float:
        dt = 0.0 if self.last_t is None else max(0.0, t - self.last_t)
        self.last_t = t
        return dt

    def fields(self, t: float) -> dict[str, Any]:
        out = self._fields(t, self._dt(t))
        out.update(self.extra)
        return out

    def _fields(self, t: float, dt: float) -> dict[str, Any]:
        raise NotImplementedError


class _OU:
    """An Ornstein-Uhlenbeck process sampled exactly at arbitrary gaps."""

    __slots__ = ("mean", "sd", "tau", "x")

    def __init__(self, mean: float, sd: float, tau: float, rng: random.Random) -> None:
        self.mean, self.sd, self.tau = mean, sd, max(tau, 1e-9)
        self.x = rng.gauss(mean, sd)  # start in the stationary distribution

    def step(self, dt: float, rng: random.Random) -> float:
        if dt > 0:
            a = math.exp(-dt / self.tau)
            self.x = (
                self.mean
                + (self.x - self.mean) * a
                + self.sd * math.sqrt(1 - a * a) * rng.gauss(0, 1)
            )
        return self.x


class SensorGenerator(PayloadGenerator):
    def __init__(self, spec: Mapping[str, Any], rng: random.Random) -> None:
        super().__init__(spec, rng)
        fields = spec.get("fields") or {"value": {}}
        self.walks: list[tuple[str, _OU, float, int]] = []
        for name, f in fields.items():
            walk = _OU(
                float(f.get("mean", 20.0)),
                float(f.get("sd", 1.0)),
                float(f.get("tau", 3600.0)),
                rng,
            )
            self.walks.append((name, walk, float(f.get("noise", 0.0)), int(f.get("decimals", 2))))

    def _fields(self, t: float, dt: float) -> dict[str, Any]:
        rng = self.rng
        out: dict[str, Any] = {}
        for name, walk, noise, decimals in self.walks:
            v = walk.step(dt, rng)
            if noise:
                v += rng.gauss(0.0, noise)
            out[name] = round(v, decimals)
        return out


class GpsGenerator(PayloadGenerator):
    def __init__(self, spec: Mapping[str, Any], rng: random.Random, region: Region) -> None:
        super().__init__(spec, rng)
        self.region = region
        self.radius_m = region.radius_km * 1000.0
        r = self.radius_m * math.sqrt(rng.random())
        a = rng.uniform(0, 2 * math.pi)
        self.north, self.east = r * math.cos(a), r * math.sin(a)  # metres from the centre
        self.heading = rng.uniform(0, 360)
        self.speed = _OU(
            float(spec.get("speed_kmh", 40.0)),
            float(spec.get("speed_sd_kmh", 15.0)),
            float(spec.get("speed_tau", 300.0)),
            rng,
        )
        self.turn_sd = float(spec.get("turn_sd_deg", 8.0))  # degrees per sqrt(second)
        self.noise_m = float(spec.get("noise_m", 4.0))

    def _fields(self, t: float, dt: float) -> dict[str, Any]:
        rng = self.rng
        speed = max(0.0, self.speed.step(dt, rng))
        if dt > 0:
            self.heading = (self.heading + rng.gauss(0, self.turn_sd * math.sqrt(dt))) % 360
            if math.hypot(self.north, self.east) > self.radius_m:  # head back towards the centre
                self.heading = math.degrees(math.atan2(-self.east, -self.north)) % 360
            d = speed / 3.6 * dt
            h = math.radians(self.heading)
            self.north += d * math.cos(h)
            self.east += d * math.sin(h)
        lat0 = self.region.lat
        lat = lat0 + (self.north + rng.gauss(0, self.noise_m)) / _EARTH_M_PER_DEG
        lon = self.region.lon + (self.east + rng.gauss(0, self.noise_m)) / (
            _EARTH_M_PER_DEG * max(0.05, math.cos(math.radians(lat0)))
        )
        return {
            "lat": round(lat, 6),
            "lon": round(lon, 6),
            "spd": round(speed, 1),
            "hdg": round(self.heading),
        }


class CounterGenerator(PayloadGenerator):
    def __init__(self, spec: Mapping[str, Any], rng: random.Random) -> None:
        super().__init__(spec, rng)
        self.name = str(spec.get("field", "total"))
        self.rate = float(spec.get("rate_per_hour", 1.0))
        self.noise = float(spec.get("noise", 0.3))
        self.decimals = int(spec.get("decimals", 3))
        self.value = rng.uniform(0, float(spec.get("start_max", 10_000.0)))

    def _fields(self, t: float, dt: float) -> dict[str, Any]:
        if dt > 0:
            factor = (
                math.exp(self.rng.gauss(-(self.noise**2) / 2, self.noise)) if self.noise else 1.0
            )
            self.value += self.rate * dt / 3600.0 * factor
        return {self.name: round(self.value, self.decimals)}


class EventGenerator(PayloadGenerator):
    def __init__(self, spec: Mapping[str, Any], rng: random.Random) -> None:
        super().__init__(spec, rng)
        self.types = tuple(spec.get("types", ("event",)))
        self.current = self.types[0]

    def _fields(self, t: float, dt: float) -> dict[str, Any]:
        return {"event": self.current}

    def new_burst(self) -> None:
        self.current = self.rng.choice(self.types)


class BlobGenerator(PayloadGenerator):
    def __init__(self, spec: Mapping[str, Any], rng: random.Random) -> None:
        super().__init__(spec, rng)
        self.blob = "x" * int(spec.get("size", 64))

    def _fields(self, t: float, dt: float) -> dict[str, Any]:
        return {"blob": self.blob}


def make_generator(spec: Mapping[str, Any], rng: random.Random, region: Region) -> PayloadGenerator:
    kind = spec.get("kind", "sensor")
    if kind == "sensor":
        return SensorGenerator(spec, rng)
    if kind == "gps":
        return GpsGenerator(spec, rng, region)
    if kind == "counter":
        return CounterGenerator(spec, rng)
    if kind == "event":
        return EventGenerator(spec, rng)
    if kind == "blob":
        return BlobGenerator(spec, rng)
    raise ValueError(f"unknown payload kind {kind!r}")


# What the wire payload's leading keys are, for readers (the adapter's decoding rules): `sent` is
# the event time, `seq` a per-topic sequence number, `ts` the device's own clock. They describe
# the message; they are not measurements.
EVENT_TIME_FIELD = "sent"
METADATA_FIELDS = ("seq", "sent", "ts")


def encode_message(
    device: str, seq: int, sent: float, device_ts: float, fields: Mapping[str, Any], pad_to: int = 0
) -> bytes:
    """The wire payload: JSON with the device id, its per-topic sequence number, the send time
    (the simulator's wall clock, for latency) and the device's own (drifting) clock, then fields.

    The first three keys always come first and in this order, so that a verifier can read them
    without decoding the rest.
    """
    head = f'{{"seq":{seq},"sent":{sent:.6f},"dev":{json.dumps(device)},"ts":{device_ts:.3f}'
    body = json.dumps(fields, separators=(",", ":"))
    text = head + ("," + body[1:] if len(body) > 2 else "}")
    if pad_to and len(text) < pad_to:
        fill = pad_to - len(text) - len(',"pad":""')
        if fill > 0:
            text = text[:-1] + ',"pad":"' + "." * fill + '"}'
    return text.encode()
