"""The kind path checked against the built images: what the rendered manifests (kind overlay)
say about each image (its name, ports, user, entrypoint, environment, probes) is what the image
really exposes and accepts. The pod is then played by a container started exactly as the pod
spec says (its command, arguments and environment after $(VAR) expansion, user, read-only root,
its volumes' mount paths, Redis reached by its Service name) and every probe is called as the
kubelet would call it."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from deploy.manifests import PASSWORD, Tools, ToolsUnavailable, container, find, runtime_env
from mcloudtt_chaos.containers import Docker, Fleet, wait_for

from .conftest import require_docker
from .mqtt import http_get

require_docker()
pytestmark = pytest.mark.timeout(900)

Docs = list[dict[str, Any]]
# component -> (workload kind, workload name, container name)
WORKLOADS = {
    "broker": ("StatefulSet", "mcloudtt-broker", "broker"),
    "adapter": ("Deployment", "mcloudtt-adapter", "adapter"),
}
# Uncompressed sizes measured in docs/deploy.md, with room: a stray build tool or cache shows.
MAX_SIZE = {"broker": 180e6, "adapter": 520e6}
# What each image's own code accepts as environment variables: asked of the image, not of the
# sources on the host.
KNOWN_ENV = {
    "broker": "from mcloudtt_broker.config import OPTIONS, env_name\n"
    "print(json.dumps([env_name(o.name) for o in OPTIONS] + ['MCLOUDTT_CONFIG']))",
    "adapter": "from mcloudtt_adapter.config import ADAPTER\n"
    "print(json.dumps([ADAPTER.env_name(o.name) for o in ADAPTER.options] + [ADAPTER.config_env]))",
}


@pytest.fixture(scope="module")
def kind_docs(tmp_path_factory: pytest.TempPathFactory) -> Docs:
    try:
        tools = Tools.install()
    except ToolsUnavailable as error:
        pytest.skip(f"deployment validation tools unavailable: {error}")
    rendered = tools.render(tmp_path_factory.mktemp("containers-deploy"))
    return tools.load_yaml(rendered["kind"])


@pytest.fixture(params=sorted(WORKLOADS))
def component(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def image(component: str, request: pytest.FixtureRequest) -> str:
    built: str = request.getfixturevalue(f"{component}_image")
    return built


def _workload(docs: Docs, component: str) -> tuple[dict[str, Any], dict[str, Any]]:
    kind, name, container_name = WORKLOADS[component]
    workload = find(docs, kind, name)
    return workload, container(workload, container_name)


def _port_number(spec: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in spec.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"probe port {port} is not a named container port")


def test_manifest_describes_the_image(
    docker: Docker, kind_docs: Docs, component: str, image: str
) -> None:
    workload, spec = _workload(kind_docs, component)
    inspected = docker.image(image)
    config = inspected["Config"]
    assert inspected["Size"] < MAX_SIZE[component], f"{image}: {inspected['Size'] / 1e6:.0f} MB"

    # The name kind/up.sh loads is the name the pods ask for, and it is never pulled.
    assert spec["image"] == image
    assert spec["imagePullPolicy"] in ("IfNotPresent", "Never")

    exposed = {int(p.split("/")[0]) for p in config["ExposedPorts"]}
    declared = {int(p["containerPort"]) for p in spec.get("ports", [])}
    assert declared <= exposed, f"ports {declared - exposed} are not exposed by {image}"

    # runAsNonRoot needs a numeric user the kubelet can check; the pod runs as the image's.
    user, _, group = config["User"].partition(":")
    assert user.isdigit() and user != "0", config["User"]
    pod_security = workload["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert (str(pod_security["runAsUser"]), str(pod_security["runAsGroup"])) == (user, group)

    # `command` would replace the entrypoint: it must then name the same program.
    if "command" in spec:
        assert spec["command"][0] == config["Entrypoint"][0], spec["command"]
    assert config["Entrypoint"] == [f"mcloudtt-{component}"]

    known = set(
        json.loads(
            docker(
                "run", "--rm", "--network", "none", "--entrypoint", "python", image,
                "-c", "import json\n" + KNOWN_ENV[component],
            )
        )
    )  # fmt: skip
    image_env = {e.split("=", 1)[0] for e in config["Env"] if e.startswith("MCLOUDTT_")}
    manifest_env = {k for k in runtime_env(kind_docs, workload, spec["name"]) if "MCLOUDTT_" in k}
    assert image_env <= known, f"{image} sets unknown variables {sorted(image_env - known)}"
    assert manifest_env <= known, f"{image} ignores {sorted(manifest_env - known)}"


@pytest.fixture
def pod(
    docker: Docker,
    fleet: Fleet,
    kind_docs: Docs,
    component: str,
    image: str,
    redis_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Any, dict[str, Any]]]:
    workload, spec = _workload(kind_docs, component)
    # Redis under its Service name, with the password the Secret holds.
    fleet.run(
        "redis",
        redis_image,
        args=["--port", "6379", "--requirepass", PASSWORD, "--save", "", "--appendonly", "no"],
        extra=["--network-alias", "mcloudtt-redis"],
    )
    pod_spec = workload["spec"]["template"]["spec"]
    security = spec.get("securityContext", {})
    extra = ["--user", f"{pod_spec['securityContext']['runAsUser']}:"
             f"{pod_spec['securityContext']['runAsGroup']}"]  # fmt: skip
    if security.get("capabilities", {}).get("drop") == ["ALL"]:
        extra += ["--cap-drop", "ALL"]
    if security.get("allowPrivilegeEscalation") is False:
        extra += ["--security-opt", "no-new-privileges"]
    if "command" in spec:
        extra += ["--entrypoint", spec["command"][0]]
    args = list(spec.get("command", [])[1:]) + list(spec.get("args", []))
    # Each volume at its mount path: an emptyDir as a tmpfs, the PVC as a fresh (anonymous)
    # volume, which docker fills from the image's directory, owner included, where Kubernetes
    # has fsGroup make it writable for the pod's user.
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    tmpfs = []
    for mount in spec.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "persistentVolumeClaim" in volume:
            extra += ["--volume", mount["mountPath"]]
        elif "secret" in volume:
            # A Secret as kind/up.sh makes it (random content, here a fresh key per run),
            # mounted read-only where the pod mounts it.
            secret_dir = tmp_path_factory.mktemp(mount["name"])
            (secret_dir / "key").write_text(secrets.token_hex(32) + "\n")
            secret_dir.chmod(0o755)
            (secret_dir / "key").chmod(0o444)
            extra += ["--volume", f"{secret_dir}:{mount['mountPath']}:ro"]
        else:
            tmpfs.append(mount["mountPath"])
    started = fleet.run(
        component,
        image,
        args=args,
        env=runtime_env(kind_docs, workload, spec["name"]),
        read_only=bool(security.get("readOnlyRootFilesystem")),
        tmpfs=tmpfs,
        extra=extra,
    )
    yield started, spec


def test_pod_as_the_manifest_runs_it_passes_every_probe(pod: tuple[Any, dict[str, Any]]) -> None:
    started, spec = pod
    probes = {k: spec[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in spec}
    assert set(probes) == {"startupProbe", "readinessProbe", "livenessProbe"}
    # startupProbe's budget: periodSeconds x failureThreshold.
    startup = probes["startupProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    for name, probe in probes.items():
        get = probe["httpGet"]
        port = _port_number(spec, get["port"])
        try:
            wait_for(
                lambda p=port, path=get["path"]: 200 <= http_get(started.ip, p, path)[0] < 400,
                timeout=budget,
                what=f"{name} {get['path']}",
            )
        except TimeoutError:
            status = http_get(started.ip, port, get["path"])
            pytest.fail(f"{name} GET {get['path']} on :{port}: {status}\n{started.logs()[-3000:]}")
    # Up the whole time: no option it was given made it exit.
    assert started.state()["Running"] is True
    assert started.restart_count() == 0
