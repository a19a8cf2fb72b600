"""Prometheus text exposition for the adapter (counters, gauges, histograms; no dependency)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in sorted(labels.items())
    )
    return "{" + inner + "}"


class Histogram:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.count += n
        self.sum += value * n


class Metrics:
    """A small registry. Names are full Prometheus names; help text is given once per name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self._histograms: dict[str, dict[tuple[tuple[str, str], ...], Histogram]] = {}
        self._callbacks: list[Callable[[], dict[str, float]]] = []

    def describe(self, name: str, kind: str, help_text: str) -> None:
        self._help[name] = (kind, help_text)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values.setdefault(name, {})
            series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values.setdefault(name, {})[key] = value

    def observe(
        self,
        name: str,
        value: float,
        n: int = 1,
        bounds: tuple[float, ...] = LATENCY_BUCKETS,
        **labels: str,
    ) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._histograms.setdefault(name, {})
            hist = series.get(key)
            if hist is None:
                hist = series[key] = Histogram(bounds)
            hist.observe(value, n)

    def observe_counts(
        self, name: str, bounds: tuple[float, ...], counts: list[int], total: float, **labels: str
    ) -> None:
        """Merge precounted bucket counts (len(bounds) + 1 of them) into a histogram."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._histograms.setdefault(name, {})
            hist = series.get(key)
            if hist is None:
                hist = series[key] = Histogram(bounds)
            for i, c in enumerate(counts):
                hist.counts[i] += c
            hist.count += sum(counts)
            hist.sum += total

    def value(self, name: str, **labels: str) -> float:
        key = tuple(sorted(labels.items()))
        with self._lock:
            return self._values.get(name, {}).get(key, 0.0)

    def total(self, name: str) -> float:
        with self._lock:
            return sum(self._values.get(name, {}).values())

    def add_callback(self, callback: Callable[[], dict[str, float]]) -> None:
        """A callback returning {name: value} gauges, read at each scrape."""
        self._callbacks.append(callback)

    def render(self) -> str:
        for callback in self._callbacks:
            for name, value in callback().items():
                self.set(name, value)
        lines: list[str] = []
        with self._lock:
            names = sorted(set(self._values) | set(self._histograms) | set(self._help))
            for name in names:
                kind, help_text = self._help.get(name, ("untyped", ""))
                if name not in self._values and name not in self._histograms:
                    if kind == "counter":
                        lines.append(f"# HELP {name} {help_text}")
                        lines.append(f"# TYPE {name} {kind}")
                        lines.append(f"{name} 0")
                    continue
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                for key, value in sorted(self._values.get(name, {}).items()):
                    lines.append(f"{name}{_labels(dict(key))} {value:g}")
                for key, hist in sorted(self._histograms.get(name, {}).items()):
                    base = dict(key)
                    running = 0
                    for bound, count in zip(hist.bounds, hist.counts, strict=False):
                        running += count
                        lines.append(
                            f"{name}_bucket{_labels({**base, 'le': f'{bound:g}'})} {running}"
                        )
                    lines.append(f"{name}_bucket{_labels({**base, 'le': '+Inf'})} {hist.count}")
                    lines.append(f"{name}_sum{_labels(base)} {hist.sum:g}")
                    lines.append(f"{name}_count{_labels(base)} {hist.count}")
        return "\n".join(lines) + "\n"


def standard_metrics() -> Metrics:
    m = Metrics()
    m.describe("mcloudtt_adapter_rows_in_total", "counter", "messages received, per source")
    m.describe("mcloudtt_adapter_rows_out_total", "counter", "rows committed, per sink")
    m.describe("mcloudtt_adapter_acked_total", "counter", "messages acknowledged to their source")
    m.describe("mcloudtt_adapter_batches_total", "counter", "batches committed, per sink")
    m.describe("mcloudtt_adapter_batch_seconds", "histogram", "time to commit one batch")
    m.describe("mcloudtt_adapter_batch_rows", "histogram", "rows per committed batch")
    m.describe("mcloudtt_adapter_sink_errors_total", "counter", "failed sink calls, per kind")
    m.describe("mcloudtt_adapter_retries_total", "counter", "sink calls retried after an error")
    m.describe("mcloudtt_adapter_dead_letter_total", "counter", "rows the sink rejected")
    m.describe(
        "mcloudtt_adapter_bad_messages_total", "counter", "source messages that did not parse"
    )
    m.describe(
        "mcloudtt_adapter_lag_seconds", "histogram", "commit time minus receive time, per row"
    )
    m.describe(
        "mcloudtt_adapter_event_lag_seconds", "gauge", "now minus the newest committed event time"
    )
    m.describe("mcloudtt_adapter_pending", "gauge", "messages received and not yet committed")
    m.describe("mcloudtt_adapter_source_connected", "gauge", "1 when the source is connected")
    m.describe(
        "mcloudtt_adapter_stream_pending", "gauge", "entries delivered to the group, not acked"
    )
    return m
