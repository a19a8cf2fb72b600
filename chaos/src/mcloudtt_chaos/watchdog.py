"""Children that die with this process however it ends, SIGKILL included.

`guard()` (once a process, from any thread) starts a small watchdog: `python watchdog.py` in a
session of its own, reading a pipe whose write end only this process holds. It also adds a token
of its own to `MCLOUDTT_GUARD` in `os.environ`, so every process started after it carries the
token, however deep and in whatever session (a broker started by a `mcloudtt-chaos run` that a
test started). `watch(pid)` names a process group too (a child whose environment was replaced).

When the pipe closes, the parent has gone. After a normal exit (an `atexit` hook says `exit`) the
watchdog does nothing: what teardown left running stays, as before. Otherwise (SIGKILL, a fatal
signal, `os._exit`) it SIGKILLs every watched group and every process carrying the token, until
none is left. Other watchdogs are spared: each sees its own parent go and does its own work.

Why not PR_SET_PDEATHSIG alone: it fires when the parent *thread* that forked ends (a child
started from `asyncio.to_thread` dies with that worker thread), and it reaches only direct
children; a SIGKILLed pytest runs no fixture teardown.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

ENV = "MCLOUDTT_GUARD"
_MARK = "MCLOUDTT_WATCHDOG"  # in the watchdog's own environment: spared by other watchdogs


# ------------------------------------------------------------------------ the parent's end


class Watchdog:
    """The parent's end of one watchdog: `watch(pid)` after a child starts, `forget(pid)` once
    it is reaped, `close()` on a clean exit."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token or f"{os.getpid()}.{time.time_ns()}"
        read_end, self._fd = os.pipe()  # both close-on-exec: no child inherits the write end
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), self.token],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # a caller reading our stderr to EOF must not wait on it
                env={**os.environ, _MARK: "1"},
                start_new_session=True,  # a Ctrl-C at the terminal does not end it early
            )
        finally:
            os.close(read_end)
        self._lock = threading.Lock()

    def _send(self, line: str) -> None:
        with self._lock:
            if self._fd < 0:
                return
            with contextlib.suppress(OSError):
                os.write(self._fd, line.encode() + b"\n")  # one short write: atomic on a pipe

    def watch(self, pid: int) -> None:
        """Kill the group `pid` leads if this process dies (the leader's start time is checked
        then, so a reused pid is not hit)."""
        self._send(f"+{pid} {_start_time(pid)}")

    def forget(self, pid: int) -> None:
        self._send(f"-{pid}")

    def close(self) -> None:
        """A clean exit: the watchdog forgets everything and exits."""
        self._send("exit")
        self._drop()

    def _drop(self) -> None:
        with self._lock:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1


_GUARD: Watchdog | None = None
_INIT = threading.Lock()


def guard() -> Watchdog:
    """This process's watchdog, started on first use; children started after carry its token."""
    global _GUARD
    with _INIT:
        if _GUARD is None:
            _GUARD = Watchdog()
            atexit.register(_clean_exit)
        elif _GUARD.proc.poll() is not None:
            # Killed under us: a new one on the same token, which the children carry (the
            # groups told to the old one are known by that token only, unless re-watched).
            _GUARD._drop()
            _GUARD = Watchdog(_GUARD.token)
        # Set after the watchdog started (it must not carry its own token), and again if a
        # caller replaced os.environ.
        tokens = os.environ.get(ENV, "").split()
        if _GUARD.token not in tokens:
            os.environ[ENV] = " ".join([*tokens, _GUARD.token])
        return _GUARD


def guarded() -> Watchdog | None:
    """This process's watchdog if one was started."""
    return _GUARD


def _clean_exit() -> None:
    if _GUARD is not None:
        _GUARD.close()


def _after_fork_in_child() -> None:
    # A forked child (multiprocessing) must not hold the pipe open, or the watchdog would wait
    # for it too; it keeps the token, so it dies with the parent, and may guard() its own.
    global _GUARD, _INIT
    _INIT = threading.Lock()  # another thread may have held it at the fork
    if _GUARD is not None:
        with contextlib.suppress(OSError):
            os.close(_GUARD._fd)
        _GUARD._fd = -1
        _GUARD = None


os.register_at_fork(after_in_child=_after_fork_in_child)


# ------------------------------------------------------------------------- the watchdog


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (index 0: state, 2: pgid, 19: start)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2 :].decode().split()


def _start_time(pid: int) -> str:
    fields = _stat(pid)
    return fields[19] if fields else "?"


def _tokens(pid: int) -> tuple[set[str], bool]:
    """The guard tokens in a process's environment, and whether it is a watchdog."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:  # gone, or not ours
        return set(), False
    tokens: set[str] = set()
    mark = False
    for entry in entries:
        if entry.startswith(ENV.encode() + b"="):
            tokens.update(entry[len(ENV) + 1 :].decode(errors="replace").split())
        elif entry.startswith(_MARK.encode() + b"="):
            mark = True
    return tokens, mark


def _sweep(token: str, groups: dict[int, str]) -> int:
    """SIGKILL what carries `token` and the members of the watched groups; how many were hit."""
    me = os.getpid()
    hit = 0
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:  # no /proc: the watched groups only
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        return 0
    # A watched group is still the one we were told of if its leader has the start time we
    # were told, or is gone (its id is not given out again while members hold it).
    live = {pgid for pgid, start in groups.items() if _start_time(pgid) in (start, "?")}
    for pid in pids:
        if pid == me:
            continue
        fields = _stat(pid)
        if fields is None or fields[0] in ("Z", "X"):
            continue
        tokens, is_watchdog = _tokens(pid)
        if is_watchdog:
            continue
        if token in tokens or int(fields[2]) in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                hit += 1
    return hit


def main(token: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: dict[int, str] = {}
    clean = False
    for raw in sys.stdin.buffer:
        line = raw.decode(errors="replace").strip()
        if line == "exit":
            clean = True
            groups.clear()
        elif line.startswith("+"):
            with contextlib.suppress(ValueError):
                pid, start = line[1:].split()
                groups[int(pid)] = start
        elif line.startswith("-"):
            with contextlib.suppress(ValueError):
                groups.pop(int(line[1:]), None)
    if clean:
        return
    # Until a sweep finds nobody: a process forked while the last sweep ran is caught by the next.
    for _ in range(50):
        if not _sweep(token, groups):
            return
        time.sleep(0.05)


if __name__ == "__main__":
    main(sys.argv[1])
