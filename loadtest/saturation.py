"""Saturation search: a locust load shape that adds users step by step until the broker no longer
keeps up, then reports the highest rate that held.

    locust -f loadtest/locustfile.py,loadtest/saturation.py --headless --scenario fan-in \
        --host mqtt://127.0.0.1:1883 --sat-step-users 200 --sat-step-time 20 --sat-p99-ms 50

Its own file because locust uses any shape class it finds in a locustfile: the plain locustfile
keeps -u/-r/-t. Each step runs --sat-step-time seconds with --sat-step-users more users (spawned
at --sat-spawn-rate); at the end of a step the step's own messages are judged (the RECV entries'
counts and latency histogram, differenced against the previous step): the step holds when
nothing was lost, no request failed and the p99 end-to-end latency is within --sat-p99-ms. The
first step that does not hold ends the test; the result is the last step that held, its users,
received and published msg/s. It is printed and written to --sat-out (JSON). In distributed
runs the master judges on the statistics the workers report every few seconds: keep the steps
well over that (20 s or more).

The connect and reconnect storms receive no messages: for them (`--sat-measure connect`, the
default there) a step is judged on its CONNECT entries instead (connects per second, the p99 time
to CONNACK, failures); the retained scenario on its RETAINED entries (`--sat-measure retained`:
the p99 time from SUBSCRIBE to the last retained message). Each step also records the CPU the locust processes used (`locust_cpu`,
share of one core per process; in distributed runs the workers' own figure, which they refresh
every 10 s) and the message operations per locust process, so a step that broke because locust
itself ran out of CPU shows as such. `mcloudtt-saturate` runs this shape per
scenario against fresh brokers and tabulates the results.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections import Counter
from typing import Any

from locust import LoadTestShape, events
from locust.runners import MasterRunner

log = logging.getLogger("mqtt-saturation")


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    group = parser.add_argument_group("Saturation search (loadtest/saturation.py)")
    group.add_argument(
        "--sat-start-users",
        env_var="LOCUST_SAT_START_USERS",
        type=int,
        default=0,
        help="users of the first step (default: one step)",
    )
    group.add_argument(
        "--sat-step-users",
        env_var="LOCUST_SAT_STEP_USERS",
        type=int,
        default=100,
        help="users added per step",
    )
    group.add_argument(
        "--sat-step-time",
        env_var="LOCUST_SAT_STEP_TIME",
        type=float,
        default=20.0,
        help="seconds per step",
    )
    group.add_argument(
        "--sat-spawn-rate",
        env_var="LOCUST_SAT_SPAWN_RATE",
        type=float,
        default=100.0,
        help="users started per second",
    )
    group.add_argument(
        "--sat-max-users",
        env_var="LOCUST_SAT_MAX_USERS",
        type=int,
        default=100_000,
        help="stop here if it still holds",
    )
    group.add_argument(
        "--sat-p99-ms",
        env_var="LOCUST_SAT_P99_MS",
        type=float,
        default=100.0,
        help="p99 end-to-end latency bound",
    )
    group.add_argument(
        "--sat-measure",
        env_var="LOCUST_SAT_MEASURE",
        choices=("auto", "recv", "connect", "retained"),
        default="auto",
        help="p99 of: end-to-end latency, CONNACK time, or SUBSCRIBE to the last retained "
        "message (auto: connect for the storms, retained for retained)",
    )
    group.add_argument(
        "--sat-out",
        env_var="LOCUST_SAT_OUT",
        default="reports/saturation.json",
        help="the result as JSON",
    )


STORMS = ("connect-storm", "reconnect-storm")


def snapshot(stats: Any) -> dict[str, Any]:
    """What the step judgement needs from locust's statistics: the RECV entries (summed) and the
    CONNECT entries (summed), published and failed counts."""
    recv: Counter[int] = Counter()
    connect: Counter[int] = Counter()
    retained: Counter[int] = Counter()
    received = lost = published = connects = 0
    for (name, method), entry in stats.entries.items():
        if method == "RECV" and name != "duplicate":
            recv.update(entry.response_times)
            received += entry.num_requests - entry.num_failures
            lost += entry.num_failures
        elif method == "PUBLISH":
            published += entry.num_requests - entry.num_failures
        elif method == "CONNECT":
            connect.update(entry.response_times)
            connects += entry.num_requests - entry.num_failures
        elif method == "RETAINED":
            retained.update(entry.response_times)
    return {
        "hist": recv,
        "connect_hist": connect,
        "retained_hist": retained,
        "received": received,
        "lost": lost,
        "published": published,
        "connects": connects,
        "failures": stats.total.num_failures,
    }


def percentile(hist: Counter[int], q: float) -> float:
    """The q-quantile of a locust response-time histogram (rounded ms -> count)."""
    total = sum(v for v in hist.values() if v > 0)
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for ms in sorted(hist):
        seen += max(hist[ms], 0)
        if seen >= rank:
            return float(ms)
    return float(max(hist))


def judge(
    before: dict[str, Any],
    after: dict[str, Any],
    seconds: float,
    bound_ms: float,
    measure: str = "recv",
) -> dict[str, Any]:
    """One step's figures and whether it held."""
    key = {"connect": "connect_hist", "retained": "retained_hist"}.get(measure, "hist")
    hist = after[key].copy()
    hist.subtract(before[key])
    step = {
        "measure": measure,
        "received_per_s": (after["received"] - before["received"]) / seconds,
        "published_per_s": (after["published"] - before["published"]) / seconds,
        "connects_per_s": (after["connects"] - before["connects"]) / seconds,
        "lost": after["lost"] - before["lost"],
        "failures": after["failures"] - before["failures"],
        "p99_ms": percentile(hist, 0.99),
        "p50_ms": percentile(hist, 0.50),
    }
    reasons = []
    if step["lost"]:
        reasons.append(f"{step['lost']} lost")
    if step["failures"]:
        reasons.append(f"{step['failures']} failed requests")
    if step["p99_ms"] > bound_ms:
        what = {"connect": "CONNACK", "retained": "all-retained"}.get(measure, "end-to-end")
        reasons.append(f"p99 {what} {step['p99_ms']:.0f} ms > {bound_ms:g} ms")
    if measure != "connect" and not step["received_per_s"]:
        reasons.append("nothing received")
    step["held"] = not reasons
    step["why_not"] = ", ".join(reasons)
    return step


def rate_of(step: dict[str, Any]) -> float:
    """The rate a step is ranked by: connects/s for the storms, received msg/s otherwise."""
    return float(step["connects_per_s" if step.get("measure") == "connect" else "received_per_s"])


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class SaturationShape(LoadTestShape):
    """Steps of users until a step loses messages or its p99 exceeds the bound."""

    def __init__(self) -> None:
        super().__init__()
        self._step = -1
        self._before: dict[str, Any] | None = None
        self._mark = (0.0, 0.0)  # (monotonic time, this process's CPU seconds) at the step start
        self.steps: list[dict[str, Any]] = []
        self.result: dict[str, Any] | None = None

    def _opts(self) -> Any:
        return self.runner.environment.parsed_options

    def scenario(self) -> str:
        opts = self._opts()
        if getattr(opts, "scenario", ""):
            return str(opts.scenario)
        tags = [t for t in (getattr(opts, "tags", None) or []) if t]
        return tags[0] if tags else "fan-in"

    def measure(self) -> str:
        chosen = str(self._opts().sat_measure)
        if chosen != "auto":
            return chosen
        if self.scenario() in STORMS:
            return "connect"
        return "retained" if self.scenario() == "retained" else "recv"

    def users_at(self, step: int) -> int:
        opts = self._opts()
        first = opts.sat_start_users or opts.sat_step_users
        return min(first + step * opts.sat_step_users, opts.sat_max_users)

    def _locust_load(self, seconds: float, cpu: float) -> tuple[float, int]:
        """(CPU share of one core per locust process over the step, processes generating)."""
        if isinstance(self.runner, MasterRunner):
            # The workers report their CPU use every few seconds (psutil, percent).
            usages = [w.cpu_usage for w in self.runner.clients.values()]
            return (sum(usages) / len(usages) / 100 if usages else 0.0), max(len(usages), 1)
        return cpu / seconds if seconds > 0 else 0.0, 1

    def tick(self) -> tuple[int, float] | None:
        opts = self._opts()
        step = int(self.get_run_time() // opts.sat_step_time)
        if step != self._step:
            now = snapshot(self.runner.stats)
            mark = (time.monotonic(), _process_cpu())
            if self._step >= 0 and self._before is not None:
                seconds = mark[0] - self._mark[0]
                figures = judge(self._before, now, seconds, opts.sat_p99_ms, self.measure())
                figures["users"] = self.users_at(self._step)
                figures["seconds"] = seconds
                share, processes = self._locust_load(seconds, mark[1] - self._mark[1])
                figures["locust_processes"] = processes
                figures["locust_cpu"] = share
                ops = figures["received_per_s"] + figures["published_per_s"]
                figures["msg_ops_per_s_per_process"] = ops / processes
                figures["users_per_process"] = figures["users"] / processes
                self.steps.append(figures)
                log.info("saturation step %d: %s", self._step, figures)
                at_max = self.users_at(self._step) >= opts.sat_max_users
                if not figures["held"] or at_max:
                    self.finish(figures if not figures["held"] else None)
                    return None
            self._step, self._before, self._mark = step, now, mark
        return self.users_at(step), opts.sat_spawn_rate

    def finish(self, broke: dict[str, Any] | None) -> None:
        held = [s for s in self.steps if s["held"]]
        best = max(held, key=lambda s: (rate_of(s), s["users"])) if held else None
        opts = self._opts()
        self.result = {
            "scenario": self.scenario(),
            "measure": self.measure(),
            "bound_p99_ms": opts.sat_p99_ms,
            "step_time_s": opts.sat_step_time,
            "highest_held": best,
            "first_failed": broke,
            "steps": self.steps,
        }
        if best is None:
            line = f"SATURATION: no step held ({broke['why_not'] if broke else 'no steps'})"
        elif best["measure"] == "connect":
            line = (
                f"SATURATION: highest sustained rate {best['connects_per_s']:.0f} connects/s"
                f" with {best['users']} users, p99 CONNACK {best['p99_ms']:.0f} ms"
            )
        else:
            line = (
                f"SATURATION: highest sustained rate {best['received_per_s']:.0f} msg/s received"
                f" ({best['published_per_s']:.0f} msg/s published) with {best['users']} users,"
                f" p99 {best['p99_ms']:.0f} ms"
            )
        if best is not None:
            line += (
                f"; next step: {broke['why_not']}"
                if broke
                else "; still holding at --sat-max-users"
            )
        print(line, flush=True)
        log.info(line)
        if opts.sat_out:
            os.makedirs(os.path.dirname(opts.sat_out) or ".", exist_ok=True)
            with open(opts.sat_out, "w") as handle:
                json.dump(self.result, handle, indent=2, default=float)
