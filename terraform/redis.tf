# Memorystore for Redis: replicated across zones (STANDARD_HA), AUTH, TLS (port 6378, server CA
# in the outputs), hourly RDB snapshots. noeviction: an evicted key would be a lost session or
# retained message (the default policy, volatile-lru, evicts keys that have a TTL).
resource "google_redis_instance" "cluster" {
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
