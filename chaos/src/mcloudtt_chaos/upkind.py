"""`mcloudtt up --kind`: the dashboard, canary and fleet of `mcloudtt up`, against the cluster
`kind/up.sh` builds instead of processes on this machine.

Nothing is started in the cluster: `kind/up.sh` did that. From the host, broker N is reached on
its own node ports (kind/overlays/kind/broker-pods.yaml, mapped to 127.0.0.1 by
kind/cluster.yaml: MQTT 31884+N, HTTP 30880+N), the adapter through `kubectl port-forward
svc/mcloudtt-adapter`, and the dashboard's buttons act through the chaos harness's kind backend
(`backends.kind.KindBackend`: pods deleted, Redis scaled to 0 and back, SIGSTOP from the node).
The simulator runs here, against the brokers' node ports. `--dry-run` prints all of that and
needs none of the tools.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from .backends import kind as kb
from .dashboard import Canary, DashboardServer, Sampler, final_page
from .local import LocalCluster, workdir
from .procs import console_script, free_port, http_get, port_free, port_open, wait_for

LOAD_SPEEDUP = 60.0  # up.LOAD_SPEEDUP (up imports this module lazily; no cycle)
ADAPTER_SERVICE = "svc/mcloudtt-adapter"  # kind/base/adapter/service.yaml
ADAPTER_PORT = 9100
REDIS_WHERE = f"pod {kb.REDIS_POD} (in the cluster)"


@dataclass
class RemoteService:
    """A broker (or Redis) in the cluster, as the dashboard's sampler sees a local process:
    always "alive" here; whether it answers is what the sampler finds out."""

    name: str
    port: int | None = None
    http_port: int | None = None
    pid: int = -1  # no local process: no CPU or memory figures

    def alive(self) -> bool:
        return True


@dataclass
class KindTargets:
    services: list[Any] = field(default_factory=list)
    redis_port: int = kb.REDIS_PORT
    redis_where: str = REDIS_WHERE


def kind_targets(brokers: int = kb.MAX_BROKERS, host: str = "127.0.0.1") -> KindTargets:
    if not 1 <= brokers <= kb.MAX_BROKERS:
        raise ValueError(
            f"--kind reaches 1 to {kb.MAX_BROKERS} brokers one by one (one NodePort Service each"
            f" in kind/overlays/kind/broker-pods.yaml), not {brokers}"
        )
    backend = kb.KindBackend(dry_run=True, host=host)
    backend.brokers = brokers
    services: list[Any] = [
        RemoteService(f"broker-{e.name[1:]}", e.mqtt_port, e.http_port) for e in backend.endpoints()
    ]
    return KindTargets([*services, RemoteService("redis")])


def context() -> str:
    return "kind-" + os.environ.get("KIND_CLUSTER_NAME", "mcloudtt")


def port_forward_command(local_port: int) -> list[str]:
    return [
        "kubectl",
        "--context",
        context(),
        "-n",
        kb.NAMESPACE,
        "port-forward",
        "--address",
        "127.0.0.1",
        ADAPTER_SERVICE,
        f"{local_port}:{ADAPTER_PORT}",
    ]


def preflight() -> str | None:
    """Why `--kind` cannot run here (one line), or None."""
    docker = os.environ.get("DOCKER", "docker")
    missing = [tool for tool in (docker, "kind", "kubectl") if shutil.which(tool) is None]
    if missing:
        return (
            f"needs {docker}, kind and kubectl on PATH; not found: {', '.join(missing)}"
            " (install them, run kind/up.sh, then mcloudtt up --kind; --dry-run shows the plan)"
        )
    cluster = os.environ.get("KIND_CLUSTER_NAME", "mcloudtt")
    try:
        proc = subprocess.run(
            ["kind", "get", "clusters"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"kind get clusters failed: {error}"
    if cluster not in proc.stdout.split():
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "not listed"
        return f"no kind cluster {cluster!r} ({why}): run kind/up.sh first"
    return None


def fleet_command(args: argparse.Namespace, targets: KindTargets) -> list[str]:
    seconds = args.seconds if args.seconds > 0 else 365 * 24 * 3600.0
    command = [
        *console_script("mcloudtt-sim"),
        "run",
        "--scenario",
        args.scenario,
        "--devices",
        str(args.devices),
        "--seconds",
        str(seconds),
    ]
    if args.load:  # as the local --load: the verifier's subscriber would double the work
        command += ["--speedup", str(LOAD_SPEEDUP), "--verify", "none"]
    for service in targets.services:
        if service.port is not None:
            command += ["--broker", f"127.0.0.1:{service.port}"]
    return command


REDIS_CLUSTER_STS = "mcloudtt-redis-cluster"  # kind/components/redis-cluster/statefulset.yaml


def made_by(args: argparse.Namespace) -> str:
    """The kind/up.sh command that made the cluster this run expects."""
    return "kind/up.sh --redis-cluster" if getattr(args, "redis_cluster", False) else "kind/up.sh"


def plan(args: argparse.Namespace, adapter_port: int) -> list[str]:
    """What `mcloudtt up --kind` would connect to and run, one line each."""
    targets = kind_targets(args.brokers)
    lines = [
        f"# kind cluster {os.environ.get('KIND_CLUSTER_NAME', 'mcloudtt')}"
        f" (kubectl context {context()}), made by {made_by(args)}"
    ]
    if getattr(args, "redis_cluster", False):
        lines.append(
            f"redis: a Redis Cluster, StatefulSet {REDIS_CLUSTER_STS} (3 primaries + 3 replicas,"
            " kind/overlays/kind-redis-cluster); the dashboard's Redis buttons are off"
        )
    for s in targets.services:
        if s.port is not None:
            lines.append(
                f"{s.name}: mqtt 127.0.0.1:{s.port}  http://127.0.0.1:{s.http_port}/metrics"
            )
    lines.append(f"adapter: http://127.0.0.1:{adapter_port}/analytics  via")
    lines.append("  " + " ".join(port_forward_command(adapter_port)))
    if args.devices > 0:
        lines.append("fleet: " + " ".join(fleet_command(args, targets)))
    host, port = args.dashboard_at
    lines.append(f"dashboard: http://{host}:{port}")
    return lines


def apply_kind_action(
    backend: kb.KindBackend,
    sampler: Sampler,
    action: tuple[str, str],
    *,
    redis_cluster: bool = False,
) -> None:
    """A dashboard button, through the kind backend (blocking, on the main thread)."""
    target, verb = action
    note = sampler.event
    if target == "redis" and redis_cluster:
        # The backend stops, starts and freezes the single Redis's StatefulSet and pod.
        note(f"redis {verb}: not on a Redis Cluster (kind/up.sh --redis-cluster)", "bad")
        return
    try:
        if target.startswith("broker-"):
            broker = "b" + target.removeprefix("broker-")
            if verb == "kill":
                backend.kill_broker(broker)
                note(f"{target}: pod deleted (--force) from the dashboard", "bad")
            elif verb == "stop":
                backend.stop_broker(broker)
                note(f"{target}: pod deleted (drained) from the dashboard", "bad")
            elif verb == "restart":
                backend.start_broker(broker)  # the StatefulSet makes the pod again
                note(f"{target} serves again", "good")
        elif target == "redis":
            if verb == "stop":
                backend.kill_redis()
                sampler.redis_state = "stopped"
            elif verb == "start":
                backend.start_redis()
                sampler.redis_state = "running"
            elif verb == "freeze":
                backend.freeze_redis()
                sampler.redis_state = "frozen"
            elif verb == "thaw":
                backend.thaw_redis()
                sampler.redis_state = "running"
            note(
                f"redis {verb} from the dashboard", "bad" if verb in ("stop", "freeze") else "good"
            )
    except (kb.KindError, NotImplementedError, OSError, TimeoutError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        note(f"{target} {verb} failed: {first[:300]}", "bad")


def up_kind(args: argparse.Namespace) -> int:
    console = Console()
    adapter_port = free_port()
    host, port = args.dashboard_at
    if args.dry_run:
        print("\n".join(plan(args, adapter_port)))
        return 0
    error = preflight()
    if error is not None:
        print(f"mcloudtt up --kind: {error}", file=sys.stderr)
        return 2
    from .up import view  # the same terminal table as the local run

    targets = kind_targets(args.brokers)
    folder = workdir(args.workdir)
    helpers = LocalCluster(folder, brokers=0)  # the port-forward and the fleet, guarded
    backend = kb.KindBackend()
    backend.brokers = args.brokers
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    canary = server = None
    sampler: Sampler | None = None
    try:
        helpers.start("adapter-port-forward", port_forward_command(adapter_port))
        wait_for(lambda: port_open(adapter_port), timeout=30, what="kubectl port-forward")
        sim = None
        if args.devices > 0:
            sim = helpers.start("simulator", fleet_command(args, targets))
        brokers = [s for s in targets.services if s.port is not None]
        canary = Canary([s.port for s in brokers])
        canary.start()
        sampler = Sampler(targets, adapter_http=adapter_port, fleet=sim, canary=canary)
        sampler.sample()
        if not port_free(port, host):
            port = free_port(host)
            console.print(f"[yellow]dashboard port in use: using {port}[/]")
        server = DashboardServer(sampler, host, port)
        server.start()

        def sample_forever() -> None:
            assert server is not None and canary is not None and sampler is not None
            tick = 0
            while not server.stopping.wait(1.0):
                canary.tick()
                sampler.sample()
                tick += 1
                if tick % 5 == 0:
                    sampler.refresh_analytics()

        threading.Thread(target=sample_forever, daemon=True).start()
        console.print(f"[bold]dashboard:[/] {server.url}  (kind cluster, context {context()})")
        started = time.monotonic()
        previous: dict[str, dict[str, float]] = {}
        last = started
        with Live(view(targets, adapter_port, previous, 0, 1.0), console=console) as live:
            while not stop_requested:
                with contextlib.suppress(queue.Empty):
                    apply_kind_action(
                        backend,
                        sampler,
                        server.actions.get(timeout=1.0),
                        redis_cluster=args.redis_cluster,
                    )
                now = time.monotonic()
                live.update(view(targets, adapter_port, previous, now - started, now - last))
                last = now
                if args.seconds and now - started >= args.seconds:
                    break
    finally:
        if sampler is not None and sampler.snapshot:
            sampler.refresh_analytics()
            args.report.parent.mkdir(parents=True, exist_ok=True)
            final = args.report.with_name(args.report.stem + "-dashboard.html")
            final.write_text(final_page({**sampler.snapshot, "analytics": sampler.analytics}))
            console.print(f"dashboard's final state: {final.resolve()}")
            # The adapter's own report, while the port-forward still runs (its DuckDB is in
            # the cluster).
            try:
                status, body = http_get(adapter_port, "/report", timeout=60)
                if status == 200:
                    Path(args.report).write_text(body)
                    console.print(f"report: {Path(args.report).resolve()}")
            except OSError as error:
                console.print(f"[yellow]no report: {error}[/]")
        if canary is not None:
            canary.stop()
        if server is not None:
            server.stop()
        helpers.stop()
    return 0
