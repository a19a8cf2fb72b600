"""Helpers for the adapter tests: publishers, an adapter subprocess, a local BigQuery emulator."""

from __future__ import annotations

import fcntl
import os
import platform
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from brokerproc import free_port, parse_metric
from mcloudtt_adapter.decode import PayloadDecoder
from mcloudtt_adapter.records import Batch, Record
from mcloudtt_chaos.procs import Process, console_script, http_get, http_status, wait_for
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[2]
T0 = 1_767_225_600_000_000  # 2026-01-01 00:00:00 UTC in microseconds


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    return wait_for(predicate, timeout=timeout, what="the condition", interval=interval)


def make_batch(records: list[tuple[str, bytes]], start: int = 0, step_us: int = 1_000_000) -> Batch:
    batch = Batch()
    decoder = PayloadDecoder()
    for i, (topic, payload) in enumerate(records):
        n = start + i
        record = Record(
            None, None, f"b1:{n}", topic, payload, 1, False, T0 + n * step_us, "b1", f"c{n % 3}"
        )
        decoder.append(batch, record, T0 + 10**9)
    return batch


def fleet(n: int = 600, start: int = 0) -> Batch:
    """Five devices every second; d4 goes quiet halfway; one spike on d0."""
    recs = []
    for i in range(start, start + n):
        device = f"d{i % 5}"
        if device == "d4" and i > n // 2:
            continue
        temp = 20.0 + (i * 7919 % 100) / 100 + (25.0 if i == 450 else 0.0)
        recs.append(
            (
                f"devices/{device}/env",
                orjson.dumps({"ts": (T0 + i * 1_000_000) / 1e6, "temp": temp, "hum": 40 + i % 3}),
            )
        )
    return make_batch(recs, start)


class Publisher:
    """A paho 2.x client that publishes and waits for each QoS 1 PUBACK."""

    def __init__(self, port: int, client_id: str = "", version: int = 5) -> None:
        protocol = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_until(self.client.is_connected, 5)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        properties: Any = None,
    ) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos:
            info.wait_for_publish(10)
            assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def adapter_command() -> list[str]:
    return console_script("mcloudtt-adapter", "mcloudtt_adapter")


class AdapterProcess(Process):
    """`mcloudtt-adapter run ...` as a subprocess, with /healthz, /readyz, /metrics on a free port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        http_port = free_port()
        self.args = list(args)
        super().__init__(
            [*adapter_command(), "run", *self.args, "--http", f"127.0.0.1:{http_port}"],
            name="adapter",
            env=env,
            http_port=http_port,
        )
        self.http_port: int = http_port

    def start(self, ready: bool = True) -> AdapterProcess:
        super().start()
        wait_until(lambda: self._probe("/healthz") == 200 or not self.alive(), 20)
        # With ready=False the caller expects that the adapter may stop on its own.
        if ready and not self.alive():
            raise self.failure(f"exited with {self.returncode}")
        if ready:
            self.wait_ready()
        return self

    def _probe(self, path: str) -> int:
        return http_status(self.http_port, path, timeout=5)

    def get(self, path: str) -> tuple[int, str]:
        try:
            return http_get(self.http_port, path)
        except OSError:
            return 0, ""

    def wait_ready(self, timeout: float = 20.0) -> None:
        wait_until(lambda: self._probe("/readyz") == 200, timeout)

    def metric(self, name: str, **labels: str) -> float:
        return parse_metric(self.get("/metrics")[1], name, **labels)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:  # type: ignore[override]
        return super().stop(timeout, sig)

    def log(self) -> str:
        return self.log_text()

    def close(self) -> None:
        if self.alive():
            self.kill()
        self.remove_log()


# ------------------------------------------------------------------------ BigQuery emulator

BQEMULATOR = "bqemulator==1.4.0"
SPATIAL = "duckdb-extension-spatial==1.5.5"


def _cache_root() -> Path:
    base = (
        os.environ.get("MCLOUDTT_CACHE")
        or os.environ.get("XDG_CACHE_HOME")
        or str(Path.home() / ".cache")
    )
    return Path(base) / "mcloudtt-adapter" / "bqemulator-1.4.0"


def _uv() -> str | None:
    return shutil.which("uv") or (
        str(REPO / ".tools/bin/uv") if (REPO / ".tools/bin/uv").exists() else None
    )


def install_bqemulator() -> tuple[Path, Path]:
    """The emulator in its own venv under the cache (its pins clash with ours), installed once.

    Offline fixes: pin the spatial extension wheel and copy its binary where DuckDB looks, in a
    private HOME (DuckDB would otherwise try to download it). Returns (bqemulator, HOME).
    """
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / "venv"
    home = root / "home"
    exe = venv / "bin" / "bqemulator"
    ready = root / ".ready"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready.exists():
            shutil.rmtree(venv, ignore_errors=True)
            uv = _uv()
            packages = [BQEMULATOR, SPATIAL, "numpy"]
            if uv:
                subprocess.run([uv, "venv", "-q", "-p", sys.executable, str(venv)], check=True)
                subprocess.run(
                    [
                        uv,
                        "pip",
                        "install",
                        "-q",
                        "--python",
                        str(venv / "bin" / "python"),
                        *packages,
                    ],
                    check=True,
                )
            else:
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
                subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *packages], check=True)
            found = sorted(
                venv.glob(
                    "lib/python*/site-packages/duckdb_extension_spatial/**/spatial.duckdb_extension"
                )
            )
            if not found:
                raise RuntimeError("spatial.duckdb_extension not found in the emulator's venv")
            version = next(p for p in found[0].parts if p.startswith("v1."))
            arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
                platform.machine(), "amd64"
            )
            target = home / ".duckdb" / "extensions" / version / f"linux_{arch}"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(found[0], target / "spatial.duckdb_extension")
            ready.write_text("ok\n")
    return exe, home


class BigQueryEmulator:
    def __init__(self, exe: Path, home: Path, project: str = "mcloudtt-test") -> None:
        self.exe = exe
        self.home = home
        self.project = project
        self.rest_port = free_port()
        self.grpc_port = free_port()
        self.process: Process | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def start(self) -> BigQueryEmulator:
        self.process = Process(
            [
                str(self.exe),
                "start",
                "--rest-port",
                str(self.rest_port),
                "--grpc-port",
                str(self.grpc_port),
                "--project",
                self.project,
                "--log-level",
                "error",
            ],
            name="bqemulator",
            env={"HOME": str(self.home)},
        ).start()
        datasets = f"/bigquery/v2/projects/{self.project}/datasets"
        self.process.wait_until(
            lambda: http_status(self.rest_port, datasets) == 200,
            what="serving its REST API",
            timeout=60,
            interval=0.1,
        )
        return self

    def client(self, endpoint: str | None = None) -> Any:
        from mcloudtt_adapter.sinks.bigquery import make_client

        return make_client(self.project, endpoint or self.endpoint)

    def stop(self) -> None:
        if self.process is not None:
            self.process.close()


class FaultProxy:
    """An HTTP proxy in front of the emulator that breaks chosen insertAll calls.

    `plan` is consumed one entry per insertAll request: "503" answers 503 without forwarding (the
    request never reached BigQuery), "lost" forwards it and then answers 503 (BigQuery stored the
    rows but the reply was lost), anything else forwards. Every insertAll body is recorded.
    """

    def __init__(self, upstream_port: int) -> None:
        import http.client
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.plan: list[str] = []
        self.insert_bodies: list[dict[str, Any]] = []
        self.injected = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action = "pass"
                if self.command == "POST" and self.path.split("?")[0].endswith("/insertAll"):
                    proxy.insert_bodies.append(json.loads(body))
                    if proxy.plan:
                        action = proxy.plan.pop(0)
                if action == "503":
                    proxy.injected += 1
                    self._reply(503, b'{"error": {"code": 503, "message": "injected"}}')
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
                }
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                if action == "lost":
                    proxy.injected += 1
                    self._reply(
                        503, b'{"error": {"code": 503, "message": "injected after commit"}}'
                    )
                    return
                self._reply(response.status, data, response.getheader("Content-Type"))

            def _reply(
                self, status: int, data: bytes, ctype: str | None = "application/json"
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype or "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
