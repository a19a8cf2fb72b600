"""Start real broker processes on free ports for tests.

`MCLOUDTT_TEST_TARGET=mosquitto` runs the same black-box tests against Mosquitto (a check that the
tests themselves say what MQTT says; options Mosquitto lacks make those tests skip).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TARGET = os.environ.get("MCLOUDTT_TEST_TARGET", "mcloudtt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def parse_metric(text: str, name: str, **labels: str) -> float:
    """One sample from Prometheus text (labels sorted by name, as our exporters write them)."""
    want = name
    if labels:
        want += "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == want:
            return float(value)
    return 0.0


def broker_command() -> list[str]:
    exe = shutil.which("mcloudtt-broker", path=str(Path(sys.executable).parent))
    if exe:
        return [exe]
    return [sys.executable, "-m", "mcloudtt_broker"]


class BrokerProcess:
    """A broker subprocess: `port` is MQTT over TCP, `http_port` serves /healthz, /readyz, /metrics."""

    def __init__(self, *extra_args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.http_port = free_port()
        self.extra_args = list(extra_args)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> BrokerProcess:
        if TARGET == "mosquitto":
            self._tmp = tempfile.TemporaryDirectory()
            conf = Path(self._tmp.name) / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "max_queued_messages 0\n"
            )
            cmd = ["mosquitto", "-c", str(conf)]
        else:
            cmd = [
                *broker_command(),
                "--bind",
                f"127.0.0.1:{self.port}",
                "--http",
                f"127.0.0.1:{self.http_port}",
                *self.extra_args,
            ]
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        # Output goes to a file, never a pipe: a pipe nobody reads would block a chatty broker.
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - handed to the child, closed below
            prefix="mcloudtt-broker-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._log.close()
        wait_for_port(self.port, proc=self.proc)
        if TARGET != "mosquitto":
            wait_for_port(self.http_port, proc=self.proc)
        return self

    def http_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one Prometheus sample from /metrics (0.0 when absent)."""
        return parse_metric(self.http_get("/metrics")[1], name, **labels)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
        self.output()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)
        return self.proc.returncode

    def output(self) -> str:
        """Everything the process printed, once it has exited ("" while it runs)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            return ""
        if not hasattr(self, "_output"):
            with contextlib.suppress(OSError), open(self._log.name, "rb") as log:
                self._output = log.read().decode(errors="replace")
        return getattr(self, "_output", "")


@contextmanager
def running_broker(*extra_args: str, env: dict[str, str] | None = None) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(*extra_args, env=env).start()
    try:
        yield broker
    finally:
        broker.stop()
