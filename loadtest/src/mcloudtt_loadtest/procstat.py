"""Broker CPU time and memory from /proc, and the generator's own CPU use.

A broker may run helper processes, so figures cover the process and all its descendants.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from mcloudtt_chaos.procs import raise_nofile_limit

__all__ = ["raise_nofile_limit"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name is in parentheses and may hold spaces; fields follow the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out = [pid]
    i = 0
    while i < len(out):
        out.extend(children.get(out[i], ()))
        i += 1
    return out


def cpu_seconds(pid: int, *, tree: bool = True) -> float:
    """utime + stime of `pid` (and its descendants), in seconds."""
    total = 0
    for p in descendants(pid) if tree else [pid]:
        try:
            fields = _stat_fields(p)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


def rss_bytes(pid: int, *, tree: bool = True) -> int:
    """VmRSS of `pid` (and its descendants)."""
    total = 0
    for p in descendants(pid) if tree else [pid]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def machine_cpu_seconds() -> tuple[float, float]:
    """(user + nice + system, steal) of the whole machine from /proc/stat, in seconds. Process
    utime and stime add up to the first, so the difference is everybody else's share."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system = (int(x) for x in fields[:3])
    steal = int(fields[7]) if len(fields) > 7 else 0
    return (user + nice + system) / CLK_TCK, steal / CLK_TCK


@dataclass
class Usage:
    """CPU used over a window: by a broker, by this process, by every other process on the
    machine (a busy neighbour makes every figure of the window suspect), stolen by the host."""

    wall: float
    broker_cpu: float
    generator_cpu: float
    other_cpu: float = 0.0
    steal: float = 0.0

    @property
    def other_core_share(self) -> float:
        return (self.other_cpu + self.steal) / self.wall if self.wall > 0 else 0.0

    @property
    def generator_core_share(self) -> float:
        return self.generator_cpu / self.wall if self.wall > 0 else 0.0

    @property
    def broker_core_share(self) -> float:
        return self.broker_cpu / self.wall if self.wall > 0 else 0.0


class UsageMeter:
    """Start at `start()`, read with `stop()`: wall time, broker CPU, generator CPU."""

    def __init__(self, broker_pid: int) -> None:
        self.pid = broker_pid
        self._t0 = 0.0
        self._b0 = 0.0
        self._g0 = 0.0
        self._m0 = (0.0, 0.0)

    def start(self) -> None:
        self._m0 = machine_cpu_seconds()
        self._t0 = time.perf_counter()
        self._b0 = cpu_seconds(self.pid)
        self._g0 = time.process_time()

    def stop(self) -> Usage:
        wall = time.perf_counter() - self._t0
        broker = cpu_seconds(self.pid) - self._b0
        generator = time.process_time() - self._g0
        busy, steal = machine_cpu_seconds()
        return Usage(
            wall=wall,
            broker_cpu=broker,
            generator_cpu=generator,
            # Tick granularity can make this slightly negative on a quiet machine.
            other_cpu=max(0.0, busy - self._m0[0] - broker - generator),
            steal=steal - self._m0[1],
        )
