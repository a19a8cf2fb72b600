"""The table every sink writes: one row per MQTT message, schema version 1.

Documented in docs/adapter-schema.md. The same columns, in the same order, exist in DuckDB and in
BigQuery; only the type names differ. A sink records the version it created the table with
(DuckDB: table `mcloudtt_meta`; BigQuery: the table label `mcloudtt_schema`) and refuses to write
into a table of a newer version than it knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    duckdb: str
    bigquery: str
    mode: str  # REQUIRED, NULLABLE or REPEATED (BigQuery modes; DuckDB uses NOT NULL)
    description: str


METRIC_FIELDS = (("name", "VARCHAR", "STRING"), ("value", "DOUBLE", "FLOAT64"))

COLUMNS: tuple[Column, ...] = (
    Column(
        "message_id",
        "VARCHAR",
        "STRING",
        "REQUIRED",
        "stable id: origin:sequence for tap messages, adapter-made for MQTT; the insertId",
    ),
    Column(
        "event_time",
        "TIMESTAMP",
        "TIMESTAMP",
        "REQUIRED",
        "when it happened: the payload's time field, else the broker's (tap) or the "
        "adapter's (MQTT) receive time; microseconds, UTC",
    ),
    Column(
        "ingest_time",
        "TIMESTAMP",
        "TIMESTAMP",
        "REQUIRED",
        "when the adapter built the batch holding the row; microseconds, UTC",
    ),
    Column(
        "receive_time",
        "TIMESTAMP",
        "TIMESTAMP",
        "REQUIRED",
        "when the broker (tap) or the adapter (MQTT) received the message",
    ),
    Column(
        "broker_id",
        "VARCHAR",
        "STRING",
        "NULLABLE",
        "id of the broker that accepted the publish (tap), else the adapter's --broker-id",
    ),
    Column(
        "client_id",
        "VARCHAR",
        "STRING",
        "NULLABLE",
        "the publisher's ClientId (tap only; MQTT hides it from subscribers)",
    ),
    Column("source", "VARCHAR", "STRING", "REQUIRED", "mqtt, stream or pubsub"),
    Column("topic", "VARCHAR", "STRING", "REQUIRED", "the MQTT topic name"),
    Column(
        "device_id",
        "VARCHAR",
        "STRING",
        "NULLABLE",
        "from a topic rule, else from a payload field, else NULL",
    ),
    Column("qos", "TINYINT", "INT64", "REQUIRED", "QoS of the publish (tap) or of the delivery"),
    Column("retain", "BOOLEAN", "BOOL", "REQUIRED", "the RETAIN flag"),
    Column("payload", "BLOB", "BYTES", "REQUIRED", "the payload, unchanged bytes"),
    Column("payload_size", "INTEGER", "INT64", "REQUIRED", "payload length in bytes"),
    Column(
        "payload_format",
        "VARCHAR",
        "STRING",
        "REQUIRED",
        "json (flattened), json-unflattened (too large), text (UTF-8), binary or empty",
    ),
    Column(
        "attributes",
        "VARCHAR",
        "STRING",
        "NULLABLE",
        "JSON object: flattened non-numeric payload fields and extra topic captures",
    ),
    Column(
        "properties",
        "VARCHAR",
        "STRING",
        "NULLABLE",
        "JSON object: the MQTT 5.0 properties of the message",
    ),
    Column(
        "metrics",
        "STRUCT(name VARCHAR, value DOUBLE)[]",
        "RECORD",
        "REPEATED",
        "numeric payload fields as (name, value), dotted paths for nested fields",
    ),
)

COLUMN_NAMES = tuple(c.name for c in COLUMNS)


def duckdb_create_table(table: str) -> str:
    parts = []
    for c in COLUMNS:
        not_null = " NOT NULL" if c.mode == "REQUIRED" else ""
        parts.append(f"    {c.name} {c.duckdb}{not_null}")
    return f'CREATE TABLE IF NOT EXISTS "{table}" (\n' + ",\n".join(parts) + "\n)"


def bigquery_schema() -> list[Any]:
    from google.cloud import bigquery

    fields = []
    for c in COLUMNS:
        if c.name == "metrics":
            sub = [bigquery.SchemaField(n, bq, mode="NULLABLE") for n, _, bq in METRIC_FIELDS]
            fields.append(
                bigquery.SchemaField(
                    c.name, "RECORD", mode="REPEATED", fields=sub, description=c.description
                )
            )
        else:
            fields.append(
                bigquery.SchemaField(c.name, c.bigquery, mode=c.mode, description=c.description)
            )
    return fields
