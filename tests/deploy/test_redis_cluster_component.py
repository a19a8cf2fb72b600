"""kind/components/redis-cluster on the kind overlay: a Redis Cluster of three primaries and
three replicas (StatefulSet + init Job) replaces the single Redis; it renders and validates
(test_manifests' tools), keeps the Redis URL and the clients' NetworkPolicies, lets the nodes
and the init Job through the default-deny and nobody else onto the cluster bus, is locked down
like the rest, shards the tap on both sides with the same N, and its redis.conf and scripts
are ones the real redis-server and shellcheck accept."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from .manifests import KIND, Tools, container, find, maybe_find, runtime_env, workloads

pytestmark = pytest.mark.timeout(900)

Docs = dict[str, list[dict[str, Any]]]
NAME = "kind-redis-cluster"
NODE_LABELS = {
    "app.kubernetes.io/name": "mcloudtt-redis",
    "app.kubernetes.io/component": "redis-cluster",
}


def _script(workload: dict[str, Any], name: str) -> str:
    command = container(workload, name)["command"]
    assert command[:2] == ["sh", "-c"]
    script: str = command[2]
    return script


def test_six_nodes_replace_the_single_redis(docs: Docs) -> None:
    d = docs[NAME]
    assert maybe_find(d, "StatefulSet", "mcloudtt-redis") is None
    assert maybe_find(docs["kind"], "StatefulSet", "mcloudtt-redis") is not None
    sts = find(d, "StatefulSet", "mcloudtt-redis-cluster")
    assert sts["spec"]["replicas"] == 6
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert NODE_LABELS.items() <= pod_labels.items()
    # The seed every client connects to is the single Redis's Service, now on the nodes.
    seed = find(d, "Service", "mcloudtt-redis")
    assert seed["spec"]["selector"].items() <= pod_labels.items()
    # Host names the nodes announce resolve through the headless Service of the StatefulSet.
    nodes = find(d, "Service", sts["spec"]["serviceName"])
    assert nodes["spec"]["clusterIP"] == "None"
    assert nodes["spec"]["selector"].items() <= pod_labels.items()
    assert "cluster-announce-hostname %s.mcloudtt-redis-cluster." in _script(sts, "redis")
    config = find(d, "ConfigMap", "mcloudtt-redis-cluster-config")["data"]["redis.conf"]
    assert "cluster-enabled yes" in config and "maxmemory-policy noeviction" in config
    mount = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}["config"]
    assert (
        mount["configMap"]["name"]
        == find(d, "ConfigMap", "mcloudtt-redis-cluster-config")["metadata"]["name"]
    )
    # Three primaries with one replica each, formed by the Job from all six nodes.
    job = find(d, "Job", "mcloudtt-redis-cluster-init")
    script = _script(job, "init")
    assert "--cluster-replicas 1" in script and "for i in 0 1 2 3 4 5" in script
    assert "cluster_slots_assigned:16384" in script  # idempotent: a formed cluster is left alone
    pdb = find(d, "PodDisruptionBudget", "mcloudtt-redis-cluster")
    assert pdb["spec"]["maxUnavailable"] == 1


def test_the_tap_is_sharded_on_both_sides(docs: Docs) -> None:
    from mcloudtt_adapter.config import ADAPTER
    from mcloudtt_broker.config import BROKER

    d = docs[NAME]
    broker_env = runtime_env(d, find(d, "StatefulSet", "mcloudtt-broker"), "broker")
    adapter_env = runtime_env(d, find(d, "Deployment", "mcloudtt-adapter"), "adapter")
    assert broker_env["MCLOUDTT_TAP_STREAMS"] == adapter_env["MCLOUDTT_ADAPTER_TAP_STREAMS"] == "3"
    assert broker_env["MCLOUDTT_TAP_STREAM"] == adapter_env["MCLOUDTT_ADAPTER_TAP_STREAM"]
    # Both CLIs take the values (an unknown variable would be ignored silently).
    assert BROKER.resolve({}, broker_env, None)["tap-streams"] == 3
    assert ADAPTER.resolve({}, adapter_env, None)["tap-streams"] == 3
    # The seed is the single Redis's address, unchanged.
    assert "@mcloudtt-redis:6379/" in broker_env["MCLOUDTT_REDIS"]


def _allows(policy: dict[str, Any], direction: str, peer: dict[str, str], port: int) -> bool:
    for rule in policy["spec"].get(direction, []):
        ports = {p["port"] for p in rule.get("ports", [])}
        peers = rule.get("to" if direction == "egress" else "from", [])
        if ports and port not in ports:
            continue
        for p in peers or [{}]:
            selector = p.get("podSelector", {})
            labels = selector.get("matchLabels", {})
            exprs = selector.get("matchExpressions", [])
            if labels.items() <= peer.items() and all(
                peer.get(e["key"]) in e["values"] for e in exprs
            ):
                return True
    return False


def test_network_policies(docs: Docs) -> None:
    d = docs[NAME]
    policies = [p for p in d if p["kind"] == "NetworkPolicy"]

    def applies(policy: dict[str, Any], pod: dict[str, str]) -> bool:
        selector = policy["spec"]["podSelector"]
        exprs = selector.get("matchExpressions", [])
        return dict(selector.get("matchLabels", {})).items() <= pod.items() and all(
            pod.get(e["key"]) in e["values"] for e in exprs
        )

    def allowed(src: dict[str, str], dst: dict[str, str], port: int) -> bool:
        out = any(
            _allows(p, "egress", dst, port)
            for p in policies
            if "Egress" in p["spec"]["policyTypes"] and applies(p, src)
        )
        into = any(
            _allows(p, "ingress", src, port)
            for p in policies
            if "Ingress" in p["spec"]["policyTypes"] and applies(p, dst)
        )
        return out and into

    def labels(kind: str, name: str) -> dict[str, str]:
        return dict(find(d, kind, name)["spec"]["template"]["metadata"]["labels"])

    node = labels("StatefulSet", "mcloudtt-redis-cluster")
    broker = labels("StatefulSet", "mcloudtt-broker")
    adapter = labels("Deployment", "mcloudtt-adapter")
    init = labels("Job", "mcloudtt-redis-cluster-init")
    assert allowed(node, node, 6379) and allowed(node, node, 16379)  # replication, the bus
    assert allowed(broker, node, 6379) and allowed(adapter, node, 6379)
    assert allowed(init, node, 6379)
    assert not allowed(broker, node, 16379) and not allowed(init, node, 16379)
    assert not allowed(init, broker, 1883)


def test_cluster_pods_are_locked_down(docs: Docs) -> None:
    found = set()
    for w in workloads(docs[NAME]):
        name = w["metadata"]["name"]
        if "redis-cluster" not in name:
            continue
        found.add(name)
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] >= 10000, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"], name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), name
    assert found == {"mcloudtt-redis-cluster", "mcloudtt-redis-cluster-init"}


def test_scripts_pass_shellcheck(tools: Tools, docs: Docs, tmp_path: Path) -> None:
    d = docs[NAME]
    for kind, name, c in (
        ("StatefulSet", "mcloudtt-redis-cluster", "redis"),
        ("Job", "mcloudtt-redis-cluster-init", "init"),
    ):
        path = tmp_path / f"{name}.sh"
        path.write_text("#!/bin/sh\n" + _script(find(d, kind, name), c))
        proc = subprocess.run(
            [str(tools.shellcheck), "-s", "sh", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout


def test_redis_conf_runs_on_the_real_redis_server(tmp_path: Path) -> None:
    """The component's redis.conf (its data and include paths moved here) starts a cluster
    node: every directive is one this redis-server knows."""
    import redis
    from mcloudtt_chaos.procs import free_port

    conf = (KIND / "components" / "redis-cluster" / "redis.conf").read_text()
    auth = tmp_path / "auth.conf"
    auth.write_text(
        'requirepass "pw"\nmasterauth "pw"\ncluster-announce-hostname node-0.example.test\n'
    )
    conf = conf.replace("dir /data", f"dir {tmp_path}").replace("/data/nodes.conf", "nodes.conf")
    conf = conf.replace("include /run/redis/auth.conf", f"include {auth}")
    (tmp_path / "redis.conf").write_text(conf)
    port, bus = free_port(), free_port()
    log = tmp_path / "redis.log"
    with log.open("wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [
                "redis-server",
                str(tmp_path / "redis.conf"),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-port",
                str(bus),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        client = redis.Redis(port=port, password="pw")
        deadline = time.monotonic() + 10
        while True:
            try:
                info = client.info("cluster")
                break
            except redis.ConnectionError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert info["cluster_enabled"] == 1
        assert client.config_get("cluster-preferred-endpoint-type") == {
            "cluster-preferred-endpoint-type": "hostname"
        }
        assert client.config_get("cluster-announce-hostname")["cluster-announce-hostname"] == (
            "node-0.example.test"
        )
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_gke_on_memorystore_cluster(tools: Tools, rendered: dict[str, Path], docs: Docs) -> None:
    """kind/components/memorystore-cluster on the gke overlay: validates strictly; the clients
    may reach the discovery endpoint and the node ports in the cluster's range, and no more; the
    tap is sharded with the same N on both sides."""
    from .manifests import example_values

    # Validated strictly with the other overlays (test_manifests.py).
    name = "gke-memorystore-cluster"
    d = docs[name]
    (rule,) = find(d, "NetworkPolicy", "mcloudtt-redis-clients-egress")["spec"]["egress"]
    values = example_values()
    assert rule["to"] == [{"ipBlock": {"cidr": values["REDIS_RANGE"]}}]
    ports = [(p["port"], p.get("endPort")) for p in rule["ports"]]
    assert ports == [(int(values["REDIS_PORT"]), None), (11000, 13047)]
    broker_env = runtime_env(d, find(d, "StatefulSet", "mcloudtt-broker"), "broker")
    adapter_env = runtime_env(d, find(d, "Deployment", "mcloudtt-adapter"), "adapter")
    assert broker_env["MCLOUDTT_TAP_STREAMS"] == adapter_env["MCLOUDTT_ADAPTER_TAP_STREAMS"]

    # Nothing added or removed: the gke overlay's objects (the generated ConfigMaps renamed).
    def names(objects: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {(o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] != "ConfigMap"}

    assert names(d) == names(docs["gke"])


def test_kind_up_applies_the_redis_cluster_overlay_when_asked(
    tools: Tools, rendered: dict[str, Path], docs: Docs, tmp_path: Path
) -> None:
    """`kind/up.sh --redis-cluster` applies kind/overlays/kind-redis-cluster, which renders to
    exactly the composition validated above (the kind overlay + components/redis-cluster); the
    objects up.sh waits for and removes when switching are the ones each layout renders."""
    proc = subprocess.run(
        [str(tools.kubectl), "kustomize", str(KIND / "overlays" / "kind-redis-cluster")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    committed = tmp_path / "kind-redis-cluster.yaml"
    committed.write_text(proc.stdout)
    assert tools.load_yaml(committed) == docs[NAME]

    script = (KIND / "up.sh").read_text()
    assert "--redis-cluster) OVERLAY=kind/overlays/kind-redis-cluster ;;" in script
    assert 'k apply -k "$OVERLAY"' in script
    cluster, single = docs[NAME], docs["kind"]
    for kind, name in (
        ("StatefulSet", "mcloudtt-redis-cluster"),
        ("Job", "mcloudtt-redis-cluster-init"),
    ):
        assert find(cluster, kind, name) and maybe_find(single, kind, name) is None
    assert maybe_find(cluster, "StatefulSet", "mcloudtt-redis") is None
    assert find(single, "StatefulSet", "mcloudtt-redis")
    for line in (
        "rollout status statefulset/mcloudtt-redis-cluster",
        "wait --for=condition=complete job/mcloudtt-redis-cluster-init",
        "delete statefulset mcloudtt-redis --ignore-not-found",
        "delete statefulset mcloudtt-redis-cluster --ignore-not-found",
        "delete job mcloudtt-redis-cluster-init --ignore-not-found",
    ):
        assert line in script, line
