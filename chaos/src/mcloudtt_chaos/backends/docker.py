"""The `docker` backend: Redis and the brokers as containers from the built images, faults by the
Docker CLI (every step a command a person can type: `containers.py` logs none of it away).

Topology of one run (`ID` random per run, so two runs never collide):

    this machine (the workload)        network mcdk-ID-clients  10.213.X.0/24  (gateway: us)
                                       network mcdk-ID-backplane 10.213.Y.0/24 (gateway: us)
    container mcdk-ID-redis            backplane only
    container mcdk-ID-b0, -b1, ...     clients and backplane, both at fixed addresses

Every container has a default route through its networks' gateway, this machine, which
forwards IPv4 between its bridges (and dockerd runs without iptables here, so nothing stops it):
a broker disconnected from the backplane would reach Redis through us, and no cut would be one.
So the run's two bridges (named `mcdkIDc` and `mcdkIDb`) get `forwarding=0` (the per-interface
sysctl: packets received on them are not forwarded, those addressed to us still arrive). That
needs root; without it `cut_*` refuse to run rather than pretend.
The workload reaches brokers at their clients addresses (the bridges' gateways are this
machine); the backplane addresses are for the harness only (Redis's port, a broker seen from
behind while its clients are cut off).

How each `Backend` call is made:
- `kill_broker`: `docker kill` (SIGKILL). Docker counts it as a manual stop, so the restart
  policy does NOT bring it back: the scenario decides the downtime and `start_broker` ends it.
- `crash_broker` (extra): SIGKILL to the container's PID 1 from this machine (a crash, an OOM
  kill); the restart policy (`unless-stopped`) restarts it, as the kubelet restarts a crashed
  pod. `wait_restarted` waits for that.
- `stop_broker`: `docker stop` (SIGTERM, the image's STOPSIGNAL, and the broker's drain; SIGKILL
  only after 30 s). Also a manual stop: no restart.
- `start_broker`: `docker start` of the same container: the same id, addresses and volumes.
- `freeze_*`/`thaw_*`: `docker pause`/`unpause` (the cgroup freezer: SIGSTOP without a signal).
- `kill_redis`: `docker kill`; `restart_redis`: `docker start` (its AOF is on a directory of
  this machine mounted at /data; `keep_data=False` empties it first).
- `cut_from_redis`: `docker network disconnect` from the backplane (its clients still reach it);
  `cut_from_clients`: the same from the clients network; `heal` connects them again at the
  same addresses. The interface disappears, so connections fail at once (no route), rather
  than hang as behind a black hole.
- `degrade_redis_link`: not available here (`NotImplementedError`): see its docstring.
- `brokers-before-redis` (`ClusterSpec.redis_first=False`): the broker containers start with
  Redis's address reserved; `start_redis` creates Redis there later.

Everything a run creates carries the labels `mcloudtt.chaos.run=ID` and the owner's pid and
start time; `teardown()` (also from an atexit hook, and on SIGTERM, which then unwinds like
Ctrl-C) removes it, and `cleanup_stale()`, run at every setup, removes what a SIGKILLed run
left behind, never a live run's.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..backend import (
    HTTP_PORT,
    MQTT_PORT,
    Backend,
    ClusterSpec,
    LinkFault,
    TwoNetworkBackend,
    TwoNetworkBroker,
    owner_alive,
    process_start_time,
)
from ..containers import (
    Container,
    Docker,
    DockerError,
    Network,
    build_redis_image,
    unavailable_reason,
)
from ..procs import port_open, wait_for

PREFIX = "mcdk"  # not "mctt": the netns backend removes stale links named so
LABEL_RUN = "mcloudtt.chaos.run"
LABEL_OWNER = "mcloudtt.chaos.owner"  # "pid:start time" of the process that made the run
REDIS_PORT = 6379
BROKER_IMAGE = "mcloudtt-broker:dev"  # kind/images.sh's tag (what .ci/containers builds)
REDIS_IMAGE = "mcloudtt-redis:dev"
STOP_TIMEOUT_S = 30  # the pod's terminationGracePeriodSeconds
# What the pod spec's securityContext says, in docker's words.
HARDENED = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")


class DockerUnavailable(RuntimeError):
    """Docker cannot run the backend here (the message says why, in one line)."""


def _owner() -> str:
    return f"{os.getpid()}:{process_start_time(os.getpid())}"


def _owner_alive(owner: str) -> bool:
    pid, _, started = owner.partition(":")
    try:
        return owner_alive(int(pid), started)
    except ValueError:
        return False


def cleanup_stale(docker: Docker | None = None) -> list[str]:
    """Remove the containers and networks of runs whose owner is gone; the run ids removed."""
    docker = docker or Docker()
    stale: set[str] = set()
    for kind in ("container", "network"):
        listing = ["ps", "--all"] if kind == "container" else ["network", "ls"]
        fmt = f'{{{{.Label "{LABEL_RUN}"}}}} {{{{.Label "{LABEL_OWNER}"}}}}'
        out = docker(*listing, "--filter", f"label={LABEL_RUN}", "--format", fmt, check=False)
        for line in out.splitlines():
            run_id, _, owner = line.strip().partition(" ")
            if run_id and not _owner_alive(owner):
                stale.add(run_id)
    for run_id in sorted(stale):
        _remove_run(docker, run_id)
    return sorted(stale)


def _remove_run(docker: Docker, run_id: str) -> None:
    label = f"label={LABEL_RUN}={run_id}"
    ids = docker("ps", "--all", "--quiet", "--filter", label, check=False).split()
    if ids:
        docker("rm", "--force", "--volumes", *ids, check=False)
    nets = docker("network", "ls", "--quiet", "--filter", label, check=False).split()
    if nets:
        docker("network", "rm", *nets, check=False)


def _no_forwarding(bridge: str) -> bool:
    """Stop this machine forwarding packets that arrive on `bridge`; False: not allowed."""
    try:
        Path(f"/proc/sys/net/ipv4/conf/{bridge}/forwarding").write_text("0\n")
    except OSError:
        return False
    return True


@dataclass(kw_only=True)
class _Broker(TwoNetworkBroker):
    container: Container
    cut: set[str] = field(default_factory=set)  # "clients" and/or "backplane"


class DockerBackend(TwoNetworkBackend[_Broker]):
    """Redis and the brokers in containers on two networks of the run's own."""

    name = "docker"
    workdir_prefix = "mcloudtt-docker-"

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        seed: int | None = None,
        broker_image: str = BROKER_IMAGE,
        docker: Docker | None = None,
    ) -> None:
        super().__init__(workdir, seed=seed)
        self.broker_image = broker_image
        self.redis_image = REDIS_IMAGE
        self.docker = docker or Docker()
        self.run_id = f"{random.SystemRandom().getrandbits(24):06x}"
        self.prefix = f"{PREFIX}-{self.run_id}"
        self.clients: Network | None = None
        self.backplane: Network | None = None
        self.brokers: dict[str, _Broker] = {}
        self.redis: Container | None = None
        self.redis_addr = ""
        self._labels: list[str] = []
        self.isolated = False  # the bridges do not forward (a cut is a cut)
        self._planned_cuts: dict[str, set[str]] = {}  # describe(): what heal reconnects

    # ---------------------------------------------------------------- life cycle

    def _check(self, spec: ClusterSpec) -> None:
        if (reason := unavailable_reason(self.docker.cli)) is not None:
            raise DockerUnavailable(f"the docker backend cannot run here: {reason}")
        if not self.docker.has_image(self.broker_image):
            raise DockerUnavailable(
                f"no image {self.broker_image}: build it first (bash kind/images.sh broker)"
            )

    def _build(self, spec: ClusterSpec) -> None:
        cleanup_stale(self.docker)
        workdir = self._workdir()
        self._labels = [
            "--label",
            f"{LABEL_RUN}={self.run_id}",
            "--label",
            f"{LABEL_OWNER}={_owner()}",
        ]
        # Made of this machine's redis-server, on the broker image's Debian (cached).
        self.redis_image = build_redis_image(self.docker, self.broker_image, REDIS_IMAGE)
        self.clients = self._network_create("clients")
        self.backplane = self._network_create("backplane")
        self.isolated = all(_no_forwarding(self._bridge(w)) for w in ("clients", "backplane"))
        # Reserved before the brokers' addresses: Redis may come only later.
        self.redis_addr = self.backplane.allocate()
        data = workdir / "redis"
        shutil.rmtree(data, ignore_errors=True)  # a fresh cluster every run
        data.mkdir()
        data.chmod(0o777)  # the Redis image runs as uid 999
        for index in range(spec.brokers):
            self._create_broker(f"b{index}")

    def _bridge(self, which: str) -> str:
        return f"{PREFIX}{self.run_id}{which[0]}"  # at most 15 characters (IFNAMSIZ)

    def _network_create(self, which: str) -> Network:
        opts = ["--opt", f"com.docker.network.bridge.name={self._bridge(which)}", *self._labels]
        return Network.create(self.docker, f"{self.prefix}-{which}", extra=opts)

    def _create(
        self,
        name: str,
        image: str,
        network: Network,
        ip: str,
        args: Sequence[str],
        extra: Sequence[str] = (),
    ) -> Container:
        """`docker create` (not started) at a fixed address on `network`."""
        self.docker(
            "create", "--name", name, "--hostname", name.rsplit("-", 1)[-1],
            "--network", network.name, "--ip", ip, *self._labels, *extra, image, *args,
        )  # fmt: skip
        return Container(self.docker, name, ip, network)

    def _create_broker(self, name: str) -> None:
        assert self.clients is not None and self.backplane is not None
        client_addr, backplane_addr = self.clients.allocate(), self.backplane.allocate()
        args = [
            "--bind", f"0.0.0.0:{MQTT_PORT}",
            "--http", f"0.0.0.0:{HTTP_PORT}",
            "--redis", f"redis://{self.redis_addr}:{REDIS_PORT}/0",
            "--id", name,
            *self.spec.broker_args,
        ]  # fmt: skip
        extra = [*HARDENED, "--tmpfs", "/tmp:rw,size=64m", "--restart", "unless-stopped"]
        for key, value in self.spec.env.items():
            extra += ["--env", f"{key}={value}"]
        container = self._create(
            f"{self.prefix}-{name}", self.broker_image, self.clients, client_addr, args, extra
        )
        self.docker(
            "network", "connect", "--ip", backplane_addr, self.backplane.name, container.name
        )
        self.brokers[name] = _Broker(
            name=name, container=container, client_addr=client_addr, backplane_addr=backplane_addr
        )

    def _start_broker(self, broker: str) -> None:
        self.broker(broker).container.start()

    def _broker_running(self, broker: str) -> bool:
        return bool(self.broker(broker).container.state().get("Running"))

    def _broker_pid(self, broker: str) -> int | None:
        try:
            state = self.broker(broker).container.state()
        except DockerError:
            return None
        return int(state["Pid"]) if state.get("Running") and state.get("Pid") else None

    def _serving_error(self, message: str) -> Exception:
        return DockerError(message)

    def _stop_brokers(self) -> None:
        # All at once (each drains); their logs are kept in the workdir next to the history.
        names = [b.container.name for b in self.brokers.values()]
        if names:
            self.docker("stop", "--time", "5", *names, timeout=60, check=False)

    def _stop_redis(self) -> None:
        pass  # removed with the run (its data is on this machine's disk)

    def _release(self) -> None:
        if self.workdir is not None and not self._own_dir:
            for name in [*self.brokers, "redis"]:
                with contextlib.suppress(Exception):
                    (self.workdir / f"{name}.log").write_text(self.log(name))
        try:
            _remove_run(self.docker, self.run_id)
        finally:
            self.brokers = {}
            self.redis = None
            self.clients = self.backplane = None

    # ---------------------------------------------------------------- looking

    def log(self, name: str) -> str:
        """The container log of `redis` or a broker."""
        container = self.redis if name == "redis" else self.broker(name).container
        return "" if container is None else container.logs()

    def restart_count(self, broker: str) -> int:
        """How often its restart policy restarted it."""
        return self.broker(broker).container.restart_count()

    # ---------------------------------------------------------------- Redis

    def _redis(self) -> Container:
        if self.redis is None:
            raise RuntimeError("Redis was not started (start_redis)")
        return self.redis

    def start_redis(self) -> None:
        if self.redis is None:
            assert self.backplane is not None and self.workdir is not None, "setup() first"
            args = [
                "--port", str(REDIS_PORT), "--bind", "0.0.0.0",
                # Reached from the brokers' addresses without a password: not refused.
                "--protected-mode", "no",
                "--save", "", "--dir", "/data",
                "--appendonly", "yes" if self.spec.redis_appendonly else "no",
            ]  # fmt: skip
            extra = [*HARDENED, "--volume", f"{self.workdir / 'redis'}:/data"]
            self.redis = self._create(
                f"{self.prefix}-redis",
                self.redis_image,
                self.backplane,
                self.redis_addr,
                args,
                extra,
            )
        if not self.redis.state().get("Running"):
            self.redis.start()
        self._wait_redis()

    def _wait_redis(self) -> None:
        try:
            wait_for(
                lambda: port_open(REDIS_PORT, self.redis_addr),
                timeout=30.0,
                what="Redis serving",
                interval=0.05,
            )
        except TimeoutError as error:
            raise DockerError(f"{error}\n{self._redis().logs()[-2000:]}") from None

    def kill_redis(self) -> None:
        self._redis().kill()

    def _redis_running(self) -> bool:
        return bool(self._redis().state().get("Running"))

    def _redis_data_dir(self) -> Path:
        assert self.workdir is not None, "setup() first"
        return self.workdir / "redis"

    def freeze_redis(self) -> None:
        self._redis().pause()

    def thaw_redis(self) -> None:
        self._redis().unpause()

    # ---------------------------------------------------------------- brokers

    def kill_broker(self, broker: str) -> None:
        """`docker kill`: SIGKILL, and no restart by the policy (a manual stop for docker)."""
        self.broker(broker).container.kill()

    def crash_broker(self, broker: str) -> None:
        """SIGKILL to its PID 1 from this machine: its restart policy restarts it."""
        self.broker(broker).container.crash()

    def wait_restarted(self, broker: str, before: int, timeout: float = 30.0) -> None:
        """Until the policy restarted it (restart count past `before`) and it serves MQTT."""
        b = self.broker(broker)
        wait_for(
            lambda: b.container.restart_count() > before,
            timeout=timeout,
            what=f"{broker} restarted by its policy",
        )
        self._wait_serving(broker, timeout=timeout)

    def stop_broker(self, broker: str) -> None:
        """`docker stop`: SIGTERM and the drain (SIGKILL after 30 s)."""
        self.broker(broker).container.stop(timeout=STOP_TIMEOUT_S)

    def freeze_broker(self, broker: str) -> None:
        self.broker(broker).container.pause()

    def thaw_broker(self, broker: str) -> None:
        self.broker(broker).container.unpause()

    # ---------------------------------------------------------------- links

    def _network(self, which: str) -> Network:
        network = self.clients if which == "clients" else self.backplane
        assert network is not None, "setup() first"
        return network

    def _disconnect(self, b: _Broker, which: str) -> None:
        if not self.isolated:
            raise DockerUnavailable(
                f"cannot cut {b.name} off: this machine would route around the cut "
                "(setting forwarding=0 on the run's bridges needs root)"
            )
        if which not in b.cut:
            self.docker("network", "disconnect", self._network(which).name, b.container.name)
            b.cut.add(which)

    def cut_from_redis(self, broker: str) -> None:
        self._disconnect(self.broker(broker), "backplane")

    def cut_from_clients(self, broker: str) -> None:
        self._disconnect(self.broker(broker), "clients")

    def heal(self, broker: str) -> None:
        b = self.broker(broker)
        for which in sorted(b.cut):
            ip = b.client_addr if which == "clients" else b.backplane_addr
            self.docker(
                "network", "connect", "--ip", ip, self._network(which).name, b.container.name
            )
            b.cut.discard(which)

    def degrade_redis_link(self, broker: str, fault: LinkFault) -> None:
        """Not on this backend. A fault proxy needs a second address for Redis and a way to
        steer one broker's connections to it, which takes routes or addresses inside the
        broker's network namespace (`ip netns`, as the netns backend does) or a proxy in the
        path of every broker from the start; plain Docker CLI offers neither, and `tc netem`
        is missing from these kernels. Run `slow-link` on `local` or `netns`."""
        raise NotImplementedError(
            "the docker backend cannot degrade a link (no fault proxy in the path, no tc "
            "netem here): run slow-link with --backend local or --backend netns"
        )

    def describe(self, call: str, *args: object, **kwargs: object) -> list[str]:
        """The docker commands one Protocol call runs (`--dry-run` shows them under it);
        `ID` stands for the run's id, known only once it runs."""
        arg = str(args[0]) if args else ""
        c = f"{PREFIX}-ID-{arg}"
        net = f"{PREFIX}-ID-{'clients' if call == 'cut_from_clients' else 'backplane'}"
        redis = f"{PREFIX}-ID-redis"
        match call:
            case "kill_broker":
                return [f"docker kill --signal KILL {c}  # no restart by the policy"]
            case "crash_broker":
                return [f"kill -KILL $(docker inspect --format '{{{{.State.Pid}}}}' {c})"]
            case "stop_broker":
                return [f"docker stop --time {STOP_TIMEOUT_S} {c}"]
            case "start_broker":
                return [f"docker start {c}"]
            case "freeze_broker" | "thaw_broker":
                return [f"docker {'pause' if call == 'freeze_broker' else 'unpause'} {c}"]
            case "start_redis":
                return [
                    f"docker create --name {redis} ... {self.redis_image}",
                    f"docker start {redis}",
                ]
            case "kill_redis":
                return [f"docker kill --signal KILL {redis}"]
            case "restart_redis":
                wipe = [] if kwargs.get("keep_data", True) else ["rm -rf WORKDIR/redis/*"]
                return [*wipe, f"docker start {redis}"]
            case "freeze_redis" | "thaw_redis":
                return [f"docker {'pause' if call == 'freeze_redis' else 'unpause'} {redis}"]
            case "cut_from_redis" | "cut_from_clients":
                self._planned_cuts.setdefault(arg, set()).add(net)
                return [f"docker network disconnect {net} {c}"]
            case "heal":  # the networks cut earlier in the plan, at the broker's own address
                cut = sorted(self._planned_cuts.pop(arg, set()))
                return [f"docker network connect --ip {arg.upper()}_ADDRESS {n} {c}" for n in cut]
            case "degrade_redis_link":
                return ["# not supported on docker: run slow-link on local or netns"]
        return []


def create() -> DockerBackend:
    """What `backends.load("docker")` returns (creating one needs no daemon)."""
    return DockerBackend()


if TYPE_CHECKING:  # mypy checks that the class implements the interface
    _implements: Backend = DockerBackend()
