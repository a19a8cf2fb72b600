"""Start real broker processes on free ports for tests.

`MCLOUDTT_TEST_TARGET=mosquitto` runs the same black-box tests against Mosquitto (a check that the
tests themselves say what MQTT says; options Mosquitto lacks make those tests skip).
"""

from __future__ import annotations

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


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
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
                "--bind", f"127.0.0.1:{self.port}",
                "--http", f"127.0.0.1:{self.http_port}",
                *self.extra_args,
            ]
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for_port(self.port, proc=self.proc)
        return self

    def http_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one Prometheus sample from /metrics (0.0 when absent)."""
        _, text = self.http_get("/metrics")
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
        self.output()  # collect and close the pipe
        return self.proc.returncode

    def output(self) -> str:
        """Everything the process printed, once it has exited ("" while it runs)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            return ""
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self._output = self.proc.stdout.read().decode(errors="replace")
            self.proc.stdout.close()
        return getattr(self, "_output", "")


@contextmanager
def running_broker(*extra_args: str, env: dict[str, str] | None = None) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(*extra_args, env=env).start()
    try:
        yield broker
    finally:
        broker.stop()
