# Images: REGION-docker.pkg.dev/PROJECT/NAME/mcloudtt-broker:TAG (and mcloudtt-adapter).
resource "google_artifact_registry_repository" "images" {
  # checkov:skip=CKV_GCP_84: Google-managed encryption at rest; the images hold no secrets (CMEK via kms_key_name if policy demands it)
  location      = var.region
  repository_id = var.name
  format        = "DOCKER"
  description   = "MCloudTT container images"

  # A tag, once pushed, always names the same image.
  docker_config {
    immutable_tags = true
  }

  depends_on = [google_project_service.apis]
}

resource "google_artifact_registry_repository_iam_member" "nodes_pull" {
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.nodes.email}"
}
