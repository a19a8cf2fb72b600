variable "project_id" {
  description = "Google Cloud project to deploy into."
  type        = string
}

variable "region" {
  description = "Region of the cluster, the registry and Memorystore."
  type        = string
  default     = "europe-west1"
}

variable "name" {
  description = "Name prefix of every resource."
  type        = string
  default     = "mcloudtt"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,20}$", var.name))
    error_message = "name: 3 to 21 lower-case letters, digits or dashes, starting with a letter."
  }
}

variable "labels" {
  description = "Extra labels on every resource."
  type        = map(string)
  default     = {}
}

# ------------------------------------------------------------------ network

variable "subnet_cidr" {
  description = "Primary range of the cluster subnet (nodes)."
  type        = string
  default     = "10.10.0.0/20"
}

variable "pods_cidr" {
  description = "Secondary range for pods."
  type        = string
  default     = "10.16.0.0/14"
}

variable "services_cidr" {
  description = "Secondary range for Services."
  type        = string
  default     = "10.20.0.0/20"
}

variable "private_services_cidr" {
  description = "Range reserved for private services access (Memorystore takes its address from it). The gke overlay's NetworkPolicy allows brokers and the adapter out to it."
  type        = string
  default     = "10.30.0.0/20"
}

# ------------------------------------------------------------------ cluster

variable "release_channel" {
  description = "GKE release channel: RAPID, REGULAR or STABLE."
  type        = string
  default     = "REGULAR"

  validation {
    condition     = contains(["RAPID", "REGULAR", "STABLE"], var.release_channel)
    error_message = "release_channel must be RAPID, REGULAR or STABLE."
  }
}

variable "master_authorized_networks" {
  description = "CIDR blocks allowed to reach the cluster's control plane (your workstation, CI). Nodes are private either way."
  type = list(object({
    cidr_block   = string
    display_name = string
  }))
}

variable "deletion_protection" {
  description = "Protect the cluster and the BigQuery table from terraform destroy."
  type        = bool
  default     = true
}

# ------------------------------------------------------------------ Memorystore

variable "redis_memory_size_gb" {
  description = "Memorystore capacity in GiB (sessions, retained messages, the tap stream)."
  type        = number
  default     = 5
}

variable "redis_version" {
  description = "Memorystore Redis version."
  type        = string
  default     = "REDIS_7_2"
}

variable "redis_backend" {
  description = "The cluster bus: \"instance\" (one Memorystore for Redis, STANDARD_HA) or \"cluster\" (Memorystore for Redis Cluster, sharded). `mcloudtt-sim plan` recommends one."
  type        = string
  default     = "instance"

  validation {
    condition     = contains(["instance", "cluster"], var.redis_backend)
    error_message = "redis_backend must be \"instance\" or \"cluster\"."
  }
}

variable "redis_shard_count" {
  description = "Memorystore for Redis Cluster: primaries (shards), from `mcloudtt-sim plan` (redis_backend = \"cluster\" only)."
  type        = number
  default     = 3

  validation {
    condition     = var.redis_shard_count >= 1 && var.redis_shard_count <= 250 && floor(var.redis_shard_count) == var.redis_shard_count
    error_message = "redis_shard_count must be a whole number from 1 to 250."
  }
}

variable "redis_replica_count" {
  description = "Memorystore for Redis Cluster: replicas per shard, in other zones (0 to 2; 1 or more for automatic failover)."
  type        = number
  default     = 1

  validation {
    condition     = contains([0, 1, 2], var.redis_replica_count)
    error_message = "redis_replica_count must be 0, 1 or 2."
  }
}

variable "redis_node_type" {
  description = "Memorystore for Redis Cluster node type (REDIS_SHARED_CORE_NANO, REDIS_STANDARD_SMALL, REDIS_HIGHMEM_MEDIUM, REDIS_HIGHMEM_XLARGE)."
  type        = string
  default     = "REDIS_HIGHMEM_MEDIUM"

  validation {
    condition     = contains(["REDIS_SHARED_CORE_NANO", "REDIS_STANDARD_SMALL", "REDIS_HIGHMEM_MEDIUM", "REDIS_HIGHMEM_XLARGE"], var.redis_node_type)
    error_message = "redis_node_type must be one of REDIS_SHARED_CORE_NANO, REDIS_STANDARD_SMALL, REDIS_HIGHMEM_MEDIUM, REDIS_HIGHMEM_XLARGE."
  }
}

variable "redis_cluster_psc_cidr" {
  description = "Subnet the Memorystore for Redis Cluster endpoints get their addresses in (Private Service Connect); the NetworkPolicy egress target."
  type        = string
  default     = "10.40.0.0/24"
}

# ------------------------------------------------------------------ BigQuery

variable "bigquery_location" {
  description = "BigQuery dataset location (a multi-region such as EU or US, or a region)."
  type        = string
  default     = "EU"
}

variable "bigquery_dataset_id" {
  description = "Dataset holding the adapter's table."
  type        = string
  default     = "mcloudtt"
}

variable "bigquery_table_id" {
  description = "The adapter's table (docs/adapter-schema.md)."
  type        = string
  default     = "messages"
}

variable "partition_expiration_days" {
  description = "Drop daily partitions older than this many days (null: keep everything)."
  type        = number
  default     = null
}

# ------------------------------------------------------------------ Kubernetes side

variable "k8s_namespace" {
  description = "Namespace of the manifests (kind/base/kustomization.yaml)."
  type        = string
  default     = "mcloudtt"
}

variable "k8s_adapter_service_account" {
  description = "Kubernetes service account of the adapter, bound to its Google service account through Workload Identity."
  type        = string
  default     = "mcloudtt-adapter"
}
