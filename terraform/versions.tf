terraform {
  required_version = ">= 1.5"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 6.0, < 8.0"
    }
  }

  # Remote state in a GCS bucket you own, given at init time (nothing hard-coded here):
  #   terraform init -backend-config=backend.hcl      (see backend.hcl.example)
  # The state holds the Memorystore AUTH string: keep the bucket private, versioned.
  backend "gcs" {}
}
