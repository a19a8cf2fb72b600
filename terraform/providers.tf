provider "google" {
  project        = var.project_id
  region         = var.region
  default_labels = local.labels
}

locals {
  labels = merge({ app = "mcloudtt", managed-by = "terraform" }, var.labels)
}
