"""The chaos scenarios' `docker` backend on real containers: Redis and brokers from the built
images on the run's own networks, every fault a Docker CLI command, the workload from the host
at the containers' addresses (paho clients over TCP).

First the backend's methods on one 2-broker cluster, then `brokers-before-redis` (through the
CLI, `--backend docker`) and `broker-kill` (through the scenario runner) with their invariants
asserted, marked as on `local` where a known loss is still open."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcloudtt_chaos import cli
from mcloudtt_chaos.backend import ClusterSpec
from mcloudtt_chaos.backends import load
from mcloudtt_chaos.backends.docker import (
    LABEL_OWNER,
    LABEL_RUN,
    DockerBackend,
    cleanup_stale,
)
from mcloudtt_chaos.containers import Docker, wait_for
from mcloudtt_chaos.scenarios import SCENARIOS, RunOptions, ScenarioResult, run_scenario

from .conftest import require_docker
from .mqtt import Client, metric

require_docker()
pytestmark = pytest.mark.timeout(600)

QOS12_INVARIANTS = ("no_lost", "qos2_once", "ordered", "shared_once", "delivered_were_sent")


# ------------------------------------------------------------------ the backend's methods


@pytest.fixture(scope="module")
def backend(broker_image: str, redis_image: str) -> Iterator[DockerBackend]:
    backend = DockerBackend(broker_image=broker_image)
    try:
        backend.setup(ClusterSpec(brokers=2))
        assert backend.isolated, "the run's bridges still forward: cuts would be routed around"
        wait_ready(backend, "b0", "b1")
        yield backend
    finally:
        backend.teardown()


def wait_ready(backend: DockerBackend, *brokers: str, timeout: float = 60.0) -> None:
    for broker in brokers:
        try:
            wait_for(lambda b=broker: backend.readyz(b)[0] == 200, timeout=timeout)
        except TimeoutError:
            pytest.fail(f"{broker}: {backend.readyz(broker)}\n{backend.log(broker)[-3000:]}")


def delivered_across(backend: DockerBackend, sender: str, receiver: str, tag: str) -> None:
    """A QoS 1 message published on `sender` reaches a subscriber on `receiver` (paho)."""
    at = {e.name: e for e in backend.endpoints()}
    sub = Client(at[receiver].host, at[receiver].mqtt_port, f"sub-{tag}")
    pub = Client(at[sender].host, at[sender].mqtt_port, f"pub-{tag}")
    try:
        topic = f"devices/{tag}/t"
        sub.subscribe(topic, qos=1)
        wait_for(
            lambda: metric(at[sender].host, "mcloudtt_cluster_remote_filters") >= 1,
            timeout=20,
            what=f"{sender} knows {receiver}'s subscription",
        )
        pub.publish(topic, tag.encode(), qos=1)
        message = sub.get()
        assert (message.topic, message.payload) == (topic, tag.encode())
    finally:
        sub.close()
        pub.close()


def test_ready_and_cross_broker_delivery(backend: DockerBackend) -> None:
    endpoints = backend.endpoints()
    assert [e.name for e in endpoints] == ["b0", "b1"]
    # At the containers' own addresses, on the run's clients network.
    assert backend.clients is not None
    assert all(ipaddress.ip_address(e.host) in backend.clients.subnet for e in endpoints)
    assert {e.host for e in endpoints} == {b.client_addr for b in backend.brokers.values()}
    assert all(backend.readyz(e.name) == (200, "ready\n") for e in endpoints)
    delivered_across(backend, "b0", "b1", "zero-to-one")
    delivered_across(backend, "b1", "b0", "one-to-zero")


def test_cut_from_redis_is_503_while_clients_still_connect_then_heal_is_200(
    backend: DockerBackend,
) -> None:
    backend.cut_from_redis("b0")
    try:
        wait_for(lambda: backend.readyz("b0")[0] == 503, timeout=30, what="b0 503")
        status, body = backend.readyz("b0")
        assert status == 503 and "Redis" in body, (status, body)
        assert backend.readyz("b1")[0] == 200  # only b0 lost Redis
        at = backend.endpoints()[0]
        Client(at.host, at.mqtt_port, "still-served").close()  # CONNACK: its clients reach it
    finally:
        backend.heal("b0")
    wait_ready(backend, "b0", timeout=30)
    delivered_across(backend, "b1", "b0", "after-heal")


def test_cut_from_clients_leaves_it_reachable_from_behind(backend: DockerBackend) -> None:
    backend.cut_from_clients("b1")
    try:
        assert backend.readyz("b1")[0] == 0  # its clients' address answers no more
        assert backend.readyz("b1", via="backplane") == (200, "ready\n")  # Redis still there
    finally:
        backend.heal("b1")
    wait_ready(backend, "b1", timeout=30)


def test_kill_then_start_under_the_same_id_and_address(
    backend: DockerBackend, docker: Docker
) -> None:
    name = backend.brokers["b1"].container.name
    container_id = docker.inspect(name)[0]["Id"]
    restarts = backend.restart_count("b1")
    backend.kill_broker("b1")
    assert backend.readyz("b1")[0] == 0
    # `docker kill` is a manual stop: the restart policy leaves it down; the scenario decides.
    time.sleep(2)
    state = backend.brokers["b1"].container.state()
    assert not state["Running"] and state["ExitCode"] == 137, state
    assert backend.restart_count("b1") == restarts
    backend.start_broker("b1")
    wait_ready(backend, "b1")
    assert docker.inspect(name)[0]["Id"] == container_id  # the same container, not a new one
    assert "broker b1 ready" in backend.log("b1")
    delivered_across(backend, "b1", "b0", "after-kill")


def test_a_crash_is_restarted_by_the_policy(backend: DockerBackend) -> None:
    before = backend.restart_count("b0")
    backend.crash_broker("b0")  # SIGKILL to its PID 1 from the host, as an OOM kill
    backend.wait_restarted("b0", before)
    wait_ready(backend, "b0")
    assert backend.restart_count("b0") == before + 1


def test_stop_drains_and_exits_0_and_freeze_holds_it(backend: DockerBackend) -> None:
    backend.stop_broker("b1")  # docker stop: SIGTERM, the drain
    state = backend.brokers["b1"].container.state()
    assert state["ExitCode"] == 0 and not state["Running"], state
    assert "shutting down" in backend.log("b1")
    backend.start_broker("b1")
    wait_ready(backend, "b1")
    backend.freeze_broker("b1")  # docker pause
    try:
        assert backend.brokers["b1"].container.state()["Paused"] is True
        assert backend.readyz("b1")[0] == 0  # no answer in time
    finally:
        backend.thaw_broker("b1")
    assert backend.readyz("b1")[0] == 200


def test_cleanup_stale_removes_a_dead_runs_leftovers_only(
    backend: DockerBackend, docker: Docker
) -> None:
    # A network labelled as a run whose owner (pid 1, another start time) is gone, as a
    # SIGKILLed run leaves it.
    dead = "dead00"
    docker(
        "network", "create", "--label", f"{LABEL_RUN}={dead}",
        "--label", f"{LABEL_OWNER}=1:0", f"mcdk-{dead}-clients",
    )  # fmt: skip
    assert cleanup_stale(docker) == [dead]
    left = docker("network", "ls", "--quiet", "--filter", f"label={LABEL_RUN}={dead}")
    assert left.strip() == ""
    # The live run (this module's) is untouched.
    assert backend.brokers["b0"].container.state()["Running"]


_HOLDER = """
import json, time
from mcloudtt_chaos.backend import ClusterSpec
from mcloudtt_chaos.backends.docker import DockerBackend
backend = DockerBackend()
backend.setup(ClusterSpec(brokers=1))
print(json.dumps({"run": backend.run_id}), flush=True)
time.sleep(120)
"""


def test_ctrl_c_removes_every_container_and_network(docker: Docker, broker_image: str) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None
            line = holder.stdout.readline()
            assert line, holder.stderr.read() if holder.stderr else "no output"
            run_id = json.loads(line)["run"]
            label = f"label={LABEL_RUN}={run_id}"
            assert len(docker("ps", "--quiet", "--filter", label).split()) == 2  # Redis, b0
            holder.send_signal(signal.SIGINT)
            holder.wait(timeout=60)
        finally:
            if holder.poll() is None:
                os.kill(holder.pid, signal.SIGKILL)
    assert docker("ps", "--all", "--quiet", "--filter", label).strip() == ""
    assert docker("network", "ls", "--quiet", "--filter", label).strip() == ""


# ------------------------------------------------------------------ the scenarios


def failure_detail(result: ScenarioResult) -> str:
    report = result.report
    assert report is not None
    bad = {name: v.examples[:3] for name, v in report.invariants.items() if not v.passed}
    return f"error={result.error} failed={bad} measurements={result.measurements}"


@pytest.fixture(scope="module")
def before_redis(
    tmp_path_factory: pytest.TempPathFactory, broker_image: str, redis_image: str
) -> dict[str, Any]:
    """`mcloudtt-chaos run brokers-before-redis --backend docker`, as a user types it."""
    tmp = tmp_path_factory.mktemp("docker-before-redis")
    out = tmp / "verdicts.json"
    argv = ["run", "brokers-before-redis", "--backend", "docker", "--brokers", "2"]
    cli.main([*argv, "--seconds", "3", "--json", str(out), "--workdir", str(tmp)])
    [scenario] = json.loads(out.read_text())["scenarios"]
    return dict(scenario)


def test_brokers_before_redis_on_docker(before_redis: dict[str, Any]) -> None:
    scenario, invariants = before_redis, before_redis["invariants"]
    assert scenario["backend"] == "docker" and scenario["error"] is None, scenario["error"]
    for name in ("brokers_stay_up", "readyz_says_why", "serves_local_clients", "ready_within_2s"):
        assert invariants[name]["passed"], (name, invariants[name], scenario["measurements"])
    reasons = scenario["measurements"]["readyz_says_why"]["reasons"]
    assert all("Redis" in reason for reason in reasons.values()), reasons
    for name in QOS12_INVARIANTS:  # what was sent once the cluster was ready
        assert invariants[name]["passed"], (name, invariants[name])
    assert invariants["no_lost"]["checked"] > 100
    # The brokers' logs kept next to the history.
    logs = Path(scenario["history"]).parent / "brokers-before-redis"
    assert "broker b0 ready" in (logs / "b0.log").read_text()


@pytest.fixture(scope="module")
def broker_kill(
    tmp_path_factory: pytest.TempPathFactory, broker_image: str, redis_image: str
) -> ScenarioResult:
    options = RunOptions(
        workdir=tmp_path_factory.mktemp("docker-broker-kill"),
        brokers=3,
        seconds=2.0,
        drain_s=8.0,
    )
    return asyncio.run(run_scenario(SCENARIOS["broker-kill"], load("docker"), options))


def test_broker_kill_on_docker_reports_what_it_lost(broker_kill: ScenarioResult) -> None:
    report = broker_kill.report
    assert report is not None and broker_kill.error is None, failure_detail(broker_kill)
    assert broker_kill.backend == "docker"
    assert report.invariants["no_lost"].checked > 100
    data = broker_kill.to_json()
    assert data["lost"] == len(report.lost)
    assert report.invariants["no_lost"].passed == (not report.lost)
    # The victim's container killed and started again: one log, two lives.
    victim = broker_kill.measurements["victim"]
    assert broker_kill.history is not None
    log = (broker_kill.history.parent / "broker-kill" / f"{victim}.log").read_text()
    assert log.count(f"broker {victim} ready") == 2, log[-2000:]
    # What the workload itself guarantees; the broker's promises are judged below.
    assert report.invariants["delivered_were_sent"].passed, failure_detail(broker_kill)


def test_broker_kill_on_docker_loses_nothing_acknowledged(broker_kill: ScenarioResult) -> None:
    report = broker_kill.report
    assert report is not None
    assert len(report.lost) == 0
    for name in QOS12_INVARIANTS:
        assert report.invariants[name].passed, failure_detail(broker_kill)
