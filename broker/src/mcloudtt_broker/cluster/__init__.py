"""Cluster buses: how a broker hands publishes to the other brokers and receives theirs."""
