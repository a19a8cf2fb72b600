"""The adapter's counters, gauges and histograms, exposed through prometheus-client.

The pipeline counts into plain dictionaries (one lock, no per-series objects); `collect()` turns
them into prometheus-client metric families when Prometheus scrapes.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

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
        # Private, not prometheus-client's process-wide default registry.
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(self))

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

    def families(self) -> Iterator[Metric]:
        """The prometheus-client view of the registry, built at each scrape."""
        for callback in self._callbacks:
            for name, value in callback().items():
                self.set(name, value)
        with self._lock:
            values = {name: dict(series) for name, series in self._values.items()}
            histograms = {
                name: {key: (h.bounds, list(h.counts), h.count, h.sum) for key, h in series.items()}
                for name, series in self._histograms.items()
            }
            described = dict(self._help)
        for name in sorted(set(values) | set(histograms) | set(described)):
            kind, help_text = described.get(name, ("unknown", ""))
            # prometheus-client names a counter's family without _total and adds it back on
            # every exposed line, so the names stay as documented.
            family = Metric(
                name.removesuffix("_total") if kind == "counter" else name, help_text, kind
            )
            # A counter nobody incremented is 0; a gauge or histogram nobody set yet is declared
            # without samples (no made-up value).
            series = values.get(name) or ({(): 0.0} if kind == "counter" else {})
            for key, value in sorted(series.items()):
                family.add_sample(name, dict(key), value)
            for key, (bounds, counts, count, total) in sorted(histograms.get(name, {}).items()):
                base = dict(key)
                running = 0
                for bound, n in zip(bounds, counts, strict=False):
                    running += n
                    # `le` as today ("1", not "1.0"), so existing series keep their identity.
                    family.add_sample(f"{name}_bucket", {**base, "le": f"{bound:g}"}, running)
                family.add_sample(f"{name}_bucket", {**base, "le": "+Inf"}, count)
                family.add_sample(f"{name}_sum", base, total)
                family.add_sample(f"{name}_count", base, count)
            yield family

    def exposition(self) -> bytes:
        """Prometheus text format 0.0.4 from a private registry; counts of any size exact."""
        return generate_latest(self._registry)

    def render(self) -> str:
        return self.exposition().decode()


class _Collector(Collector):
    # A separate object: the registry would take `Metrics.describe` for its own describe().
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self.metrics.families()


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
