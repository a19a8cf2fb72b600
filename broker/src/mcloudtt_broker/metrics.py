"""`/metrics`: a prometheus-client collector over the counters the core already keeps.

Nothing is counted here: `collect()` reads `Broker.stats`, the sessions and the cluster bus's
`metrics()` when Prometheus scrapes, so the hot path stays plain integer increments. The exposed
names, labels and HELP texts are the ones the README documents; dashboards rely on them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .core.auth import ACTIONS, AUTH_LABELS
from .core.broker import Broker

CLUSTER_DROP_REASONS = ("buffer_full_qos0", "buffer_full", "unconfirmed_overflow", "peer_gone")
WRONG_ACK_KINDS = (
    "puback_unknown",
    "puback_for_qos2",
    "pubrec_for_qos1",
    "pubcomp_unknown",
    "pubcomp_for_qos1",
)
LIMITS = (
    "connections",
    "listener_connections",
    "connect_rate",
    "publish_rate",
    "bandwidth",
    "subscriptions",
    "topic_length",
    "topic_levels",
)
DROP_REASONS = ("queue_full", "slow_consumer", "expired", "packet_too_large", "offline_qos0")


class ClusterMetrics(Protocol):
    """What the collector reads from the cluster bus."""

    @property
    def dropped(self) -> Mapping[str, int]: ...

    def metrics(self) -> dict[str, float]: ...


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    # CounterMetricFamily drops a trailing _total from the family name; the Prometheus text
    # exposition puts it back on the HELP, TYPE and sample lines, so the names stay as documented.
    return CounterMetricFamily(name, help_text, value=value)


def _by_label(
    family: CounterMetricFamily, label_values: Mapping[str, float]
) -> CounterMetricFamily:
    for label, value in label_values.items():
        family.add_metric([label], value)
    return family


class BrokerCollector(Collector):
    def __init__(self, broker: Broker, bus: ClusterMetrics | None = None) -> None:
        self.broker = broker
        self.bus = bus

    def collect(self) -> Iterator[Metric]:
        broker = self.broker
        stats = broker.stats
        sessions = broker.sessions.values()
        yield GaugeMetricFamily(
            "mcloudtt_connections", "Clients connected now.", value=broker.connected_count()
        )
        yield _counter(
            "mcloudtt_connections_total",
            "MQTT connections accepted (CONNACK sent with success).",
            stats.connections_total,
        )
        for direction, verb, counts in (
            ("received", "received from", stats.messages_received),
            ("sent", "sent to", stats.messages_sent),
        ):
            family = CounterMetricFamily(
                f"mcloudtt_messages_{direction}_total",
                f"PUBLISH packets {verb} clients, by QoS.",
                labels=["qos"],
            )
            yield _by_label(family, {str(qos): counts[qos] for qos in range(3)})
        yield _counter(
            "mcloudtt_bytes_received_total", "Bytes read from clients.", stats.bytes_received
        )
        yield _counter("mcloudtt_bytes_sent_total", "Bytes written to clients.", stats.bytes_sent)
        reasons = dict.fromkeys(DROP_REASONS, 0) | dict(stats.dropped)
        yield _by_label(
            CounterMetricFamily(
                "mcloudtt_messages_dropped_total",
                "Deliveries not made, by reason.",
                labels=["reason"],
            ),
            dict(sorted(reasons.items())),
        )
        yield _counter(
            "mcloudtt_protocol_errors_total",
            "Connections closed for a protocol error.",
            stats.protocol_errors,
        )
        kinds = dict.fromkeys(WRONG_ACK_KINDS, 0) | dict(stats.wrong_acks)
        yield _by_label(
            CounterMetricFamily(
                "mcloudtt_wrong_acks_total",
                "Acknowledgements that matched no flow (each closed its connection), by kind.",
                labels=["kind"],
            ),
            dict(sorted(kinds.items())),
        )
        auth = dict.fromkeys(AUTH_LABELS, 0) | dict(stats.auth)
        yield _by_label(
            CounterMetricFamily(
                "mcloudtt_auth_total",
                "CONNECT authentication decisions, by result.",
                labels=["result"],
            ),
            auth,
        )
        acl = CounterMetricFamily(
            "mcloudtt_acl_decisions_total",
            "ACL decisions (publish: write, subscribe, delivery: read), by action and result.",
            labels=["action", "result"],
        )
        decisions = stats.acl
        for action in ACTIONS:
            for result in ("allow", "deny"):
                acl.add_metric([action, result], decisions[action, result])
        yield acl
        yield _counter(
            "mcloudtt_oversized_closes_total",
            "Connections closed because a packet they needed exceeded their Maximum Packet Size.",
            stats.oversized_closes,
        )
        limits = dict.fromkeys(LIMITS, 0) | dict(stats.limited)
        yield _by_label(
            CounterMetricFamily(
                "mcloudtt_limited_total",
                "Times a limit was hit (a refused CONNECT or SUBSCRIBE, a closed connection, or "
                "a client's reading paused), by limit.",
                labels=["limit"],
            ),
            dict(sorted(limits.items())),
        )
        for name, help_text, value in (
            (
                "mcloudtt_inflight_messages",
                "QoS 1/2 messages sent and not yet acknowledged.",
                sum(len(s.inflight) for s in sessions),
            ),
            (
                "mcloudtt_queued_messages",
                "QoS 1/2 messages waiting to be sent.",
                sum(len(s.queue) for s in sessions),
            ),
            ("mcloudtt_retained_messages", "Retained messages stored.", len(broker.retained)),
            ("mcloudtt_subscriptions", "Subscriptions of all sessions.", broker.trie.count),
            ("mcloudtt_sessions", "Sessions, connected or not.", len(broker.sessions)),
            (
                "mcloudtt_uptime_seconds",
                "Seconds since start.",
                int(broker.clock() - stats.started_at),
            ),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)
        if self.bus is not None:
            yield from self._cluster(self.bus)

    def _cluster(self, bus: ClusterMetrics) -> Iterator[Metric]:
        for name, value in bus.metrics().items():
            help_text = f"Cluster link: {name.replace('_', ' ')}."
            if name.endswith("_total"):
                yield _counter(f"mcloudtt_cluster_{name}", help_text, value)
            else:
                yield GaugeMetricFamily(f"mcloudtt_cluster_{name}", help_text, value=value)
        reasons = dict.fromkeys(CLUSTER_DROP_REASONS, 0) | dict(bus.dropped)
        yield _by_label(
            CounterMetricFamily(
                "mcloudtt_cluster_dropped_total",
                "Cluster messages given up, by reason.",
                labels=["reason"],
            ),
            dict(sorted(reasons.items())),
        )


def registry_for(broker: Broker, bus: ClusterMetrics | None = None) -> CollectorRegistry:
    """A private registry (not the process-wide default) holding only the broker's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker, bus))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    """Prometheus text format 0.0.4 (`generate_latest`); integers of any size print exactly."""
    return generate_latest(registry)
