# GKE Autopilot: private nodes, a release channel, Workload Identity (always on in Autopilot),
# nodes running as a least-privilege service account instead of the Compute Engine default.
resource "google_service_account" "nodes" {
  account_id   = "${var.name}-nodes"
  display_name = "MCloudTT GKE nodes"
}

resource "google_project_iam_member" "nodes" {
  project = var.project_id
  # Logging, monitoring and metadata writes the nodes need, nothing else.
  role   = "roles/container.defaultNodeServiceAccount"
  member = "serviceAccount:${google_service_account.nodes.email}"
}

resource "google_container_cluster" "autopilot" {
  # checkov:skip=CKV_GCP_12: Autopilot always runs GKE Dataplane V2, which enforces NetworkPolicy; the network_policy block is not allowed on Autopilot
  # checkov:skip=CKV_GCP_61: Autopilot manages node networking; VPC flow logs are on for the subnet (network.tf)
  # checkov:skip=CKV_GCP_69: Autopilot always runs the GKE metadata server (Workload Identity cannot be turned off); node_config does not apply
  # checkov:skip=CKV_GCP_65: Google Groups for RBAC needs a Workspace domain group (authenticator_groups_config); access is through IAM here
  name             = var.name
  location         = var.region
  enable_autopilot = true

  network    = google_compute_network.vpc.id
  subnetwork = google_compute_subnetwork.gke.id

  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }

  private_cluster_config {
    enable_private_nodes = true
    # The control plane keeps a public endpoint, open only to master_authorized_networks.
    enable_private_endpoint = false
  }

  master_authorized_networks_config {
    dynamic "cidr_blocks" {
      for_each = var.master_authorized_networks
      content {
        cidr_block   = cidr_blocks.value.cidr_block
        display_name = cidr_blocks.value.display_name
      }
    }
  }

  # No client certificates: access through IAM only.
  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  release_channel {
    channel = var.release_channel
  }

  cluster_autoscaling {
    auto_provisioning_defaults {
      service_account = google_service_account.nodes.email
      oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    }
  }

  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }

  # Upgrades (and the broker drains they cause) at night, at weekends.
  maintenance_policy {
    recurring_window {
      start_time = "2025-01-04T01:00:00Z"
      end_time   = "2025-01-04T09:00:00Z"
      recurrence = "FREQ=WEEKLY;BYDAY=SA,SU"
    }
  }

  resource_labels     = local.labels
  deletion_protection = var.deletion_protection

  depends_on = [
    google_project_service.apis,
    google_project_iam_member.nodes,
  ]
}
