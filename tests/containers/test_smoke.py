"""The broker image as Kubernetes runs it, for real: a Redis container and three broker
containers from the built image on a network with its own subnet, with the manifests' broker
configuration (kind/base/config/broker.env), a read-only root filesystem with a tmpfs on /tmp,
no capabilities, and a restart policy in the part of the kubelet restarting a crashed pod.
MQTT clients and probes come from the host, to the containers' addresses on the bridge."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from mcloudtt_chaos.containers import IMAGE_UID, Container, Docker, DockerError, Fleet, wait_for

from .conftest import ROOT, require_docker
from .mqtt import Client, http_get, metric

require_docker()
pytestmark = pytest.mark.timeout(600)

PASSWORD = "0123456789abcdef0123456789abcdef"  # hex, like the one kind/up.sh makes
# What the pod spec's securityContext says, in docker's words.
HARDENED = ["--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
READY_TIMEOUT = 60.0


def manifest_env() -> dict[str, str]:
    """The broker's MCLOUDTT_* options exactly as the ConfigMap hands them to the pods."""
    env = {}
    for line in (ROOT / "kind" / "base" / "config" / "broker.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def start_redis(fleet: Fleet, image: str, ip: str | None = None) -> Container:
    return fleet.run(
        "redis",
        image,
        ip=ip,
        args=["--port", "6379", "--requirepass", PASSWORD, "--save", "", "--appendonly", "no"],
        read_only=True,
        extra=HARDENED,
    )


def start_broker(fleet: Fleet, image: str, n: int, redis_ip: str) -> Container:
    env = manifest_env() | {
        "MCLOUDTT_ID": f"mcloudtt-broker-{n}",
        "MCLOUDTT_REDIS": f"redis://:{PASSWORD}@{redis_ip}:6379/0",
    }
    return fleet.run(
        f"broker-{n}",
        image,
        env=env,
        restart="unless-stopped",
        read_only=True,
        tmpfs=["/tmp:rw,size=64m"],
        publish=[1883, 8080],
        extra=HARDENED,
    )


def readyz(broker: Container) -> tuple[int, str]:
    return http_get(broker.ip, 8080, "/readyz")


def wait_ready(brokers: list[Container]) -> None:
    for broker in brokers:
        try:
            wait_for(lambda b=broker: readyz(b)[0] == 200, timeout=READY_TIMEOUT, what="ready")
        except TimeoutError:
            pytest.fail(f"{broker.name} not ready: {readyz(broker)}\n{broker.logs()[-3000:]}")


def wait_remote_filters(brokers: list[Container], at_least: int) -> None:
    for broker in brokers:
        wait_for(
            lambda b=broker: metric(b.ip, "mcloudtt_cluster_remote_filters") >= at_least,
            timeout=20,
            what=f"{at_least} remote filters on {broker.name}",
        )


def delivered_across(sender: Container, receiver: Container, tag: str) -> None:
    """A QoS 1 message published on `sender` reaches a subscriber on `receiver`."""
    sub = Client(receiver.ip, 1883, f"sub-{tag}")
    pub = Client(sender.ip, 1883, f"pub-{tag}")
    try:
        topic = f"devices/{tag}/temperature"
        sub.subscribe(topic, qos=1)
        wait_remote_filters([sender], at_least=1)
        pub.publish(topic, tag.encode(), qos=1)
        message = sub.get()
        assert (message.topic, message.payload, message.qos) == (topic, tag.encode(), 1)
    finally:
        sub.close()
        pub.close()


@dataclass
class Cluster:
    fleet: Fleet
    redis: Container
    brokers: list[Container]


@pytest.fixture(scope="module")
def cluster(docker: Docker, broker_image: str, redis_image: str) -> Iterator[Cluster]:
    with Fleet.open(docker, f"mct-{uuid.uuid4().hex[:8]}") as fleet:
        redis = start_redis(fleet, redis_image)
        brokers = [start_broker(fleet, broker_image, n, redis.ip) for n in range(3)]
        wait_ready(brokers)
        yield Cluster(fleet, redis, brokers)


def test_image_runs_as_10001_and_stays_slim(docker: Docker, broker_image: str) -> None:
    image = docker.image(broker_image)
    config = image["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["mcloudtt-broker"]
    assert config["StopSignal"] == "SIGTERM"
    assert set(config["ExposedPorts"]) == {"1883/tcp", "8083/tcp", "8883/tcp", "8080/tcp"}
    # The base (~125 MB) and a ~25 MB virtualenv: a stray build tool or cache would show here.
    assert image["Size"] < 180e6, f"{broker_image} is {image['Size'] / 1e6:.0f} MB"
    # Only the broker and its locked dependencies: nothing of the adapter, simulator, or pip.
    listed = docker(
        "run", "--rm", "--entrypoint", "python", broker_image, "-c",
        "import importlib.metadata as m; print(*sorted(d.metadata['Name'].lower() for d in m.distributions()))",
    ).split()  # fmt: skip
    assert "mcloudtt-broker" in listed
    assert not {"mcloudtt-adapter", "mcloudtt-simulator", "duckdb", "pip", "setuptools"} & set(
        listed
    ), listed


def test_every_broker_ready_as_the_probe_sees_it(cluster: Cluster) -> None:
    for broker in cluster.brokers:
        assert readyz(broker) == (200, "ready\n")
        assert http_get(broker.ip, 8080, "/healthz")[0] == 200
        # The same probe through the port published on the host.
        host, port = broker.published(8080)
        assert http_get(host, port, "/readyz")[0] == 200
        assert metric(broker.ip, "mcloudtt_cluster_link_up") == 1


def test_processes_run_as_10001(cluster: Cluster) -> None:
    for broker in cluster.brokers:
        assert broker.process_uids() == {IMAGE_UID}, broker.name
        assert broker.exec("id", "-u").strip() == str(IMAGE_UID)


def test_read_only_root_filesystem(cluster: Cluster) -> None:
    broker = cluster.brokers[0]
    assert cluster.fleet.docker.inspect(broker.name)[0]["HostConfig"]["ReadonlyRootfs"] is True
    with pytest.raises(DockerError, match="Read-only file system"):
        broker.exec("python", "-c", "open('/opt/venv/probe', 'w')")
    broker.exec("python", "-c", "open('/tmp/probe', 'w').write('x')")  # the tmpfs, as emptyDir


def test_cross_broker_delivery(cluster: Cluster) -> None:
    b0, b1, b2 = cluster.brokers
    delivered_across(b0, b1, "zero-to-one")
    delivered_across(b2, b0, "two-to-zero")


def test_published_mqtt_port(cluster: Cluster) -> None:
    host, port = cluster.brokers[1].published(1883)
    sub = Client(host, port, "sub-published")
    try:
        sub.subscribe("devices/published/#")
        pub = Client(cluster.brokers[2].ip, 1883, "pub-published")
        wait_remote_filters([cluster.brokers[2]], at_least=1)
        pub.publish("devices/published/x", b"via the host port")
        assert sub.get().payload == b"via the host port"
        pub.close()
    finally:
        sub.close()


def test_crashed_broker_is_restarted_by_its_policy_and_rejoins(cluster: Cluster) -> None:
    b0, b1, b2 = cluster.brokers
    before = b2.restart_count()
    # A crash (or an OOM kill) from the container's point of view: its PID 1 killed outright.
    # `docker kill` would not do: docker counts it as a manual stop and applies no restart
    # policy to it.
    b2.crash()
    wait_for(lambda: b2.restart_count() > before, timeout=30, what="a restart by the policy")
    wait_ready([b2])
    assert b2.state()["Running"] is True
    delivered_across(b2, b0, "after-restart-out")
    delivered_across(b1, b2, "after-restart-in")


def test_sigterm_drains_and_exits_0(cluster: Cluster) -> None:
    broker = cluster.brokers[1]
    client = Client(broker.ip, 1883, "drained")
    started = time.monotonic()
    # docker stop: SIGTERM (the image's STOPSIGNAL) to PID 1, SIGKILL only after 30 s.
    assert broker.stop(timeout=30) == 0
    took = time.monotonic() - started
    assert client.disconnected.wait(5), "the broker did not close the client's connection"
    # MQTT 5: the broker says why before closing (DISCONNECT 0x8B server shutting down).
    assert int(client.disconnect_reason.value) == 0x8B, client.disconnect_reason
    assert took < 25, f"the drain took {took:.1f}s (SIGKILL would have been needed at 30 s)"
    assert broker.state()["OOMKilled"] is False
    assert "shutting down" in broker.logs()
    client.close()
    # A stopped container stays down under `unless-stopped`, like a pod scaled away.
    time.sleep(1)
    assert broker.state()["Running"] is False


def test_brokers_started_before_redis_become_ready_when_it_starts(
    fleet: Fleet, broker_image: str, redis_image: str
) -> None:
    redis_ip = fleet.network.allocate()  # reserved: Redis comes later at this address
    brokers = [start_broker(fleet, broker_image, n, redis_ip) for n in range(2)]
    # Up and serving, but not ready: the probe keeps them out of the Service until Redis is up.
    for broker in brokers:
        wait_for(lambda b=broker: http_get(b.ip, 8080, "/healthz")[0] == 200, timeout=30)
        status, body = readyz(broker)
        assert status == 503 and body.startswith("not ready"), (status, body)
    time.sleep(3)  # several of the brokers' Redis retries fail meanwhile
    assert all(b.state()["Running"] and b.restart_count() == 0 for b in brokers)

    start_redis(fleet, redis_image, ip=redis_ip)
    wait_ready(brokers)
    delivered_across(brokers[0], brokers[1], "late-redis")
