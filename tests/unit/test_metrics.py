"""The /metrics exposition of the broker and the adapter, read back with prometheus-client's own
parser: documented names, types and HELP texts unchanged, large counters exact."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from mcloudtt_adapter.metrics import LAG_BUCKETS, standard_metrics
from mcloudtt_broker.core.broker import Broker
from mcloudtt_broker.metrics import registry_for, render_metrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

BIG = 12_345_678  # past 10,000,000: `:g` printed 1.23457e+07

# Exposed name (as on the TYPE line) -> (type, HELP): what dashboards and alerts rely on.
BROKER_FAMILIES = {
    "mcloudtt_connections": ("gauge", "Clients connected now."),
    "mcloudtt_connections_total": (
        "counter",
        "MQTT connections accepted (CONNACK sent with success).",
    ),
    "mcloudtt_messages_received_total": (
        "counter",
        "PUBLISH packets received from clients, by QoS.",
    ),
    "mcloudtt_messages_sent_total": ("counter", "PUBLISH packets sent to clients, by QoS."),
    "mcloudtt_bytes_received_total": ("counter", "Bytes read from clients."),
    "mcloudtt_bytes_sent_total": ("counter", "Bytes written to clients."),
    "mcloudtt_messages_dropped_total": ("counter", "Deliveries not made, by reason."),
    "mcloudtt_protocol_errors_total": ("counter", "Connections closed for a protocol error."),
    "mcloudtt_wrong_acks_total": (
        "counter",
        "Acknowledgements that matched no flow (each closed its connection), by kind.",
    ),
    "mcloudtt_oversized_closes_total": (
        "counter",
        "Connections closed because a packet they needed exceeded their Maximum Packet Size.",
    ),
    "mcloudtt_limited_total": (
        "counter",
        "Times a limit was hit (a refused CONNECT or SUBSCRIBE, a closed connection, or a "
        "client's reading paused), by limit.",
    ),
    "mcloudtt_auth_total": ("counter", "CONNECT authentication decisions, by result."),
    "mcloudtt_acl_decisions_total": (
        "counter",
        "ACL decisions (publish: write, subscribe, delivery: read), by action and result.",
    ),
    "mcloudtt_inflight_messages": ("gauge", "QoS 1/2 messages sent and not yet acknowledged."),
    "mcloudtt_queued_messages": ("gauge", "QoS 1/2 messages waiting to be sent."),
    "mcloudtt_retained_messages": ("gauge", "Retained messages stored."),
    "mcloudtt_subscriptions": ("gauge", "Subscriptions of all sessions."),
    "mcloudtt_sessions": ("gauge", "Sessions, connected or not."),
    "mcloudtt_uptime_seconds": ("gauge", "Seconds since start."),
}


class MemoryBusMetrics:
    """The two things the collector reads from a cluster bus, held in memory."""

    def __init__(self, values: dict[str, float], dropped: Mapping[str, int]) -> None:
        self.values = values
        self.dropped = dropped

    def metrics(self) -> dict[str, float]:
        return dict(self.values)


def declared(text: str) -> dict[str, tuple[str, str]]:
    """TYPE and HELP per exposed name, from the raw text (the parser drops a counter's _total)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            _, key, name, rest = [*line.split(" ", 3), ""][:4]
            out.setdefault(name, ["", ""])[0 if key == "TYPE" else 1] = rest
    return {name: (kind, help_text) for name, (kind, help_text) in out.items()}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        sample: Sample
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_broker_exposition_parses_with_names_types_and_help_as_documented() -> None:
    broker = Broker(clock=lambda: 100.0)
    broker.stats.messages_received[1] = BIG
    broker.stats.bytes_sent = 2**40 + 1  # well past a float32, still exact as a float64
    broker.stats.dropped["queue_full"] = 3
    text = render_metrics(registry_for(broker)).decode()

    assert declared(text) == BROKER_FAMILIES
    got = samples(text)
    assert got[("mcloudtt_messages_received_total", (("qos", "1"),))] == BIG
    assert got[("mcloudtt_bytes_sent_total", ())] == 2**40 + 1
    assert got[("mcloudtt_messages_dropped_total", (("reason", "queue_full"),))] == 3
    # Every documented drop reason is there from the start (rate() needs the zero).
    reasons = {dict(labels)["reason"] for name, labels in got if "dropped" in name}
    assert reasons == {"queue_full", "slow_consumer", "expired", "packet_too_large", "offline_qos0"}
    kinds = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert kinds["mcloudtt_messages_received"] == "counter"  # the parser's name: no _total


def test_broker_exposition_of_the_cluster_bus() -> None:
    bus = MemoryBusMetrics(
        {"link_up": 1.0, "forwarded_total": float(BIG), "peers": 2.0},
        Counter(peer_gone=2),
    )
    text = render_metrics(registry_for(Broker(clock=lambda: 0.0), bus)).decode()
    families = declared(text)
    assert families["mcloudtt_cluster_forwarded_total"] == (
        "counter",
        "Cluster link: forwarded total.",
    )
    assert families["mcloudtt_cluster_link_up"] == ("gauge", "Cluster link: link up.")
    got = samples(text)
    assert got[("mcloudtt_cluster_forwarded_total", ())] == BIG
    assert got[("mcloudtt_cluster_peers", ())] == 2
    assert got[("mcloudtt_cluster_dropped_total", (("reason", "peer_gone"),))] == 2
    assert got[("mcloudtt_cluster_dropped_total", (("reason", "buffer_full"),))] == 0


def test_broker_collector_reads_at_scrape_time() -> None:
    broker = Broker(clock=lambda: 0.0)
    registry = registry_for(broker)
    before = samples(render_metrics(registry).decode())
    broker.stats.connections_total = BIG
    after = samples(render_metrics(registry).decode())
    assert before[("mcloudtt_connections_total", ())] == 0
    assert after[("mcloudtt_connections_total", ())] == BIG


def test_adapter_exposition_exact_and_as_documented() -> None:
    m = standard_metrics()
    m.inc("mcloudtt_adapter_rows_in_total", BIG, source="mqtt")
    m.inc("mcloudtt_adapter_sink_errors_total", 2, sink="duckdb", kind='quote"d')
    m.set("mcloudtt_adapter_pending", 5)
    m.observe("mcloudtt_adapter_batch_seconds", 0.3, sink="duckdb")
    counts = [1] * (len(LAG_BUCKETS) + 1)
    m.observe_counts("mcloudtt_adapter_lag_seconds", LAG_BUCKETS, counts, 3.5)
    text = m.exposition().decode()

    families = declared(text)
    assert families["mcloudtt_adapter_rows_in_total"] == (
        "counter",
        "messages received, per source",
    )
    assert families["mcloudtt_adapter_lag_seconds"][0] == "histogram"
    assert families["mcloudtt_adapter_source_connected"][0] == "gauge"  # declared, unset
    got = samples(text)
    assert got[("mcloudtt_adapter_rows_in_total", (("source", "mqtt"),))] == BIG
    assert got[("mcloudtt_adapter_sink_errors_total", (("kind", 'quote"d'), ("sink", "duckdb")))]
    assert got[("mcloudtt_adapter_acked_total", ())] == 0  # a counter nobody touched yet
    # Bucket bounds keep their old spelling ("1", not "1.0"), so series keep their identity.
    assert got[("mcloudtt_adapter_lag_seconds_bucket", (("le", "1"),))] == 8
    assert got[("mcloudtt_adapter_lag_seconds_bucket", (("le", "+Inf"),))] == len(counts)
    assert got[("mcloudtt_adapter_lag_seconds_count", ())] == len(counts)
    assert got[("mcloudtt_adapter_lag_seconds_sum", ())] == 3.5
    assert got[("mcloudtt_adapter_batch_seconds_bucket", (("le", "0.5"), ("sink", "duckdb")))] == 1
    assert not any(name == "mcloudtt_adapter_source_connected" for name, _ in got)
