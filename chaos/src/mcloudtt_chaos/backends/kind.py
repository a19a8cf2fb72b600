"""The `kind` backend: the chaos scenarios on the cluster `kind/up.sh` builds, driven by kubectl.

Theory of operation. Every action is a `Step` (one command line, or a wait) handed to one
`Runner`. A real runner executes it; a dry-run runner only records it, so running any scenario
on a dry-run backend yields its exact plan (`plan()`), and the tests check that plan against the
rendered `kind/overlays/kind`. Values only known on a live cluster (a pod's node, IP, container
id) are captured by one step into a shell variable (`NODE_MCLOUDTT_BROKER_1=$(kubectl ...)`) and
used by later ones (`"${NODE_MCLOUDTT_BROKER_1}"`), in real runs as in the printed plan.

How each fault is made on kind (docs/chaos.md says the same for users):

- Brokers are the pods of the StatefulSet `mcloudtt-broker`; `b1` is pod `mcloudtt-broker-1`
  (broker id = pod name). The workload reaches each one through its own NodePort Service
  (`kind/overlays/kind/broker-pods.yaml`), mapped to 127.0.0.1 by `kind/cluster.yaml`.
- kill: `kubectl delete pod --grace-period=0 --force`. The kubelet still sends SIGTERM and
  SIGKILLs 2 s later (its minimum grace), so a broker may begin its drain; the StatefulSet brings
  the pod back under the same name by itself.
- Redis down: the StatefulSet `mcloudtt-redis` scaled to 0 and back; its volume keeps the AOF.
  `keep_data=False` deletes the volume claim while Redis is down, so it comes back empty.
- freeze: SIGSTOP cannot come from inside the container (the process is PID 1 there, and the
  kernel drops SIGSTOP/SIGKILL sent to a namespace's init from inside it), so it is sent from the
  kind node (a Docker container that sees the pod's processes) with `docker exec`.
- partitions: NetworkPolicies only ever allow, so a broker is cut by narrowing the allowing
  policy (`mcloudtt-redis-clients-egress` or `mcloudtt-broker-ingress`) to every pod but its
  own (`statefulset.kubernetes.io/pod-name NotIn [...]`); the default-deny policy then applies
  to it. Enforcers judge a connection by its first packet, so the cut broker's open connections
  are dropped from the node's conntrack table, which makes their next packet a new one.
- slow links need `tc netem` inside the pod's network namespace: not supported here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import importlib
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from mcloudtt_chaos.backend import Backend, ClusterSpec, Endpoint, LinkFault

NAMESPACE = "mcloudtt"
BROKER_STS = "mcloudtt-broker"
BROKER_CONTAINER = "broker"
BROKER_HPA = "mcloudtt-broker"
REDIS_STS = "mcloudtt-redis"
REDIS_CONTAINER = "redis"
REDIS_POD = "mcloudtt-redis-0"
REDIS_PVC = "data-mcloudtt-redis-0"  # volumeClaimTemplates "data" of pod mcloudtt-redis-0
REDIS_PORT = 6379
MQTT_PORTS = (1883, 8083)  # MQTT and MQTT over WebSocket in the broker pods
HTTP_PORT = 8080
NAME_LABEL = "app.kubernetes.io/name"
BROKER_SELECTOR = f"{NAME_LABEL}=mcloudtt-broker"
# Set by the StatefulSet controller on each of its pods (not in the manifests).
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
REDIS_EGRESS_POLICY = "mcloudtt-redis-clients-egress"
BROKER_INGRESS_POLICY = "mcloudtt-broker-ingress"
MANAGED_BY = "app.kubernetes.io/managed-by"  # labels the policies this backend adds
PROBES_POLICY = "mcloudtt-chaos-probes-only"  # keeps a broker cut from clients probed
# The podSelectors of those two policies in kind/base/networkpolicies.yaml, restored on heal
# (tests/chaos/test_kind_plan.py checks them against the rendered overlay).
REDIS_EGRESS_SELECTOR: dict[str, Any] = {
    "matchExpressions": [
        {
            "key": NAME_LABEL,
            "operator": "In",
            "values": ["mcloudtt-broker", "mcloudtt-adapter"],
        }
    ]
}
BROKER_INGRESS_SELECTOR: dict[str, Any] = {"matchLabels": {NAME_LABEL: "mcloudtt-broker"}}
# The kind overlay's HPA bounds, restored at teardown (pinned during a run so that load does not
# add brokers mid-scenario).
HPA_MIN, HPA_MAX = 3, 5
# kind/overlays/kind/broker-pods.yaml: broker N on 127.0.0.1:MQTT_NODE_PORT+N and HTTP_NODE_PORT+N.
MAX_BROKERS = 3
MQTT_NODE_PORT = 31884
HTTP_NODE_PORT = 30880
BROKER_TIMEOUT_S = 120
REDIS_TIMEOUT_S = 300
# The Redis pod's own way to authenticate (as its probes do): the password never leaves the pod.
REDIS_CLI = 'REDISCLI_AUTH="$(cat /etc/redis-auth/password)" redis-cli'
# In the kind node: the host pid of the container's main process, from its CRI container id.
_PID = 'crictl inspect -o go-template --template "{{.info.pid}}" "${1#containerd://}"'


class NotSupported(NotImplementedError):
    """This fault cannot be made on kind; the message says why and what to use instead. A
    NotImplementedError, so a runner can tell "not on this backend" from a failure."""


class KindError(Exception):
    """A command against the cluster failed."""


@dataclass(frozen=True, kw_only=True)
class Step:
    """One line of the plan: a command, or (with `url`) a wait for an HTTP status from the host."""

    argv: tuple[str, ...] = ()
    stdin: str | None = None
    capture: str | None = None  # store stdout in this variable for later steps
    check: bool = True  # a non-zero exit fails the run
    timeout_s: float = 60.0
    url: str | None = None
    expect_status: int = 200
    why: str = ""

    def render(self) -> str:
        if self.url is not None:
            until = f"answers {self.expect_status}" if self.expect_status else "gets no answer"
            line = f"# wait until GET {self.url} {until} (up to {self.timeout_s:g} s)"
        else:
            line = " ".join(_quote(arg) for arg in self.argv)
            if self.stdin is not None:
                line += " <<< " + shlex.quote(self.stdin)
            if self.capture:
                line = f"{self.capture}=$({line})"
            if not self.check:
                line += " || true"
        return f"{line}  # {self.why}" if self.why else line


def _quote(arg: str) -> str:
    # A reference to a captured variable stays expandable in the printed plan.
    if "${" in arg and re.fullmatch(r"[^'\"\\`]*", arg):
        return f'"{arg}"'
    return shlex.quote(arg)


class Runner:
    """Runs steps (or, with dry_run, records them). Every kubectl/docker call goes through here."""

    def __init__(self, *, dry_run: bool = False, echo: TextIO | None = None) -> None:
        self.dry_run = dry_run
        self.echo = echo
        self.plan: list[str] = []
        self.steps: list[Step] = []  # what `plan` renders, for tests
        self.vars: dict[str, str] = {}

    def run(self, step: Step) -> str:
        line = step.render()
        self.plan.append(line)
        self.steps.append(step)
        if self.echo is not None:
            print(line, file=self.echo, flush=True)
        if self.dry_run:
            return "${" + step.capture + "}" if step.capture else ""
        if step.url is not None:
            self._wait_http(step)
            return ""

        argv = [self._expand(arg) for arg in step.argv]
        try:
            proc = subprocess.run(
                argv,
                input=step.stdin,
                capture_output=True,
                text=True,
                timeout=step.timeout_s + 30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise KindError(f"{line}: {error}") from error
        if proc.returncode != 0 and step.check:
            raise KindError(f"{line}: exit {proc.returncode}: {proc.stderr.strip()[-800:]}")
        out = proc.stdout.strip()
        if step.capture:
            self.vars[step.capture] = out
        return out

    def _expand(self, arg: str) -> str:
        return re.sub(r"\$\{([A-Z0-9_]+)\}", lambda m: self.vars.get(m.group(1), m.group(0)), arg)

    def _wait_http(self, step: Step) -> None:
        assert step.url is not None
        deadline = time.monotonic() + step.timeout_s
        last = ""
        while time.monotonic() < deadline:
            status, body = http_get(step.url)
            if status == step.expect_status:
                return
            last = f"{status} {body[:200]}"
            time.sleep(0.5)
        if step.check:
            raise KindError(f"{step.url} did not answer {step.expect_status} in time ({last})")


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, str]:
    """(status, body), or (0, reason) when nothing answers."""
    match = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)", url)
    assert match, url
    conn = http.client.HTTPConnection(match.group(1), int(match.group(2)), timeout=timeout_s)
    try:
        conn.request("GET", match.group(3))
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    except OSError as error:
        return 0, str(error) or type(error).__name__
    finally:
        conn.close()


def pod_of(broker: str) -> str:
    """`b1`, `1` or `mcloudtt-broker-1` -> `mcloudtt-broker-1`."""
    match = re.fullmatch(r"(?:b|mcloudtt-broker-)?(\d+)", broker)
    if match is None:
        raise ValueError(f"not a broker name: {broker!r} (b0, b1, ... or mcloudtt-broker-N)")
    return f"{BROKER_STS}-{int(match.group(1))}"


def _var(kind: str, pod: str) -> str:
    return f"{kind}_{pod.replace('-', '_').upper()}"


def env_of(spec: ClusterSpec) -> dict[str, str]:
    """spec.broker_args (`--presence-ttl 3`) as the MCLOUDTT_* variables every broker option has,
    then spec.env; a flag without a value becomes `true`."""
    env: dict[str, str] = {}
    args = list(spec.broker_args)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ValueError(f"broker option expected, got {arg!r}")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            value = args.pop(0) if args and not args[0].startswith("--") else "true"
        env["MCLOUDTT_" + name.replace("-", "_").upper()] = value
    env.update(spec.env)
    return env


def probes_only_policy(pod: str) -> dict[str, Any]:
    """The policy that keeps a broker cut from its clients reachable on its HTTP port (probes,
    /readyz), and only there."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": f"{PROBES_POLICY}-{pod}",
            "namespace": NAMESPACE,
            "labels": {
                "app.kubernetes.io/part-of": "mcloudtt",
                MANAGED_BY: "mcloudtt-chaos",
            },
        },
        "spec": {
            "podSelector": {"matchLabels": {POD_NAME_LABEL: pod}},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"port": HTTP_PORT, "protocol": "TCP"}]}],
        },
    }


def narrowed(selector: dict[str, Any], excluded: Iterable[str]) -> dict[str, Any]:
    """`selector` without the pods named in `excluded` (the selector itself when none)."""
    pods = sorted(excluded)
    if not pods:
        return json.loads(json.dumps(selector))  # type: ignore[no-any-return]
    out: dict[str, Any] = json.loads(json.dumps(selector))
    out.setdefault("matchExpressions", []).append(
        {"key": POD_NAME_LABEL, "operator": "NotIn", "values": pods}
    )
    return out


class KindBackend:
    """The Backend for a kind cluster made by kind/up.sh (see the module docstring)."""

    name = "kind"

    def __init__(
        self,
        *,
        dry_run: bool = False,
        runner: Runner | None = None,
        context: str | None = None,
        host: str = "127.0.0.1",
        docker: str | None = None,
        echo: TextIO | None = None,
    ) -> None:
        self.runner = runner or Runner(dry_run=dry_run, echo=echo)
        cluster = os.environ.get("KIND_CLUSTER_NAME", "mcloudtt")
        self.context = context or f"kind-{cluster}"
        self.host = host
        self.docker = docker or os.environ.get("DOCKER", "docker")  # as kind/up.sh
        self.brokers = MAX_BROKERS
        self._env: list[str] = []
        self._cut_redis: set[str] = set()
        self._cut_clients: set[str] = set()
        self._frozen: set[str] = set()
        self._redis_down = False
        self._appendonly = True
        self._set_up = False
        self._twin: KindBackend | None = None  # dry-run double for describe()

    # ------------------------------------------------------------------ helpers

    def _k(self, *args: str, why: str = "", **kw: Any) -> str:
        argv = ("kubectl", "--context", self.context, "-n", NAMESPACE, *args)
        for arg in args:
            # kubectl's own wait bounds the command's (the runner adds its margin).
            if match := re.fullmatch(r"--timeout=(\d+)s", arg):
                kw.setdefault("timeout_s", float(match.group(1)))
        return self.runner.run(Step(argv=argv, why=why, **kw))

    def _wait_http(self, url: str, timeout_s: float, why: str = "") -> None:
        self.runner.run(Step(url=url, timeout_s=timeout_s, why=why))

    def _node_and(self, pod: str, field: str, kind: str) -> tuple[str, str]:
        """Capture the pod's node and one more field; return both as variable references."""
        node = self._k(
            "get", f"pod/{pod}", "-o", "jsonpath={.spec.nodeName}", capture=_var("NODE", pod)
        )
        value = self._k("get", f"pod/{pod}", "-o", f"jsonpath={field}", capture=_var(kind, pod))
        return node, value

    def _signal(self, pod: str, signal: str, why: str) -> None:
        node, cid = self._node_and(pod, "{.status.containerStatuses[0].containerID}", "CID")
        script = f'kill -{signal} "$({_PID})"'
        self.runner.run(
            Step(argv=(self.docker, "exec", node, "sh", "-c", script, "sh", cid), why=why)
        )

    def _drop_connections(self, pod: str, *, to_redis: bool) -> None:
        node, ip = self._node_and(pod, "{.status.podIP}", "IP")
        if to_redis:
            filters = [("--orig-src", ip, "--dport", str(REDIS_PORT))]
        else:
            filters = [("--orig-dst", ip, "--dport", str(port)) for port in MQTT_PORTS]
        for f in filters:
            self.runner.run(
                Step(
                    argv=(self.docker, "exec", node, "conntrack", "-D", "-p", "tcp", *f),
                    check=False,  # exit 1 when there was nothing to drop
                    why="open connections are judged again by their next packet",
                )
            )

    def _apply_policies(self, *, redis: bool = True, clients: bool = True) -> None:
        """Each allowing policy narrowed to leave out the brokers cut from that side."""
        for policy, selector, cut, wanted in (
            (REDIS_EGRESS_POLICY, REDIS_EGRESS_SELECTOR, self._cut_redis, redis),
            (BROKER_INGRESS_POLICY, BROKER_INGRESS_SELECTOR, self._cut_clients, clients),
        ):
            if not wanted:
                continue
            patch = [
                {"op": "replace", "path": "/spec/podSelector", "value": narrowed(selector, cut)}
            ]
            self._k(
                "patch",
                f"networkpolicy/{policy}",
                "--type=json",
                "-p",
                json.dumps(patch, separators=(",", ":")),
                why=f"selects every pod but {', '.join(sorted(cut))}" if cut else "as deployed",
            )

    def _wait_brokers_serve(self, pods: Iterable[str]) -> None:
        for pod in pods:
            i = int(pod.rsplit("-", 1)[1])
            self._wait_http(
                f"http://{self.host}:{HTTP_NODE_PORT + i}/healthz",
                BROKER_TIMEOUT_S,
                why=f"{pod} serves (ready or not)",
            )

    def _pods(self) -> list[str]:
        return [f"{BROKER_STS}-{i}" for i in range(self.brokers)]

    # ------------------------------------------------------------------ Backend

    def setup(self, spec: ClusterSpec) -> None:
        if not 1 <= spec.brokers <= MAX_BROKERS:
            raise NotSupported(
                f"--backend kind runs 1 to {MAX_BROKERS} brokers (one NodePort Service each in"
                f" kind/overlays/kind/broker-pods.yaml), not {spec.brokers}"
            )
        self.brokers = spec.brokers
        self._appendonly = spec.redis_appendonly
        self._set_up = True
        self._k(
            "get",
            f"statefulset/{BROKER_STS}",
            f"statefulset/{REDIS_STS}",
            *(f"service/{pod}" for pod in self._pods()),
            why="the cluster kind/up.sh made",
        )
        # Undo what an interrupted earlier run may have left.
        self._cut_redis.clear()
        self._cut_clients.clear()
        self._apply_policies()
        self._delete_chaos_policies()
        self._k(
            "patch",
            f"hpa/{BROKER_HPA}",
            "--type=merge",
            "-p",
            json.dumps({"spec": {"minReplicas": spec.brokers, "maxReplicas": spec.brokers}}),
            why="no autoscaling during the run",
        )
        self._k("scale", f"statefulset/{BROKER_STS}", f"--replicas={spec.brokers}")
        env = env_of(spec)
        if env or spec.redis_first:
            self.start_redis()
        if env:
            self._env = sorted(env)
            # A changed pod template rolls the brokers, one at a time, each until it is ready
            # (so with Redis up).
            self._k(
                "set",
                "env",
                f"statefulset/{BROKER_STS}",
                "-c",
                BROKER_CONTAINER,
                *(f"{k}={v}" for k, v in sorted(env.items())),
            )
            self._k(
                "rollout",
                "status",
                f"statefulset/{BROKER_STS}",
                f"--timeout={BROKER_TIMEOUT_S * spec.brokers}s",
            )
        if not spec.redis_first:
            # Brokers before Redis: Redis goes away, then every broker starts again at once. Not
            # `rollout restart`: a rolling update waits for each pod to be ready, which a broker
            # is not without Redis, so it would stall at the first pod.
            self._scale_redis_down(why="brokers start before Redis")
            self._k(
                "delete",
                "pod",
                "-l",
                BROKER_SELECTOR,
                "--wait=true",
                f"--timeout={BROKER_TIMEOUT_S}s",
                why="the StatefulSet (podManagementPolicy Parallel) starts all again at once",
            )
        self._wait_brokers_serve(self._pods())

    def _delete_chaos_policies(self) -> None:
        self._k(
            "delete",
            "networkpolicy",
            "-l",
            f"{MANAGED_BY}=mcloudtt-chaos",
            "--ignore-not-found",
            why="policies an earlier cut left",
        )

    def teardown(self) -> None:
        if not self._set_up:
            return
        for pod in sorted(self._frozen):
            self._signal(pod, "CONT", why="thaw")
        self._frozen.clear()
        self._cut_redis.clear()
        self._cut_clients.clear()
        self._apply_policies()
        self._delete_chaos_policies()
        if self._env:
            self._k(
                "set",
                "env",
                f"statefulset/{BROKER_STS}",
                "-c",
                BROKER_CONTAINER,
                *(f"{k}-" for k in self._env),
            )
            self._env = []
        if self._redis_down:
            self.start_redis()
        self._k("scale", f"statefulset/{BROKER_STS}", f"--replicas={HPA_MIN}")
        self._k(
            "patch",
            f"hpa/{BROKER_HPA}",
            "--type=merge",
            "-p",
            json.dumps({"spec": {"minReplicas": HPA_MIN, "maxReplicas": HPA_MAX}}),
            why="autoscaling as deployed",
        )
        self._k(
            "rollout",
            "status",
            f"statefulset/{BROKER_STS}",
            f"--timeout={BROKER_TIMEOUT_S * HPA_MIN}s",
        )
        self._set_up = False

    def describe(self, call: str, *args: Any, **kwargs: Any) -> list[str]:
        """The plan lines one Protocol call would run (the CLI's --dry-run shows them under
        the call). Calls go to a dry-run double, so state (what is cut, the spec) carries over
        from call to call as in a real run."""
        if self._twin is None:
            self._twin = KindBackend(
                dry_run=True, context=self.context, host=self.host, docker=self.docker
            )
        before = len(self._twin.runner.plan)
        try:
            getattr(self._twin, call)(*args, **kwargs)
        except NotSupported as error:
            return [f"# not supported on kind: {error}"]
        return self._twin.runner.plan[before:]

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(
                name=f"b{i}",  # pod mcloudtt-broker-{i}
                host=self.host,
                mqtt_port=MQTT_NODE_PORT + i,
                http_port=HTTP_NODE_PORT + i,
            )
            for i in range(self.brokers)
        ]

    def readyz(self, broker: str) -> tuple[int, str]:
        i = int(pod_of(broker).rsplit("-", 1)[1])
        url = f"http://{self.host}:{HTTP_NODE_PORT + i}/readyz"
        if self.runner.dry_run:
            self.runner.plan.append(f"# GET {url}")
            return 200, "dry run: not asked"
        return http_get(url)

    # Redis

    def _redis_cli(self, command: str, why: str = "") -> None:
        self._k(
            "exec",
            REDIS_POD,
            "-c",
            REDIS_CONTAINER,
            "--",
            "sh",
            "-c",
            f"{REDIS_CLI} {command}",
            why=why,
        )

    def _scale_redis_down(self, why: str = "") -> None:
        self._k("scale", f"statefulset/{REDIS_STS}", "--replicas=0", why=why)
        self._k("wait", "--for=delete", f"pod/{REDIS_POD}", f"--timeout={REDIS_TIMEOUT_S}s")
        self._redis_down = True

    def start_redis(self) -> None:
        self._k("scale", f"statefulset/{REDIS_STS}", "--replicas=1")
        self._k(
            "rollout",
            "status",
            f"statefulset/{REDIS_STS}",
            f"--timeout={REDIS_TIMEOUT_S}s",
            why="Redis answers PING (its readiness probe)",
        )
        if not self._appendonly:
            # redis.conf turns AOF on; each start of Redis reads it again.
            self._redis_cli("CONFIG SET appendonly no", why="no AOF in this run")
        self._redis_down = False

    def kill_redis(self) -> None:
        # Scale first, or the StatefulSet would make a new pod at once; then cut the grace short.
        self._k("scale", f"statefulset/{REDIS_STS}", "--replicas=0")
        self._k(
            "delete",
            "pod",
            REDIS_POD,
            "--grace-period=0",
            "--force",
            "--ignore-not-found",
            why="SIGTERM, SIGKILL 2 s later",
        )
        self._k("wait", "--for=delete", f"pod/{REDIS_POD}", f"--timeout={REDIS_TIMEOUT_S}s")
        self._redis_down = True

    def restart_redis(self, *, keep_data: bool = True) -> None:
        if not self._redis_down:
            self._scale_redis_down()
        if not keep_data:
            self._k(
                "delete",
                f"pvc/{REDIS_PVC}",
                "--wait=true",
                f"--timeout={REDIS_TIMEOUT_S}s",
                why="Redis comes back empty, as after a failover that lost its writes",
            )
        self.start_redis()

    def freeze_redis(self) -> None:
        self._signal(REDIS_POD, "STOP", why="freeze Redis")
        self._frozen.add(REDIS_POD)

    def thaw_redis(self) -> None:
        self._signal(REDIS_POD, "CONT", why="thaw Redis")
        self._frozen.discard(REDIS_POD)

    # Brokers

    def kill_broker(self, broker: str) -> None:
        pod = pod_of(broker)
        self._k(
            "delete",
            "pod",
            pod,
            "--grace-period=0",
            "--force",
            why="SIGTERM, SIGKILL 2 s later; the StatefulSet makes it again",
        )
        # Blocks until the old process is gone, so that start_broker waits for the new one.
        i = int(pod.rsplit("-", 1)[1])
        self.runner.run(
            Step(
                url=f"http://{self.host}:{HTTP_NODE_PORT + i}/healthz",
                expect_status=0,
                timeout_s=10,
                check=False,
                why=f"{pod} no longer answers (the next one may be quicker than this)",
            )
        )

    def stop_broker(self, broker: str) -> None:
        pod = pod_of(broker)
        self._k(
            "delete",
            "pod",
            pod,
            "--wait=true",
            f"--timeout={BROKER_TIMEOUT_S}s",
            why="preStop, SIGTERM and the drain",
        )

    def start_broker(self, broker: str) -> None:
        # The StatefulSet starts it again under the same name by itself: wait until it serves.
        self._wait_brokers_serve([pod_of(broker)])

    def freeze_broker(self, broker: str) -> None:
        pod = pod_of(broker)
        self._signal(pod, "STOP", why="freeze (liveness restarts it after about 30 s)")
        self._frozen.add(pod)

    def thaw_broker(self, broker: str) -> None:
        pod = pod_of(broker)
        self._signal(pod, "CONT", why="thaw")
        self._frozen.discard(pod)

    # Links

    def cut_from_redis(self, broker: str) -> None:
        pod = pod_of(broker)
        self._cut_redis.add(pod)
        self._apply_policies(clients=False)
        self._drop_connections(pod, to_redis=True)

    def cut_from_clients(self, broker: str) -> None:
        pod = pod_of(broker)
        self._k(
            "apply",
            "-f",
            "-",
            stdin=json.dumps(probes_only_policy(pod), separators=(",", ":")),
            why="probes and /readyz still reach it",
        )
        self._cut_clients.add(pod)
        self._apply_policies(redis=False)
        self._drop_connections(pod, to_redis=False)

    def heal(self, broker: str) -> None:
        pod = pod_of(broker)
        if pod in self._cut_redis:
            self._cut_redis.discard(pod)
            self._apply_policies(clients=False)
        if pod in self._cut_clients:
            self._cut_clients.discard(pod)
            self._apply_policies(redis=False)
            self._k("delete", f"networkpolicy/{PROBES_POLICY}-{pod}", "--ignore-not-found")

    def degrade_redis_link(self, broker: str, fault: LinkFault) -> None:
        if fault.blackhole and fault.latency_ms is None and fault.bandwidth_bytes_per_s is None:
            self.cut_from_redis(broker)  # a black hole is a cut
            return
        raise NotSupported(
            "slow-link on kind needs tc netem inside the broker pod's network namespace, which"
            " this backend does not set up; run it with --backend local or --backend netns"
        )


# -------------------------------------------------------------------- plans

Scenario = Callable[[KindBackend, ClusterSpec], object] | Sequence[Sequence[Any]] | str


def plan(scenario: Scenario, spec: ClusterSpec | None = None) -> list[str]:
    """The exact kubectl plan of a scenario on kind, without a cluster.

    `scenario` is a scenario run (a callable `(backend, spec)` that calls setup and teardown
    itself), or a list of Protocol calls (`[("kill_broker", "b1"), ("heal", "b1")]`) that this
    wraps in setup and teardown (keyword arguments in a trailing dict), or a scenario name looked up in `mcloudtt_chaos.scenarios`.
    """
    spec = spec or ClusterSpec()
    backend = KindBackend(dry_run=True)
    if isinstance(scenario, str):
        _named(scenario)(backend, spec)
    elif callable(scenario):
        scenario(backend, spec)
    else:
        backend.setup(spec)
        for call in scenario:
            call_method(backend, call)
        backend.teardown()
    return list(backend.runner.plan)


def call_method(backend: KindBackend, call: Sequence[Any]) -> object:
    """Run `("restart_redis", {"keep_data": False})` or `("kill_broker", "b1")` on a backend: a
    method name, its arguments, and a trailing dict of keyword arguments."""
    method, *args = call
    kwargs = args.pop() if args and isinstance(args[-1], dict) else {}
    return getattr(backend, method)(*args, **kwargs)


def _named(name: str) -> Callable[[KindBackend, ClusterSpec], object]:
    """A scenario of `mcloudtt_chaos.scenarios` by name, as a `(backend, spec)` run: through
    that module's own dry-run `plan(scenario, backend)` (which shows each Protocol call with
    the lines `describe` gives), else the scenario called directly."""
    try:
        scenarios = importlib.import_module("mcloudtt_chaos.scenarios")
    except ImportError as error:
        raise LookupError(f"no scenarios module to look {name!r} up in: {error}") from error
    table = getattr(scenarios, "SCENARIOS", None)
    found = table.get(name) if isinstance(table, dict) else None
    if found is None:
        raise LookupError(f"unknown scenario {name!r}")
    module_plan = getattr(scenarios, "plan", None)
    if callable(module_plan) and dataclasses.is_dataclass(found) and not callable(found):

        def run(backend: KindBackend, spec: ClusterSpec) -> None:
            scenario = dataclasses.replace(found, cluster=spec)
            lines = module_plan(scenario, backend)
            if inspect.isawaitable(lines):
                lines = asyncio.run(_awaited(lines))
            backend.runner.plan[:] = list(lines)

        return run
    for run_ in (found, getattr(found, "run", None)):
        if callable(run_):
            return run_  # type: ignore[no-any-return]
    raise LookupError(f"scenario {name!r} has no run(backend, spec)")


async def _awaited(value: Awaitable[Any]) -> Any:
    return await value


def print_plan(lines: Iterable[str], out: TextIO = sys.stdout) -> None:
    for line in lines:
        print(line, file=out)


# A KindBackend is a Backend (checked by mypy).
_: type[Backend] = KindBackend
