resource "google_project_service" "apis" {
  for_each = toset([
    "artifactregistry.googleapis.com",
    "bigquery.googleapis.com",
    "binaryauthorization.googleapis.com",
    "compute.googleapis.com",
    "container.googleapis.com",
    "iam.googleapis.com",
    "networkconnectivity.googleapis.com",
    "redis.googleapis.com",
    "servicenetworking.googleapis.com",
  ])
  service = each.value
  # Other things in the project may use these APIs.
  disable_on_destroy = false
}
