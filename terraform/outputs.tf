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

output "redis_backend" {
  description = "instance (Memorystore for Redis) or cluster (Memorystore for Redis Cluster)."
  value       = var.redis_backend
}

output "redis_cluster_name" {
  description = "The Memorystore for Redis Cluster (empty with an instance): configure.sh fetches its server CA by this name."
  value       = local.redis_cluster ? google_redis_cluster.bus[0].name : ""
}

output "redis_region" {
  value = var.region
}

output "redis_host" {
  description = "The instance's address, or the cluster's discovery endpoint (any node: the brokers read the topology from it)."
  value       = local.redis_cluster ? google_redis_cluster.bus[0].discovery_endpoints[0].address : google_redis_instance.cluster[0].host
}

output "redis_port" {
  description = "The TLS port (6378 with in-transit encryption on an instance; 6379 on a cluster's discovery endpoint)."
  value       = local.redis_cluster ? google_redis_cluster.bus[0].discovery_endpoints[0].port : google_redis_instance.cluster[0].port
}

output "redis_reserved_range" {
  description = "CIDR the Memorystore instance or the cluster's endpoints live in (the NetworkPolicy egress target)."
  value       = local.redis_cluster ? var.redis_cluster_psc_cidr : var.private_services_cidr
}

output "redis_auth_string" {
  description = "Memorystore AUTH string: goes into the Secret mcloudtt-redis, nowhere else (empty on a cluster: no AUTH string there)."
  value       = local.redis_cluster ? "" : google_redis_instance.cluster[0].auth_string
  sensitive   = true
}

output "redis_server_ca" {
  description = "PEM CAs that sign the Memorystore server certificate (ConfigMap mcloudtt-redis-ca); all of them, so that a CA rotation needs only a re-run of configure.sh."
  value       = local.redis_cluster ? "" : join("\n", google_redis_instance.cluster[0].server_ca_certs[*].cert)
}
