"""Start real broker processes on free ports for tests (thin wrappers over mcloudtt_chaos.procs).

`MCLOUDTT_TEST_TARGET=mosquitto` runs the same black-box tests against Mosquitto (a check that the
tests themselves say what MQTT says; options Mosquitto lacks make those tests skip).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from signal import SIGTERM

from mcloudtt_chaos.procs import (
    Process,
    console_script,
    free_port,
    http_get,
    mosquitto_binary,
    mosquitto_config,
    parse_metrics,
    port_open,
    wait_for,
)

__all__ = [
    "TARGET",
    "BrokerProcess",
    "broker_command",
    "broker_pool",
    "free_port",
    "running_broker",
]

TARGET = os.environ.get("MCLOUDTT_TEST_TARGET", "mcloudtt")


def wait_for_port(
    port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    def listening() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        return port_open(port)

    wait_for(listening, timeout=timeout, what=f"something listening on 127.0.0.1:{port}")


def parse_metric(text: str, name: str, **labels: str) -> float:
    """One sample from Prometheus text (exactly these labels), 0.0 when absent."""
    return parse_metrics(text).value(name, **labels)


def broker_command() -> list[str]:
    return console_script("mcloudtt-broker", "mcloudtt_broker")


class BrokerProcess(Process):
    """A broker subprocess: `port` is MQTT over TCP, `http_port` serves /healthz, /readyz, /metrics."""

    def __init__(self, *extra_args: str, env: dict[str, str] | None = None) -> None:
        port, http_port = free_port(), free_port()
        self.extra_args = list(extra_args)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._output: str | None = None
        super().__init__([], name="broker", env=env, port=port, http_port=http_port)
        # Tests may set either port before start() (a restart on the same address).
        self.port: int = port
        self.http_port: int = http_port

    def _command(self) -> list[str]:
        if TARGET == "mosquitto":
            self._tmp = self._tmp or tempfile.TemporaryDirectory()
            conf = Path(self._tmp.name) / "mosquitto.conf"
            conf.write_text(mosquitto_config(self.port))
            return [mosquitto_binary(), "-c", str(conf)]
        return [
            *broker_command(),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--http",
            f"127.0.0.1:{self.http_port}",
            *self.extra_args,
        ]

    def start(self) -> BrokerProcess:
        self.cmd = self._command()
        self._output = None
        super().start()
        try:
            self.wait_port(timeout=10)
            if TARGET != "mosquitto":
                self.wait_port(self.http_port, timeout=10)
        except BaseException:
            self.stop()  # not left running when it did not come up
            raise
        return self

    def http_get(self, path: str) -> tuple[int, str]:
        return http_get(self.http_port, path)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one Prometheus sample from /metrics (0.0 when absent)."""
        return parse_metric(self.http_get("/metrics")[1], name, **labels)

    def signal(self, sig: int = SIGTERM) -> None:
        super().signal(sig)

    def stop(self, timeout: float = 10.0, sig: int = SIGTERM) -> int:
        code = super().stop(timeout, sig)
        if self._output is None:
            self._output = self.log_text()
        self.remove_log()  # its text is kept for output()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return code

    def close(self) -> None:
        self.stop()

    def output(self) -> str:
        """Everything the process printed, once it has exited ("" while it runs)."""
        if self.alive():
            return ""
        return self._output if self._output is not None else self.log_text()


@contextmanager
def broker_pool(*base_args: str) -> Iterator[Callable[..., BrokerProcess]]:
    """`start(*args, env=None)`: a broker with `base_args` and `args`; all stopped at the end."""
    started: list[BrokerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> BrokerProcess:
        broker = BrokerProcess(*base_args, *args, env=env).start()
        started.append(broker)
        return broker

    try:
        yield start
    finally:
        for broker in started:
            broker.stop()


@contextmanager
def running_broker(*extra_args: str, env: dict[str, str] | None = None) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(*extra_args, env=env).start()
    try:
        yield broker
    finally:
        broker.stop()
