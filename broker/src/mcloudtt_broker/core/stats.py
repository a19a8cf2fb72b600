"""Counters the core keeps for /metrics and $SYS (plain integers: cheap on the hot path)."""

from __future__ import annotations

from collections import Counter


class Stats:
    __slots__ = (
        "acl_other",
        "auth",
        "bytes_received",
        "bytes_sent",
        "connections_total",
        "dropped",
        "limited",
        "messages_received",
        "messages_sent",
        "oversized_closes",
        "protocol_errors",
        "read_allowed",
        "started_at",
        "write_allowed",
        "wrong_acks",
    )

    def __init__(self, started_at: float) -> None:
        self.started_at = started_at
        self.connections_total = 0
        self.messages_received = [0, 0, 0]  # by QoS
        self.messages_sent = [0, 0, 0]  # by QoS
        self.bytes_received = 0
        self.bytes_sent = 0
        # reason -> count: queue_full, slow_consumer, expired, packet_too_large, offline_qos0
        self.dropped: Counter[str] = Counter()
        self.protocol_errors = 0
        # kind -> count: acknowledgements that match no flow (puback_unknown, puback_for_qos2,
        # pubrec_for_qos1, pubcomp_unknown, pubcomp_for_qos1); each also closes its connection.
        self.wrong_acks: Counter[str] = Counter()
        # Connections closed because a packet they needed exceeded their Maximum Packet Size.
        self.oversized_closes = 0
        # limit -> count of times it was hit: connections, listener_connections, connect_rate,
        # publish_rate and bandwidth (reading paused), subscriptions, topic_length, topic_levels.
        self.limited: Counter[str] = Counter()
        # CONNECT decisions by label (success, anonymous, bad_username_or_password,
        # not_authorized, bad_authentication_method), and ACL decisions by (action, result):
        # the two counted per message as plain integers (a Counter update would cost more
        # than the cached decision itself), the others in `acl_other`.
        self.auth: Counter[str] = Counter()
        self.read_allowed = 0
        self.write_allowed = 0
        self.acl_other: Counter[tuple[str, str]] = Counter()

    @property
    def acl(self) -> Counter[tuple[str, str]]:
        """Every ACL decision by (action, result); a copy, to read (count into the fields)."""
        merged = Counter(self.acl_other)
        merged["read", "allow"] += self.read_allowed
        merged["write", "allow"] += self.write_allowed
        return merged
