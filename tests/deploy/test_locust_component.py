"""kind/components/locust on both overlays: it renders and validates (test_manifests), runs the
locustfile of loadtest/ from its ConfigMap, targets the broker Service, lets the workers reach
their master and the brokers through the namespace's default-deny policies, is locked down like
the rest, and hands locust only options the real locust (with the locustfile loaded) accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .manifests import ROOT, Tools, container, find, mounts, runtime_env

pytestmark = pytest.mark.timeout(900)

Docs = dict[str, list[dict[str, Any]]]
WITH_LOCUST = ("kind-locust", "gke-locust")
LOCUST_NAMES = ("mcloudtt-locust-master", "mcloudtt-locust-worker")


@pytest.mark.parametrize("overlay", WITH_LOCUST)
def test_the_component_adds_only_locust(docs: Docs, overlay: str) -> None:
    base = docs[overlay.split("-")[0]]
    added = {(d["kind"], d["metadata"]["name"]) for d in docs[overlay]} - {
        (d["kind"], d["metadata"]["name"]) for d in base
    }
    assert all("locust" in name for _, name in added), added
    for doc in docs[overlay]:
        assert (
            doc["metadata"].get("namespace", "mcloudtt") == "mcloudtt" or doc["kind"] == "Namespace"
        )
        if "locust" in doc["metadata"]["name"]:
            assert doc["metadata"]["namespace"] == "mcloudtt", doc["metadata"]["name"]


@pytest.mark.parametrize("overlay", WITH_LOCUST)
def test_locust_runs_the_locustfile_against_the_broker_service(docs: Docs, overlay: str) -> None:
    d = docs[overlay]
    files = find(d, "ConfigMap", "mcloudtt-locustfile")["data"]
    for name in ("locustfile.py", "saturation.py"):
        assert files[name] == (ROOT / "loadtest" / name).read_text(), name
    broker = find(d, "Service", "mcloudtt-broker")
    broker_ports = {p["port"] for p in broker["spec"]["ports"]}
    master_svc = find(d, "Service", "mcloudtt-locust-master")
    for name in LOCUST_NAMES:
        dep = find(d, "Deployment", name)
        env = runtime_env(d, dep, "locust")
        host = env["LOCUST_HOST"]
        assert host == f"mqtt://{broker['metadata']['name']}:1883" and 1883 in broker_ports
        path = env["LOCUST_LOCUSTFILE"]
        mount = mounts(dep, "locust")[str(Path(path).parent)]
        assert mount["configMap"]["name"].startswith("mcloudtt-locustfile-")
        assert Path(path).name in files
        pod = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod.items()
    master = find(d, "Deployment", "mcloudtt-locust-master")
    assert (
        master_svc["spec"]["selector"].items()
        <= master["spec"]["template"]["metadata"]["labels"].items()
    )
    worker_args = container(find(d, "Deployment", "mcloudtt-locust-worker"), "locust")["args"]
    assert f"--master-host={master_svc['metadata']['name']}" in worker_args
    assert "--master-port=5557" in worker_args
    assert 5557 in {p["port"] for p in master_svc["spec"]["ports"]}
    ports = {p["name"]: p["containerPort"] for p in container(master, "locust")["ports"]}
    assert ports == {"web": 8089, "master": 5557}


def _allows(policy: dict[str, Any], direction: str, pod: dict[str, str], port: int) -> bool:
    for rule in policy["spec"].get(direction, []):
        ports = {p["port"] for p in rule.get("ports", [])}
        peers = rule.get("to" if direction == "egress" else "from", [])
        if ports and port not in ports:
            continue
        if not peers or any(
            p.get("podSelector", {}).get("matchLabels", {}).items() <= pod.items() for p in peers
        ):
            return True
    return False


@pytest.mark.parametrize("overlay", WITH_LOCUST)
def test_network_policies_let_locust_through_the_default_deny(docs: Docs, overlay: str) -> None:
    d = docs[overlay]
    policies = [p for p in d if p["kind"] == "NetworkPolicy"]

    def labels(kind: str, name: str) -> dict[str, str]:
        return dict(find(d, kind, name)["spec"]["template"]["metadata"]["labels"])

    def applies(policy: dict[str, Any], pod: dict[str, str]) -> bool:
        return dict(policy["spec"]["podSelector"].get("matchLabels", {})).items() <= pod.items()

    def allowed(direction: str, pod: dict[str, str], peer: dict[str, str], port: int) -> bool:
        key = "Egress" if direction == "egress" else "Ingress"
        mine = [p for p in policies if key in p["spec"]["policyTypes"] and applies(p, pod)]
        return any(_allows(p, direction, peer, port) for p in mine)

    worker = labels("Deployment", "mcloudtt-locust-worker")
    master = labels("Deployment", "mcloudtt-locust-master")
    broker = labels("StatefulSet", "mcloudtt-broker")
    assert allowed("egress", worker, broker, 1883)
    assert allowed("egress", worker, master, 5557)
    assert allowed("ingress", master, worker, 5557)
    assert allowed("ingress", broker, worker, 1883)
    assert not allowed("egress", worker, broker, 6379)  # nothing more than MQTT


@pytest.mark.parametrize("overlay", WITH_LOCUST)
def test_locust_pods_are_locked_down(docs: Docs, overlay: str) -> None:
    for name in LOCUST_NAMES:
        dep = find(docs[overlay], "Deployment", name)
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] >= 10000
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        c = container(dep, "locust")
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind])
        assert "readinessProbe" in c and "livenessProbe" in c
        # The root filesystem is read-only: reports go to the /tmp volume.
        assert "/tmp" in mounts(dep, "locust")


OPTIONS = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import locustfile, saturation  # their options, as locust registers them
from locust.argument_parser import get_parser
opts = get_parser(default_config_files=[]).parse_args(sys.argv[2:])
json.dump({k: v for k, v in vars(opts).items() if isinstance(v, (str, int, float, bool, list))}, sys.stdout)
"""


@pytest.mark.parametrize("name", LOCUST_NAMES)
def test_locust_accepts_the_options_the_manifests_pass(docs: Docs, name: str) -> None:
    d = docs["kind-locust"]
    dep = find(d, "Deployment", name)
    env = runtime_env(d, dep, "locust")
    # Unknown LOCUST_* variables would be ignored: each must be an option of locust or the
    # locustfile, and reach it with its value.
    done = subprocess.run(
        [sys.executable, "-c", OPTIONS, str(ROOT / "loadtest"), *container(dep, "locust")["args"]],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    opts = json.loads(done.stdout)
    for key, value in env.items():
        assert key.startswith("LOCUST_"), key
        dest = key.removeprefix("LOCUST_").lower()
        assert dest in opts, f"{key} is no option of locust or the locustfile"
        assert str(opts[dest]) == value or opts[dest] == type(opts[dest])(value), (key, opts[dest])
    assert opts["master" if name.endswith("master") else "worker"] is True


def test_the_locust_image(tools: Tools) -> None:
    text = (ROOT / "loadtest" / "Dockerfile").read_text()
    lock = (ROOT / "uv.lock").read_text()
    version = text.split("ARG LOCUST_VERSION=")[1].split()[0]
    assert f'name = "locust"\nversion = "{version}"' in lock, "the image's locust is not uv.lock's"
    assert "USER 10001" in text and text.count("FROM python:3.11-slim") == 2
    proc = subprocess.run(
        [str(tools.hadolint), str(ROOT / "loadtest" / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
