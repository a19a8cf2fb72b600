"""The adapter process: sources, pipeline, sink and HTTP endpoint, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass, field

from .decode import DecodeRules, PayloadDecoder
from .httpd import HttpServer
from .metrics import Metrics, standard_metrics
from .pipeline import Pipeline, Source
from .sinks.base import Sink

log = logging.getLogger("mcloudtt.adapter")


@dataclass
class AdapterConfig:
    # sources
    mqtt: tuple[str, int] | None = None
    mqtt_filter: str = "#"
    mqtt_group: str | None = "mcloudtt-adapter"
    client_id: str = field(default_factory=lambda: f"mcloudtt-adapter-{socket.gethostname()}")
    session_expiry: int = 86_400
    keepalive: int = 30
    qos: int = 1
    username: str | None = None
    password: str | None = None
    broker_id: str | None = None
    redis: str | None = None
    redis_mode: str = "stream"  # or pubsub
    tap_stream: str = "mcloudtt:tap"
    tap_streams: int = 1  # the brokers' --tap-streams
    sharded_pubsub: bool = False  # the brokers' --sharded-pubsub
    sync_channel: str = "sync"
    cluster_key_file: str | None = None  # the brokers' key: tap entries must carry its tag
    redis_group: str = "mcloudtt-adapter"
    consumer: str | None = None  # default: client_id
    claim_idle: float = 60.0  # seconds before another replica's pending entries are claimed
    start_id: str = "0"
    # sinks
    duckdb: str | None = None
    table: str = "messages"
    duckdb_checkpoint: str = "256MB"
    bigquery: str | None = None
    bigquery_endpoint: str | None = None
    dead_letter_file: str = "mcloudtt-dead-letter.jsonl"
    # decoding and batching
    rules: DecodeRules = field(default_factory=DecodeRules)
    batch_rows: int = 10_000
    batch_delay: float = 0.25
    linger: float = 0.005
    max_pending: int = 100_000
    # service
    http: tuple[str, int] | None = None
    drain_timeout: float = 30.0


def build_sink(config: AdapterConfig) -> Sink:
    if config.bigquery:
        from .sinks.bigquery import BigQuerySink

        return BigQuerySink(
            config.bigquery,
            endpoint=config.bigquery_endpoint,
            dead_letter_file=config.dead_letter_file,
        )
    from .sinks.duckdb import DuckDBSink

    return DuckDBSink(
        config.duckdb or "mcloudtt.duckdb",
        table=config.table,
        checkpoint_threshold=config.duckdb_checkpoint,
    )


def build_sources(config: AdapterConfig) -> list[Source]:
    sources: list[Source] = []
    if config.mqtt:
        from .sources.mqtt import MqttSource

        host, port = config.mqtt
        sources.append(
            MqttSource(
                host,
                port,
                client_id=config.client_id,
                topic_filter=config.mqtt_filter,
                group=config.mqtt_group,
                qos=config.qos,
                session_expiry=config.session_expiry,
                keepalive=config.keepalive,
                username=config.username,
                password=config.password,
                broker_id=config.broker_id,
            )
        )
    if config.redis:
        from mcloudtt_broker.cluster.keys import cluster_keys, read_key_file

        from .sources.redis import RedisPubSubSource, stream_source

        keys = cluster_keys(
            read_key_file(config.cluster_key_file) if config.cluster_key_file else ()
        )
        if config.redis_mode == "pubsub":
            sources.append(
                RedisPubSubSource(
                    config.redis,
                    channel=config.sync_channel,
                    keys=keys,
                    sharded=config.sharded_pubsub,
                )
            )
        else:
            sources.append(
                stream_source(
                    config.redis,
                    stream=config.tap_stream,
                    streams=config.tap_streams,
                    group=config.redis_group,
                    consumer=config.consumer or config.client_id,
                    claim_idle=config.claim_idle,
                    start_id=config.start_id,
                    keys=keys,
                )
            )
    return sources


def _source_state(source: Source) -> str:
    if source.connected:
        return f"{source.name}=up"
    reason = getattr(source, "last_error", "")  # why a Redis source is down (wrong CA, ...)
    return f"{source.name}=down ({reason})" if reason else f"{source.name}=down"


class Adapter:
    def __init__(
        self,
        config: AdapterConfig,
        *,
        sink: Sink | None = None,
        sources: list[Source] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or standard_metrics()
        self.sink = sink or build_sink(config)
        self.pipeline = Pipeline(
            self.sink,
            PayloadDecoder(config.rules),
            self.metrics,
            batch_rows=config.batch_rows,
            batch_delay=config.batch_delay,
            linger=config.linger,
            max_pending=max(config.max_pending, config.batch_rows),
        )
        for source in sources if sources is not None else build_sources(config):
            self.pipeline.add_source(source)
        self._tasks: list[asyncio.Task[None]] = []
        self.http: HttpServer | None = None
        self._stopped = asyncio.Event()
        self.metrics.add_callback(self._source_gauges)

    @property
    def sources(self) -> list[Source]:
        return self.pipeline.sources

    def _source_gauges(self) -> dict[str, float]:
        for source in self.sources:
            self.metrics.set(
                "mcloudtt_adapter_source_connected",
                1.0 if source.connected else 0.0,
                source=source.name,
            )
        return {}

    async def start(self) -> None:
        if not self.sources:
            raise ValueError("no source: give --mqtt and/or --redis")
        pipeline_task = self.pipeline.start()
        self._tasks.append(pipeline_task)
        for source in self.sources:
            self._tasks.append(asyncio.create_task(source.run(), name=f"mcloudtt-{source.name}"))
        if self.config.http:
            self.http = HttpServer(
                {
                    "/healthz": self._healthz,
                    "/readyz": self._readyz,
                    "/metrics": self._metrics,
                    "/report": self._report,
                    "/analytics": self._analytics,
                }
            )
            await self.http.start(*self.config.http)

    def ready(self) -> bool:
        return (
            self.pipeline.failed is None
            and self.pipeline.sink_open
            and all(source.connected for source in self.sources)
            and not self._stopped.is_set()
        )

    async def _healthz(self) -> tuple[str, bytes, str]:
        if self.pipeline.failed is not None:
            return (
                "503 Service Unavailable",
                f"sink failed: {self.pipeline.failed}\n".encode(),
                "text/plain",
            )
        return "200 OK", b"ok\n", "text/plain; charset=utf-8"

    async def _readyz(self) -> tuple[str, bytes, str]:
        if self.ready():
            return "200 OK", b"ready\n", "text/plain; charset=utf-8"
        states = ", ".join(_source_state(s) for s in self.sources)
        return "503 Service Unavailable", f"not ready: {states}\n".encode(), "text/plain"

    async def _metrics(self) -> tuple[str, bytes, str]:
        for source in self.sources:
            pending = getattr(source, "stream_pending", None)
            if pending is not None:
                value = await pending()
                if value is not None:
                    self.metrics.set(
                        "mcloudtt_adapter_stream_pending", float(value), source=source.name
                    )
        return "200 OK", self.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8"

    async def _report(self) -> tuple[str, bytes, str]:
        reader = getattr(self.sink, "reader", None)
        if reader is None:
            return "404 Not Found", b"the live report needs the DuckDB sink\n", "text/plain"
        from .analysis import Analysis, DuckDBEngine
        from .report import build_report, render_html

        def make() -> bytes:
            engine = DuckDBEngine(reader(), self.config.table)
            try:
                return render_html(build_report(Analysis(engine))).encode()
            finally:
                engine.close()

        body = await asyncio.get_running_loop().run_in_executor(None, make)
        return "200 OK", body, "text/html; charset=utf-8"

    async def _analytics(self) -> tuple[str, bytes, str]:
        """The dashboard's charts (`live.live_analytics`), as JSON."""
        reader = getattr(self.sink, "reader", None)
        if reader is None:
            return "404 Not Found", b"live analytics need the DuckDB sink\n", "text/plain"
        import json

        from .analysis import Analysis, DuckDBEngine
        from .live import live_analytics

        def make() -> bytes:
            cursor = reader()
            cursor.execute("BEGIN TRANSACTION")  # every figure from one snapshot of the table
            engine = DuckDBEngine(cursor, self.config.table)
            try:
                return json.dumps(live_analytics(Analysis(engine))).encode()
            finally:
                cursor.execute("ROLLBACK")
                engine.close()

        body = await asyncio.get_running_loop().run_in_executor(None, make)
        return "200 OK", body, "application/json"

    async def wait_failed(self) -> None:
        while self.pipeline.failed is None and not self._stopped.is_set():
            await asyncio.sleep(0.2)

    async def stop(self) -> bool:
        """Drain: stop the sources, commit and acknowledge the buffer, close. True if clean."""
        if self._stopped.is_set():
            return True
        self._stopped.set()
        clean = await self.pipeline.drain(self.config.drain_timeout)
        for task in self._tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.stop()
        return clean


def tune_runtime() -> None:
    """Garbage-collector settings for a process that holds many short-lived messages.

    Messages make no reference cycles, but with the default thresholds the collector runs every
    few hundred messages and its older generations walk every buffered message: about a fifth
    of the adapter's CPU at 50k msg/s. Startup objects are frozen out of the collector's view.
    """
    import gc

    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def run_adapter(config: AdapterConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain. 0 after a clean drain (or a drain that left only
    unacknowledged messages for redelivery), 1 when the sink failed for good."""
    adapter = Adapter(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await adapter.start()
    log.info(
        "adapter running: sources %s -> %s",
        ", ".join(s.name for s in adapter.sources),
        adapter.sink.name,
    )
    failed = asyncio.create_task(adapter.wait_failed())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({failed, stopping}, return_when=asyncio.FIRST_COMPLETED)
    failed.cancel()
    stopping.cancel()
    clean = await adapter.stop()
    if adapter.pipeline.failed is not None:
        log.error("stopped: %s", adapter.pipeline.failed)
        return 1
    log.info(
        "stopped after committing %d messages%s",
        adapter.pipeline.committed,
        "" if clean else " (some left unacknowledged for redelivery)",
    )
    return 0
