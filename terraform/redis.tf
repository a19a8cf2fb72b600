# The cluster bus: one Memorystore for Redis instance (redis_backend = "instance", the default)
# or Memorystore for Redis Cluster (redis_backend = "cluster", shards and replicas as variables;
# `mcloudtt-sim plan` prints the lines). docs/deploy.md, "Choosing the Redis".
locals {
  redis_cluster = var.redis_backend == "cluster"
}

# Memorystore for Redis: replicated across zones (STANDARD_HA), AUTH, TLS (port 6378, server CA
# in the outputs), hourly RDB snapshots. noeviction: an evicted key would be a lost session or
# retained message (the default policy, volatile-lru, evicts keys that have a TTL).
resource "google_redis_instance" "cluster" {
  count = local.redis_cluster ? 0 : 1

  name           = "${var.name}-redis"
  display_name   = "MCloudTT cluster bus"
  region         = var.region
  tier           = "STANDARD_HA"
  memory_size_gb = var.redis_memory_size_gb
  redis_version  = var.redis_version

  authorized_network = google_compute_network.vpc.id
  connect_mode       = "PRIVATE_SERVICE_ACCESS"
  reserved_ip_range  = google_compute_global_address.private_services.name

  auth_enabled            = true
  transit_encryption_mode = "SERVER_AUTHENTICATION"

  redis_configs = {
    maxmemory-policy = "noeviction"
  }

  persistence_config {
    persistence_mode    = "RDB"
    rdb_snapshot_period = "ONE_HOUR"
  }

  maintenance_policy {
    weekly_maintenance_window {
      day = "SUNDAY"
      start_time {
        hours   = 3
        minutes = 0
        seconds = 0
        nanos   = 0
      }
    }
  }

  labels = local.labels

  depends_on = [google_service_networking_connection.private_services]
}

# Deployments from before the choice existed keep their instance (no destroy and re-create).
moved {
  from = google_redis_instance.cluster
  to   = google_redis_instance.cluster[0]
}

# Memorystore for Redis Cluster: var.redis_shard_count primaries, each with
# var.redis_replica_count replicas in other zones (automatic failover), TLS, hourly RDB
# snapshots, noeviction. Reached through Private Service Connect: the discovery endpoint (port
# 6379) and the node endpoints (ports 11000-13047) get addresses in the subnet below.
#
# No AUTH string: Memorystore for Redis Cluster authenticates with IAM access tokens only, which
# expire hourly and which the brokers do not fetch; the cluster is reachable only from this VPC
# (PSC) and the NetworkPolicy lets only brokers and the adapter out to it.
resource "google_compute_subnetwork" "redis_psc" {
  count = local.redis_cluster ? 1 : 0

  name                     = "${var.name}-redis-psc"
  region                   = var.region
  network                  = google_compute_network.vpc.id
  ip_cidr_range            = var.redis_cluster_psc_cidr
  private_ip_google_access = true

  log_config {
    aggregation_interval = "INTERVAL_10_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

resource "google_network_connectivity_service_connection_policy" "redis" {
  count = local.redis_cluster ? 1 : 0

  name          = "${var.name}-redis"
  location      = var.region
  service_class = "gcp-memorystore-redis"
  description   = "Memorystore for Redis Cluster endpoints of the MCloudTT cluster bus"
  network       = google_compute_network.vpc.id

  psc_config {
    subnetworks = [google_compute_subnetwork.redis_psc[0].id]
  }
}

resource "google_redis_cluster" "bus" {
  count = local.redis_cluster ? 1 : 0

  name          = "${var.name}-redis"
  region        = var.region
  shard_count   = var.redis_shard_count
  replica_count = var.redis_replica_count
  node_type     = var.redis_node_type

  authorization_mode      = "AUTH_MODE_DISABLED"
  transit_encryption_mode = "TRANSIT_ENCRYPTION_MODE_SERVER_AUTHENTICATION"

  psc_configs {
    network = google_compute_network.vpc.id
  }

  zone_distribution_config {
    mode = "MULTI_ZONE"
  }

  redis_configs = {
    maxmemory-policy = "noeviction"
  }

  persistence_config {
    mode = "RDB"
    rdb_config {
      rdb_snapshot_period = "ONE_HOUR"
    }
  }

  maintenance_policy {
    weekly_maintenance_window {
      day = "SUNDAY"
      start_time {
        hours   = 3
        minutes = 0
        seconds = 0
        nanos   = 0
      }
    }
  }

  deletion_protection_enabled = var.deletion_protection

  depends_on = [google_network_connectivity_service_connection_policy.redis]
}
