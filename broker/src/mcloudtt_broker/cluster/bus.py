"""The `ClusterBus` Protocol and the single-node bus.

The core hands the bus every publish it accepted from a local client ("forward this"); a bus
that reaches other brokers hands their publishes back through `Broker.deliver_remote`, which
delivers locally and never forwards again (no echo).
"""

from __future__ import annotations

from typing import Protocol

from ..core.message import Message


class ClusterBus(Protocol):
    def forward(self, message: Message) -> None:
        """Offer a locally accepted publish to the rest of the cluster."""
        ...


class LocalBus:
    """A single node: nothing to forward to."""

    def forward(self, message: Message) -> None:
        return None
