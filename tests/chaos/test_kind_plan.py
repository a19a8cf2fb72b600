"""The kind backend's plan, checked against the manifests it runs on (no cluster needed).

Every Protocol method is run on a dry-run `KindBackend`; each kubectl command it would run is
parsed, and every resource, label, selector, container, port and policy it names is looked up
in `kind/overlays/kind` as `kubectl kustomize` renders it (with the kubectl tests/deploy
installs). The policy patches are applied by kubectl itself (`patch --local`) to the rendered
policies, the results validated by kubernetes-validate, and their meaning checked: the cut
broker is left with no policy that lets it reach Redis (or its clients), the others keep theirs.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
from deploy.manifests import K8S_VERSION, ROOT, Tools, ToolsUnavailable, container, find
from mcloudtt_chaos.backend import ClusterSpec, LinkFault
from mcloudtt_chaos.backends import kind as kb

pytestmark = pytest.mark.timeout(900)

Obj = dict[str, Any]

# Every Protocol method with arguments, as a scenario would call it.
CALLS: list[tuple[Any, ...]] = [
    ("start_redis",),
    ("kill_redis",),
    ("restart_redis",),
    ("freeze_redis",),
    ("thaw_redis",),
    ("kill_broker", "b1"),
    ("stop_broker", "b1"),
    ("start_broker", "b1"),
    ("freeze_broker", "b2"),
    ("thaw_broker", "b2"),
    ("cut_from_redis", "b1"),
    ("cut_from_clients", "b2"),
    ("heal", "b1"),
    ("readyz", "b0"),
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


def steps_of(calls: list[tuple[Any, ...]], spec: ClusterSpec | None = None) -> list[kb.Step]:
    backend = kb.KindBackend(dry_run=True)
    backend.setup(spec or ClusterSpec())
    for call in calls:
        kb.call_method(backend, call)
    backend.teardown()
    return backend.runner.steps


def every_plan() -> list[kb.Step]:
    steps = steps_of(CALLS)
    steps += steps_of(
        [("kill_redis",), ("restart_redis", {"keep_data": False}), ("heal", "b2")],
        ClusterSpec(brokers=2, redis_first=False, redis_appendonly=False, env={"X": "1"}),
    )
    return steps + steps_of([], ClusterSpec(broker_args=("--presence-ttl", "3")))


def kubectl_args(step: kb.Step) -> list[str]:
    """The arguments after `kubectl --context C -n NAMESPACE`."""
    assert step.argv[:5] == ("kubectl", "--context", "kind-mcloudtt", "-n", kb.NAMESPACE)
    return list(step.argv[5:])


def pods_of(docs: list[Obj], name: str) -> set[str]:
    sts = find(docs, "StatefulSet", name)
    return {f"{name}-{i}" for i in range(sts["spec"]["replicas"])}


def pod_labels(docs: list[Obj], pod: str) -> dict[str, str]:
    """The labels a pod has at run time: its template's, and the StatefulSet's pod-name label."""
    for d in docs:
        if d["kind"] in ("StatefulSet", "Deployment"):
            name = d["metadata"]["name"]
            if pod == name or (d["kind"] == "StatefulSet" and pod in pods_of(docs, name)):
                labels = dict(d["spec"]["template"]["metadata"]["labels"])
                if d["kind"] == "StatefulSet":
                    labels[kb.POD_NAME_LABEL] = pod
                return labels
    raise AssertionError(f"no workload makes pod {pod}")


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        op = expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        assert op in ("In", "NotIn"), op
    return True


# --------------------------------------------------------------------- the plan's references


def test_every_protocol_method_has_a_well_formed_plan() -> None:
    backend = kb.KindBackend(dry_run=True)
    backend.setup(ClusterSpec())
    for method, *args in CALLS:
        before = len(backend.runner.plan)
        getattr(backend, method)(*args)
        lines = backend.runner.plan[before:]
        assert lines, f"{method} plans nothing"
        for line in lines:
            # Each line is a shell command line as printed: bash must parse it.
            proc = subprocess.run(["bash", "-n", "-c", line], capture_output=True, text=True)
            assert proc.returncode == 0, f"{line}\n{proc.stderr}"
            assert re.match(r"(# |[A-Z0-9_]+=\$\()?(kubectl|docker) |# (wait|GET) ", line), line
    backend.teardown()
    assert backend.runner.plan[-1].startswith("kubectl --context kind-mcloudtt -n mcloudtt rollout")


def test_captured_values_are_defined_before_use() -> None:
    defined: set[str] = set()
    for step in every_plan():
        for arg in step.argv:
            for var in re.findall(r"\$\{([A-Z0-9_]+)\}", arg):
                assert var in defined, f"{var} used before it is captured: {step.render()}"
        if step.capture:
            defined.add(step.capture)


def test_every_reference_exists_in_the_kind_overlay(rendered: list[Obj]) -> None:
    kinds = {
        "statefulset": "StatefulSet",
        "service": "Service",
        "hpa": "HorizontalPodAutoscaler",
        "networkpolicy": "NetworkPolicy",
    }
    broker_sts = find(rendered, "StatefulSet", kb.BROKER_STS)
    redis_sts = find(rendered, "StatefulSet", kb.REDIS_STS)
    pods = pods_of(rendered, kb.BROKER_STS) | pods_of(rendered, kb.REDIS_STS)
    applied = set()
    seen: set[str] = set()
    for step in every_plan():
        if step.url is not None or step.argv[0] != "kubectl":
            continue
        args = kubectl_args(step)
        verb = args[0]
        seen.add(verb)
        if step.stdin is not None:  # kubectl apply -f -: a policy of our own
            applied.add(json.loads(step.stdin)["metadata"]["name"])
        for arg in args[1:]:
            kind, slash, name = arg.partition("/")
            if slash and kind in kinds:
                if kind == "networkpolicy" and name.startswith(kb.PROBES_POLICY):
                    continue  # ours, checked below
                obj = find(rendered, kinds[kind], name)
                assert obj["metadata"]["namespace"] == kb.NAMESPACE, arg
            elif slash and kind == "pod":
                assert name in pods, arg
            elif slash and kind == "pvc":
                # data-mcloudtt-redis-0: claim template "data" of pod mcloudtt-redis-0
                claims = {t["metadata"]["name"] for t in redis_sts["spec"]["volumeClaimTemplates"]}
                assert any(name == f"{c}-{p}" for c in claims for p in pods), arg
        if verb == "delete" and args[1] == "pod" and not args[2].startswith("-"):
            assert args[2] in pods, args
        if "-l" in args:
            key, _, value = args[args.index("-l") + 1].partition("=")
            if args[1] == "pod":
                # The label selects the broker pods, exactly as the StatefulSet does.
                assert broker_sts["spec"]["selector"]["matchLabels"] == {key: value}
                assert broker_sts["spec"]["template"]["metadata"]["labels"][key] == value
            else:
                assert key == kb.MANAGED_BY, args
        if "-c" in args:
            name = args[args.index("-c") + 1]
            target = args[1] if verb == "exec" else args[2]
            if target in (kb.REDIS_POD, f"statefulset/{kb.REDIS_STS}"):
                container(redis_sts, name)
            else:
                assert target == f"statefulset/{kb.BROKER_STS}", args
                container(broker_sts, name)
        for arg in args:
            if arg.startswith("jsonpath={.status.containerStatuses[0]"):
                # [0] is the only container (init containers are reported elsewhere).
                for sts in (broker_sts, redis_sts):
                    assert len(sts["spec"]["template"]["spec"]["containers"]) == 1
    assert {"delete", "scale", "rollout", "wait", "patch", "exec", "apply", "set"} <= seen
    assert applied == {f"{kb.PROBES_POLICY}-mcloudtt-broker-2"}


def test_the_constants_match_the_manifests(rendered: list[Obj]) -> None:
    broker = find(rendered, "StatefulSet", kb.BROKER_STS)
    redis = find(rendered, "StatefulSet", kb.REDIS_STS)
    ports = {p["name"]: p["containerPort"] for p in container(broker, "broker")["ports"]}
    assert (ports["mqtt"], ports["ws"]) == kb.MQTT_PORTS and ports["http"] == kb.HTTP_PORT
    c = container(broker, "broker")
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    rc = container(redis, kb.REDIS_CONTAINER)
    assert [p["containerPort"] for p in rc["ports"]] == [kb.REDIS_PORT]
    # The Redis password file redis-cli reads, as the pod's own probes do.
    assert "/etc/redis-auth" in {m["mountPath"] for m in rc["volumeMounts"]}
    assert "/etc/redis-auth/password" in " ".join(rc["readinessProbe"]["exec"]["command"])
    assert redis["spec"]["replicas"] == 1
    hpa = find(rendered, "HorizontalPodAutoscaler", kb.BROKER_HPA)
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (kb.HPA_MIN, kb.HPA_MAX)
    assert hpa["spec"]["minReplicas"] >= kb.MAX_BROKERS
    # Parallel: deleting every broker pod starts them all again at once (brokers-before-redis).
    assert broker["spec"]["podManagementPolicy"] == "Parallel"
    egress = find(rendered, "NetworkPolicy", kb.REDIS_EGRESS_POLICY)
    ingress = find(rendered, "NetworkPolicy", kb.BROKER_INGRESS_POLICY)
    assert egress["spec"]["podSelector"] == kb.REDIS_EGRESS_SELECTOR
    assert ingress["spec"]["podSelector"] == kb.BROKER_INGRESS_SELECTOR


def test_each_broker_is_reachable_from_the_host_on_its_endpoint(rendered: list[Obj]) -> None:
    cluster = (ROOT / "kind" / "cluster.yaml").read_text()
    mapped = {
        (int(c), int(h), a)
        for c, h, a in re.findall(
            r"containerPort: (\d+)\s+hostPort: (\d+)\s+listenAddress: ([\d.]+)", cluster
        )
    }
    backend = kb.KindBackend(dry_run=True)
    endpoints = backend.endpoints()
    assert [e.name for e in endpoints] == ["b0", "b1", "b2"]
    assert len(endpoints) == kb.MAX_BROKERS
    for i, endpoint in enumerate(endpoints):
        pod = f"{kb.BROKER_STS}-{i}"
        assert pod in pods_of(rendered, kb.BROKER_STS)
        svc = find(rendered, "Service", pod)
        assert svc["metadata"]["namespace"] == kb.NAMESPACE
        assert svc["spec"]["type"] == "NodePort"
        # A broker waiting for Redis is not ready, and must still be reached.
        assert svc["spec"]["publishNotReadyAddresses"] is True
        assert svc["spec"]["selector"] == {kb.POD_NAME_LABEL: pod}
        by_target = {p["targetPort"]: p["nodePort"] for p in svc["spec"]["ports"]}
        assert by_target == {"mqtt": endpoint.mqtt_port, "http": endpoint.http_port}
        for port in (endpoint.mqtt_port, endpoint.http_port):
            assert (port, port, endpoint.host) in mapped, port
    # The brokers' ingress policy lets those ports in from outside the cluster.
    ingress = find(rendered, "NetworkPolicy", kb.BROKER_INGRESS_POLICY)
    open_ports = {p["port"] for rule in ingress["spec"]["ingress"] for p in rule["ports"]}
    assert {1883, kb.HTTP_PORT} <= open_ports
    assert all("from" not in rule for rule in ingress["spec"]["ingress"])


# --------------------------------------------------------------------- the policies


def patched(tools: Tools, tmp_path: Path, obj: Obj, step: kb.Step) -> Obj:
    """The object after the plan's `kubectl patch`, applied by kubectl itself, offline."""
    args = kubectl_args(step)
    assert args[0] == "patch"
    src = tmp_path / f"{obj['metadata']['name']}.json"
    src.write_text(json.dumps(obj))
    proc = subprocess.run(
        [str(tools.kubectl), "patch", "--local", "-f", str(src), *args[2:], "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out: Obj = json.loads(proc.stdout)
    return out


def validate(tools: Tools, tmp_path: Path, objs: list[Obj]) -> None:
    for i, obj in enumerate(objs):
        path = tmp_path / f"policy-{i}.json"
        path.write_text(json.dumps(obj))
        proc = subprocess.run(
            [str(tools.kubernetes_validate), "--strict", "-k", K8S_VERSION, "--quiet", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def egress_to_redis(policies: list[Obj], labels: dict[str, str]) -> bool:
    """Whether any policy selecting a pod with these labels lets it out to Redis on 6379."""
    redis = {"app.kubernetes.io/name": "mcloudtt-redis"}
    for p in policies:
        if "Egress" not in p["spec"]["policyTypes"] or not selects(
            p["spec"]["podSelector"], labels
        ):
            continue
        for rule in p["spec"].get("egress", []):
            ports = {q["port"] for q in rule.get("ports", [])}
            to = rule.get("to")
            if (not ports or kb.REDIS_PORT in ports) and (
                to is None or any(selects(peer.get("podSelector", {}), redis) for peer in to)
            ):
                return True
    return False


def ingress_on(policies: list[Obj], labels: dict[str, str], port: int) -> bool:
    for p in policies:
        if "Ingress" not in p["spec"]["policyTypes"] or not selects(
            p["spec"]["podSelector"], labels
        ):
            continue
        for rule in p["spec"].get("ingress", []):
            if "from" not in rule and port in {q["port"] for q in rule.get("ports", [])}:
                return True
    return False


def test_a_cut_leaves_the_broker_no_allowing_policy_and_heal_restores_it(
    tools: Tools, rendered: list[Obj], tmp_path: Path
) -> None:
    policies = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "NetworkPolicy"}
    b1, b2 = pod_labels(rendered, "mcloudtt-broker-1"), pod_labels(rendered, "mcloudtt-broker-2")
    b0, adapter = (
        pod_labels(rendered, "mcloudtt-broker-0"),
        pod_labels(rendered, "mcloudtt-adapter"),
    )
    before = list(policies.values())
    assert egress_to_redis(before, b1) and ingress_on(before, b2, 1883)

    backend = kb.KindBackend(dry_run=True)
    backend.setup(ClusterSpec())
    for cut in (("cut_from_redis", "b1"), ("cut_from_clients", "b2")):
        start = len(backend.runner.steps)
        getattr(backend, cut[0])(cut[1])
        for step in backend.runner.steps[start:]:
            if step.argv[:1] == ("kubectl",) and kubectl_args(step)[0] == "patch":
                name = kubectl_args(step)[1].split("/", 1)[1]
                policies[name] = patched(tools, tmp_path, policies[name], step)
            elif step.stdin is not None:
                added = json.loads(step.stdin)
                policies[added["metadata"]["name"]] = added
    cut = list(policies.values())
    validate(tools, tmp_path, [p for p in cut if p not in before])
    # b1 is cut from Redis, nobody else is; b2 from its clients, yet still probed on 8080.
    assert not egress_to_redis(cut, b1)
    assert egress_to_redis(cut, b0) and egress_to_redis(cut, b2) and egress_to_redis(cut, adapter)
    assert not ingress_on(cut, b2, 1883) and not ingress_on(cut, b2, 8083)
    assert ingress_on(cut, b2, kb.HTTP_PORT)
    assert ingress_on(cut, b0, 1883) and ingress_on(cut, b1, 1883)
    # The default-deny and DNS policies still apply to the cut brokers.
    assert selects(policies["default-deny"]["spec"]["podSelector"], b1)

    start = len(backend.runner.steps)
    backend.heal("b1")
    backend.heal("b2")
    for step in backend.runner.steps[start:]:
        args = kubectl_args(step)
        name = args[1].split("/", 1)[1]
        if args[0] == "patch":
            policies[name] = patched(tools, tmp_path, policies[name], step)
        else:
            assert args[0] == "delete" and name.startswith(kb.PROBES_POLICY)
            del policies[name]
    assert sorted(policies.values(), key=str) == sorted(before, key=str)


# --------------------------------------------------------------------- behaviour without a cluster


def test_brokers_before_redis_takes_redis_down_then_restarts_every_broker_at_once() -> None:
    lines = kb.plan([], ClusterSpec(redis_first=False))
    down = next(i for i, line in enumerate(lines) if "mcloudtt-redis --replicas=0" in line)
    restart = next(i for i, line in enumerate(lines) if "delete pod -l" in line)
    up = next(i for i, line in enumerate(lines) if "mcloudtt-redis --replicas=1" in line)
    assert down < restart < up
    # No rolling restart while Redis is down: it would wait for a ready broker forever.
    assert not any("rollout" in line for line in lines[:up])


def test_redis_comes_back_empty_only_when_asked() -> None:
    keep = kb.plan([("kill_redis",), ("restart_redis",)])
    lose = kb.plan([("kill_redis",), ("restart_redis", {"keep_data": False})])
    assert not any("pvc/" in line for line in keep)
    (delete,) = [line for line in lose if "pvc/" in line]
    kill = next(i for i, line in enumerate(lose) if "delete pod mcloudtt-redis-0" in line)
    up = next(i for i, line in enumerate(lose) if i > kill and "redis --replicas=1" in line)
    # The claim goes while no pod holds it; the StatefulSet makes a new, empty one.
    assert kill < lose.index(delete) < up


def test_what_kind_cannot_do_is_refused_clearly() -> None:
    backend = kb.KindBackend(dry_run=True)
    with pytest.raises(kb.NotSupported, match="1 to 3 brokers"):
        backend.setup(ClusterSpec(brokers=4))
    backend.setup(ClusterSpec())
    with pytest.raises(NotImplementedError, match="netem"):
        backend.degrade_redis_link("b1", LinkFault(latency_ms=50))
    with pytest.raises(ValueError, match="not a broker"):
        backend.kill_broker("redis")


def test_broker_options_become_the_brokers_environment() -> None:
    spec = ClusterSpec(broker_args=("--presence-ttl", "3", "--log-level=debug"), env={"A": "b"})
    assert kb.env_of(spec) == {
        "MCLOUDTT_PRESENCE_TTL": "3",
        "MCLOUDTT_LOG_LEVEL": "debug",
        "A": "b",
    }
    lines = kb.plan([], spec)
    assert any(
        line.endswith("-c broker A=b MCLOUDTT_LOG_LEVEL=debug MCLOUDTT_PRESENCE_TTL=3")
        for line in lines
    )
    assert any(
        line.endswith("-c broker A- MCLOUDTT_LOG_LEVEL- MCLOUDTT_PRESENCE_TTL-") for line in lines
    )


def test_a_scenario_run_yields_its_plan() -> None:
    def scenario(backend: kb.KindBackend, spec: ClusterSpec) -> None:
        backend.setup(spec)
        backend.kill_broker("b1")
        backend.start_broker("b1")
        backend.teardown()

    lines = kb.plan(scenario, ClusterSpec())
    kill = lines.index(
        "kubectl --context kind-mcloudtt -n mcloudtt delete pod mcloudtt-broker-1 --grace-period=0"
        " --force  # SIGTERM, SIGKILL 2 s later; the StatefulSet makes it again"
    )
    assert "30881/healthz gets no answer" in lines[kill + 1]
    assert "30881/healthz answers 200" in lines[kill + 2]


def test_the_real_runner_captures_and_substitutes(tmp_path: Path) -> None:
    runner = kb.Runner()
    assert runner.run(kb.Step(argv=("echo", "node-1"), capture="NODE_X")) == "node-1"
    out = tmp_path / "out"
    runner.run(
        kb.Step(argv=("sh", "-c", 'printf %s "$1" > ' + shlex.quote(str(out)), "sh", "${NODE_X}"))
    )
    assert out.read_text() == "node-1"
    with pytest.raises(kb.KindError, match="exit 3"):
        runner.run(kb.Step(argv=("sh", "-c", "exit 3")))
    runner.run(kb.Step(argv=("sh", "-c", "exit 1"), check=False))
    assert runner.plan[1] == f'sh -c \'printf %s "$1" > {shlex.quote(str(out))}\' sh "${{NODE_X}}"'


def test_describe_gives_each_call_its_lines_and_keeps_state() -> None:
    # As the CLI's --dry-run asks a real (not dry-run) backend: nothing runs, state carries.
    backend = kb.KindBackend()
    assert not backend.runner.dry_run
    setup = backend.describe("setup", ClusterSpec(redis_first=False))
    assert any("delete pod -l app.kubernetes.io/name=mcloudtt-broker" in line for line in setup)
    cut = backend.describe("cut_from_redis", "b1")
    assert "NotIn" in cut[0] and "mcloudtt-broker-1" in cut[0]
    # The heal of a cut broker restores the policy; of an uncut one does nothing.
    assert backend.describe("heal", "b0") == []
    (heal,) = backend.describe("heal", "b1")
    assert "NotIn" not in heal and "as deployed" in heal
    lose = backend.describe("restart_redis", keep_data=False)
    assert any("delete pvc/data-mcloudtt-redis-0" in line for line in lose)
    (refused,) = backend.describe("degrade_redis_link", "b0", LinkFault(latency_ms=100))
    assert refused.startswith("# not supported on kind:")
    assert backend.runner.plan == []  # the real runner saw nothing


def test_a_named_scenario_yields_its_plan() -> None:
    try:
        import mcloudtt_chaos.scenarios  # noqa: F401
    except ImportError:
        pytest.skip("mcloudtt_chaos.scenarios is not in this build")
    lines = kb.plan("broker-kill", ClusterSpec())
    assert any(
        "delete pod mcloudtt-broker-" in line and "--grace-period=0" in line for line in lines
    )
    assert any("mcloudtt-redis --replicas=1" in line for line in lines)


def test_kubectl_waits_bound_the_runners_timeout() -> None:
    steps = steps_of([("kill_redis",), ("restart_redis",)])
    (wait,) = [s for s in steps if "wait" in s.argv and "--for=delete" in s.argv]
    assert f"--timeout={kb.REDIS_TIMEOUT_S}s" in wait.argv
    assert wait.timeout_s == kb.REDIS_TIMEOUT_S
