"""Start the brokers under test as fresh local processes, each on its own free port.

- mcloudtt: `mcloudtt-broker` from the same environment as this command.
- mosquitto: the system's binary with a generated configuration (no persistence, unbounded
  queues: with its default `max_queued_messages 1000` it drops QoS 1 messages for a slow
  subscriber and the generator would wait for messages that never come).
- amqtt: pinned in a virtual environment of its own under the cache directory, made on first use,
  because its dependency pins clash with the project's.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from mcloudtt_chaos.procs import (
    HOST,
    NotInstalled,
    Process,
    console_script,
    free_port,
    mosquitto_binary,
    mosquitto_config,
)
from mcloudtt_mqttclient import (
    CONNACK,
    DISCONNECT_BYTES,
    MQTT_311,
    Frame,
    MalformedPacket,
    Reader,
    connect,
    parse,
)

AMQTT_VERSION = "0.12.1"
BROKER_NAMES = ("mcloudtt", "mosquitto", "amqtt")


class BrokerUnavailable(RuntimeError):
    """The broker cannot be started on this machine (not installed, install failed)."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mcloudtt-loadtest"


class RunningBroker(Process):
    """A broker under test, serving MQTT on `port`, its output in `log_path`."""

    def __init__(self, launcher: Launcher, port: int, workdir: Path) -> None:
        super().__init__(
            launcher.command(port, workdir),
            name=launcher.name,
            log_path=workdir / f"{launcher.name}-{port}.log",
            cwd=workdir,
            port=port,
        )
        self.port: int = port


class Launcher(Protocol):
    name: str

    def prepare(self) -> None:
        """Make the broker runnable (install it if needed); raise BrokerUnavailable if not."""

    def version(self) -> str: ...

    def command(self, port: int, workdir: Path) -> list[str]: ...


class McloudttLauncher:
    name = "mcloudtt"

    def __init__(self, extra_args: str = "") -> None:
        self.extra_args = shlex.split(extra_args)

    def _base(self) -> list[str]:
        return console_script("mcloudtt-broker", "mcloudtt_broker")

    def prepare(self) -> None:
        try:
            from importlib.metadata import PackageNotFoundError, version

            version("mcloudtt-broker")
        except PackageNotFoundError as e:
            raise BrokerUnavailable("mcloudtt-broker is not installed in this environment") from e

    def version(self) -> str:
        from importlib.metadata import version

        return version("mcloudtt-broker")

    def command(self, port: int, workdir: Path) -> list[str]:
        return [*self._base(), "--bind", f"{HOST}:{port}", *self.extra_args]


class MosquittoLauncher:
    name = "mosquitto"

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or ""

    def prepare(self) -> None:
        try:
            self.binary = self.binary or mosquitto_binary()
        except NotInstalled as error:
            raise BrokerUnavailable(str(error)) from None
        if not Path(self.binary).exists():
            raise BrokerUnavailable(f"{self.binary} not found")

    def version(self) -> str:
        out = subprocess.run(
            [self.binary, "-h"], capture_output=True, text=True, check=False, timeout=10
        ).stdout
        first = out.splitlines()[0] if out else ""
        return first.rsplit(" ", 1)[-1] if "version" in first else "unknown"

    def command(self, port: int, workdir: Path) -> list[str]:
        conf = workdir / f"mosquitto-{port}.conf"
        conf.write_text(mosquitto_config(port))
        return [self.binary, "-c", str(conf)]


class AmqttLauncher:
    name = "amqtt"

    def __init__(self, cache_dir: Path) -> None:
        self.venv = cache_dir / f"amqtt-{AMQTT_VERSION}"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def script(self) -> Path:
        return self.venv / "bin" / "amqtt"

    def _installed(self) -> bool:
        if not self.script.exists():
            return False
        probe = subprocess.run(
            [str(self.python), "-c", "import amqtt; print(amqtt.__version__)"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        return probe.returncode == 0 and probe.stdout.strip() == AMQTT_VERSION

    def prepare(self) -> None:
        if self._installed():
            return
        self.venv.parent.mkdir(parents=True, exist_ok=True)
        uv = shutil.which("uv")
        if uv:
            steps = [
                [
                    uv,
                    "venv",
                    "--quiet",
                    "--allow-existing",
                    "--python",
                    sys.executable,
                    str(self.venv),
                ],
                [
                    uv,
                    "pip",
                    "install",
                    "--quiet",
                    "--python",
                    str(self.python),
                    f"amqtt=={AMQTT_VERSION}",
                ],
            ]
        else:
            steps = [
                [sys.executable, "-m", "venv", str(self.venv)],
                [str(self.python), "-m", "pip", "install", "--quiet", f"amqtt=={AMQTT_VERSION}"],
            ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, check=False, timeout=600)
            if done.returncode != 0:
                raise BrokerUnavailable(
                    f"installing amqtt {AMQTT_VERSION} failed: {' '.join(step)}\n{done.stderr[-2000:]}"
                )
        if not self._installed():
            raise BrokerUnavailable(f"amqtt {AMQTT_VERSION} not importable in {self.venv}")

    def version(self) -> str:
        return AMQTT_VERSION

    def command(self, port: int, workdir: Path) -> list[str]:
        # JSON is YAML. Only anonymous auth: no $SYS publisher, no packet logger.
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        conf = workdir / f"amqtt-{port}.yaml"
        conf.write_text(json.dumps(config, indent=2))
        return [str(self.script), "-c", str(conf)]


def make_launcher(name: str, *, cache_dir: Path, mcloudtt_args: str = "") -> Launcher:
    if name == "mcloudtt":
        return McloudttLauncher(mcloudtt_args)
    if name == "mosquitto":
        return MosquittoLauncher()
    if name == "amqtt":
        return AmqttLauncher(cache_dir)
    raise ValueError(f"unknown broker {name!r}; choose from {', '.join(BROKER_NAMES)}")


def _mqtt_probe(port: int, timeout: float) -> bool:
    """True once the broker answers a CONNECT with a CONNACK."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(connect("mcloudtt-bench-probe", version=MQTT_311, keepalive=10))
            reader = Reader()
            frames: list[Frame] = []
            while not frames:
                chunk = s.recv(64)
                if not chunk:
                    return False
                frames = reader.frames(chunk)
            if frames[0][0] == CONNACK:
                s.sendall(DISCONNECT_BYTES)
                return parse(*frames[0], MQTT_311).code == 0
    except (OSError, MalformedPacket):
        return False
    return False


def start_broker(launcher: Launcher, workdir: Path, *, timeout: float = 30.0) -> RunningBroker:
    """A fresh broker process on a free port, returned once it answers MQTT."""
    broker = RunningBroker(launcher, free_port(), workdir).start()
    try:
        broker.wait_until(
            lambda: _mqtt_probe(broker.port, timeout=2.0),
            what=f"answering MQTT on port {broker.port}",
            timeout=timeout,
            interval=0.05,
        )
    except BaseException:
        broker.stop()
        raise
    return broker
