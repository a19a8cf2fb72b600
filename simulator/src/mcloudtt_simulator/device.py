"""One device's behaviour as a plain generator of timed actions, shared by both clocks.

`DeviceModel.actions(horizon)` yields `(t, kind, stream, seq, first_of_burst)` tuples in model
time: CONNECT, PUBLISH, DISCONNECT (graceful) and DROP (the connection dies; the will fires).
The virtual-time device model (`simulate_devices`, one simpy process per device) and the
real-time driver (`realtime.py`, which paces the same tuples on an asyncio loop and performs them
over real MQTT connections) both consume it; the cohort model in `plan.py` is its aggregate.

A device:
- starts online with probability session / (session + offline) (the stationary churn state);
- while online, each stream fires by its schedule: an `interval` stream as a stationary renewal
  process (the first gap after a connect is drawn from the equilibrium distribution), an `events`
  stream as a Poisson process of bursts, both in *operational time* that runs at the diurnal
  multiplier's pace; an `aligned` stream at every wall-clock boundary of its period as read on
  the device's own clock (offset + drift since the last resync) plus a firmware delay;
- ends a session after an exponential time (gracefully or not), stays offline for an exponential
  time, reconnects;
- in a regional outage drops at once (if online), and reconnects uniformly within the outage's
  reconnect-jitter window after the outage ends; outages reset the churn timers.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import numpy as np
import simpy

from .fleet import Fleet, Identity

__all__ = ["CONNECT", "DISCONNECT", "DROP", "PUBLISH", "DeviceModel", "advance", "simulate_devices"]

CONNECT, PUBLISH, DISCONNECT, DROP = 0, 1, 2, 3
INF = math.inf
_FLAT = (1.0,) * 24


def advance(t: float, tau: float, profile: Sequence[float], start_tod: float) -> float:
    """The model time at which `tau` units of operational time have passed after `t`, when
    operational time runs at `profile[hour of day]` times the pace of real time."""
    if profile is _FLAT or tau <= 0:
        return t + tau
    for _ in range(24 * 366):  # bounded: a profile that is zero all year never fires
        a = start_tod + t
        hour = int((a % 86400.0) // 3600.0)
        m = profile[hour]
        left = (math.floor(a / 3600.0) + 1) * 3600.0 - a
        if m > 0 and tau <= m * left:
            return t + tau / m
        tau -= m * left
        t += left
    return INF


class DeviceModel:
    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.identity: Identity = fleet.identity(index)
        self.cls = fleet.classes[self.identity.cls]
        seed = fleet.scenario.seed
        self.rng = random.Random(f"{seed}/{self.cls.name}/{self.identity.n}/schedule")
        clock = self.cls.clock
        crng = random.Random(f"{seed}/{self.cls.name}/{self.identity.n}/clock")
        self.clock_offset = crng.gauss(0.0, clock.offset_sd) if clock.offset_sd else 0.0
        self.clock_drift = crng.gauss(0.0, clock.drift_ppm_sd) * 1e-6 if clock.drift_ppm_sd else 0.0
        self.outages = fleet.outages_by_region[self.identity.region]
        self.jitter = fleet.scenario.outages.reconnect_jitter
        profiles = []
        for s in self.cls.streams:
            p = s.schedule.diurnal
            profiles.append(_FLAT if all(x == 1.0 for x in p) else p)
        self.profiles = profiles

    def clock_error(self, t: float) -> float:
        """Device clock minus true time at model time `t`."""
        since = (self.fleet.start_tod + t) % self.cls.clock.resync
        return self.clock_offset + self.clock_drift * since

    def device_time(self, t: float) -> float:
        return t + self.clock_error(t)

    def _aligned_fire(self, stream: int, k: int) -> float:
        sch = self.cls.streams[stream].schedule
        boundary = k * sch.period - self.fleet.start_tod
        delay = self.rng.uniform(0.0, sch.spread) if sch.spread else 0.0
        return boundary + delay - self.clock_error(boundary)

    def _first_fire(self, stream: int, t: float, aligned_k: list[int]) -> float:
        sch = self.cls.streams[stream].schedule
        rng = self.rng
        start_tod = self.fleet.start_tod
        if sch.kind == "interval":
            assert sch.interval is not None
            return advance(t, sch.interval.sample_residual(rng), self.profiles[stream], start_tod)
        if sch.kind == "events":
            return advance(
                t, rng.expovariate(sch.per_hour / 3600.0), self.profiles[stream], start_tod
            )
        k = max(aligned_k[stream], math.floor((start_tod + t) / sch.period) - 1)
        while True:
            fire = self._aligned_fire(stream, k)
            k += 1
            if fire > t:
                aligned_k[stream] = k
                return fire

    def actions(
        self, horizon: float, *, ramp: float = 0.0
    ) -> Iterator[tuple[float, int, int, int, bool]]:
        """Timed actions until `horizon` (model seconds). The first CONNECT of a device online at
        the start comes at a uniform time in [0, ramp)."""
        rng = self.rng
        cls = self.cls
        churn = cls.churn
        streams = cls.streams
        nstreams = len(streams)
        start_tod = self.fleet.start_tod
        outages = self.outages
        oi = bisect.bisect_right([o[1] for o in outages], 0.0)  # skip outages over before 0
        seqs = [0] * nstreams
        next_fire = [INF] * nstreams
        aligned_k = [-(2**62)] * nstreams
        bursts: list[tuple[float, int]] = []

        state = "on" if churn is None or rng.random() < churn.online_fraction else "off"
        if oi < len(outages) and outages[oi][0] <= 0.0:
            state = "down"
            t_state = outages[oi][1] + rng.uniform(0.0, self.jitter)
            oi += 1
        elif state == "on":
            t_state = rng.uniform(0.0, ramp) if ramp > 0 else 0.0
            state = "connecting"
        else:
            assert churn is not None
            t_state = rng.expovariate(1.0 / churn.offline)

        while True:
            t_out = outages[oi][0] if oi < len(outages) else INF
            if state == "on":
                t_pub = min(next_fire) if nstreams else INF
                t_burst = bursts[0][0] if bursts else INF
                t = min(t_pub, t_burst, t_state, t_out)
                if t >= horizon:
                    return
                if t == t_burst:
                    _, s = heapq.heappop(bursts)
                    yield (t, PUBLISH, s, seqs[s], False)
                    seqs[s] += 1
                    continue
                if t == t_pub:
                    s = next_fire.index(t)
                    sch = streams[s].schedule
                    yield (t, PUBLISH, s, seqs[s], True)
                    seqs[s] += 1
                    if sch.kind == "interval":
                        assert sch.interval is not None
                        next_fire[s] = advance(
                            t, sch.interval.sample(rng), self.profiles[s], start_tod
                        )
                    elif sch.kind == "events":
                        size = rng.randint(sch.burst_min, sch.burst_max)
                        for j in range(1, size):
                            heapq.heappush(bursts, (t + j * sch.burst_gap, s))
                        next_fire[s] = advance(
                            t, rng.expovariate(sch.per_hour / 3600.0), self.profiles[s], start_tod
                        )
                    else:
                        next_fire[s] = self._first_fire(s, t, aligned_k)
                    continue
                next_fire = [INF] * nstreams
                bursts.clear()
                if t == t_out:
                    yield (t, DROP, -1, 0, False)
                    state = "down"
                    t_state = outages[oi][1] + rng.uniform(0.0, self.jitter)
                    oi += 1
                    continue
                assert churn is not None
                graceful = rng.random() >= churn.ungraceful
                yield (t, DISCONNECT if graceful else DROP, -1, 0, False)
                state = "off"
                t_state = t + rng.expovariate(1.0 / churn.offline)
                continue
            # off, down or connecting: wait for the next connect or outage
            t = min(t_state, t_out)
            if t >= horizon:
                return
            if t == t_out:
                state = "down"
                t_state = outages[oi][1] + rng.uniform(0.0, self.jitter)
                oi += 1
                continue
            yield (t, CONNECT, -1, 0, False)
            state = "on"
            t_state = t + rng.expovariate(1.0 / churn.session) if churn is not None else INF
            for s in range(nstreams):
                next_fire[s] = self._first_fire(s, t, aligned_k)


class Recorder:
    """Per-bucket counts of a run: messages per stream and connection events per class."""

    def __init__(self, fleet: Fleet, resolution: float) -> None:
        self.dt = float(resolution)
        self.steps = max(1, math.ceil(fleet.horizon / self.dt - 1e-9))
        nstreams = sum(len(c.streams) for c in fleet.classes)
        nclasses = len(fleet.classes)
        self.msgs = np.zeros((nstreams, self.steps), dtype=np.int64)
        self.connections = np.zeros((nclasses, self.steps), dtype=np.int64)
        self.connects = np.zeros((nclasses, self.steps), dtype=np.int64)
        self.disconnects = np.zeros((nclasses, self.steps), dtype=np.int64)  # graceful
        self.drops = np.zeros((nclasses, self.steps), dtype=np.int64)  # ungraceful
        self.wills = np.zeros((nclasses, self.steps), dtype=np.int64)  # wills the broker publishes
        self.zombies = np.zeros(
            (nclasses, self.steps), dtype=np.int64
        )  # dead connections not yet noticed
        self.status = np.zeros((nclasses, self.steps), dtype=np.int64)  # retained status messages


def simulate_devices(fleet: Fleet, resolution: float = 1.0, progress: object = None) -> Recorder:
    """The device-level virtual-time model: one simpy process per device (small fleets only;
    it checks the cohort model and shows what the real-time driver will do)."""
    env = simpy.Environment()
    rec = Recorder(fleet, resolution)
    stream_base = []
    acc = 0
    for cls in fleet.classes:
        stream_base.append(acc)
        acc += len(cls.streams)
    steps = rec.steps
    dt = rec.dt
    conn_delta = np.zeros((len(fleet.classes), steps + 1), dtype=np.int64)
    zombie_delta = np.zeros((len(fleet.classes), steps + 1), dtype=np.int64)
    detect_rng = random.Random(f"{fleet.scenario.seed}/detect")
    windows = [cls.detection_window() for cls in fleet.classes]

    def device(env: simpy.Environment, model: DeviceModel) -> Generator[simpy.Event, Any, None]:
        c = model.identity.cls
        base = stream_base[c]
        has_status = model.cls.status_topic is not None
        initial = True
        for t, kind, s, _seq, _first in model.actions(fleet.horizon):
            if t > env.now:
                yield env.timeout(t - env.now)
            b = min(int(t / dt), steps - 1)
            if kind == PUBLISH:
                rec.msgs[base + s, b] += 1
            elif kind == CONNECT:
                conn_delta[c, b if not initial or t > 0 else 0] += 1
                if not (initial and t == 0.0):
                    rec.connects[c, b] += 1
                    rec.status[c, b] += has_status
                initial = False
            else:
                conn_delta[c, b] -= 1
                initial = False
                if kind == DISCONNECT:
                    rec.disconnects[c, b] += 1
                    rec.status[c, b] += has_status
                    continue
                rec.drops[c, b] += 1
                zombie_delta[c, b] += 1
                window = windows[c]
                if window is None:
                    continue
                seen = t + detect_rng.uniform(*window)
                if seen < fleet.horizon:
                    bd = min(int(seen / dt), steps - 1)
                    zombie_delta[c, bd] -= 1
                    rec.wills[c, bd] += has_status
                    rec.status[c, bd] += has_status

    for i in range(fleet.devices):
        env.process(device(env, DeviceModel(fleet, i)))
    env.run(until=fleet.horizon)
    # connections at the end of each bucket
    rec.connections[:] = np.cumsum(conn_delta[:, :steps], axis=1)
    rec.zombies[:] = np.cumsum(zombie_delta[:, :steps], axis=1)
    return rec
