"""A watchdog that outlives its parent by a moment: it reads process-group ids on stdin, one a
line ("-": forget them all), and when stdin closes (the parent exited, however: even SIGKILL closes the pipe) it
SIGKILLs every group it was told about, grandchildren included (the simulator's workers).

`python -m mcloudtt_chaos.watchdog`; `Watchdog` starts one and feeds it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys


class Watchdog:
    """The parent's end: `watch(pgid)` after each child starts."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mcloudtt_chaos.watchdog"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C at the terminal does not end it early
        )

    def watch(self, pgid: int) -> None:
        if self.proc.stdin is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(f"{pgid}\n".encode())
                self.proc.stdin.flush()

    def close(self) -> None:
        """Everything was stopped in order: it forgets the groups (their ids may be reused
        by then) and exits."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b"-\n")
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin.buffer:
        if line.strip() == b"-":
            groups.clear()
            continue
        with contextlib.suppress(ValueError):
            groups.add(int(line))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


if __name__ == "__main__":
    main()
