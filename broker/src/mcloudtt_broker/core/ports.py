"""The core's ports: what it asks of a cluster bus, and what a bus may ask of it.

Outgoing (`ClusterBus`): the core hands the bus every publish it accepted from a local client
("forward this"), the changes of its subscription filters and persistent sessions, and each
CONNECT whose session may live on another broker. Incoming (`ClusterCore`): a bus that reaches
other brokers hands their publishes back through `deliver_remote`, which delivers locally and
never forwards again (no echo), keeps the cluster table current, and moves sessions in and out.
A bus uses only `ClusterCore`, never the core's internals.

`LocalBus` is the single node: nothing to forward to, no session lives elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Protocol

from ..mqtt.reason_codes import ReasonCode
from .message import Message
from .session import SessionSnapshot

# Called once with the session found elsewhere (None: none, or a clean start) to finish CONNECT;
# with a reason code when it could not be looked for in time (the cluster is busy): the
# CONNECT is refused with it, and the session stays where it is for the client's next try.
Resume = Callable[[SessionSnapshot | ReasonCode | None], None]


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
        a bus that stores persistent sessions for failover writes it again
        (`ClusterCore.stored_session`)."""
        ...

    def delivery_completed(self, client_id: str) -> None:
        """A persistent session's client completed a QoS 2 delivery (PUBCOMP): a bus that
        replays a dead broker's inbox stores the session again at once, so that the replay
        does not deliver it twice (exactly once costs a write per completion)."""
        ...

    def release_after_store(self, client_id: str, packet_id: int) -> bool:
        """A persistent session's client sent PUBREC: True if the bus stores the session
        first and then calls `ClusterCore.release` (the PUBREL is where the client delivers;
        a session restored elsewhere must know it was sent), False to send PUBREL now."""
        ...

    def locate_session(self, client_id: str, clean_start: bool, resume: Resume) -> bool:
        """A CONNECT for `client_id` was accepted: its session may live on another broker.

        False: nothing to look for, the CONNECT goes on at once and `resume` is never called.
        True: the bus takes the session from wherever it is (that broker gives it up through
        `ClusterCore.handover`) and calls `resume(snapshot)` exactly once, later or already
        inside this call.
        """
        ...


class ClusterCore(Protocol):
    """What a cluster bus may use of the broker core."""

    clock: Callable[[], float]

    # The cluster table: other brokers' subscription filters.
    def remote_subscribe(self, broker_id: str, full_filter: str) -> None: ...

    def remote_unsubscribe(self, broker_id: str, full_filter: str) -> None: ...

    def remote_forget(self, broker_id: str) -> None: ...

    def remote_filter_count(self) -> int: ...

    def local_filters(self) -> list[str]:
        """The filters with local subscribers: this broker's entries in the cluster table."""
        ...

    # Messages from other brokers.
    def deliver_remote(
        self, message: Message, plain: bool, groups: Sequence[str], skip: Collection[str] = ()
    ) -> Sequence[str]:
        """Deliver here (`skip`: not to these sessions' plain subscriptions); returns the
        shared groups of `groups` with no member here any more (their last one just left, or
        was handed to another broker): the caller passes them on (`replay_shared`), or the
        message would reach no member."""
        ...

    def retained_messages(self) -> list[Message]:
        """The retained messages (without `$` topics, which include this broker's `$SYS`)."""
        ...

    def load_retained(self, messages: Iterable[Message]) -> None:
        """Make the retained messages (without `$` topics) exactly `messages`."""
        ...

    # Sessions across brokers.
    def has_session(self, client_id: str) -> bool: ...

    def persistent_sessions(self) -> list[str]:
        """Client ids of the sessions that outlive their connection (Session Expiry > 0)."""
        ...

    def stored_session(self, client_id: str) -> SessionSnapshot | None:
        """The session to store for failover; None when there is none to store (gone, or it
        ends with its connection)."""
        ...

    def handover(self, client_id: str, clean_start: bool, now: float) -> SessionSnapshot | None:
        """Another broker took `client_id`: close the connection here, give up the session."""
        ...

    def will_of(self, client_id: str) -> Message | None:
        """The will to publish if this broker died now with `client_id` connected."""
        ...

    def publish(self, message: Message) -> None:
        """Route a message as if a client here published it (a dead broker's stored wills)."""
        ...

    def adopt_session(self, snapshot: SessionSnapshot, now: float) -> None:
        """Take a session a gone broker served, as an offline session expiring from `now`."""
        ...

    def queued(self, client_id: str) -> int:
        """How many messages wait in the queue of `client_id`'s session."""
        ...

    def bound_queue(self, client_id: str, bounded: bool) -> None:
        """Lift (False) or restore (True) the queue bound of `client_id`'s session."""
        ...

    def queue_behind(self, client_id: str, start: int, stop: int) -> None:
        """Move the queued messages [start, stop) of `client_id`'s session behind the rest."""
        ...

    def surrender_sessions(self) -> list[str]:
        """Give up every persistent session (another broker adopted them while we were
        declared dead); returns their ClientIds."""
        ...

    def idle_sessions(self) -> list[str]:
        """Client ids of the online persistent sessions with nothing in flight or queued."""
        ...

    def release(self, client_id: str, packet_id: int) -> None:
        """Send the PUBREL `release_after_store` held back, now that the session is stored."""
        ...

    def busy_sessions(self) -> list[str]:
        """Client ids of the online persistent sessions with something in flight or queued."""
        ...

    def replay_to(
        self, client_ids: Iterable[str], message: Message, *, redelivered: bool = True
    ) -> None:
        """Deliver `message` to the plain subscriptions of these local sessions only."""
        ...

    def remote_route(self, message: Message) -> tuple[Sequence[str], dict[str, list[str]]]:
        """The remote part of routing `message` (plain targets, shared groups per broker)."""
        ...

    def replay_shared(self, message: Message, keys: Iterable[str], gone: str) -> None:
        """Deliver `message` once more to each of these shared groups, on a member here or on
        a live broker other than `gone` (which was chosen for them and died)."""
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

    def delivery_completed(self, client_id: str) -> None:
        return None

    def release_after_store(self, client_id: str, packet_id: int) -> bool:
        return False

    def locate_session(self, client_id: str, clean_start: bool, resume: Resume) -> bool:
        return False
