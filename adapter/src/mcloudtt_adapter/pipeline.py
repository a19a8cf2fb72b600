"""The pipeline: sources -> bounded inbox -> batches -> sink -> acknowledgements.

Theory of operation. Sources call `submit(records)` (push sources, e.g. MQTT) or await
`wait_for_room()` before fetching (pull sources, e.g. a Redis stream). The inbox is bounded:
when messages received and not yet committed reach `max_pending`, push sources are paused (the
MQTT socket stops being read, so TCP and the broker's flow control hold the rest) and pull
sources stop fetching; both resume below half of it. A batch is cut when it reaches
`batch_rows` or `batch_bytes`, when its first message is `batch_delay` old, or when nothing new
arrived for `linger` (a source that waits for acknowledgements before it sends more). Batches are
committed one at a time, in order, in a worker thread, while the next one fills. Only after the
sink returned are the batch's messages acknowledged to their sources (MQTT PUBACK, Redis XACK):
at least once. A failed write is retried with capped, jittered backoff; the messages stay
unacknowledged meanwhile, so the inbox fills and the sources are held back. `drain()` stops the
sources, commits what is buffered, acknowledges it and returns; what cannot be committed before
the deadline stays unacknowledged and is redelivered to the next adapter.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from .decode import PayloadDecoder
from .metrics import LAG_BUCKETS, Metrics, standard_metrics
from .records import Batch, Record
from .sinks.base import Backoff, Sink, SinkError, WriteResult

log = logging.getLogger("mcloudtt.adapter.pipeline")


class Source(Protocol):
    name: str

    def attach(self, pipeline: Pipeline) -> None: ...

    async def run(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def ack(self, tokens: list[Any]) -> None: ...

    def stop_receiving(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def connected(self) -> bool: ...


class FatalSinkError(RuntimeError):
    """The sink cannot write at all (bad schema, no permission): the adapter stops."""


CommitListener = Callable[[Batch, WriteResult, float], None]


class Pipeline:
    def __init__(
        self,
        sink: Sink,
        decoder: PayloadDecoder | None = None,
        metrics: Metrics | None = None,
        *,
        batch_rows: int = 10_000,
        batch_bytes: int = 8 * 1024 * 1024,
        batch_delay: float = 0.25,
        linger: float = 0.005,
        max_pending: int = 100_000,
        retry_base: float = 0.2,
        retry_cap: float = 30.0,
    ) -> None:
        if batch_rows < 1 or max_pending < batch_rows:
            raise ValueError("need 1 <= batch_rows <= max_pending")
        self.sink = sink
        self.decoder = decoder or PayloadDecoder()
        self.metrics = metrics or standard_metrics()
        self.batch_rows = batch_rows
        self.batch_bytes = batch_bytes
        self.batch_delay = batch_delay
        self.linger = linger
        self.max_pending = max_pending
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.sources: list[Source] = []
        self.commit_listeners: list[CommitListener] = []
        self._inbox: collections.deque[Record] = collections.deque()
        self._inbox_bytes = 0
        self.pending = 0  # received, not yet acknowledged
        self._paused = False
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._closing = False
        self.abandon = threading.Event()  # set when the drain deadline passed
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mcloudtt-sink")
        self._task: asyncio.Task[None] | None = None
        self.failed: BaseException | None = None
        self.sink_open = False
        self.committed = 0
        self.newest_event_us = 0
        self._rows_in: dict[str, float] = collections.defaultdict(float)
        self.metrics.add_callback(self._gauges)

    # ------------------------------------------------------------ sources side

    def add_source(self, source: Source) -> None:
        self.sources.append(source)
        source.attach(self)

    def submit(self, records: list[Record], nbytes: int | None = None) -> None:
        """Take messages from a push source (never blocks; pauses the sources when full).

        `nbytes`: their payload bytes, when the source knows it cheaply."""
        if not records:
            return
        self._inbox.extend(records)
        n = len(records)
        self.pending += n
        src = records[0].source
        self._rows_in[src.name if src is not None else "test"] += n
        self._inbox_bytes += nbytes if nbytes is not None else sum(len(r.payload) for r in records)
        if self.pending >= self.max_pending and not self._paused:
            self._paused = True
            self._room.clear()
            for source in self.sources:
                source.pause()
        if len(self._inbox) == n:
            self._wake.set()  # the inbox was empty: the batching loop sleeps until now
        if len(self._inbox) >= self.batch_rows or self._inbox_bytes >= self.batch_bytes:
            self._full.set()

    async def wait_for_room(self) -> None:
        """For pull sources: return when the pipeline has room for another fetch."""
        await self._room.wait()

    @property
    def room(self) -> int:
        return max(0, self.max_pending - self.pending)

    def _maybe_resume(self) -> None:
        if self._paused and self.pending <= self.max_pending // 2:
            self._paused = False
            self._room.set()
            for source in self.sources:
                source.resume()

    # ------------------------------------------------------------ batching

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name="mcloudtt-pipeline")
        return self._task

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if not await self._open_sink():
            return
        commit: asyncio.Task[None] | None = None
        try:
            while True:
                if not self._inbox:
                    if self._closing:
                        break
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                # Fill the batch. Submits do not wake this loop (that would cost a wakeup per
                # socket read); it checks every `linger` whether anything new arrived.
                first = loop.time()
                seen = len(self._inbox)
                while not self._closing:
                    if len(self._inbox) >= self.batch_rows or self._inbox_bytes >= self.batch_bytes:
                        break
                    age = loop.time() - first
                    if age >= self.batch_delay:
                        break
                    self._full.clear()
                    try:
                        await asyncio.wait_for(
                            self._full.wait(), min(self.linger, self.batch_delay - age)
                        )
                    except TimeoutError:
                        if len(self._inbox) == seen:
                            break  # nothing new for `linger`: the source waits for our acks
                        seen = len(self._inbox)
                batch = self._take()
                if commit is not None:
                    await commit
                    commit = None
                if self.failed is not None:
                    break
                commit = asyncio.create_task(self._commit(batch))
            if commit is not None:
                await commit
        finally:
            if commit is not None and not commit.done():
                commit.cancel()

    async def _open_sink(self) -> bool:
        """Open the sink, retrying while the store is unreachable; False if it never will be."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(base=self.retry_base, cap=self.retry_cap, stop=self.abandon)
        while True:
            try:
                await loop.run_in_executor(self._executor, self.sink.open)
                self.sink_open = True
                return True
            except SinkError as error:
                self.metrics.inc(
                    "mcloudtt_adapter_sink_errors_total", sink=self.sink.name, kind=error.kind
                )
                if not error.retryable:
                    log.error("sink %s cannot start: %s", self.sink.name, error)
                    self.failed = FatalSinkError(str(error))
                    return False
                log.warning("sink %s cannot start yet: %s", self.sink.name, error)
            delay = backoff.next()
            if self._closing or await self._sleep_unless_abandoned(delay):
                return False

    def _take(self) -> Batch:
        batch = Batch()
        inbox = self._inbox
        popleft = inbox.popleft
        append = self.decoder.append
        acks = batch.acks
        now_us = time.time_ns() // 1000
        limit = self.batch_bytes
        last_source: Any = None
        tokens: list[Any] = []
        for _ in range(min(self.batch_rows, len(inbox))):
            record = popleft()
            append(batch, record, now_us)
            if record.ack is not None:
                source = record.source
                if source is not last_source:
                    tokens = acks.setdefault(source, [])  # type: ignore[arg-type]
                    last_source = source
                tokens.append(record.ack)
            if batch.payload_bytes >= limit:
                break
        self._inbox_bytes -= batch.payload_bytes
        return batch

    async def _commit(self, batch: Batch) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(base=self.retry_base, cap=self.retry_cap, stop=self.abandon)
        sink_name = self.sink.name
        started = time.monotonic()
        while True:
            try:
                result = await loop.run_in_executor(self._executor, self._write, batch)
                break
            except SinkError as error:
                self.metrics.inc(
                    "mcloudtt_adapter_sink_errors_total", sink=sink_name, kind=error.kind
                )
                if not error.retryable:
                    log.error("sink %s failed for good: %s", sink_name, error)
                    self.failed = FatalSinkError(str(error))
                    return
                log.warning("sink %s: %s; retrying", sink_name, error)
            except Exception as error:  # a bug or an unexpected client error: retry, loudly
                self.metrics.inc(
                    "mcloudtt_adapter_sink_errors_total", sink=sink_name, kind="unexpected"
                )
                log.exception("sink %s raised %r; retrying", sink_name, error)
            if self.abandon.is_set():
                return  # not acknowledged: the source redelivers to the next adapter
            self.metrics.inc("mcloudtt_adapter_retries_total", sink=sink_name)
            delay = backoff.next()
            if await self._sleep_unless_abandoned(delay):
                return
        elapsed = time.monotonic() - started
        n = len(batch)
        for source, tokens in batch.acks.items():
            try:
                source.ack(tokens)
            except Exception:
                log.exception("acknowledging to %s failed", source.name)
            self.metrics.inc("mcloudtt_adapter_acked_total", len(tokens), source=source.name)
        self.pending -= n
        self.committed += n
        m = self.metrics
        m.inc("mcloudtt_adapter_rows_out_total", result.written, sink=sink_name)
        if result.dead_lettered:
            m.inc("mcloudtt_adapter_dead_letter_total", result.dead_lettered, sink=sink_name)
        m.inc("mcloudtt_adapter_batches_total", sink=sink_name)
        m.observe("mcloudtt_adapter_batch_seconds", elapsed, sink=sink_name)
        m.observe("mcloudtt_adapter_batch_rows", n, bounds=(10, 100, 1000, 5000, 10_000, 50_000))
        now = time.time()
        for listener in self.commit_listeners:
            listener(batch, result, now)
        self._maybe_resume()

    def _write(self, batch: Batch) -> WriteResult:
        result = self.sink.write(batch)
        # Lag per row (commit time minus receive time), counted here, off the event loop.
        now_us = time.time_ns() // 1000
        bounds = [int(b * 1e6) for b in LAG_BUCKETS]
        counts = [0] * (len(bounds) + 1)
        total = 0
        for received in batch.receive_time:
            lag = now_us - received
            counts[bisect.bisect_left(bounds, lag)] += 1
            total += lag
        if batch.event_time:
            self.newest_event_us = max(self.newest_event_us, max(batch.event_time))
        self.metrics.observe_counts(
            "mcloudtt_adapter_lag_seconds", LAG_BUCKETS, counts, total / 1e6
        )
        return result

    async def _sleep_unless_abandoned(self, delay: float) -> bool:
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if self.abandon.is_set():
                return True
            await asyncio.sleep(min(0.05, deadline - time.monotonic()))
        return self.abandon.is_set()

    def _gauges(self) -> dict[str, float]:
        out = {"mcloudtt_adapter_pending": float(self.pending)}
        if self.newest_event_us:
            out["mcloudtt_adapter_event_lag_seconds"] = max(
                0.0, time.time() - self.newest_event_us / 1e6
            )
        for name, value in self._rows_in.items():
            self.metrics.set("mcloudtt_adapter_rows_in_total", value, source=name)
        return out

    # ------------------------------------------------------------ shutdown

    async def drain(self, timeout: float = 30.0) -> bool:
        """Stop the sources, commit and acknowledge what is buffered. True if all of it was."""
        for source in self.sources:
            source.stop_receiving()
        self._closing = True
        self._wake.set()
        self._full.set()
        done = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                done = False
                self.abandon.set()
                stop = getattr(self.sink, "stop_event", None)
                if stop is not None:
                    stop.set()
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(self._task, 10.0)
            except Exception:
                done = False
        for source in self.sources:
            try:
                await source.close()
            except Exception:
                log.exception("closing source %s", source.name)
        if self.sink_open:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self.sink.close)
        self._executor.shutdown(wait=False)
        return done and not self._inbox and self.failed is None
