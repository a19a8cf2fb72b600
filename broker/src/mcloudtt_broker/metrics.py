"""Prometheus text exposition of the broker's counters and gauges."""

from __future__ import annotations

from .core.broker import Broker

CLUSTER_DROP_REASONS = ("buffer_full_qos0", "buffer_full", "unconfirmed_overflow", "peer_gone")
WRONG_ACK_KINDS = (
    "puback_unknown",
    "puback_for_qos2",
    "pubrec_for_qos1",
    "pubcomp_unknown",
    "pubcomp_for_qos1",
)
DROP_REASONS = ("queue_full", "slow_consumer", "expired", "packet_too_large", "offline_qos0")


def render_metrics(
    broker: Broker,
    now: float,
    cluster: dict[str, float] | None = None,
    cluster_dropped: dict[str, int] | None = None,
) -> str:
    stats = broker.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(
                f"{name}{labels} {value:g}"
                if isinstance(value, float)
                else f"{name}{labels} {value}"
            )

    sessions = broker.sessions.values()
    metric(
        "mcloudtt_connections", "gauge", "Clients connected now.", [("", broker.connected_count())]
    )
    metric(
        "mcloudtt_connections_total",
        "counter",
        "MQTT connections accepted (CONNACK sent with success).",
        [("", stats.connections_total)],
    )
    metric(
        "mcloudtt_messages_received_total",
        "counter",
        "PUBLISH packets received from clients, by QoS.",
        [(f'{{qos="{q}"}}', stats.messages_received[q]) for q in range(3)],
    )
    metric(
        "mcloudtt_messages_sent_total",
        "counter",
        "PUBLISH packets sent to clients, by QoS.",
        [(f'{{qos="{q}"}}', stats.messages_sent[q]) for q in range(3)],
    )
    metric(
        "mcloudtt_bytes_received_total",
        "counter",
        "Bytes read from clients.",
        [("", stats.bytes_received)],
    )
    metric(
        "mcloudtt_bytes_sent_total",
        "counter",
        "Bytes written to clients.",
        [("", stats.bytes_sent)],
    )
    reasons = dict.fromkeys(DROP_REASONS, 0) | dict(stats.dropped)
    metric(
        "mcloudtt_messages_dropped_total",
        "counter",
        "Deliveries not made, by reason.",
        [(f'{{reason="{r}"}}', n) for r, n in sorted(reasons.items())],
    )
    metric(
        "mcloudtt_protocol_errors_total",
        "counter",
        "Connections closed for a protocol error.",
        [("", stats.protocol_errors)],
    )
    kinds = dict.fromkeys(WRONG_ACK_KINDS, 0) | dict(stats.wrong_acks)
    metric(
        "mcloudtt_wrong_acks_total",
        "counter",
        "Acknowledgements that matched no flow (each closed its connection), by kind.",
        [(f'{{kind="{k}"}}', n) for k, n in sorted(kinds.items())],
    )
    metric(
        "mcloudtt_oversized_closes_total",
        "counter",
        "Connections closed because a packet they needed exceeded their Maximum Packet Size.",
        [("", stats.oversized_closes)],
    )
    metric(
        "mcloudtt_inflight_messages",
        "gauge",
        "QoS 1/2 messages sent and not yet acknowledged.",
        [("", sum(len(s.inflight) for s in sessions))],
    )
    metric(
        "mcloudtt_queued_messages",
        "gauge",
        "QoS 1/2 messages waiting to be sent.",
        [("", sum(len(s.queue) for s in sessions))],
    )
    metric(
        "mcloudtt_retained_messages",
        "gauge",
        "Retained messages stored.",
        [("", len(broker.retained))],
    )
    metric(
        "mcloudtt_subscriptions",
        "gauge",
        "Subscriptions of all sessions.",
        [("", broker.trie.count)],
    )
    metric(
        "mcloudtt_sessions", "gauge", "Sessions, connected or not.", [("", len(broker.sessions))]
    )
    metric(
        "mcloudtt_uptime_seconds",
        "gauge",
        "Seconds since start.",
        [("", int(now - stats.started_at))],
    )
    if cluster is not None:
        for name, value in cluster.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            metric(
                f"mcloudtt_cluster_{name}",
                kind,
                f"Cluster link: {name.replace('_', ' ')}.",
                [("", value)],
            )
        reasons = dict.fromkeys(CLUSTER_DROP_REASONS, 0) | dict(cluster_dropped or {})
        metric(
            "mcloudtt_cluster_dropped_total",
            "counter",
            "Cluster messages given up, by reason.",
            [(f'{{reason="{r}"}}', n) for r, n in sorted(reasons.items())],
        )
    return "\n".join(lines) + "\n"
