"""Where rows a sink rejected go, each with its reason: a JSON Lines file or a BigQuery table."""

from __future__ import annotations

import base64
import os
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import orjson

from ..records import Batch


class DeadLetter(Protocol):
    def write(self, entries: list[dict[str, Any]]) -> None:
        """Store entries durably or raise. Each: message_id, failed_at_us, sink, reason, row."""
        ...


def dead_letter_entry(batch: Batch, index: int, sink: str, reason: str) -> dict[str, Any]:
    row = batch.row(index)
    row["payload"] = base64.b64encode(row["payload"]).decode()
    row["metrics"] = [{"name": n, "value": v} for n, v in row["metrics"]]
    return {
        "message_id": row["message_id"],
        "failed_at_us": time.time_ns() // 1000,
        "sink": sink,
        "reason": reason,
        "row": row,
    }


class FileDeadLetter:
    """Appends one JSON object per line and fsyncs before returning."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.count = 0

    def write(self, entries: list[dict[str, Any]]) -> None:
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(orjson.dumps(e) + b"\n" for e in entries)
        with self._lock, open(self.path, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self.count += len(entries)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [orjson.loads(line) for line in self.path.read_bytes().splitlines() if line]


class MemoryDeadLetter:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def write(self, entries: list[dict[str, Any]]) -> None:
        self.entries.extend(entries)
