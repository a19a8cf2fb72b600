"""Real BigQuery: runs only when a project is configured and credentials are found.

Set `MCLOUDTT_BIGQUERY_LIVE_DATASET=PROJECT.DATASET` (a dataset the credentials may create tables
in) and provide application default credentials (`gcloud auth application-default login`, a
service account key in GOOGLE_APPLICATION_CREDENTIALS, or Workload Identity). The test creates a
table of its own, writes, reads back through the analysis, and deletes the table.
"""

from __future__ import annotations

import os
import uuid

import pytest
from mcloudtt_adapter.analysis import Analysis, BigQueryEngine
from mcloudtt_adapter.sinks.bigquery import BigQuerySink

from .helpers import fleet

DATASET = os.environ.get("MCLOUDTT_BIGQUERY_LIVE_DATASET", "")


def _credentials_available() -> bool:
    try:
        import google.auth

        google.auth.default()
    except Exception:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not DATASET or not _credentials_available(),
    reason="live BigQuery: set MCLOUDTT_BIGQUERY_LIVE_DATASET=PROJECT.DATASET and credentials",
)


def test_live_bigquery_round_trip() -> None:
    table = f"{DATASET}.mcloudtt_live_{uuid.uuid4().hex[:10]}"
    sink = BigQuerySink(table)
    sink.open()
    try:
        batch = fleet(120)
        result = sink.write(batch)
        assert result.written == len(batch)
        sink.write(batch.subset(list(range(10))))  # a redelivery: same insertIds
        analysis = Analysis(BigQueryEngine(sink.client, table))
        assert analysis.overview()["messages"] == len(batch)
        assert analysis.rollups("minute")
        table_info = sink.client.get_table(table)
        assert table_info.time_partitioning.field == "event_time"
        assert table_info.clustering_fields == ["device_id", "topic"]
    finally:
        sink.client.delete_table(table, not_found_ok=True)
        sink.client.delete_table(sink.dead_letter_table, not_found_ok=True)
        sink.close()
