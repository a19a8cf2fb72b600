# kind/overlays/gke/configure.sh reads these (terraform output -json) to write gke.env and the
# Kubernetes Secret and ConfigMap for Memorystore.

output "project_id" {
  value = var.project_id
}

output "region" {
  value = var.region
}

output "cluster_name" {
  value = google_container_cluster.autopilot.name
}

output "get_credentials" {
  description = "Command that points kubectl at the cluster."
  value       = "gcloud container clusters get-credentials ${google_container_cluster.autopilot.name} --region ${var.region} --project ${var.project_id}"
}

output "image_repository" {
  description = "Push images here: IMAGE_REPOSITORY/mcloudtt-broker:TAG."
  value       = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}

output "adapter_service_account" {
  description = "Google service account the adapter's Kubernetes service account is annotated with."
  value       = google_service_account.adapter.email
}

output "bigquery_table" {
  description = "The adapter's --bigquery PROJECT.DATASET.TABLE."
  value       = "${var.project_id}.${google_bigquery_dataset.mcloudtt.dataset_id}.${google_bigquery_table.messages.table_id}"
}

output "redis_host" {
  value = google_redis_instance.cluster.host
}

output "redis_port" {
  description = "The TLS port (6378 with in-transit encryption)."
  value       = google_redis_instance.cluster.port
}

output "redis_reserved_range" {
  description = "CIDR the Memorystore instance lives in (the NetworkPolicy egress target)."
  value       = var.private_services_cidr
}

output "redis_auth_string" {
  description = "Memorystore AUTH string: goes into the Secret mcloudtt-redis, nowhere else."
  value       = google_redis_instance.cluster.auth_string
  sensitive   = true
}

output "redis_server_ca" {
  description = "PEM CAs that sign the Memorystore server certificate (ConfigMap mcloudtt-redis-ca); all of them, so that a CA rotation needs only a re-run of configure.sh."
  value       = join("\n", google_redis_instance.cluster.server_ca_certs[*].cert)
}
