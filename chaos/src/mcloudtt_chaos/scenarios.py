"""The chaos scenarios: one set of definitions, written only against `Backend`, for every backend.

A `Scenario` is data (the cluster it needs, the load, the invariants it judges and those it only
counts, each with its reason) and one small async function, its fault: what breaks, when, and
what the scenario measures itself beyond the history (readiness after Redis, memory of a broker
under a stalled subscriber, a reconnect storm). `run_scenario` does the rest the same way for
all: set the cluster up, start the workload, let it warm up, run the fault, let it heal, stop
publishing, drain, snapshot every broker, judge the history with the checker, tear down.

Fault windows go into the history (`FaultStart`/`FaultEnd`, through the workload), so the
checker's recovery time is measured from the end of each one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mcloudtt_chaos.backend import Backend, ClusterSpec, Endpoint, LinkFault, unwind_on_signals
from mcloudtt_chaos.checker import Report, Verdict, check
from mcloudtt_chaos.history import Acked, Delivered, HistoryWriter, Record, Sent, read_history
from mcloudtt_chaos.probe import ProbeClient, local_roundtrip
from mcloudtt_chaos.procs import scrape

T = TypeVar("T")

# The readiness promise of brokers-before-redis (the seed's topology problem).
READY_WITHIN_S = 2.0


class WorkloadLike(Protocol):
    """What the runner needs of `mcloudtt_chaos.workload.Workload` (its methods may be plain or
    coroutines; the runner awaits what is awaitable)."""

    def start(self) -> Any: ...
    def fault_start(self, name: str, target: str = "") -> Any: ...
    def fault_end(self, name: str, target: str = "") -> Any: ...
    def stop_publishing(self) -> Any: ...
    def drain(self, timeout: float) -> Any: ...
    def snapshot(self, endpoints: list[Endpoint]) -> Any: ...
    def stop(self) -> Any: ...


WorkloadFactory = Callable[[list[Endpoint], HistoryWriter, Mapping[str, Any]], WorkloadLike]


async def _call(method: Callable[..., Any], *args: Any) -> Any:
    """A workload method, off the loop: the workload's own clients run on threads and its
    `start()` and `drain()` block; a coroutine method is awaited instead."""
    if inspect.iscoroutinefunction(method):
        return await method(*args)
    return await asyncio.to_thread(method, *args)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What the command line may change of every scenario (None: the scenario's own)."""

    brokers: int | None = None
    seconds: float | None = None  # the fault phase
    rate: float | None = None  # messages/s of the workload
    seed: int = 1
    workdir: Path | None = None
    storm_clients: int = 2000
    drain_s: float = 15.0


@dataclass
class Run:
    """A scenario's handle on the running cluster, given to its fault function."""

    scenario: Scenario
    backend: Backend
    workload: WorkloadLike
    options: RunOptions
    seconds: float
    progress: Callable[[str], None]
    measurements: dict[str, Any] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    # Clients whose records leave the history before it is judged (with the reason).
    excluded_clients: dict[str, str] = field(default_factory=dict)
    # Messages sent before `split_at` are judged apart, as the invariant `split_name`.
    split_at: float | None = None
    split_name: str = ""
    dry: bool = False  # --dry-run: backend calls are recorded, sleeps and probes skipped

    @property
    def brokers(self) -> list[str]:
        return [e.name for e in self.backend.endpoints()]

    def broker(self, index: int) -> str:
        names = self.brokers
        return names[index % len(names)]

    async def sleep(self, seconds: float) -> None:
        if self.dry:
            self.progress(f"sleep {seconds:g}s")
        else:
            await asyncio.sleep(seconds)

    async def call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A blocking backend call, off the loop (the workload keeps running meanwhile)."""
        return await asyncio.to_thread(method, *args, **kwargs)

    @asynccontextmanager
    async def fault(self, name: str, target: str = "") -> AsyncIterator[None]:
        """A fault window in the history, around what the block breaks and heals."""
        self.progress(f"fault {name} {target}".rstrip())
        await _call(self.workload.fault_start, name, target)
        try:
            yield
        finally:
            await _call(self.workload.fault_end, name, target)
            self.progress(f"healed {name} {target}".rstrip())

    def judge(self, name: str, passed: bool, **counts: Any) -> Verdict:
        """A verdict the scenario measured itself, next to the checker's."""
        verdict = Verdict(name, checked=1)
        verdict.counts.update(
            {k: v for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool)}
        )
        if not passed:
            verdict.fail(dict(counts))
        self.measurements[name] = counts
        self.verdicts.append(verdict)
        return verdict

    async def wait_ready(self, brokers: list[str], timeout: float) -> float | None:
        """Seconds until every one of `brokers` answers /readyz 200 (None: not in time)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            answers = await asyncio.gather(*(self.call(self.backend.readyz, b) for b in brokers))
            if all(status == 200 for status, _ in answers):
                return time.monotonic() - start
            await asyncio.sleep(0.02)
        return None


Fault = Callable[[Run], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    summary: str
    fault: Fault
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    # WorkloadSpec fields this scenario sets (rate, seconds and seed come from RunOptions).
    load: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 5.0  # default length of the fault phase
    warmup_s: float = 2.0
    settle_s: float = 3.0  # after the fault healed, before publishing stops
    # Invariants only counted here, with why (the checker still computes them).
    skip: Mapping[str, str] = field(default_factory=dict)
    # What the scenario measures itself, for `list` and the README.
    measures: tuple[str, ...] = ()

    def judged(self) -> list[str]:
        from mcloudtt_chaos.checker import COUNTED_ONLY, INVARIANTS

        own = [i for i in INVARIANTS if i not in self.skip and i not in COUNTED_ONLY]
        return [*own, *self.measures]


# --------------------------------------------------------------------------- the faults


async def _brokers_before_redis(run: Run) -> None:
    backend, brokers = run.backend, run.brokers
    async with run.fault("redis-absent", "redis"):
        await run.sleep(run.seconds)
        answers = await asyncio.gather(*(run.call(backend.readyz, b) for b in brokers))
        up = [b for b, (status, _) in zip(brokers, answers, strict=True) if status != 0]
        run.judge("brokers_stay_up", len(up) == len(brokers), up=len(up), brokers=len(brokers))
        reasons = {b: body.strip() for b, (_, body) in zip(brokers, answers, strict=True)}
        says_why = all(status == 503 and "redis" in body.lower() for status, body in answers)
        run.judge("readyz_says_why", says_why, reasons=reasons)
        served = (
            [True] * len(brokers)
            if run.dry
            else await asyncio.gather(*(local_roundtrip(e) for e in backend.endpoints()))
        )
        run.judge(
            "serves_local_clients",
            all(served),
            served=sum(served),
            brokers=len(brokers),
        )
        await run.call(backend.start_redis)
        ready_after = await run.wait_ready(brokers, timeout=30)
    run.measurements["ready_after_redis_s"] = ready_after
    # Before the cluster is ready a broker serves only its local clients; what it PUBACKed
    # then for subscribers on other brokers is judged apart from the rest.
    run.split_at = time.monotonic()
    run.split_name = "no_lost_before_ready"
    run.judge(
        "ready_within_2s",
        ready_after is not None and ready_after <= READY_WITHIN_S,
        ready_after_s=ready_after,
        limit_s=READY_WITHIN_S,
    )


async def _redis_restart(run: Run) -> None:
    async with run.fault("redis-kill", "redis"):
        await run.call(run.backend.kill_redis)
        await run.sleep(run.seconds)
        await run.call(run.backend.restart_redis, keep_data=True)
    run.measurements["ready_after_redis_s"] = await run.wait_ready(run.brokers, timeout=30)


async def _redis_freeze(run: Run) -> None:
    async with run.fault("redis-freeze", "redis"):
        await run.call(run.backend.freeze_redis)
        await run.sleep(run.seconds)
        await run.call(run.backend.thaw_redis)
    run.measurements["ready_after_thaw_s"] = await run.wait_ready(run.brokers, timeout=30)


async def _redis_data_loss(run: Run) -> None:
    async with run.fault("redis-data-loss", "redis"):
        await run.call(run.backend.kill_redis)
        await run.sleep(run.seconds)
        await run.call(run.backend.restart_redis, keep_data=False)
    run.measurements["ready_after_redis_s"] = await run.wait_ready(run.brokers, timeout=30)


def _victim(run: Run) -> str:
    """The broker to break: the workload's own choice when it names one (the broker its
    persistent subscribers sit on), else the last."""
    homes = Counter(
        str(getattr(s, "broker", "") or "") for s in getattr(run.workload, "subscribers", [])
    )
    homes.pop("", None)
    return homes.most_common(1)[0][0] if homes else run.broker(-1)


async def _broker_kill(run: Run) -> None:
    victim = _victim(run)
    async with run.fault("broker-kill", victim):
        await run.call(run.backend.kill_broker, victim)
        await run.sleep(run.seconds)
        await run.call(run.backend.start_broker, victim)
    run.measurements["victim"] = victim


PRESENCE_TTL_S = 3.0  # the --presence-ttl of the broker-kill scenarios
# The cluster of the scenarios that wait for a dead (or frozen) broker's presence to expire.
SHORT_PRESENCE = ClusterSpec(broker_args=("--presence-ttl", f"{PRESENCE_TTL_S:g}"))
# A session whose client is away while its broker is declared dead and adopted, then handed on,
# queues everything for it meanwhile (~200 a second in this workload, 5-8 s); the default bound
# of 1,000 then drops (counted, queue_full) what is acknowledged. A bound, not what these
# scenarios test (tests/cluster/test_noloss.py does the same).
OFFLINE_QUEUE = ("--max-queued-messages", "100000")
# The short-presence cluster whose clients are away for seconds: the broker-kill scenarios.
AWAY_PRESENCE = ClusterSpec(broker_args=("--presence-ttl", f"{PRESENCE_TTL_S:g}", *OFFLINE_QUEUE))


async def _broker_kill_after_expiry(run: Run) -> None:
    """Its clients stay away until its presence expired (TTL + 2 s), then reconnect."""
    victim = _victim(run)
    hold = PRESENCE_TTL_S + 2.0
    holder = getattr(run.workload, "hold_reconnects", None)
    async with run.fault("broker-kill", victim):
        if callable(holder):
            await _call(holder, hold)
        else:
            run.measurements["hold_unsupported"] = "the workload reconnects at once"
        await run.call(run.backend.kill_broker, victim)
        await run.sleep(max(run.seconds, hold))
        await run.call(run.backend.start_broker, victim)
    run.measurements["victim"] = victim
    run.measurements["reconnects_held_s"] = hold


async def _broker_restart_same_id(run: Run) -> None:
    victim = _victim(run)
    async with run.fault("broker-restart", victim):
        await run.call(run.backend.kill_broker, victim)
        await run.call(run.backend.start_broker, victim)
        ready = await run.wait_ready([victim], timeout=30)
    run.measurements["victim"] = victim
    run.measurements["ready_after_restart_s"] = ready


async def _rolling_restart(run: Run) -> None:
    took: dict[str, float | None] = {}
    for broker in run.brokers:
        async with run.fault("rolling-restart", broker):
            await run.call(run.backend.stop_broker, broker)
            await run.call(run.backend.start_broker, broker)
            took[broker] = await run.wait_ready([broker], timeout=30)
        await run.sleep(max(1.0, run.seconds / max(1, len(run.brokers))))
    run.measurements["ready_after_restart_s"] = took


# A broker cut from Redis (the link held, not refused) notices within a heartbeat and its
# deadline (--presence-ttl 3: 0.6 + 1.2 s) and serves a new client from then on; until then its
# CONNECT waits on the session look-up.
SERVED_WHILE_CUT_S = 3.0


async def _partition(run: Run) -> None:
    cut_redis, cut_clients = run.broker(1), run.broker(2)
    endpoint = {e.name: e for e in run.backend.endpoints()}[cut_redis]
    async with run.fault("cut-from-redis", cut_redis):
        await run.call(run.backend.cut_from_redis, cut_redis)
        began = time.monotonic()
        # A new local client is still served (a broker cut from Redis serves its own clients).
        served = True if run.dry else await local_roundtrip(endpoint, timeout=run.seconds)
        took = time.monotonic() - began
        await run.sleep(max(0.0, run.seconds - took))
        await run.call(run.backend.heal, cut_redis)
    run.judge(
        "serves_clients_while_cut",
        served and took <= SERVED_WHILE_CUT_S,
        broker=cut_redis,
        roundtrip_s=round(took, 3),
        limit_s=SERVED_WHILE_CUT_S,
    )
    await run.sleep(2)
    async with run.fault("cut-from-clients", cut_clients):
        await run.call(run.backend.cut_from_clients, cut_clients)
        await run.sleep(run.seconds)
        await run.call(run.backend.heal, cut_clients)


SLOW_LINKS = (
    ("latency", LinkFault(latency_ms=100, jitter_ms=50)),
    ("bandwidth", LinkFault(bandwidth_bytes_per_s=20_000)),
    ("slicer", LinkFault(slice_bytes=8)),
)


async def _slow_link(run: Run) -> None:
    target = run.broker(0)
    for name, link in SLOW_LINKS:
        async with run.fault(name, target):
            await run.call(run.backend.degrade_redis_link, target, link)
            await run.sleep(run.seconds / len(SLOW_LINKS))
            await run.call(run.backend.heal, target)
        await run.sleep(1)


def _rss(backend: Backend, broker: str) -> int | None:
    # Not every backend can read a process's memory; those that can offer `rss(broker)`.
    reader = getattr(backend, "rss", None)
    return reader(broker) if callable(reader) else None


def _drops(endpoint: Endpoint) -> dict[str, float] | None:
    try:
        metrics = scrape(endpoint.http_port, host=endpoint.host)
    except OSError:
        return None
    return {
        dict(labels).get("reason", ""): value
        for (name, labels), value in metrics.items()
        if name == "mcloudtt_messages_dropped_total" and value
    }


def _metric(endpoint: Endpoint, name: str) -> float | None:
    try:
        return scrape(endpoint.http_port, host=endpoint.host).total(name)
    except OSError:
        return None


async def _slow_consumer(run: Run) -> None:
    """A persistent QoS 1 subscriber of the workload's topics that reads its CONNACK and SUBACK
    and then nothing: the broker's send buffer fills, then its inflight window, then the
    session's queue (--max-queued-messages), and what overflows is dropped and counted. The
    stalled client is not the workload's, so the workload's own subscribers are still judged."""
    broker = run.broker(-1)
    endpoint = {e.name: e for e in run.backend.endpoints()}[broker]
    before = await run.call(_rss, run.backend, broker)
    dropped_before = await run.call(_metric, endpoint, "mcloudtt_messages_dropped_total")
    peak = before or 0
    stalled = ProbeClient(endpoint, "chaos-stalled", clean=False, rcvbuf=4096)
    try:
        async with run.fault("slow-consumer", broker):
            if not run.dry:
                await stalled.connect()
                await stalled.subscribe(STALLED_FILTER, qos=1)
            deadline = time.monotonic() + (0 if run.dry else run.seconds)
            while time.monotonic() < deadline:
                rss = await run.call(_rss, run.backend, broker)
                peak = max(peak, rss or 0)
                await run.sleep(0.25)
            dropped = await run.call(_metric, endpoint, "mcloudtt_messages_dropped_total")
            queued = await run.call(_metric, endpoint, "mcloudtt_queued_messages")
            sessions = await run.call(_metric, endpoint, "mcloudtt_sessions")
            run.measurements["dropped_by_reason"] = await run.call(_drops, endpoint)
    finally:
        await stalled.close()
    growth = None if before is None else peak - before
    run.judge(
        "memory_bounded",
        growth is None or growth < MEMORY_BOUND,
        rss_before=before,
        rss_peak=peak,
        rss_growth=growth,
        limit=MEMORY_BOUND,
    )
    run.measurements["dropped"] = None if dropped is None else dropped - (dropped_before or 0.0)
    # Every session's queue stops at --max-queued-messages, the stalled one's included.
    limit = None if sessions is None else int(sessions) * STALLED_QUEUE_LIMIT
    run.judge(
        "queue_bounded",
        queued is None or limit is None or queued <= limit,
        queued=None if queued is None else int(queued),
        sessions=None if sessions is None else int(sessions),
        limit=limit,
    )


STALLED_FILTER = "chaos/data/#"  # the workload's data topics (WorkloadSpec.topic_prefix)
MEMORY_BOUND = 200 * 2**20  # RSS growth allowed while one subscriber is stalled
STALLED_QUEUE_LIMIT = 500  # the scenario's --max-queued-messages


def _storm_endpoints(backend: Backend) -> dict[str, Endpoint]:
    """Where the storm's clients connect. A backend whose client links run through a proxy of
    its own in this process (local: 3 descriptors per client, 10,000 clients would not fit in
    a 20,000 limit) offers `direct_endpoints()`, the brokers' own ports: the storm is about
    the brokers and Redis, not the client links."""
    direct = getattr(backend, "direct_endpoints", None)
    endpoints = direct() if callable(direct) else backend.endpoints()
    return {e.name: e for e in endpoints}


async def _reconnect_storm(run: Run) -> None:
    victim = run.broker(-1)
    # (A dry run's stand-in backend answers every call, this one included, with None.)
    endpoints = (
        {e.name: e for e in run.backend.endpoints()} if run.dry else _storm_endpoints(run.backend)
    )
    others = [e for name, e in endpoints.items() if name != victim]
    count = 0 if run.dry else run.options.storm_clients
    clients = [ProbeClient(endpoints[victim], f"storm-{i}", clean=False) for i in range(count)]
    refused: Counter[int] = Counter()  # CONNACK return codes other than 0, while storming
    present: list[bool] = []
    took = 0.0
    try:
        # Connected a few hundred at a time: the storm is the reconnect, not this.
        for first in range(0, count, 200):
            batch = clients[first : first + 200]
            answers = await asyncio.gather(*(c.connect() for c in batch))
            bad = [c.client_id for c, (_, code) in zip(batch, answers, strict=True) if code]
            if bad:
                raise RuntimeError(f"storm clients refused before the storm: {bad[:5]}")
        run.progress(f"{count} storm clients on {victim}")
        # Their sessions are stored (SESSION_WRITE_DELAY) before the broker dies.
        await run.sleep(1.0)
        async with run.fault("reconnect-storm", victim):
            await run.call(run.backend.kill_broker, victim)
            for c in clients:
                await c.close()
            start = time.monotonic()
            again = [
                ProbeClient(others[i % len(others)], f"storm-{i}", clean=False)
                for i in range(count)
            ]
            clients = again
            done: list[float] = []

            async def back(client: ProbeClient) -> bool:
                answer = await _connect_retrying(
                    client,
                    deadline_s=STORM_DEADLINE_S,
                    refused=refused,
                    connack_timeout_s=STORM_CONNACK_TIMEOUT_S,
                    backoff_cap_s=STORM_BACKOFF_CAP_S,
                )
                if answer is not None:
                    done.append(time.monotonic() - start)
                    present.append(answer)
                return answer is not None

            results = await asyncio.gather(*(back(c) for c in again), return_exceptions=True)
            took = time.monotonic() - start
            done.sort()
            run.measurements["storm_p50_s"] = done[len(done) // 2] if done else None
            run.measurements["storm_p99_s"] = done[int(len(done) * 0.99)] if done else None
            await run.call(run.backend.start_broker, victim)
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    ok = sum(1 for r in results if r is True) if count else 0
    run.judge("storm_reconnected", ok == count, reconnected=ok, clients=count, took_s=took)
    # Each came back to the session the dead broker held (adopted, then handed over): a CONNACK
    # without it would be a session, and its messages, lost.
    kept = sum(present)
    run.judge("storm_sessions_kept", kept == count, kept=kept, clients=count)
    run.measurements["storm_reconnect_s"] = took
    run.measurements["storm_refused"] = {f"0x{code:02x}": n for code, n in sorted(refused.items())}


CONNACK_TIMEOUT_S = 5.0
STORM_CONNACK_TIMEOUT_S = 30.0  # a device waits this long for its CONNACK in a storm
STORM_BACKOFF_CAP_S = 5.0  # and retries a refused CONNECT after at most this (jittered)
STORM_DEADLINE_S = 60.0  # every storm client back by then, or storm_reconnected fails


async def _connect_retrying(
    client: ProbeClient,
    *,
    deadline_s: float,
    refused: Counter[int] | None = None,
    connack_timeout_s: float = CONNACK_TIMEOUT_S,
    backoff_cap_s: float = 1.0,
) -> bool | None:
    """Connect until accepted, with a device's backoff: its CONNACK's session-present flag
    (None: not accepted within the deadline). Refusals are counted in `refused` by code."""
    deadline = time.monotonic() + deadline_s
    delay = 0.05
    while time.monotonic() < deadline:
        try:
            # A broker that takes the TCP connection but never answers is tried again.
            async with asyncio.timeout(connack_timeout_s):
                present, code = await client.connect()
            if code == 0:
                return present
            if refused is not None:
                refused[code] += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        await client.close()
        # Jittered, capped doubling, as devices do: refused clients do not come back in step.
        await asyncio.sleep(random.uniform(delay / 2, delay))
        delay = min(backoff_cap_s, delay * 2)
    return None


# ---------------------------------------------------------------------------- the list

SESSION_LOSS = (
    "Redis came back empty: the sessions, inbox streams and retained messages it held are gone "
    "by design; counted, not judged"
)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="brokers-before-redis",
            summary="every broker starts, Redis only N s later: brokers stay up, serve local "
            "clients, /readyz says why, ready within 2 s of Redis",
            cluster=ClusterSpec(redis_first=False),
            fault=_brokers_before_redis,
            seconds=4.0,
            warmup_s=0.5,
            measures=(
                "no_lost_before_ready",
                "brokers_stay_up",
                "readyz_says_why",
                "serves_local_clients",
                "ready_within_2s",
            ),
        ),
        Scenario(
            name="redis-restart",
            summary="Redis SIGKILLed, restarted with its AOF",
            fault=_redis_restart,
            seconds=3.0,
        ),
        Scenario(
            name="redis-freeze",
            summary="Redis SIGSTOPped past every timeout (presence TTL 3 s), then SIGCONT",
            cluster=SHORT_PRESENCE,
            fault=_redis_freeze,
            seconds=6.0,
        ),
        Scenario(
            name="redis-data-loss",
            summary="Redis comes back empty, as after a failover that lost recent writes",
            fault=_redis_data_loss,
            seconds=2.0,
            skip={
                "no_lost": SESSION_LOSS,
                "sessions_kept": SESSION_LOSS,
                "retained_equal": SESSION_LOSS,
            },
        ),
        Scenario(
            name="broker-kill",
            summary="SIGKILL of a broker holding persistent sessions, traffic in flight; its "
            "clients reconnect elsewhere at once",
            cluster=AWAY_PRESENCE,
            fault=_broker_kill,
            seconds=3.0,
        ),
        Scenario(
            name="broker-kill-after-expiry",
            summary="as broker-kill, but its clients come back only after its presence expired",
            cluster=AWAY_PRESENCE,
            fault=_broker_kill_after_expiry,
            seconds=6.0,
        ),
        Scenario(
            name="broker-restart-same-id",
            summary="a broker SIGKILLed and started again at once under the same id (a "
            "StatefulSet pod)",
            cluster=AWAY_PRESENCE,
            fault=_broker_restart_same_id,
            seconds=2.0,
        ),
        Scenario(
            name="rolling-restart",
            summary="each broker SIGTERMed (drained) and restarted in turn",
            cluster=ClusterSpec(broker_args=("--drain-timeout", "2")),
            fault=_rolling_restart,
            seconds=3.0,
        ),
        Scenario(
            name="partition",
            summary="a broker cut from Redis while its clients reach it; a broker cut from its "
            "clients",
            cluster=SHORT_PRESENCE,
            fault=_partition,
            seconds=5.0,
            measures=("serves_clients_while_cut",),
            skip={
                "wills": "a DISCONNECT a client sends into the cut never reaches the broker, "
                "whose keepalive then rightly publishes the will (MQTT-3.1.2-8): the history "
                "cannot tell which the broker saw"
            },
        ),
        Scenario(
            name="slow-link",
            summary="latency 100±50 ms, 20 kB/s, 8-byte slices between one broker and Redis",
            fault=_slow_link,
            seconds=9.0,
        ),
        Scenario(
            name="slow-consumer",
            summary="a subscriber stops reading: the broker's memory stays bounded, drops counted",
            # A small inflight window: the stalled session's queue fills, and overflows, soon.
            cluster=ClusterSpec(
                broker_args=(
                    "--max-queued-messages",
                    str(STALLED_QUEUE_LIMIT),
                    "--max-inflight",
                    "100",
                )
            ),
            # Big enough that the socket buffers cannot hide the backlog: the queue overflows.
            load={"payload_size": 4000, "rate": 300.0},
            fault=_slow_consumer,
            seconds=6.0,
            measures=("memory_bounded", "queue_bounded"),
        ),
        Scenario(
            name="reconnect-storm",
            summary="thousands of persistent clients of a killed broker reconnect at once "
            "(--storm-clients, 2,000 by default)",
            cluster=AWAY_PRESENCE,
            fault=_reconnect_storm,
            # The workload's own clients wait for their CONNACK as the storm's do (paho also
            # gives up on it after its keepalive), rather than hop to another broker while
            # their session is still on its way.
            load={
                "connect_timeout": STORM_CONNACK_TIMEOUT_S,
                "keepalive": int(STORM_CONNACK_TIMEOUT_S),
            },
            seconds=1.0,
            measures=("storm_reconnected", "storm_sessions_kept"),
        ),
    )
}


def resolve(names: list[str]) -> list[Scenario]:
    """Scenarios by name (`all`: every one); KeyError names the first unknown one."""
    if names == ["all"]:
        return list(SCENARIOS.values())
    out = []
    for name in names:
        if name not in SCENARIOS:
            raise KeyError(name)
        out.append(SCENARIOS[name])
    return out


# ---------------------------------------------------------------------------- running


@dataclass
class ScenarioResult:
    scenario: str
    backend: str
    report: Report | None
    measurements: dict[str, Any]
    skipped: dict[str, str]
    history: Path | None
    duration_s: float
    error: str | None = None
    load_ignored: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.error is None and self.report is not None and self.report.passed

    def to_json(self) -> dict[str, Any]:
        report = self.report.to_json() if self.report is not None else {}
        return {
            "scenario": self.scenario,
            "backend": self.backend,
            "passed": self.passed,
            "error": self.error,
            "duration_s": round(self.duration_s, 3),
            "history": str(self.history) if self.history else None,
            "skipped": dict(self.skipped),
            "measurements": _jsonable(self.measurements),
            "load_ignored": list(self.load_ignored),
            **report,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 4)
    return value


def default_workload() -> WorkloadFactory:
    from mcloudtt_chaos import workload as module

    spec_type = module.WorkloadSpec
    names = {f.name for f in dataclasses.fields(spec_type)}

    def factory(
        endpoints: list[Endpoint], writer: HistoryWriter, load: Mapping[str, Any]
    ) -> WorkloadLike:
        spec = spec_type(**{k: v for k, v in load.items() if k in names})
        return module.Workload(endpoints, writer, spec)

    factory.accepts = names  # type: ignore[attr-defined]
    return factory


def judge(
    records: list[Record],
    skip: Mapping[str, str],
    excluded: Mapping[str, str] = {},
    *,
    split_at: float | None = None,
    split_name: str = "no_lost_before",
    split_judged: bool = True,
) -> Report:
    """The checker over a history, without the clients a scenario excluded (and why).

    With `split_at`, messages sent before it are judged apart: `no_lost` (and every other
    invariant) covers the later ones, and `split_name` is the `no_lost` of the earlier ones;
    `lost` lists both."""
    if excluded:
        records = [r for r in records if not _involves(r, excluded)]
    if split_at is None:
        return check(records, skip=set(skip))
    early = {(r.publisher, r.seq) for r in records if isinstance(r, Sent) and r.t < split_at}

    def keep(record: Record, want_early: bool) -> bool:
        if isinstance(record, Sent | Acked | Delivered):
            return ((record.publisher, record.seq) in early) == want_early
        return True

    report = check([r for r in records if keep(r, False)], skip=set(skip))
    before = check([r for r in records if keep(r, True)], skip=set(skip))
    verdict = before.invariants["no_lost"]
    verdict.name = split_name
    if not split_judged:  # counted and shown, not a reason to fail
        verdict.judged, verdict.passed = False, True
    report.invariants[split_name] = verdict
    report.lost = sorted([*report.lost, *before.lost])
    return report


# A SUBACK is one broker's answer; the other brokers learn the filter a moment later, and a
# message published on one of them in that moment misses it. Counted, not judged: the
# scenarios judge what a fault does, not the start.
STARTUP_SPLIT = "no_lost_at_startup"


def _filters_converged(endpoints: list[Endpoint], timeout: float) -> float | None:
    """When every broker routes the same number of distinct filters (None: not in time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = set()
        for endpoint in endpoints:
            try:
                metrics = scrape(endpoint.http_port, host=endpoint.host, timeout=1.0)
            except OSError:
                counts.add(-1)
                continue
            counts.add(
                int(
                    metrics.value("mcloudtt_cluster_local_filters")
                    + metrics.value("mcloudtt_cluster_remote_filters")
                )
            )
        if len(counts) == 1 and -1 not in counts:
            return time.monotonic()
        time.sleep(0.02)
    return None


def _involves(record: Record, clients: Mapping[str, str]) -> bool:
    for attr in ("client", "subscriber", "watcher"):
        if getattr(record, attr, None) in clients:
            return True
    return False


async def run_scenario(
    scenario: Scenario,
    backend: Backend,
    options: RunOptions = RunOptions(),
    *,
    workload_factory: WorkloadFactory | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> ScenarioResult:
    """Run one scenario on a backend that is not set up yet; it is torn down at the end."""
    started = time.monotonic()
    workdir = options.workdir or Path(".")
    workdir.mkdir(parents=True, exist_ok=True)
    history_path = workdir / f"{scenario.name}.history.jsonl"
    history_path.unlink(missing_ok=True)
    seconds = options.seconds if options.seconds is not None else scenario.seconds
    cluster = scenario.cluster
    if options.brokers is not None:
        cluster = dataclasses.replace(cluster, brokers=options.brokers)
    load: dict[str, Any] = dict(scenario.load)
    load.setdefault("seed", options.seed)
    if options.rate is not None:
        load["rate"] = options.rate
    factory = workload_factory or default_workload()
    accepts = getattr(factory, "accepts", None)
    ignored = sorted(k for k in load if accepts is not None and k not in accepts)
    result = ScenarioResult(
        scenario=scenario.name,
        backend=backend.name,
        report=None,
        measurements={},
        skipped=dict(scenario.skip),
        history=history_path,
        duration_s=0.0,
        load_ignored=ignored,
    )
    if hasattr(backend, "workdir") and backend.workdir is None:
        backend.workdir = workdir / scenario.name  # its logs kept next to the history
    if hasattr(backend, "seed") and backend.seed is None:
        backend.seed = options.seed  # the toxics' jitter and slice sizes
    writer = HistoryWriter(history_path)
    workload: WorkloadLike | None = None
    run: Run | None = None
    # Here, on the loop's thread (the main one from the CLI), not in `setup`'s worker thread,
    # where no signal handler can be set: a SIGTERM then unwinds through the `finally` below,
    # which tears the cluster down, instead of killing us and leaving it running.
    unwind_on_signals()
    try:
        progress(f"setting up {cluster.brokers} brokers on {backend.name}")
        await asyncio.to_thread(backend.setup, cluster)
        workload = factory(backend.endpoints(), writer, load)
        run = Run(scenario, backend, workload, options, seconds, progress)
        progress("workload starting")
        await _call(workload.start)
        started_at = time.monotonic()
        converged = (
            await asyncio.to_thread(_filters_converged, backend.endpoints(), 10.0)
            if cluster.redis_first  # without Redis the brokers cannot know each other's
            else None
        )
        run.measurements["filters_converged_s"] = (
            None if converged is None else round(converged - started_at, 3)
        )
        # What was published before every broker knew every filter is counted apart.
        run.split_at, run.split_name = converged or time.monotonic(), STARTUP_SPLIT
        await asyncio.sleep(scenario.warmup_s)
        await scenario.fault(run)
        await asyncio.sleep(scenario.settle_s)
        progress("draining")
        await _call(workload.stop_publishing)
        drained = await _call(workload.drain, options.drain_s)
        run.measurements["drained"] = drained is not False
        await _call(workload.snapshot, backend.endpoints())
    except Exception as error:  # the run's verdict, not a crash of the whole command
        result.error = f"{type(error).__name__}: {error}"
    finally:
        if workload is not None:
            try:
                await _call(workload.stop)
                counters = getattr(workload, "counters_json", None)
                if callable(counters) and run is not None:
                    run.measurements["workload"] = counters()
            except Exception as error:
                result.error = result.error or f"workload stop: {type(error).__name__}: {error}"
        writer.close()
        progress("tearing down")
        await asyncio.to_thread(backend.teardown)
    excluded = run.excluded_clients if run is not None else {}
    report = judge(
        read_history(history_path),
        scenario.skip,
        excluded,
        split_at=run.split_at if run is not None else None,
        split_name=run.split_name if run is not None else "",
        split_judged=run.split_name != STARTUP_SPLIT if run is not None else True,
    )
    if run is not None:
        for verdict in run.verdicts:
            report.invariants[verdict.name] = verdict
        result.measurements = run.measurements
        if excluded:
            result.measurements["excluded_clients"] = dict(excluded)
    result.report = report
    result.duration_s = time.monotonic() - started
    return result


# ---------------------------------------------------------------------------- dry run


class _PlanRecorder:
    """A stand-in backend for `--dry-run`: every call is written down, nothing is done. A real
    backend that can say what a call would run (kind: the kubectl commands) offers
    `describe(call, *args) -> list[str]`, and those lines are shown under the call."""

    def __init__(self, real: Backend, brokers: int, lines: list[str]) -> None:
        self.name = real.name
        self._real = real
        self._brokers = brokers
        self._lines = lines

    def _record(self, call: str, *args: Any, **kwargs: Any) -> None:
        shown = ", ".join([*(repr(a) for a in args), *(f"{k}={v!r}" for k, v in kwargs.items())])
        self._lines.append(f"{call}({shown})")
        describe = getattr(self._real, "describe", None)
        if callable(describe):
            self._lines.extend(f"    {line}" for line in describe(call, *args, **kwargs))

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(name=f"b{i}", host="127.0.0.1", mqtt_port=0, http_port=0)
            for i in range(self._brokers)
        ]

    def readyz(self, broker: str) -> tuple[int, str]:
        return 200, "ready"

    def __getattr__(self, call: str) -> Callable[..., None]:
        if call.startswith("_"):
            raise AttributeError(call)
        return lambda *args, **kwargs: self._record(call, *args, **kwargs)


class _PlanWorkload:
    def __init__(self, lines: list[str]) -> None:
        self._lines = lines

    def start(self) -> None:
        self._lines.append("workload start")

    def fault_start(self, name: str, target: str = "") -> None:
        self._lines.append(f"-- fault {name} {target} begins".replace("  ", " "))

    def fault_end(self, name: str, target: str = "") -> None:
        self._lines.append(f"-- fault {name} {target} ends".replace("  ", " "))

    def stop_publishing(self) -> None: ...
    def drain(self, timeout: float) -> None: ...
    def snapshot(self, endpoints: list[Endpoint]) -> None: ...
    def stop(self) -> None: ...


async def plan(
    scenario: Scenario, backend: Backend, options: RunOptions = RunOptions()
) -> list[str]:
    """What `run_scenario` would do, call by call, without doing it (`--dry-run`)."""
    cluster = scenario.cluster
    if options.brokers is not None:
        cluster = dataclasses.replace(cluster, brokers=options.brokers)
    lines: list[str] = []
    recorder = _PlanRecorder(backend, cluster.brokers, lines)
    recorder._record("setup", cluster)
    workload = _PlanWorkload(lines)
    seconds = options.seconds if options.seconds is not None else scenario.seconds
    run = Run(
        scenario,
        recorder,  # records every Backend call (a Backend by its __getattr__)
        workload,
        options,
        seconds,
        progress=lambda text: lines.append(f"   {text}") if text.startswith("sleep") else None,
        dry=True,
    )
    workload.start()
    await run.sleep(scenario.warmup_s)
    await scenario.fault(run)
    await run.sleep(scenario.settle_s)
    lines.append("workload drain, snapshot, stop")
    recorder._record("teardown")
    return lines
