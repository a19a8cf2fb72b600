"""`mcloudtt up --kind` without a cluster (none can run here): a one-line error when a tool or
the cluster is missing, and the endpoints it would use checked against `kind/cluster.yaml` and
the rendered `kind/overlays/kind` (each broker's node ports reach that broker's MQTT and HTTP
container ports from 127.0.0.1; the adapter's Service port is its HTTP port)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from deploy.manifests import ROOT, Tools, ToolsUnavailable, container, find

from .test_up import left_behind, mcloudtt

Obj = dict[str, Any]


def run(args: list[str], path: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path}
    env.pop("KIND_CLUSTER_NAME", None)
    return subprocess.run(
        [mcloudtt(), "up", "--kind", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_missing_tools_are_named_on_one_line(tmp_path: Path) -> None:
    result = run(["--seconds", "5"], str(tmp_path))  # nothing on PATH
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mcloudtt up --kind: needs docker, kind and kubectl on PATH")
    assert "not found: docker, kind, kubectl" in lines[0] and "kind/up.sh" in lines[0]


def test_no_cluster_is_one_line_too(tmp_path: Path) -> None:
    # Tools present (stand-ins that answer as kind does with no cluster), the cluster absent.
    for tool, script in (
        ("docker", "exit 0"),
        ("kubectl", "exit 0"),
        ("kind", 'echo "No kind clusters found." >&2; exit 0'),
    ):
        path = tmp_path / tool
        path.write_text(f"#!/bin/sh\n{script}\n")
        path.chmod(0o755)
    result = run([], f"{tmp_path}:/usr/bin:/bin")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "mcloudtt up --kind: no kind cluster 'mcloudtt' (No kind clusters found.):"
        " run kind/up.sh first"
    ]


@pytest.fixture(scope="module")
def tools() -> Tools:
    try:
        return Tools.install()
    except ToolsUnavailable as error:
        pytest.skip(f"deployment validation tools unavailable: {error}")


@pytest.fixture(scope="module")
def rendered(tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    return tools.load_yaml(tools.render(tmp_path_factory.mktemp("kind"))["kind"])


def _port(workload: Obj, name: str, target: Any) -> int:
    """The container port a Service's targetPort (a name or a number) means."""
    ports = container(workload, name)["ports"]
    if isinstance(target, int):
        assert any(p["containerPort"] == target for p in ports)
        return target
    return next(p["containerPort"] for p in ports if p["name"] == target)


@pytest.mark.timeout(900)
def test_dry_run_endpoints_are_the_overlays(tools: Tools, rendered: list[Obj]) -> None:
    result = run(["--dry-run", "--devices", "10", "--dashboard", "127.0.0.1:8123"], "/usr/bin")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    brokers = re.findall(
        r"^broker-(\d+): mqtt 127\.0\.0\.1:(\d+)  http://127\.0\.0\.1:(\d+)/", out, re.M
    )
    assert len(brokers) == 3, out
    mappings = {
        (m["hostPort"], m["containerPort"], m.get("listenAddress"))
        for node in tools.load_yaml(ROOT / "kind" / "cluster.yaml")[0]["nodes"]
        for m in node.get("extraPortMappings", [])
    }
    sts = find(rendered, "StatefulSet", "mcloudtt-broker")
    assert sts["spec"]["replicas"] >= len(brokers) or "HorizontalPodAutoscaler" in {
        d["kind"] for d in rendered
    }
    for n, mqtt, http in brokers:
        service = find(rendered, "Service", f"mcloudtt-broker-{n}")
        assert service["spec"]["type"] == "NodePort"
        assert service["spec"]["selector"] == {
            "statefulset.kubernetes.io/pod-name": f"mcloudtt-broker-{n}"
        }
        by_node_port = {p["nodePort"]: p for p in service["spec"]["ports"]}
        for host_port, container_port in ((int(mqtt), 1883), (int(http), 8080)):
            # kind maps the host port to the same node port, on loopback only.
            assert (host_port, host_port, "127.0.0.1") in mappings, host_port
            target = by_node_port[host_port]["targetPort"]
            assert _port(sts, "broker", target) == container_port
        # The fleet is spread over exactly these brokers.
        assert f"--broker 127.0.0.1:{mqtt}" in out
    # The adapter, through kubectl port-forward to its Service's HTTP port.
    forward = re.search(r"kubectl (.*) port-forward .* svc/(\S+) (\d+):(\d+)", out)
    assert forward is not None, out
    assert forward.group(1) == "--context kind-mcloudtt -n mcloudtt"
    assert find(rendered, "Namespace", "mcloudtt")
    service = find(rendered, "Service", forward.group(2))
    port = next(p for p in service["spec"]["ports"] if p["port"] == int(forward.group(4)))
    deployment = find(rendered, "Deployment", "mcloudtt-adapter")
    assert _port(deployment, "adapter", port["targetPort"]) == 9100
    assert f"adapter: http://127.0.0.1:{forward.group(3)}/analytics" in out
    assert "dashboard: http://127.0.0.1:8123" in out


@pytest.mark.timeout(900)
def test_dry_run_on_a_redis_cluster_names_what_up_sh_made(tools: Tools, tmp_path: Path) -> None:
    """`--redis-cluster`: the plan says the cluster comes from `kind/up.sh --redis-cluster` and
    names the Redis Cluster's StatefulSet, which that overlay renders (and the plain one not)."""
    result = run(["--dry-run", "--redis-cluster", "--devices", "0"], "/usr/bin")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "made by kind/up.sh --redis-cluster" in out
    named = re.search(r"^redis: a Redis Cluster, StatefulSet (\S+) ", out, re.M)
    assert named is not None, out
    rendered = tools.render(tmp_path)
    cluster = tools.load_yaml(rendered["kind-redis-cluster"])
    assert find(cluster, "StatefulSet", named.group(1))["spec"]["replicas"] == 6
    assert (
        "--redis-cluster) OVERLAY=kind/overlays/kind-redis-cluster"
        in (ROOT / "kind/up.sh").read_text()
    )
    plain = run(["--dry-run", "--devices", "0"], "/usr/bin").stdout
    assert "made by kind/up.sh (" not in plain and "redis: a Redis Cluster" not in plain
    wrong = subprocess.run(
        [mcloudtt(), "up", "--redis-cluster"], capture_output=True, text=True, timeout=60
    )
    assert wrong.returncode == 2 and "--redis-cluster goes with --kind" in wrong.stderr


def test_buttons_act_through_the_kind_backend() -> None:
    """Each dashboard button, on a dry-run kind backend: the pod it acts on is the one whose
    node ports the card shows (pod N on 30880+N), and Redis' state follows."""
    from mcloudtt_chaos.backends import kind as kb
    from mcloudtt_chaos.dashboard import Sampler
    from mcloudtt_chaos.upkind import apply_kind_action, kind_targets

    targets = kind_targets()
    sampler = Sampler(targets)
    backend = kb.KindBackend(dry_run=True)
    card = {s.name: s for s in targets.services}
    cases = [
        (("broker-1", "kill"), "delete pod mcloudtt-broker-1 --grace-period=0 --force", None),
        (("broker-1", "restart"), f"{card['broker-1'].http_port}/healthz answers 200", None),
        (("redis", "stop"), "scale statefulset/mcloudtt-redis --replicas=0", "stopped"),
        (("redis", "start"), "scale statefulset/mcloudtt-redis --replicas=1", "running"),
        (("redis", "freeze"), "kill -STOP", "frozen"),
        (("redis", "thaw"), "kill -CONT", "running"),
    ]
    for action, expected, redis in cases:
        before = len(backend.runner.plan)
        apply_kind_action(backend, sampler, action)
        lines = "\n".join(backend.runner.plan[before:])
        assert expected in lines, (action, lines)
        if redis is not None:
            assert sampler.redis_state == redis
    log = [e["text"] for e in sampler.events]
    assert (
        any("broker-1: pod deleted" in t for t in log) and any("failed" in t for t in log) is False
    )
    # On a Redis Cluster the Redis buttons do nothing to the single Redis, and say so.
    before = len(backend.runner.plan)
    apply_kind_action(backend, sampler, ("redis", "stop"), redis_cluster=True)
    assert backend.runner.plan[before:] == [] and sampler.redis_state == "running"
    assert "not on a Redis Cluster" in sampler.events[0]["text"]  # newest first


def test_the_sampler_watches_brokers_it_did_not_start(tmp_path: Path) -> None:
    """The kind view's brokers are not this machine's children: the sampler reads them over
    HTTP alone (here two local brokers stand in for the pods' node ports)."""
    from mcloudtt_chaos.dashboard import Sampler, lookup
    from mcloudtt_chaos.local import LocalCluster
    from mcloudtt_chaos.procs import free_block, wait_for
    from mcloudtt_chaos.upkind import REDIS_WHERE, KindTargets, RemoteService

    cluster = LocalCluster(
        tmp_path, brokers=2, base_port=free_block(2), base_http_port=free_block(2)
    )
    try:
        cluster.start_redis()
        cluster.start_brokers()
        remote = [
            RemoteService(s.name, s.port, s.http_port)
            for s in cluster.services
            if s.name.startswith("broker-")
        ]
        sampler = Sampler(KindTargets([*remote, RemoteService("redis")]))
        snap = wait_for(
            lambda: (s := sampler.sample()) and all(b["ready"] for b in s["brokers"]) and s,
            timeout=20,
            what="both brokers ready",
        )
        assert [b["name"] for b in snap["brokers"]] == ["broker-1", "broker-2"]
        assert all(b["cpu_pct"] == 0 and b["rss_mb"] == 0 for b in snap["brokers"])
        assert snap["redis"] == {"port": 6379, "where": REDIS_WHERE, "state": "running"}
        assert lookup(sampler.broker_http(), "nobody")["holder"] is None
    finally:
        cluster.stop()


FORWARDER = """#!{python}
# Stands in for `kubectl` here: `port-forward ... LOCAL:9100` forwards LOCAL to the adapter
# this test runs; anything else (a button's kubectl call) is recorded and succeeds.
import asyncio, sys
with open({log!r}, "a") as f:
    print(" ".join(sys.argv[1:]), file=f)
if "port-forward" not in sys.argv:
    sys.exit(0)
local, target = int(sys.argv[-1].split(":")[0]), {adapter}


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def handle(reader, writer):
    r2, w2 = await asyncio.open_connection("127.0.0.1", target)
    await asyncio.gather(pipe(reader, w2), pipe(r2, writer))


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", local)
    await server.serve_forever()


asyncio.run(main())
"""


@pytest.mark.timeout(180)
def test_up_kind_end_to_end_with_stand_ins(tmp_path: Path) -> None:
    """The whole `--kind` run with the cluster stood in for: local brokers on the kind node
    ports, an adapter behind a stand-in `kubectl port-forward`, `kind` listing the cluster.
    The dashboard shows the brokers and the adapter's analytics, a button runs the kind
    backend's kubectl command, and the report comes from the adapter's /report."""
    import json
    import signal
    import sys
    import urllib.request

    from mcloudtt_chaos.backends import kind as kb
    from mcloudtt_chaos.local import LocalCluster
    from mcloudtt_chaos.procs import console_script, free_port, http_get, port_free, wait_for

    node_ports = [kb.MQTT_NODE_PORT + i for i in range(3)] + [
        kb.HTTP_NODE_PORT + i for i in range(3)
    ]
    if not all(port_free(p) for p in node_ports):
        pytest.skip("the kind node ports are taken on this machine")
    cluster = LocalCluster(
        tmp_path / "cluster",
        brokers=3,
        base_port=kb.MQTT_NODE_PORT,
        base_http_port=kb.HTTP_NODE_PORT,
    )
    (tmp_path / "cluster").mkdir()
    adapter, dashboard = free_port(), free_port()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "kubectl.log"
    (bin_dir / "kubectl").write_text(
        FORWARDER.format(python=sys.executable, log=str(calls), adapter=adapter)
    )
    (bin_dir / "kind").write_text("#!/bin/sh\necho mcloudtt\n")
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    proc = None
    try:
        cluster.start_redis()
        cluster.start_brokers("--tap-stream", "mcloudtt:tap", "--sys-interval", "5")
        assert cluster.base_port == kb.MQTT_NODE_PORT  # not moved to a free block
        cluster.start(
            "adapter",
            [
                *console_script("mcloudtt-adapter"),
                "run",
                "--redis",
                cluster.redis_url,
                "--redis-mode",
                "stream",
                "--tap-stream",
                "mcloudtt:tap",
                "--duckdb",
                str(tmp_path / "k.duckdb"),
                "--http",
                f"127.0.0.1:{adapter}",
            ],
            http_port=adapter,
        )
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        env.pop("KIND_CLUSTER_NAME", None)
        proc = subprocess.Popen(
            [
                mcloudtt(),
                "up",
                "--kind",
                "--seconds",
                "60",
                "--devices",
                "10",
                "--dashboard",
                f"127.0.0.1:{dashboard}",
                "--report",
                str(tmp_path / "report.html"),
                "--workdir",
                str(tmp_path / "work"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def get(path: str) -> Any:
            try:
                status, body = http_get(dashboard, path, timeout=5)
            except OSError:
                return None
            return json.loads(body) if status == 200 else None

        snap = wait_for(
            lambda: (
                (s := get("/state"))
                and [b["state"] for b in s["brokers"]] == ["ready"] * 3
                and (s["adapter"] or {}).get("rows")
                and s
            ),
            timeout=60,
            what="three ready brokers and rows through the adapter",
        )
        assert [b["mqtt"] for b in snap["brokers"]] == [
            f"127.0.0.1:{kb.MQTT_NODE_PORT + i}" for i in range(3)
        ]
        assert snap["redis"]["where"].startswith("pod mcloudtt-redis-0")
        wait_for(
            lambda: (a := get("/analytics")) and a["total_messages"] > 0,
            timeout=30,
            what="the adapter's analytics through the port-forward",
        )
        # A button: the kind backend's command for it (here recorded by the stand-in).
        request = urllib.request.Request(
            f"http://127.0.0.1:{dashboard}/action/broker-1/kill", method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.status == 202
        wait_for(
            lambda: (
                calls.exists()
                and "-n mcloudtt delete pod mcloudtt-broker-1 --grace-period=0 --force"
                in calls.read_text()
            ),
            timeout=20,
            what="kubectl delete pod from the kill button",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        cluster.stop()
    assert "<svg" in (tmp_path / "report.html").read_text()  # the adapter's own /report
    assert "const FINAL={" in (tmp_path / "report-dashboard.html").read_text()
    assert "port-forward --address 127.0.0.1 svc/mcloudtt-adapter" in calls.read_text()
    # Neither the port-forward nor the fleet outlives it.
    markers = [str(bin_dir), f"--broker 127.0.0.1:{kb.MQTT_NODE_PORT}"]
    assert wait_for(lambda: not left_behind(markers), timeout=10, what="no process left")
