"""BigQuery: streaming inserts (insertAll) with insertIds, chunked, retried, dead-lettered.

* One client for the life of the sink (the original adapter made one per row).
* The table is created when absent: partitioned by day on `event_time`, clustered by
  `device_id, topic`, labelled with the schema version.
* Each row's insertId is its `message_id`, so a retried request (and a message redelivered by
  the source) is recognised by BigQuery's best-effort de-duplication; the analysis queries also
  de-duplicate on `message_id`, which makes the result exact whatever the backend did.
* A batch is sent in chunks of at most `chunk_rows` rows and `chunk_bytes` bytes of JSON
  (BigQuery's limits are 50,000 rows and 10 MB per request; 500 rows is its recommendation).
* Retryable failures (429, 5xx, rate-limit 403s, connection errors) are retried with capped,
  jittered exponential backoff, until `stop_event` is set (the drain deadline).
* Rows BigQuery rejects (`skipInvalidRows`: the others are stored) go to the dead letter with the
  reason; a request too large is split in halves, and a single row still too large is rejected.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from ..records import Batch
from ..schema import SCHEMA_VERSION, bigquery_schema
from .base import Backoff, SinkError, WriteResult
from .deadletter import DeadLetter, FileDeadLetter, dead_letter_entry

log = logging.getLogger("mcloudtt.adapter.bigquery")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
_RETRYABLE_REASONS = {"rateLimitExceeded", "backendError", "internalError", "quotaExceeded"}
DEAD_LETTER_SCHEMA = (
    ("message_id", "STRING", "REQUIRED"),
    ("failed_at", "TIMESTAMP", "REQUIRED"),
    ("sink", "STRING", "NULLABLE"),
    ("reason", "STRING", "NULLABLE"),
    ("row_json", "STRING", "NULLABLE"),
)


def ts_text(us: int) -> str:
    """Microseconds since the epoch as a BigQuery TIMESTAMP literal, UTC, full precision."""
    return (_EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%d %H:%M:%S.%f UTC")


def batch_to_json_rows(batch: Batch) -> list[dict[str, Any]]:
    rows = []
    b64 = base64.b64encode
    for i in range(len(batch)):
        lo, hi = batch.metric_offsets[i], batch.metric_offsets[i + 1]
        rows.append(
            {
                "message_id": batch.message_id[i],
                "event_time": ts_text(batch.event_time[i]),
                "ingest_time": ts_text(batch.ingest_time[i]),
                "receive_time": ts_text(batch.receive_time[i]),
                "broker_id": batch.broker_id[i],
                "client_id": batch.client_id[i],
                "source": batch.source[i],
                "topic": batch.topic[i],
                "device_id": batch.device_id[i],
                "qos": batch.qos[i],
                "retain": batch.retain[i],
                "payload": b64(batch.payload[i]).decode(),
                "payload_size": batch.payload_size[i],
                "payload_format": batch.payload_format[i],
                "attributes": batch.attributes[i],
                "properties": batch.properties[i],
                "metrics": [
                    {"name": n, "value": v}
                    for n, v in zip(
                        batch.metric_names[lo:hi], batch.metric_values[lo:hi], strict=True
                    )
                ],
            }
        )
    return rows


def make_client(project: str, endpoint: str | None = None) -> Any:
    """A client for real BigQuery (application default credentials), or for an emulator."""
    from google.cloud import bigquery

    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        return bigquery.Client(
            project=project,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": endpoint},
        )
    return bigquery.Client(project=project)


def split_table_id(table_id: str) -> tuple[str, str, str]:
    parts = table_id.replace(":", ".").split(".")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"expected PROJECT.DATASET.TABLE, got {table_id!r}")
    return parts[0], parts[1], parts[2]


def classify(error: BaseException) -> tuple[bool, str]:
    """(retryable, kind) for an exception from the client."""
    from google.api_core import exceptions as gexc

    try:
        import requests

        network: tuple[type[BaseException], ...] = (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,
        )
    except ImportError:  # pragma: no cover
        network = ()
    if isinstance(error, (*network, ConnectionError, TimeoutError)):
        return True, "network"
    if isinstance(error, gexc.GoogleAPICallError):
        code = int(error.code or 0)
        reasons = {e.get("reason") for e in (error.errors or []) if isinstance(e, dict)}
        if code in _RETRYABLE_STATUS or reasons & _RETRYABLE_REASONS:
            return True, f"http_{code}"
        if code == 404:
            return True, "not_found"
        if code in (400, 413) and ("too large" in str(error).lower() or code == 413):
            return False, "too_large"
        return False, f"http_{code}"
    return False, type(error).__name__


class BigQuerySink:
    name = "bigquery"

    def __init__(
        self,
        table_id: str,
        *,
        client: Any = None,
        endpoint: str | None = None,
        create: bool = True,
        chunk_rows: int = 500,
        chunk_bytes: int = 9_000_000,
        dead_letter: DeadLetter | None = None,
        dead_letter_table: str | None = None,
        dead_letter_file: str = "mcloudtt-dead-letter.jsonl",
        retry_base: float = 0.25,
        retry_cap: float = 30.0,
        request_timeout: float = 60.0,
    ) -> None:
        self.project, self.dataset, self.table = split_table_id(table_id)
        self.table_id = f"{self.project}.{self.dataset}.{self.table}"
        self.endpoint = endpoint
        self.client = client
        self.create = create
        self.chunk_rows = chunk_rows
        self.chunk_bytes = chunk_bytes
        self.dead_letter_table = (
            dead_letter_table if dead_letter_table is not None else f"{self.table_id}_dead_letter"
        )
        self.file_dead_letter = FileDeadLetter(dead_letter_file)
        self.dead_letter: DeadLetter = dead_letter or _TableDeadLetter(self)
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.request_timeout = request_timeout
        self.stop_event = threading.Event()
        self.requests = 0
        self.retries = 0

    # ------------------------------------------------------------ setup

    def open(self) -> None:
        if self.client is None:
            self.client = make_client(self.project, self.endpoint)
        try:
            self._ensure_table()
        except Exception as error:
            retryable, kind = classify(error)
            raise SinkError(
                f"cannot prepare {self.table_id}: {error}", retryable=retryable, kind=kind
            ) from error

    def _ensure_table(self) -> None:
        from google.api_core.exceptions import NotFound
        from google.cloud import bigquery

        client = self.client
        try:
            table = client.get_table(self.table_id)
        except NotFound:
            if not self.create:
                raise
            client.create_dataset(f"{self.project}.{self.dataset}", exists_ok=True)
            table = bigquery.Table(self.table_id, schema=bigquery_schema())
            table.time_partitioning = bigquery.TimePartitioning(
                type_=bigquery.TimePartitioningType.DAY, field="event_time"
            )
            table.clustering_fields = ["device_id", "topic"]
            table.labels = {"mcloudtt_schema": str(SCHEMA_VERSION)}
            table.description = f"MCloudTT messages, schema version {SCHEMA_VERSION}"
            client.create_table(table, exists_ok=True)
            log.info("created %s (partitioned by day on event_time)", self.table_id)
            return
        version = (table.labels or {}).get("mcloudtt_schema")
        if version is not None and version.isdigit() and int(version) > SCHEMA_VERSION:
            raise SinkError(
                f"{self.table_id} has schema version {version}; this adapter writes {SCHEMA_VERSION}",
                retryable=False,
                kind="schema",
            )

    def ensure_dead_letter_table(self) -> None:
        from google.api_core.exceptions import NotFound
        from google.cloud import bigquery

        try:
            self.client.get_table(self.dead_letter_table)
        except NotFound:
            schema = [bigquery.SchemaField(n, t, mode=m) for n, t, m in DEAD_LETTER_SCHEMA]
            self.client.create_table(
                bigquery.Table(self.dead_letter_table, schema=schema), exists_ok=True
            )

    # ------------------------------------------------------------ writing

    def write(self, batch: Batch) -> WriteResult:
        if not len(batch):
            return WriteResult(0)
        rows = batch_to_json_rows(batch)
        rejected: list[tuple[int, str]] = []
        for indices in self._chunks(rows):
            rejected.extend(self._insert(rows, indices))
        if rejected:
            entries = [dead_letter_entry(batch, i, self.name, reason) for i, reason in rejected]
            self.dead_letter.write(entries)
        return WriteResult(len(batch) - len(rejected), len(rejected))

    def _chunks(self, rows: list[dict[str, Any]]) -> list[list[int]]:
        chunks: list[list[int]] = []
        current: list[int] = []
        size = 0
        for i, row in enumerate(rows):
            row_size = len(orjson.dumps(row)) + 64
            if current and (len(current) >= self.chunk_rows or size + row_size > self.chunk_bytes):
                chunks.append(current)
                current, size = [], 0
            current.append(i)
            size += row_size
        if current:
            chunks.append(current)
        return chunks

    def _insert(self, rows: list[dict[str, Any]], indices: list[int]) -> list[tuple[int, str]]:
        """Insert rows[indices]; retry until stored or rejected. Returns (index, reason) rejected."""
        backoff = Backoff(base=self.retry_base, cap=self.retry_cap, stop=self.stop_event)
        while True:
            self.requests += 1
            try:
                errors = self.client.insert_rows_json(
                    self.table_id,
                    [rows[i] for i in indices],
                    row_ids=[rows[i]["message_id"] for i in indices],
                    skip_invalid_rows=True,
                    retry=None,
                    timeout=self.request_timeout,
                )
            except Exception as error:
                retryable, kind = classify(error)
                if kind == "too_large":
                    if len(indices) == 1:
                        return [(indices[0], f"row too large for insertAll: {error}")]
                    half = len(indices) // 2
                    return self._insert(rows, indices[:half]) + self._insert(rows, indices[half:])
                if kind == "not_found" and self.create:
                    log.warning("%s vanished; creating it again", self.table_id)
                    try:
                        self._ensure_table()
                    except Exception as again:
                        log.warning("re-creating %s failed: %s", self.table_id, again)
                elif not retryable:
                    raise SinkError(
                        f"insertAll failed: {error}", retryable=False, kind=kind
                    ) from error
                self.retries += 1
                log.warning("insertAll %s (%s); retry %d", kind, error, backoff.attempt + 1)
                if not backoff.wait():
                    raise SinkError("stopped while retrying", retryable=True, kind=kind) from error
                continue
            rejected: list[tuple[int, str]] = []
            retry_indices: list[int] = []
            for entry in errors:
                index = indices[int(entry["index"])]
                reasons = entry.get("errors") or []
                # "stopped": a valid row held back because another was invalid (not with
                # skipInvalidRows, but BigQuery documents it): send it again.
                if reasons and all(r.get("reason") == "stopped" for r in reasons):
                    retry_indices.append(index)
                else:
                    rejected.append((index, orjson.dumps(reasons).decode()))
            if retry_indices:
                rejected.extend(self._insert(rows, retry_indices))
            return rejected

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()


class _TableDeadLetter:
    """Rejected rows into `<table>_dead_letter`; if that fails too, into the file."""

    def __init__(self, sink: BigQuerySink) -> None:
        self.sink = sink
        self._ready = False

    def write(self, entries: list[dict[str, Any]]) -> None:
        sink = self.sink
        rows = [
            {
                "message_id": e["message_id"],
                "failed_at": ts_text(e["failed_at_us"]),
                "sink": e["sink"],
                "reason": e["reason"],
                "row_json": orjson.dumps(e["row"]).decode(),
            }
            for e in entries
        ]
        try:
            if not self._ready:
                sink.ensure_dead_letter_table()
                self._ready = True
            errors = sink.client.insert_rows_json(
                sink.dead_letter_table,
                rows,
                row_ids=[f"{r['message_id']}:dl" for r in rows],
                retry=None,
                timeout=sink.request_timeout,
            )
            if errors:
                raise RuntimeError(f"dead-letter rows rejected: {errors[:3]}")
        except Exception as error:
            log.warning(
                "dead-letter table %s failed (%s); using %s",
                sink.dead_letter_table,
                error,
                sink.file_dead_letter.path,
            )
            sink.file_dead_letter.write(entries)
