"""Virtual-time planning: the load a fleet puts on the cluster, by cohorts on a simpy Environment.

Theory of operation
-------------------
A million devices each sending every few seconds are some 10^10 messages a day: one simpy event
per message (or a process per device) cannot run in minutes. The devices of a class are
statistically identical and independent, so the model keeps, per class, *counts* of devices in
each state and per region (online, offline by churn, down in an outage) and one simpy process per
class that advances in steps of `resolution` seconds (default 1 s) and draws, for each step, how
many devices change state and how many messages they send. The cost is
O(classes x steps), whatever the number of devices.

What is drawn in a step of length dt, with `on` devices of the class online:
- Churn: sessions and offline periods are exponential (a two-state Markov chain per device), so
  the number of online devices going offline in a step is Binomial(on, 1 - exp(-dt/session)) and
  of offline devices coming back Binomial(off, 1 - exp(-dt/offline)) -- the exact transition law
  of the per-device chain. Of the departures a Binomial(ungraceful) share drop (the will fires).
- `interval` streams: each online device is a stationary renewal process of mean gap mu, so the
  expected number of messages in the step is on * m(h) * dt / mu (m = diurnal multiplier of the
  hour; the renewal theorem, in operational time). Their superposition over many independent
  devices is close to a Poisson process (Palm-Khintchine), so the count is Poisson with that
  mean. For nearly periodic gaps the true count is a little *less* variable than Poisson: the
  model errs on the bursty side, which is the safe side for sizing.
- `events` streams: Poisson(on * m(h) * rate * dt) events; each is a burst of a uniform number of
  messages `burst_gap` apart. The number of bursts that reach their k-th message is drawn as a
  chain of Binomials, and the k-th messages land (k-1) * gap later: exact for the burst law.
- `aligned` streams (reports at wall-clock multiples of a period): every online device fires
  once per boundary B, at B + delay - clock error, where delay ~ U(0, spread) and the clock error
  ~ Normal(0, offset_sd^2 + (drift_sd * time since resync)^2). The number firing in each step
  near B is a Multinomial draw over the exact distribution of that sum, so the quarter-hour peak
  and how clock drift smears it over the day are both in the model.
- Outages: a simpy process per outage takes every device of its region down at its start (the
  online ones drop: wills) and, at its end, schedules their reconnects uniformly over the
  reconnect-jitter window (a Multinomial over the window's steps): the reconnect storm.
- Retained status: a connect publishes "online", a graceful disconnect "offline"; a drop (no
  FIN/RST: the device or its network died) leaves a dead connection that the broker closes 1.5
  keepalives after the last packet it got, and only then publishes the will: detections are
  spread uniformly over that window (`DeviceClass.detection_window`), so an outage's wills come
  a keepalive or so after it starts, not in its first second. A takeover by the device's own
  reconnect can publish the will earlier; the model ignores that (same count, later).

Each step's counts are written to per-second arrays (messages per stream; connections, connects,
disconnects, drops, wills and status messages per class); the report derives rates, bytes and
peaks, and `sizing.py` turns peaks into broker pods and Redis sizing. The device-level model in
`device.py` (a simpy process per device) is the same law device by device; tests check that the
two agree with each other and with the closed-form expectation in `expected_rates`.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy

from .device import Recorder
from .fleet import Fleet
from .scenario import DeviceClass, Stream

__all__ = ["CohortModel", "expected_rates", "simulate_cohorts"]


def _phi(z: np.ndarray) -> np.ndarray:
    return np.asarray(np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi), dtype=float)


_erf = np.vectorize(math.erf, otypes=[float])


def _Phi(z: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + _erf(z / math.sqrt(2.0))), dtype=float)


def aligned_cdf(x: np.ndarray, sigma: float, spread: float) -> np.ndarray:
    """CDF of U(0, spread) + Normal(0, sigma^2) at `x`."""
    if sigma <= 1e-9 and spread <= 1e-9:
        return (x >= 0).astype(float)
    if spread <= 1e-9:
        return _Phi(x / sigma)
    if sigma <= 1e-9:
        return np.asarray(np.clip(x / spread, 0.0, 1.0), dtype=float)

    def g(z: np.ndarray) -> np.ndarray:  # an antiderivative of Phi
        return np.asarray(z * _Phi(z) + _phi(z), dtype=float)

    return np.asarray((sigma / spread) * (g(x / sigma) - g((x - spread) / sigma)), dtype=float)


class CohortModel:
    """The devices of one class, as counts, advanced by one simpy process.

    Churn acts on the class totals (online / offline among the devices not in an outage); as the
    devices of a class are exchangeable, the split of those totals over regions, needed only when
    an outage hits one region, is a hypergeometric draw at that moment.
    """

    def __init__(
        self, fleet: Fleet, c: int, rec: Recorder, stream_base: int, rng: np.random.Generator
    ) -> None:
        self.fleet = fleet
        self.c = c
        self.cls: DeviceClass = fleet.classes[c]
        self.rec = rec
        self.base = stream_base
        self.rng = rng
        self.dt = rec.dt
        self.counts = [int(n) for n in fleet.region_counts[c]]
        n = sum(self.counts)
        p = self.cls.online_fraction
        self.on = int(rng.binomial(n, p)) if p < 1 else n  # online, not in an outage
        self.off = n - self.on  # offline by churn, not in an outage
        self.down = [0] * len(self.counts)  # per region: in an outage or waiting to reconnect
        self.reconnecting = 0  # devices scheduled in ring_conn
        self.has_status = self.cls.status_topic is not None
        self.pending_drops = 0
        self.zombies = 0
        # ring buffers of future arrivals, indexed by step % H
        need = 2.0
        need = max(need, fleet.scenario.outages.reconnect_jitter / self.dt + 2)
        self.aligned_lead: list[int] = []
        for st in self.cls.streams:
            sch = st.schedule
            if sch.kind == "events":
                need = max(need, (sch.burst_max - 1) * sch.burst_gap / self.dt + 2)
            lead = 0
            if sch.kind == "aligned":
                sigma_max = self.cls.clock.sd_at(self.cls.clock.resync)
                lead = math.ceil((6.0 * sigma_max + 1.0) / self.dt) + 1
                need = max(need, 2 * lead + sch.spread / self.dt + 4)
            self.aligned_lead.append(lead)
        self.detect = self.cls.detection_window()
        if self.detect is not None:
            need = max(need, self.detect[1] / self.dt + 3)
        self.H = math.ceil(need) + 1
        self.ring_msgs = [[0] * self.H for _ in self.cls.streams]
        self.ring_conn = [[0] * self.H for _ in self.counts]
        self.ring_detect = [0] * self.H
        if self.detect is not None:
            offsets, probs = self._detection_law()
            self.detect_offsets = offsets.tolist()
            self.detect_probs = probs
            self.detect_cdf = np.cumsum(probs).tolist()
        self.next_boundary = [0] * len(self.cls.streams)
        for s, st in enumerate(self.cls.streams):
            if st.schedule.kind == "aligned":
                self.next_boundary[s] = math.floor(fleet.start_tod / st.schedule.period)
        self.step = 0

    # -- events from the outage process -------------------------------------------------------

    def _available(self) -> tuple[list[int], list[int]]:
        """Devices per region that are online or offline by churn (not down)."""
        pending = (
            [sum(ring) for ring in self.ring_conn] if self.reconnecting else [0] * len(self.counts)
        )
        return [n - d for n, d in zip(self.counts, self.down, strict=True)], pending

    def outage_start(self, region: int) -> None:
        avail, pending = self._available()
        a = avail[region]
        total = sum(avail)
        on_r = 0
        if a and self.on:
            on_r = int(self.rng.hypergeometric(a, total - a, self.on)) if total > a else self.on
        self.on -= on_r
        self.off -= a - on_r
        self.pending_drops += on_r
        # devices still waiting to come back from an earlier outage wait for this one's end
        self.reconnecting -= pending[region]
        self.ring_conn[region] = [0] * self.H
        self.down[region] = self.counts[region]

    def outage_end(self, region: int, jitter: float) -> None:
        n = self.down[region] - sum(self.ring_conn[region])
        if n <= 0:
            return
        slots = min(max(1, math.ceil(jitter / self.dt)), self.H - 1)
        counts = self.rng.multinomial(n, np.full(slots, 1.0 / slots)).tolist()
        ring = self.ring_conn[region]
        for k, m in enumerate(counts):
            ring[(self.step + k) % self.H] += m
        self.reconnecting += n

    # -- the per-step process ----------------------------------------------------------------

    def _schedule_aligned(self, s: int, stream: Stream, t_now: float) -> None:
        sch = stream.schedule
        fleet = self.fleet
        lead_t = self.aligned_lead[s] * self.dt
        while True:
            k = self.next_boundary[s]
            boundary = k * sch.period - fleet.start_tod  # model time of the wall-clock boundary
            if boundary - lead_t > t_now + self.dt:
                return
            self.next_boundary[s] = k + 1
            if boundary + sch.spread + lead_t < 0:
                continue  # entirely before the start of the run
            n = self.on
            if n == 0:
                continue
            since = (fleet.start_tod + boundary) % self.cls.clock.resync
            sigma = self.cls.clock.sd_at(since)
            first = math.floor((boundary - lead_t) / self.dt)
            last = math.ceil((boundary + sch.spread + lead_t) / self.dt)
            edges = np.arange(first, last + 2, dtype=float) * self.dt - boundary
            cdf = aligned_cdf(edges, sigma, sch.spread)
            cdf[0], cdf[-1] = 0.0, 1.0  # mass outside the window goes to its end slots
            probs = np.clip(np.diff(cdf), 0.0, None)
            probs /= probs.sum()
            counts = self.rng.multinomial(n, probs).tolist()
            ring = self.ring_msgs[s]
            for j, m in zip(range(first, last + 1), counts, strict=True):
                # only at the start of a run can the window open in the past: those devices
                # fired before t = 0 and are not part of the run
                if j >= self.step and m:
                    ring[j % self.H] += m

    def run(self, env: simpy.Environment) -> Generator[simpy.Event, Any, None]:
        cls, rec, rng, dt, H = self.cls, self.rec, self.rng, self.dt, self.H
        c, base = self.c, self.base
        churn = cls.churn
        p_leave = p_back = ungraceful = 0.0
        if churn is not None:
            p_leave = -math.expm1(-dt / churn.session)
            p_back = -math.expm1(-dt / churn.offline)
            ungraceful = churn.ungraceful
        # per stream: (kind, rate per online device per step at multiplier 1, profile, stream)
        plan = []
        for st in cls.streams:
            sch = st.schedule
            if sch.kind == "interval":
                assert sch.interval is not None
                plan.append((0, dt / sch.interval.mean, sch.diurnal, st))
            elif sch.kind == "events":
                plan.append((1, dt * sch.per_hour / 3600.0, sch.diurnal, st))
            else:
                plan.append((2, 0.0, sch.diurnal, st))
        start_tod = self.fleet.start_tod
        steps = rec.steps
        has_status = self.has_status
        poisson, binomial = rng.poisson, rng.binomial
        msgs, connections, connects_a = rec.msgs, rec.connections[c], rec.connects[c]
        disconnects_a, drops_a, zombies_a = rec.disconnects[c], rec.drops[c], rec.zombies[c]
        wills_a, status_a = rec.wills[c], rec.status[c]
        ring_msgs, ring_detect = self.ring_msgs, self.ring_detect
        timeout = env.timeout
        while self.step < steps:
            i = self.step
            slot = i % H
            t = i * dt
            connects = drops = graceful = 0
            if self.reconnecting:
                for r, ring in enumerate(self.ring_conn):
                    m = ring[slot]
                    if m:
                        ring[slot] = 0
                        self.down[r] -= m
                        self.reconnecting -= m
                        self.on += m
                        connects += m
            if churn is not None:
                leave = int(binomial(self.on, p_leave)) if self.on else 0
                back = int(binomial(self.off, p_back)) if self.off else 0
                self.on += back - leave
                self.off += leave - back
                connects += back
                if leave:
                    drops = int(binomial(leave, ungraceful))
                    graceful = leave - drops
            if self.pending_drops:
                drops += self.pending_drops
                self.pending_drops = 0
            if drops:
                self.zombies += drops
                if self.detect is not None:
                    self._schedule_detection(drops)
            detected = ring_detect[slot]
            if detected:
                ring_detect[slot] = 0
                self.zombies -= detected
            n_on = self.on
            hour = int(((start_tod + t) % 86400.0) // 3600.0)
            for s, (kind, coef, profile, stream) in enumerate(plan):
                ring = ring_msgs[s]
                if kind == 0:
                    if n_on:
                        ring[slot] += int(poisson(n_on * profile[hour] * coef))
                elif kind == 1:
                    if n_on:
                        events = int(poisson(n_on * profile[hour] * coef))
                        if events:
                            sch = stream.schedule
                            self._bursts(ring, sch.burst_min, sch.burst_max, sch.burst_gap, events)
                else:
                    self._schedule_aligned(s, stream, t)
                m = ring[slot]
                if m:
                    msgs[base + s, i] = m
                    ring[slot] = 0
            connections[i] = n_on
            connects_a[i] = connects
            disconnects_a[i] = graceful
            drops_a[i] = drops
            zombies_a[i] = self.zombies
            if has_status:
                wills_a[i] = detected
                status_a[i] = connects + graceful + detected
            self.step = i + 1
            yield timeout(dt)

    def _detection_law(self) -> tuple[np.ndarray, np.ndarray]:
        """Step offsets at which a drop is noticed, and their probabilities (uniform delay)."""
        assert self.detect is not None
        lo, hi = self.detect
        first = max(1, math.floor(lo / self.dt))
        last = max(first, math.floor(hi / self.dt))
        offsets = np.arange(first, last + 1)
        if hi - lo < 1e-9 or len(offsets) == 1:
            return offsets[:1], np.ones(1)
        edges = np.arange(first, last + 2, dtype=float) * self.dt
        probs = np.diff(np.clip((edges - lo) / (hi - lo), 0.0, 1.0))
        probs[0] += max(0.0, 1.0 - probs.sum())
        return offsets, probs / probs.sum()

    def _schedule_detection(self, drops: int) -> None:
        offsets, ring, H, step = self.detect_offsets, self.ring_detect, self.H, self.step
        if len(offsets) == 1:
            ring[(step + offsets[0]) % H] += drops
        elif drops <= 16:
            cdf, rnd = self.detect_cdf, self.rng.random
            last = len(offsets) - 1
            for _ in range(drops):
                k = min(bisect.bisect_left(cdf, rnd()), last)
                ring[(step + offsets[k]) % H] += 1
        else:
            counts = self.rng.multinomial(drops, self.detect_probs).tolist()
            for o, m in zip(offsets, counts, strict=True):
                if m:
                    ring[(step + o) % H] += m

    def _bursts(self, ring: list[int], bmin: int, bmax: int, gap: float, events: int) -> None:
        step, H = self.step, self.H
        ring[step % H] += events
        alive = events
        for k in range(2, bmax + 1):
            if k > bmin:
                # P(size >= k | size >= k-1) for a size uniform on [bmin, bmax]
                alive = int(self.rng.binomial(alive, (bmax - k + 1) / (bmax - k + 2)))
                if alive == 0:
                    break
            ring[(step + round((k - 1) * gap / self.dt)) % H] += alive


def _outage_process(
    env: simpy.Environment,
    cohorts: list[CohortModel],
    region: int,
    start: float,
    end: float,
    jitter: float,
) -> Generator[simpy.Event, Any, None]:
    if start > env.now:
        yield env.timeout(start - env.now)
    for cohort in cohorts:
        cohort.outage_start(region)
    yield env.timeout(max(0.0, end - env.now))
    for cohort in cohorts:
        cohort.outage_end(region, jitter)


@dataclass
class PlanRun:
    fleet: Fleet
    rec: Recorder
    runtime_s: float
    model: str


def simulate_cohorts(
    fleet: Fleet,
    resolution: float = 1.0,
    progress: Callable[[float], None] | None = None,
) -> PlanRun:
    """Run the cohort model over the fleet's horizon; `progress(t)` is called as time advances."""
    began = time.perf_counter()
    env = simpy.Environment()
    rec = Recorder(fleet, resolution)
    cohorts: list[CohortModel] = []
    base = 0
    for c, cls in enumerate(fleet.classes):
        rng = np.random.default_rng([fleet.scenario.seed, 1000 + c])
        cohort = CohortModel(fleet, c, rec, base, rng)
        base += len(cls.streams)
        cohorts.append(cohort)
        env.process(cohort.run(env))
    jitter = fleet.scenario.outages.reconnect_jitter
    for o in fleet.outages:
        env.process(_outage_process(env, cohorts, o.region, o.start, o.end, jitter))
    horizon = rec.steps * rec.dt
    chunk = max(rec.dt, min(600.0, horizon / 200))
    t = 0.0
    while t < horizon:
        t = min(horizon, t + chunk)
        env.run(until=t)
        if progress is not None:
            progress(t)
    return PlanRun(fleet=fleet, rec=rec, runtime_s=time.perf_counter() - began, model="cohort")


def expected_rates(fleet: Fleet) -> dict[str, float]:
    """Closed-form mean rates (per second, over the horizon) in the absence of outages:
    per stream `CLASS/STREAM`, plus `status` and `connects`."""
    out: dict[str, float] = {}
    status = connects = 0.0
    for c, cls in enumerate(fleet.classes):
        n = fleet.class_counts[c]
        on = n * cls.online_fraction
        for stream in cls.streams:
            sch = stream.schedule
            if sch.kind == "aligned":
                # every online device fires once per wall-clock boundary inside the horizon
                first = math.ceil(fleet.start_tod / sch.period)
                last = math.ceil((fleet.start_tod + fleet.horizon) / sch.period) - 1
                rate = on * max(0, last - first + 1) / fleet.horizon
            else:
                rate = on * sch.base_rate() * fleet.mean_multiplier(sch.diurnal)
            out[f"{cls.name}/{stream.name}"] = rate
        if cls.churn is not None:
            cycles = n / (cls.churn.session + cls.churn.offline)
            connects += cycles
            if cls.status_topic is not None:
                status += 2 * cycles
    out["status"] = status
    out["connects"] = connects
    return out
