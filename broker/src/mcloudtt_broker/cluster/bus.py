"""The `ClusterBus` Protocol and the single-node bus.

The core hands the bus every publish it accepted from a local client ("forward this"); a bus
that reaches other brokers hands their publishes back through `Broker.deliver_remote`, which
delivers locally and never forwards again (no echo).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from ..core.message import Message


class ClusterBus(Protocol):
    def forward(
        self, message: Message, targets: Sequence[str], groups: Mapping[str, list[str]]
    ) -> None:
        """Offer a locally accepted publish to the cluster.

        `targets`: brokers with a plain subscription matching the topic (from the cluster
        table); `groups`: broker id -> shared groups (`$share/{name}/{filter}`) that broker was
        chosen to serve for this message. A bus may send to more brokers (broadcast mode).
        """
        ...

    def subscription_added(self, full_filter: str) -> None:
        """The first local subscription with this filter appeared."""
        ...

    def subscription_removed(self, full_filter: str) -> None:
        """The last local subscription with this filter went away."""
        ...

    def session_changed(self, client_id: str) -> None:
        """A session's lasting state changed (subscriptions, connection, queue while away, end):
        a bus that stores persistent sessions for failover writes it again."""
        ...


class LocalBus:
    """A single node: nothing to forward to."""

    def forward(
        self, message: Message, targets: Sequence[str], groups: Mapping[str, list[str]]
    ) -> None:
        return None

    def subscription_added(self, full_filter: str) -> None:
        return None

    def subscription_removed(self, full_filter: str) -> None:
        return None

    def session_changed(self, client_id: str) -> None:
        return None
