"""MCloudTT on one machine: start Redis, brokers, the adapter and a fleet as local processes."""
