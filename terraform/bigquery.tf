# The adapter's dataset and table. The columns are the adapter's schema version 1
# (docs/adapter-schema.md, mcloudtt_adapter.schema; tests/deploy checks that schemas/messages.json
# matches it): partitioned by day on event_time, clustered by device_id and topic, labelled with
# the schema version the adapter checks before writing.
resource "google_bigquery_dataset" "mcloudtt" {
  # checkov:skip=CKV_GCP_81: Google-managed encryption at rest; CMEK (a KMS key ring, rotation, IAM) is an organisation decision, added with default_encryption_configuration
  dataset_id                 = var.bigquery_dataset_id
  location                   = var.bigquery_location
  description                = "MCloudTT: every MQTT message that crossed the cluster"
  delete_contents_on_destroy = false

  depends_on = [google_project_service.apis]
}

resource "google_bigquery_table" "messages" {
  # checkov:skip=CKV_GCP_80: Google-managed encryption at rest, as for the dataset (CKV_GCP_81)
  dataset_id  = google_bigquery_dataset.mcloudtt.dataset_id
  table_id    = var.bigquery_table_id
  description = "MCloudTT messages, schema version 1"
  schema      = file("${path.module}/schemas/messages.json")

  time_partitioning {
    type          = "DAY"
    field         = "event_time"
    expiration_ms = var.partition_expiration_days == null ? null : var.partition_expiration_days * 86400000
  }

  clustering = ["device_id", "topic"]

  labels = merge(local.labels, { mcloudtt_schema = "1" })

  deletion_protection = var.deletion_protection

  lifecycle {
    # The adapter owns the table's evolution: a newer adapter adds NULLABLE columns and bumps
    # the mcloudtt_schema label. Terraform creates the table and leaves both alone afterwards.
    ignore_changes = [schema, labels]
  }
}
