"""Chaos backends, looked up by name: `load("local")` imports `backends/local.py` and returns
its `Backend` (each module exposes `create() -> Backend`, or a class named `<Name>Backend`).

Modules are imported only when asked for, so a backend that needs what this machine lacks
(root for `netns`, kubectl for `kind`) costs nothing until it is chosen. Creating one must not
need its platform (`--dry-run` creates it to describe the plan); `setup()` may fail instead.

Optional, looked up with getattr by the scenarios and the runner:
- `rss(broker) -> int | None`: resident memory of a broker (slow-consumer judges its growth);
- `describe(call, *args, **kwargs) -> list[str]`: what a Backend call would run (kubectl ...),
  printed under that call by `--dry-run`;
- `workdir: Path | None`: set by the runner (when None) to keep logs next to the history.
"""

from __future__ import annotations

import importlib
from typing import cast

from mcloudtt_chaos.backend import Backend

NAMES = ("local", "netns", "kind", "docker")


class BackendUnavailable(RuntimeError):
    """The backend's module is missing or cannot be imported here (one line says why)."""


def load(name: str) -> Backend:
    """A new, not yet set up, backend of this name."""
    if name not in NAMES:
        raise BackendUnavailable(f"unknown backend {name!r} (known: {', '.join(NAMES)})")
    try:
        module = importlib.import_module(f"mcloudtt_chaos.backends.{name}")
    except ModuleNotFoundError as error:
        if error.name == f"mcloudtt_chaos.backends.{name}":
            raise BackendUnavailable(f"backend {name!r} is not in this build") from None
        raise BackendUnavailable(f"backend {name!r} needs {error.name!r}: {error}") from None
    factory = getattr(module, "create", None) or getattr(module, f"{name.title()}Backend", None)
    if factory is None:
        raise BackendUnavailable(f"backend module {name!r} has no create() or backend class")
    try:
        return cast(Backend, factory())
    except (OSError, RuntimeError) as error:  # e.g. procs.NotInstalled: a tool it needs
        raise BackendUnavailable(f"backend {name!r} cannot run here: {error}") from None
