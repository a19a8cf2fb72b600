"""The kustomize manifests: they render, validate strictly against Kubernetes 1.33, and keep the
promises the deployment makes (probes, drain, security context, Redis reachable only by brokers
and the adapter, the GKE overlay's Memorystore/BigQuery/Workload Identity wiring)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from .manifests import (
    K8S_VERSION,
    Tools,
    container,
    example_values,
    find,
    maybe_find,
    runtime_env,
    workloads,
)

# Installing the tools (first run only) happens in the first test's setup.
pytestmark = pytest.mark.timeout(900)

Docs = dict[str, list[dict[str, Any]]]
DEPLOYED = ("kind", "gke")


@pytest.mark.parametrize(
    "overlay",
    [
        "base",
        "kind",
        "gke",
        "kind-locust",
        "gke-locust",
        "kind-redis-cluster",
        "gke-memorystore-cluster",
    ],
)
def test_overlay_validates_strictly(tools: Tools, rendered: dict[str, Path], overlay: str) -> None:
    proc = subprocess.run(
        [
            str(tools.kubernetes_validate),
            "--strict",
            "-k",
            K8S_VERSION,
            "--quiet",
            str(rendered[overlay]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("overlay", DEPLOYED)
def test_every_workload_is_locked_down(docs: Docs, overlay: str) -> None:
    found = []
    for w in workloads(docs[overlay]):
        name = w["metadata"]["name"]
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] >= 10000, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("hostNetwork") is not True, name
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert "add" not in sc["capabilities"], (name, c["name"])
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, c["name"], kind)
            assert "readinessProbe" in c and "livenessProbe" in c, (name, c["name"])
        found.append(name)
    expected = {"mcloudtt-broker", "mcloudtt-adapter"} | (
        {"mcloudtt-redis"} if overlay == "kind" else set()
    )
    assert set(found) == expected


@pytest.mark.parametrize("overlay", DEPLOYED)
def test_broker_probes_drain_and_disruption(docs: Docs, overlay: str) -> None:
    d = docs[overlay]
    sts = find(d, "StatefulSet", "mcloudtt-broker")
    broker = container(sts, "broker")
    env = runtime_env(d, sts, "broker")
    http_port = int(env["MCLOUDTT_HTTP"].rpartition(":")[2])
    ports = {p["name"]: p["containerPort"] for p in broker["ports"]}
    assert ports["http"] == http_port
    assert broker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert broker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert broker[probe]["httpGet"]["port"] in ("http", http_port)
    # SIGTERM comes after preStop; the broker must have drained before SIGKILL.
    pre_stop = broker["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(env["MCLOUDTT_DRAIN_TIMEOUT"])
    grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + drain, (grace, pre_stop, drain)
    # Stable ids: the broker id is the pod name.
    assert env["MCLOUDTT_ID"] == sts["metadata"]["name"] + "-0"
    headless = find(d, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    pdb = find(d, "PodDisruptionBudget", "mcloudtt-broker")
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    hpa = find(d, "HorizontalPodAutoscaler", "mcloudtt-broker")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "mcloudtt-broker",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    lb = find(d, "Service", "mcloudtt-broker")
    assert lb["spec"]["type"] == "LoadBalancer"
    lb_ports = {p["port"]: p["targetPort"] for p in lb["spec"]["ports"]}
    assert lb_ports[1883] == "mqtt" and lb_ports[8083] == "ws"
    for target in lb_ports.values():
        assert target in ports, f"Service targets {target}, not a container port"


@pytest.mark.parametrize("overlay", DEPLOYED)
def test_adapter_drains_before_it_is_killed(docs: Docs, overlay: str) -> None:
    d = docs[overlay]
    dep = find(d, "Deployment", "mcloudtt-adapter")
    env = runtime_env(d, dep, "adapter")
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(env["MCLOUDTT_ADAPTER_DRAIN_TIMEOUT"])
    adapter = container(dep, "adapter")
    assert adapter["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert adapter["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("overlay", DEPLOYED)
def test_only_brokers_and_adapter_reach_redis(docs: Docs, overlay: str) -> None:
    d = docs[overlay]
    policies = {p["metadata"]["name"]: p["spec"] for p in d if p["kind"] == "NetworkPolicy"}
    deny = policies["default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    allowed = {"mcloudtt-broker", "mcloudtt-adapter"}
    clients = policies["mcloudtt-redis-clients-egress"]
    (expr,) = clients["podSelector"]["matchExpressions"]
    assert expr["key"] == "app.kubernetes.io/name" and set(expr["values"]) == allowed
    (rule,) = clients["egress"]
    # No other policy opens the Redis port for egress.
    redis_port = rule["ports"][0]["port"]
    for name, spec in policies.items():
        if name == "mcloudtt-redis-clients-egress":
            continue
        for egress in spec.get("egress", []):
            assert all(p.get("port") != redis_port for p in egress.get("ports", [])), name
    if overlay == "kind":
        assert rule["to"] == [
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mcloudtt-redis"}}}
        ]
        (ingress,) = policies["mcloudtt-redis-ingress"]["ingress"]
        (peer,) = ingress["from"]
        (expr,) = peer["podSelector"]["matchExpressions"]
        assert set(expr["values"]) == allowed
        assert [p["port"] for p in ingress["ports"]] == [6379]
    else:
        values = example_values()
        assert rule["to"] == [{"ipBlock": {"cidr": values["REDIS_RANGE"]}}]
        assert str(redis_port) == values["REDIS_PORT"]


def test_kind_overlay_maps_the_ports_kind_forwards(docs: Docs) -> None:
    lb = find(docs["kind"], "Service", "mcloudtt-broker")
    node_ports = {p["port"]: p["nodePort"] for p in lb["spec"]["ports"]}
    cluster = (Path(__file__).resolve().parents[2] / "kind" / "cluster.yaml").read_text()
    for node_port in node_ports.values():
        assert f"containerPort: {node_port}" in cluster
    redis = find(docs["kind"], "StatefulSet", "mcloudtt-redis")
    conf = find(docs["kind"], "ConfigMap", "mcloudtt-redis-config")["data"]["redis.conf"]
    assert "appendonly yes" in conf and "include /run/redis/auth.conf" in conf
    assert "maxmemory-policy noeviction" in conf
    claim = redis["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data"
    pvc = find(docs["kind"], "PersistentVolumeClaim", "mcloudtt-adapter-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_gke_overlay_uses_memorystore_bigquery_and_workload_identity(docs: Docs) -> None:
    d = docs["gke"]
    values = example_values()
    for kind, name in [
        ("StatefulSet", "mcloudtt-redis"),
        ("Service", "mcloudtt-redis"),
        ("PersistentVolumeClaim", "mcloudtt-adapter-data"),
        ("ConfigMap", "gke-values"),  # local-config: used by the replacements, never applied
    ]:
        assert maybe_find(d, kind, name) is None, f"{kind} {name} should not be in the gke overlay"
    ksa = find(d, "ServiceAccount", "mcloudtt-adapter")
    assert ksa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] == values["ADAPTER_GSA"]
    sts = find(d, "StatefulSet", "mcloudtt-broker")
    dep = find(d, "Deployment", "mcloudtt-adapter")
    assert container(sts, "broker")["image"] == values["BROKER_IMAGE"]
    assert container(dep, "adapter")["image"] == values["ADAPTER_IMAGE"]
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "mcloudtt-adapter"
    # No Google key file anywhere: no GOOGLE_APPLICATION_CREDENTIALS, no secret volume but the
    # TLS certificate and the cluster key (the brokers' HMAC key, not a cloud credential).
    for w in workloads(d):
        for c in w["spec"]["template"]["spec"]["containers"]:
            assert all(e["name"] != "GOOGLE_APPLICATION_CREDENTIALS" for e in c.get("env", []))
        secrets = [
            v["secret"]["secretName"]
            for v in w["spec"]["template"]["spec"].get("volumes", [])
            if "secret" in v
        ]
        assert set(secrets) <= {"mcloudtt-broker-tls", "mcloudtt-cluster-key"}, secrets
    lb = find(d, "Service", "mcloudtt-broker")
    assert 8883 in {p["port"] for p in lb["spec"]["ports"]}


@pytest.mark.parametrize("overlay", ["base", "kind", "gke"])
def test_no_secret_values_in_manifests(docs: Docs, overlay: str) -> None:
    # Secrets come from kubectl create secret (kind/up.sh, configure.sh), never from the repo.
    assert not [d for d in docs[overlay] if d["kind"] == "Secret"]


@pytest.mark.parametrize("overlay", DEPLOYED)
def test_cluster_key_comes_from_a_secret_made_at_deploy_time(docs: Docs, overlay: str) -> None:
    """Brokers and adapter read --cluster-key-file from the mounted Secret mcloudtt-cluster-key,
    which kind/up.sh and configure.sh create with random content (never in git or an image)."""
    d = docs[overlay]
    for kind, name, program, env_name in (
        ("StatefulSet", "mcloudtt-broker", "broker", "MCLOUDTT_CLUSTER_KEY_FILE"),
        ("Deployment", "mcloudtt-adapter", "adapter", "MCLOUDTT_ADAPTER_CLUSTER_KEY_FILE"),
    ):
        workload = find(d, kind, name)
        spec = workload["spec"]["template"]["spec"]
        volume = next(v for v in spec["volumes"] if v["name"] == "cluster-key")
        assert volume["secret"]["secretName"] == "mcloudtt-cluster-key"
        c = container(workload, program)
        mount = next(m for m in c["volumeMounts"] if m["name"] == "cluster-key")
        assert mount["readOnly"] is True
        path = next(e["value"] for e in c["env"] if e["name"] == env_name)
        assert path.startswith(mount["mountPath"] + "/")
        assert path.rsplit("/", 1)[1] == "key"  # the Secret's key, as the scripts create it
    root = Path(__file__).resolve().parents[2]
    for script in ("kind/up.sh", "kind/overlays/gke/configure.sh"):
        text = (root / script).read_text()
        assert "create secret generic mcloudtt-cluster-key" in text, script
        assert "--from-file=key=" in text and "/dev/urandom" in text, script
