"""The pipeline on the in-memory sink: ack after commit, retries, backpressure, drain."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from brokerproc import parse_metric
from mcloudtt_adapter.pipeline import Pipeline
from mcloudtt_adapter.records import Record
from mcloudtt_adapter.sinks.base import MemorySink, SinkError, WriteResult


class FakeSource:
    """A push source: `push(n)` submits n records; acks and pauses are recorded."""

    name = "fake"

    def __init__(self) -> None:
        self.pipeline: Pipeline | None = None
        self.acked: list[Any] = []
        self.paused = False
        self.pauses = 0
        self.closed = False
        self.n = 0

    def attach(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def run(self) -> None:
        pass

    def pause(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume(self) -> None:
        self.paused = False

    def ack(self, tokens: list[Any]) -> None:
        self.acked.extend(tokens)

    def stop_receiving(self) -> None:
        pass

    async def close(self) -> None:
        self.closed = True

    @property
    def connected(self) -> bool:
        return True

    def push(self, n: int) -> list[int]:
        assert self.pipeline is not None
        tokens = list(range(self.n, self.n + n))
        self.pipeline.submit(
            [
                Record(
                    self,
                    t,
                    f"m{t}",
                    "devices/d1/env",
                    b'{"v": %d}' % t,
                    1,
                    False,
                    1_767_225_600_000_000 + t,
                )
                for t in tokens
            ]
        )
        self.n += n
        return tokens


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)


def make(sink: Any, **kw: Any) -> tuple[Pipeline, FakeSource]:
    options = {
        "batch_rows": 100,
        "batch_delay": 0.05,
        "linger": 0.005,
        "max_pending": 1000,
        "retry_base": 0.01,
        "retry_cap": 0.05,
    }
    options.update(kw)
    pipeline = Pipeline(sink, **options)
    source = FakeSource()
    pipeline.add_source(source)
    return pipeline, source


def test_acknowledged_only_after_commit_and_in_order() -> None:
    class Gate(MemorySink):
        def __init__(self) -> None:
            super().__init__()
            self.gate = __import__("threading").Event()

        def write(self, batch: Any) -> WriteResult:
            self.gate.wait(5)
            return super().write(batch)

    async def main() -> None:
        sink = Gate()
        pipeline, source = make(sink)
        pipeline.start()
        tokens = source.push(250)
        await asyncio.sleep(0.2)
        assert source.acked == []  # the sink has not committed: nothing acknowledged
        assert sink.rows == []
        sink.gate.set()
        await _until(lambda: len(source.acked) == 250)
        assert source.acked == tokens  # in the order received (MQTT-4.6.0-2)
        assert [r["message_id"] for r in sink.rows] == [f"m{t}" for t in tokens]
        assert await pipeline.drain(5)

    asyncio.run(main())


def test_failed_writes_are_retried_and_not_acked_meanwhile() -> None:
    async def main() -> None:
        sink = MemorySink()
        sink.fail(3, SinkError("backend unavailable", retryable=True, kind="http_503"))
        pipeline, source = make(sink)
        pipeline.start()
        source.push(10)
        await _until(lambda: len(source.acked) == 10)
        assert len(sink.rows) == 10
        assert pipeline.metrics.value("mcloudtt_adapter_retries_total", sink="memory") == 3
        assert (
            pipeline.metrics.value(
                "mcloudtt_adapter_sink_errors_total", sink="memory", kind="http_503"
            )
            == 3
        )
        assert await pipeline.drain(5)

    asyncio.run(main())


def test_fatal_sink_error_stops_without_ack() -> None:
    async def main() -> None:
        sink = MemorySink()
        sink.fail(1, SinkError("permission denied", retryable=False, kind="http_403"))
        pipeline, source = make(sink)
        pipeline.start()
        source.push(5)
        await _until(lambda: pipeline.failed is not None)
        assert source.acked == []
        assert not await pipeline.drain(1)

    asyncio.run(main())


def test_backpressure_pauses_sources_and_bounds_pending() -> None:
    async def main() -> None:
        sink = MemorySink(delay=0.05)  # slow store
        pipeline, source = make(sink, max_pending=300, batch_rows=100)
        pipeline.start()
        peak = 0
        for _ in range(40):
            if not source.paused:
                source.push(50)
            peak = max(peak, pipeline.pending)
            await asyncio.sleep(0.005)
        assert source.pauses >= 1
        assert peak < 300 + 50  # never more than one push past the bound
        await _until(lambda: pipeline.pending == 0, 10)
        assert not source.paused  # resumed once drained below half
        assert len(sink.rows) == source.n
        assert await pipeline.drain(5)

    asyncio.run(main())


def test_drain_commits_everything_buffered() -> None:
    async def main() -> None:
        sink = MemorySink(delay=0.02)
        pipeline, source = make(sink, batch_rows=50, batch_delay=10.0, linger=10.0)
        pipeline.start()
        source.push(120)
        assert await pipeline.drain(5)
        assert len(sink.rows) == 120 and len(source.acked) == 120
        assert source.closed and sink.closed

    asyncio.run(main())


def test_drain_deadline_leaves_uncommitted_messages_unacked() -> None:
    async def main() -> None:
        sink = MemorySink()
        sink.fail(10_000)
        pipeline, source = make(sink)
        pipeline.start()
        source.push(20)
        await asyncio.sleep(0.1)
        clean = await pipeline.drain(0.3)
        assert not clean
        assert source.acked == []  # redelivered by the source to the next adapter

    asyncio.run(main())


def test_batches_are_cut_by_rows_delay_and_linger() -> None:
    async def main() -> None:
        sink = MemorySink()
        pipeline, source = make(sink, batch_rows=100, batch_delay=1.0, linger=0.02)
        pipeline.start()
        source.push(250)  # two full batches at once, the rest after the linger
        await _until(lambda: len(sink.rows) == 250)
        assert sink.batches == 3
        started = time.monotonic()
        source.push(1)
        await _until(lambda: len(sink.rows) == 251)
        assert time.monotonic() - started < 0.5  # linger, not the one-second delay
        assert await pipeline.drain(5)

    asyncio.run(main())


def test_lag_and_row_metrics() -> None:
    async def main() -> None:
        sink = MemorySink()
        pipeline, source = make(sink)
        pipeline.start()
        source.push(30)
        await _until(lambda: len(source.acked) == 30)
        text = pipeline.metrics.render()
        assert parse_metric(text, "mcloudtt_adapter_rows_out_total", sink="memory") == 30
        assert parse_metric(text, "mcloudtt_adapter_rows_in_total", source="fake") == 30
        assert parse_metric(text, "mcloudtt_adapter_lag_seconds_count") == 30
        assert parse_metric(text, "mcloudtt_adapter_batch_seconds_count", sink="memory") >= 1
        assert await pipeline.drain(5)

    asyncio.run(main())


@pytest.mark.parametrize("rows", [0, 1])
def test_rejects_inconsistent_bounds(rows: int) -> None:
    with pytest.raises(ValueError):
        Pipeline(MemorySink(), batch_rows=rows if rows else 0, max_pending=0)
