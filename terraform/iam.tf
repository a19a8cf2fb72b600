# The adapter's identity: a Google service account used by the Kubernetes service account
# mcloudtt/mcloudtt-adapter through Workload Identity. No keys are ever created.
resource "google_service_account" "adapter" {
  account_id   = "${var.name}-adapter"
  display_name = "MCloudTT adapter (BigQuery writer)"
}

# Rows into this dataset's tables (and the dead-letter table the adapter creates next to them);
# nothing in any other dataset.
resource "google_bigquery_dataset_iam_member" "adapter_data_editor" {
  dataset_id = google_bigquery_dataset.mcloudtt.dataset_id
  role       = "roles/bigquery.dataEditor"
  member     = "serviceAccount:${google_service_account.adapter.email}"
}

# Query jobs (the adapter's /report endpoint and `mcloudtt-adapter report`).
resource "google_project_iam_member" "adapter_job_user" {
  project = var.project_id
  role    = "roles/bigquery.jobUser"
  member  = "serviceAccount:${google_service_account.adapter.email}"
}

resource "google_service_account_iam_member" "adapter_workload_identity" {
  service_account_id = google_service_account.adapter.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${var.k8s_namespace}/${var.k8s_adapter_service_account}]"

  # The workload identity pool PROJECT.svc.id.goog exists once the cluster does.
  depends_on = [google_container_cluster.autopilot]
}
