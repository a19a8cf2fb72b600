"""HTTP for probes and Prometheus: the broker's small route-based server, reused."""

from mcloudtt_broker.httpd import Handler, HttpServer

__all__ = ["Handler", "HttpServer"]
