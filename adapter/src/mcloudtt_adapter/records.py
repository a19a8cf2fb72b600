"""What flows through the adapter: a `Record` per message in, a columnar `Batch` per commit out."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol


class AckTarget(Protocol):
    """A source that wants to hear which of its messages a sink has committed."""

    name: str

    def ack(self, tokens: list[Any]) -> None: ...


class Record:
    """One message as a source received it; `ack` is the source's token (None: nothing to ack)."""

    __slots__ = (
        "ack",
        "broker_id",
        "client_id",
        "message_id",
        "payload",
        "properties",
        "qos",
        "received_at_us",
        "retain",
        "source",
        "topic",
    )

    def __init__(
        self,
        source: AckTarget | None,
        ack: Any,
        message_id: str,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        received_at_us: int,
        broker_id: str | None = None,
        client_id: str | None = None,
        properties: str | None = None,
    ) -> None:
        self.source = source
        self.ack = ack
        self.message_id = message_id
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.received_at_us = received_at_us
        self.broker_id = broker_id
        self.client_id = client_id
        self.properties = properties  # JSON text of the MQTT 5.0 properties, or None

    def __repr__(self) -> str:
        return f"Record({self.message_id!r}, {self.topic!r}, {len(self.payload)} bytes)"


# Field positions in a row tuple (the decoder appends one tuple per message; columns are
# built once per batch by transposing, which is cheaper than seventeen appends per message).
(
    MESSAGE_ID,
    EVENT_TIME,
    RECEIVE_TIME,
    BROKER_ID,
    CLIENT_ID,
    SOURCE,
    TOPIC,
    DEVICE_ID,
    QOS,
    RETAIN,
    PAYLOAD,
    PAYLOAD_SIZE,
    PAYLOAD_FORMAT,
    ATTRIBUTES,
    PROPERTIES,
    METRIC_END,
) = range(16)


class Batch:
    """Rows for one commit, readable as columns for Arrow (DuckDB) or as JSON rows (BigQuery).

    `metric_offsets[i]:metric_offsets[i+1]` are row i's entries in `metric_names`/`metric_values`.
    Times are integer microseconds since the epoch, UTC.
    """

    __slots__ = (
        "_cols",
        "_cols_len",
        "acks",
        "ingest_us",
        "metric_names",
        "metric_values",
        "payload_bytes",
        "tuples",
    )

    def __init__(self) -> None:
        self.tuples: list[tuple[Any, ...]] = []  # one per row, fields in the order above
        self._cols: list[tuple[Any, ...]] = []
        self._cols_len = -1
        self.ingest_us = 0
        self.metric_names: list[str] = []
        self.metric_values: list[float] = []
        self.payload_bytes = 0
        # source -> its ack tokens, in the order received
        self.acks: dict[AckTarget, list[Any]] = {}

    def __len__(self) -> int:
        return len(self.tuples)

    def add_row(self, row: tuple[Any, ...]) -> None:
        self.tuples.append(row)

    def _col(self, index: int) -> list[Any]:
        if self._cols_len != len(self.tuples):
            self._cols = list(zip(*self.tuples, strict=True)) if self.tuples else [()] * 16
            self._cols_len = len(self.tuples)
        return list(self._cols[index])

    @property
    def message_id(self) -> list[str]:
        return self._col(MESSAGE_ID)

    @property
    def event_time(self) -> list[int]:
        return self._col(EVENT_TIME)

    @property
    def ingest_time(self) -> list[int]:
        return [self.ingest_us] * len(self.tuples)

    @property
    def receive_time(self) -> list[int]:
        return self._col(RECEIVE_TIME)

    @property
    def broker_id(self) -> list[str | None]:
        return self._col(BROKER_ID)

    @property
    def client_id(self) -> list[str | None]:
        return self._col(CLIENT_ID)

    @property
    def source(self) -> list[str]:
        return self._col(SOURCE)

    @property
    def topic(self) -> list[str]:
        return self._col(TOPIC)

    @property
    def device_id(self) -> list[str | None]:
        return self._col(DEVICE_ID)

    @property
    def qos(self) -> list[int]:
        return self._col(QOS)

    @property
    def retain(self) -> list[bool]:
        return self._col(RETAIN)

    @property
    def payload(self) -> list[bytes]:
        return self._col(PAYLOAD)

    @property
    def payload_size(self) -> list[int]:
        return self._col(PAYLOAD_SIZE)

    @property
    def payload_format(self) -> list[str]:
        return self._col(PAYLOAD_FORMAT)

    @property
    def attributes(self) -> list[str | None]:
        return self._col(ATTRIBUTES)

    @property
    def properties(self) -> list[str | None]:
        return self._col(PROPERTIES)

    @property
    def metric_offsets(self) -> list[int]:
        return [0, *self._col(METRIC_END)]

    def metrics_of(self, i: int) -> list[tuple[str, float]]:
        hi = self.tuples[i][METRIC_END]
        lo = self.tuples[i - 1][METRIC_END] if i else 0
        return list(zip(self.metric_names[lo:hi], self.metric_values[lo:hi], strict=True))

    def rows(self) -> Iterator[dict[str, Any]]:
        """Row dicts (column name -> Python value; times stay integer microseconds)."""
        for i in range(len(self)):
            yield self.row(i)

    def row(self, i: int) -> dict[str, Any]:
        r = self.tuples[i]
        return {
            "message_id": r[MESSAGE_ID],
            "event_time": r[EVENT_TIME],
            "ingest_time": self.ingest_us,
            "receive_time": r[RECEIVE_TIME],
            "broker_id": r[BROKER_ID],
            "client_id": r[CLIENT_ID],
            "source": r[SOURCE],
            "topic": r[TOPIC],
            "device_id": r[DEVICE_ID],
            "qos": r[QOS],
            "retain": r[RETAIN],
            "payload": r[PAYLOAD],
            "payload_size": r[PAYLOAD_SIZE],
            "payload_format": r[PAYLOAD_FORMAT],
            "attributes": r[ATTRIBUTES],
            "properties": r[PROPERTIES],
            "metrics": self.metrics_of(i),
        }

    def subset(self, indices: list[int]) -> Batch:
        """A new batch holding only the given rows (acks are not carried over)."""
        out = Batch()
        out.ingest_us = self.ingest_us
        for i in indices:
            r = self.tuples[i]
            hi = r[METRIC_END]
            lo = self.tuples[i - 1][METRIC_END] if i else 0
            out.metric_names.extend(self.metric_names[lo:hi])
            out.metric_values.extend(self.metric_values[lo:hi])
            out.add_row((*r[:METRIC_END], len(out.metric_names)))
            out.payload_bytes += r[PAYLOAD_SIZE]
        return out
