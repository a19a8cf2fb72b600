"""DuckDB: the embedded default. A batch becomes one Arrow table and one INSERT (one commit)."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa  # type: ignore[import-untyped]

from ..records import Batch
from ..schema import SCHEMA_VERSION, duckdb_create_table
from .base import SinkError, WriteResult

_TS = pa.timestamp("us")
METRIC_TYPE = pa.struct([pa.field("name", pa.string()), pa.field("value", pa.float64())])
ARROW_SCHEMA = pa.schema(
    [
        pa.field("message_id", pa.string(), nullable=False),
        pa.field("event_time", _TS, nullable=False),
        pa.field("ingest_time", _TS, nullable=False),
        pa.field("receive_time", _TS, nullable=False),
        pa.field("broker_id", pa.string()),
        pa.field("client_id", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("topic", pa.string(), nullable=False),
        pa.field("device_id", pa.string()),
        pa.field("qos", pa.int8(), nullable=False),
        pa.field("retain", pa.bool_(), nullable=False),
        pa.field("payload", pa.binary(), nullable=False),
        pa.field("payload_size", pa.int32(), nullable=False),
        pa.field("payload_format", pa.string(), nullable=False),
        pa.field("attributes", pa.string()),
        pa.field("properties", pa.string()),
        pa.field("metrics", pa.list_(METRIC_TYPE)),
    ]
)


def batch_to_arrow(batch: Batch) -> pa.Table:
    metrics = pa.ListArray.from_arrays(
        pa.array(batch.metric_offsets, pa.int32()),
        pa.StructArray.from_arrays(
            [
                pa.array(batch.metric_names, pa.string()),
                pa.array(batch.metric_values, pa.float64()),
            ],
            fields=list(METRIC_TYPE),
        ),
    )
    columns = [
        pa.array(batch.message_id, pa.string()),
        pa.array(batch.event_time, _TS),
        pa.array(batch.ingest_time, _TS),
        pa.array(batch.receive_time, _TS),
        pa.array(batch.broker_id, pa.string()),
        pa.array(batch.client_id, pa.string()),
        pa.array(batch.source, pa.string()),
        pa.array(batch.topic, pa.string()),
        pa.array(batch.device_id, pa.string()),
        pa.array(batch.qos, pa.int8()),
        pa.array(batch.retain, pa.bool_()),
        pa.array(batch.payload, pa.binary()),
        pa.array(batch.payload_size, pa.int32()),
        pa.array(batch.payload_format, pa.string()),
        pa.array(batch.attributes, pa.string()),
        pa.array(batch.properties, pa.string()),
        metrics,
    ]
    return pa.Table.from_arrays(columns, schema=ARROW_SCHEMA)


def ensure_table(con: duckdb.DuckDBPyConnection, table: str) -> None:
    """Create the table and its version record, or check the version of an existing one."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS mcloudtt_meta (name VARCHAR PRIMARY KEY, schema_version INTEGER)"
    )
    row = con.execute("SELECT schema_version FROM mcloudtt_meta WHERE name = ?", [table]).fetchone()
    if row is not None and row[0] > SCHEMA_VERSION:
        raise SinkError(
            f"table {table!r} has schema version {row[0]}; this adapter writes {SCHEMA_VERSION}",
            retryable=False,
            kind="schema",
        )
    con.execute(duckdb_create_table(table))
    if row is None:
        con.execute("INSERT INTO mcloudtt_meta VALUES (?, ?)", [table, SCHEMA_VERSION])


class DuckDBSink:
    """Appends to `table` in a DuckDB file (or `:memory:`)."""

    name = "duckdb"

    def __init__(
        self,
        path: str | Path,
        *,
        table: str = "messages",
        threads: int | None = 1,
        checkpoint_threshold: str | None = "256MB",
    ) -> None:
        self.path = str(path)
        self.table = table
        # DuckDB folds its write-ahead log into the file when the log reaches this size; each
        # checkpoint stalls commits (about a second per 100 MB here), and fewer, larger ones
        # cost less in all than DuckDB's default of 16 MB. The last one runs at close.
        self.checkpoint_threshold = checkpoint_threshold
        # One thread: appends gain nothing from DuckDB's worker pool and would take CPU from the
        # event loop; queries on `reader()` connections share the setting (SET threads to raise).
        self.threads = threads
        self.con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()
        self._insert = f'INSERT INTO "{table}" SELECT * FROM __mcloudtt_batch'

    def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(self.path)
        except duckdb.IOException as error:
            raise SinkError(f"cannot open {self.path}: {error}", retryable=False) from error
        if self.threads:
            self.con.execute(f"SET threads = {int(self.threads)}")
        if self.checkpoint_threshold:
            self.con.execute("SET checkpoint_threshold = ?", [self.checkpoint_threshold])
        ensure_table(self.con, self.table)

    def write(self, batch: Batch) -> WriteResult:
        if not len(batch):
            return WriteResult(0)
        con = self.con
        if con is None:
            raise SinkError("sink not open", retryable=False)
        table = batch_to_arrow(batch)
        with self._lock:
            try:
                con.register("__mcloudtt_batch", table)
                try:
                    con.execute(self._insert)
                finally:
                    con.unregister("__mcloudtt_batch")
            except duckdb.Error as error:
                raise SinkError(f"duckdb insert failed: {error}", kind="insert") from error
        return WriteResult(len(batch))

    def reader(self) -> Any:
        """A second connection to the same database, for queries while the sink writes."""
        if self.con is None:
            raise RuntimeError("sink not open")
        return self.con.cursor()

    def close(self) -> None:
        if self.con is not None:
            with self._lock:
                with contextlib.suppress(duckdb.Error):
                    self.con.execute("CHECKPOINT")
                self.con.close()
                self.con = None
