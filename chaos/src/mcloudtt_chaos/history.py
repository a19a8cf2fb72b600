"""The history of a chaos run: every client operation and fault as one JSON line.

The workload appends typed records while it runs (`HistoryWriter`); the checker reads them back
(`read_history`) and judges them after the run, Jepsen-style, so that a run's verdict can be
recomputed, and a checker bug fixed, without running the faults again.

Conventions the checker relies on:
- `t` is seconds on one clock for the whole run (the workload's `time.monotonic()`).
- A message is named by its publisher and that publisher's sequence number (`seq`), which the
  workload writes into the payload (`encode_payload`), so a delivery names what it delivered.
- `conn` numbers the connections of one client (1, 2, ...), so that a disconnect, its will and the
  next CONNACK can be told apart.
- Times in `Subscribed`, `Acked` and `ConnAck` are when the client saw the broker's answer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar


@dataclass(frozen=True, kw_only=True)
class Sent:
    """A PUBLISH the publisher wrote (`dup`: its own retransmission after a reconnect)."""

    kind: ClassVar[str] = "sent"
    t: float
    publisher: str
    topic: str
    qos: int
    seq: int
    broker: str = ""
    retain: bool = False
    dup: bool = False


@dataclass(frozen=True, kw_only=True)
class Acked:
    """The PUBACK (QoS 1) or PUBCOMP (QoS 2) for a publisher's message: the broker took it."""

    kind: ClassVar[str] = "acked"
    t: float
    publisher: str
    seq: int
    reason_code: int = 0


@dataclass(frozen=True, kw_only=True)
class Delivered:
    """A PUBLISH a subscriber received (`group`: through that shared subscription group)."""

    kind: ClassVar[str] = "delivered"
    t: float
    subscriber: str
    broker: str
    topic: str
    qos: int
    publisher: str
    seq: int
    dup: bool = False
    retain: bool = False
    group: str | None = None


@dataclass(frozen=True, kw_only=True)
class Connect:
    """A CONNECT sent (`will_topic`: the will it carries, if any)."""

    kind: ClassVar[str] = "connect"
    t: float
    client: str
    conn: int
    broker: str
    clean_start: bool
    protocol: int = 4
    will_topic: str | None = None


@dataclass(frozen=True, kw_only=True)
class ConnAck:
    kind: ClassVar[str] = "connack"
    t: float
    client: str
    conn: int
    broker: str
    session_present: bool
    reason_code: int = 0


@dataclass(frozen=True, kw_only=True)
class Subscribed:
    """A SUBACK granting `qos` for `filter` (`group`: a `$share/<group>/<filter>` subscription)."""

    kind: ClassVar[str] = "subscribed"
    t: float
    client: str
    filter: str
    qos: int
    group: str | None = None


@dataclass(frozen=True, kw_only=True)
class Disconnect:
    """A connection ended: `normal` is a DISCONNECT the client sent (no will, MQTT-3.1.2-10);
    anything else (socket closed, broker killed, keepalive lost) is abnormal."""

    kind: ClassVar[str] = "disconnect"
    t: float
    client: str
    conn: int
    normal: bool
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class WillPublished:
    """A will message a watcher received: the will of `client`'s connection `conn`."""

    kind: ClassVar[str] = "will"
    t: float
    watcher: str
    client: str
    conn: int
    broker: str = ""
    # The watcher's connection it came on, and its DUP flag: a copy on a later connection that
    # resumed the session is a QoS 1 redelivery, not a second will (0: not recorded).
    watcher_conn: int = 0
    dup: bool = False


@dataclass(frozen=True, kw_only=True)
class SessionExpired:
    """The subscriber's session is gone by design (expiry interval passed, or discarded)."""

    kind: ClassVar[str] = "session_expired"
    t: float
    client: str


@dataclass(frozen=True, kw_only=True)
class FaultStart:
    kind: ClassVar[str] = "fault_start"
    t: float
    fault: str
    target: str = ""


@dataclass(frozen=True, kw_only=True)
class FaultEnd:
    kind: ClassVar[str] = "fault_end"
    t: float
    fault: str
    target: str = ""


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """What one broker holds, read after healing: retained topics (topic -> payload digest) and
    its subscription table as (client, filter, qos) rows."""

    kind: ClassVar[str] = "snapshot"
    t: float
    broker: str
    retained: dict[str, str] = field(default_factory=dict)
    subscriptions: tuple[tuple[str, str, int], ...] = ()


Record = (
    Sent
    | Acked
    | Delivered
    | Connect
    | ConnAck
    | Subscribed
    | Disconnect
    | WillPublished
    | SessionExpired
    | FaultStart
    | FaultEnd
    | Snapshot
)

RECORD_TYPES: dict[str, type[Record]] = {
    cls.kind: cls
    for cls in (
        Sent,
        Acked,
        Delivered,
        Connect,
        ConnAck,
        Subscribed,
        Disconnect,
        WillPublished,
        SessionExpired,
        FaultStart,
        FaultEnd,
        Snapshot,
    )
}


class HistoryError(ValueError):
    """A line that is not a record of a known kind."""


def to_json(record: Record) -> dict[str, Any]:
    data: dict[str, Any] = {"kind": record.kind}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        data[f.name] = [list(row) for row in value] if isinstance(value, tuple) else value
    return data


def from_json(data: dict[str, Any]) -> Record:
    kind = data.get("kind")
    cls = RECORD_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise HistoryError(f"unknown record kind {kind!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in data.items() if k in names}
    if cls is Snapshot and "subscriptions" in values:
        values["subscriptions"] = tuple(
            (str(c), str(f), int(q)) for c, f, q in values["subscriptions"]
        )
    try:
        return cls(**values)
    except TypeError as error:
        raise HistoryError(f"bad {kind} record: {error}") from None


def dumps(record: Record) -> str:
    return json.dumps(to_json(record), separators=(",", ":"), sort_keys=True)


def loads(line: str) -> Record:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise HistoryError(f"not JSON: {error}") from None
    if not isinstance(data, dict):
        raise HistoryError("a record is a JSON object")
    return from_json(data)


class HistoryWriter:
    """Append records to a JSON-lines file; flushed line by line so a crash keeps the history."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] = self.path.open("a", encoding="utf-8")
        self.count = 0

    def write(self, record: Record) -> None:
        self._file.write(dumps(record) + "\n")
        self._file.flush()
        self.count += 1

    def write_all(self, records: Iterable[Record]) -> None:
        for record in records:
            self.write(record)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def iter_history(path: str | Path) -> Iterator[Record]:
    with Path(path).open(encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                yield loads(line)
            except HistoryError as error:
                raise HistoryError(f"{path}:{number}: {error}") from None


def read_history(path: str | Path) -> list[Record]:
    return list(iter_history(path))


def write_history(path: str | Path, records: Iterable[Record]) -> None:
    with HistoryWriter(path) as writer:
        writer.write_all(records)


def encode_payload(publisher: str, seq: int, sent_at: float, *, size: int = 0) -> bytes:
    """The workload's payload: who sent it, its sequence number and when, padded to `size`."""
    body = json.dumps({"p": publisher, "s": seq, "t": sent_at}, separators=(",", ":")).encode()
    return body + b" " * max(0, size - len(body))


def decode_payload(payload: bytes) -> tuple[str, int, float]:
    data = json.loads(payload)
    return str(data["p"]), int(data["s"]), float(data["t"])
