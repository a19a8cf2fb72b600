"""The sink interface: write a batch and return only once it is committed (or raise)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from mcloudtt_broker.backoff import Backoff as CappedBackoff

from ..records import Batch


@dataclass(frozen=True, slots=True)
class WriteResult:
    written: int
    dead_lettered: int = 0


class SinkError(Exception):
    """A write failed. `retryable`: the same batch may succeed later (the pipeline retries)."""

    def __init__(self, message: str, *, retryable: bool = True, kind: str = "error") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.kind = kind


@runtime_checkable
class Sink(Protocol):
    """A place rows go. `write` runs in a worker thread; one call at a time, batches in order.

    A sink returns from `write` only when every row is durable in the store, or in the dead
    letter with its reason; only then does the pipeline acknowledge the messages to their
    sources. Writing the same batch twice must be harmless (ids make retries recognisable).
    """

    name: str

    def open(self) -> None: ...

    def write(self, batch: Batch) -> WriteResult: ...

    def close(self) -> None: ...


class Backoff(CappedBackoff):
    """The shared backoff (half jitter: at least half the ceiling) with a blocking wait for
    sink threads; `wait()` returns False once told to stop."""

    def __init__(
        self, *, base: float = 0.2, cap: float = 30.0, stop: threading.Event | None = None
    ) -> None:
        super().__init__(base=base, cap=cap, jitter=0.5)
        self.stop = stop or threading.Event()

    def wait(self) -> bool:
        return not self.stop.wait(self.next())


class MemorySink:
    """Rows kept in a list, for unit tests. `fail(n)` makes the next n writes raise."""

    name = "memory"

    def __init__(self, *, delay: float = 0.0) -> None:
        self.rows: list[dict[str, Any]] = []
        self.batches = 0
        self.delay = delay
        self._failures = 0
        self._failure: SinkError | None = None
        self.opened = False
        self.closed = False
        self._seen: set[str] = set()
        self.duplicates = 0

    def fail(self, times: int = 1, error: SinkError | None = None) -> None:
        self._failures = times
        self._failure = error or SinkError("injected failure", retryable=True)

    def open(self) -> None:
        self.opened = True

    def write(self, batch: Batch) -> WriteResult:
        if self.delay:
            time.sleep(self.delay)
        if self._failures:
            self._failures -= 1
            assert self._failure is not None
            raise self._failure
        for row in batch.rows():
            if row["message_id"] in self._seen:
                self.duplicates += 1
            self._seen.add(row["message_id"])
            self.rows.append(row)
        self.batches += 1
        return WriteResult(len(batch))

    def close(self) -> None:
        self.closed = True
