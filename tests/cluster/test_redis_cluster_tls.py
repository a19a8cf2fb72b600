"""Memorystore for Redis Cluster is TLS-only with a private CA: a real 3+3 Redis Cluster on
loopback with TLS on every link (clients `--tls-port` only, the cluster bus `--tls-cluster`,
replication `--tls-replication`), its certificate from a CA made by the test (trustme).

Brokers and the adapter are given the URL exactly as the gke overlay with the
`memorystore-cluster` component renders it (`MCLOUDTT_REDIS` from the StatefulSet's template,
`rediss`, the discovery endpoint, an empty AUTH string, the CA file; `MCLOUDTT_TAP_STREAMS=3`):
they find the shards over TLS, follow redirections to nodes they were not given (each node its
own TLS handshake, the certificate checked against the address in CLUSTER SLOTS), deliver
cross-broker QoS 1 and the adapter reads the sharded tap.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from adapter.helpers import AdapterProcess
from brokerproc import BrokerProcess
from mcloudtt_broker.cluster.tap import tap_streams
from rediscluster import RedisClusterProcess, RedisTls
from redisproc import TlsFiles

from .conftest import CLUSTER_ARGS, deliver_across, wait_ready, wait_until
from .test_noloss import check
from .test_redis_cluster import run_under_load

ROOT = Path(__file__).resolve().parents[2]
CA_IN_POD = "/etc/mcloudtt/redis-ca/ca.pem"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles(tmp_path_factory.mktemp("cluster-tls"))


@pytest.fixture(scope="module")
def tls_cluster(tls: TlsFiles) -> Iterator[RedisClusterProcess]:
    with RedisClusterProcess(tls=RedisTls(tls.ca, tls.server_cert, tls.server_key)) as cluster:
        yield cluster


def _env_value(manifest: Path, name: str) -> str:
    """A container's `- name: NAME` / `value: ...` (the project has no YAML parser; the deploy
    tests render the same manifests with kustomize and check them strictly)."""
    found = re.search(rf"- name: {name}\n\s+value: (\S+)", manifest.read_text())
    assert found, f"{name} not in {manifest}"
    return found.group(1)


def _literals(kustomization: Path, configmap: str) -> dict[str, str]:
    """The `literals` of one configMapGenerator entry."""
    text = kustomization.read_text()
    block = re.search(rf"- name: {configmap}\n(.*?)(?=\n  - name: |\n\S|\Z)", text, re.S)
    assert block, f"{configmap} not in {kustomization}"
    literals = re.findall(r"^\s+- ([A-Z_]+)=(.*)$", block.group(1), re.M)
    return dict(literals)


def rendered_env(cluster: RedisClusterProcess, ca: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The brokers' and the adapter's Redis environment as the gke overlay with the
    memorystore-cluster component renders it, for this cluster's discovery endpoint (one node)
    and CA file."""
    endpoint = _literals(ROOT / "kind/overlays/gke/kustomization.yaml", "mcloudtt-redis-endpoint")
    component = ROOT / "kind/components/memorystore-cluster/kustomization.yaml"
    seed = cluster.live_nodes()[0]
    values = {
        **endpoint,
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(seed.port),
        "REDIS_PASSWORD": "",  # configure.sh: no AUTH string on a cluster
        "REDIS_QUERY": endpoint["REDIS_QUERY"].replace(CA_IN_POD, str(ca)),
    }
    assert CA_IN_POD in endpoint["REDIS_QUERY"] and endpoint["REDIS_SCHEME"] == "rediss"

    def expand(template: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], template)

    broker_url = expand(_env_value(ROOT / "kind/base/broker/statefulset.yaml", "MCLOUDTT_REDIS"))
    adapter_url = expand(
        _env_value(ROOT / "kind/base/adapter/deployment.yaml", "MCLOUDTT_ADAPTER_REDIS")
    )
    broker = {"MCLOUDTT_REDIS": broker_url, "MCLOUDTT_TAP_STREAM": "mcloudtt:tap"}
    broker.update(_literals(component, "mcloudtt-broker"))
    adapter = {"MCLOUDTT_ADAPTER_REDIS": adapter_url, "MCLOUDTT_ADAPTER_TAP_STREAM": "mcloudtt:tap"}
    adapter.update(_literals(component, "mcloudtt-adapter"))
    return broker, adapter


def test_brokers_and_adapter_on_a_tls_redis_cluster_as_gke_renders_it(
    tls: TlsFiles, tls_cluster: RedisClusterProcess, tmp_path: Path
) -> None:
    broker_env, adapter_env = rendered_env(tls_cluster, tls.ca)
    url = broker_env["MCLOUDTT_REDIS"]
    assert url == f"rediss://:@127.0.0.1:{tls_cluster.live_nodes()[0].port}/0?ssl_ca_certs={tls.ca}"
    assert broker_env["MCLOUDTT_TAP_STREAMS"] == "3"
    # The tap streams sit on three shards: the seed alone cannot serve them (MOVED elsewhere).
    with tls_cluster.client() as store:
        keys = tap_streams("mcloudtt:tap", 3)
        assert len({store.get_node_from_key(key).port for key in keys}) == 3
    brokers = [
        BrokerProcess("--id", name, *CLUSTER_ARGS, env=broker_env).start() for name in ("ta", "tb")
    ]
    adapter = AdapterProcess("--duckdb", str(tmp_path / "tap.duckdb"), env=adapter_env)
    try:
        wait_ready(brokers, timeout=20)
        a, b = brokers
        deliver_across(a, b, "tls-cluster")
        deliver_across(b, a, "back")
        adapter.start()
        wait_until(
            lambda: adapter.metric("mcloudtt_adapter_rows_out_total", sink="duckdb") >= 40,
            30,
            "the adapter to store the 40 messages from three tap streams over TLS",
        )
        with tls_cluster.client() as store:
            assert all(store.xlen(key) for key in keys)  # every shard's stream was written
    finally:
        for broker in brokers:
            code = broker.stop()
            print(f"--- broker {broker.port} exited {code}", broker.output()[-3000:], sep="\n")
        print("--- adapter", adapter.log()[-3000:], sep="\n")
        adapter.close()
    for broker in brokers:
        assert "Traceback" not in broker.output()


def _loopback_name() -> str:
    """A host name other than `localhost` (which redis-py's cluster client turns into
    127.0.0.1) that resolves to loopback here: the machine's own name, as /etc/hosts often has."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        address = ""
    if not address.startswith("127.") or name == "localhost":
        pytest.skip(f"the host name {name!r} does not resolve to loopback here")
    return name


def test_certificates_for_names_and_nodes_announced_by_name_or_ip(tmp_path: Path) -> None:
    """A cluster whose certificate names the nodes by host name (not IP): with the nodes
    announced by that name in CLUSTER SLOTS (`cluster-preferred-endpoint-type hostname`) every
    per-node TLS handshake checks the name and the brokers work; announced by IP, the check
    fails on the nodes found from the seed, and the broker says why and what to do."""
    import trustme

    name = _loopback_name()
    ca = trustme.CA(organization_name="mcloudtt name-only CA")
    cert = ca.issue_cert(name)  # no IP address in it
    files = RedisTls(tmp_path / "ca.pem", tmp_path / "node.pem", tmp_path / "node.key")
    ca.cert_pem.write_to_path(str(files.ca))
    cert.cert_chain_pems[0].write_to_path(str(files.cert))
    cert.private_key_pem.write_to_path(str(files.key))
    brokers: list[BrokerProcess] = []
    late: BrokerProcess | None = None

    def start(url: str, broker_id: str) -> BrokerProcess:
        broker = BrokerProcess("--redis", url, "--id", broker_id, *CLUSTER_ARGS).start()
        brokers.append(broker)
        return broker

    with RedisClusterProcess(tls=files, hostname=name) as cluster:
        url = cluster.seed_url
        assert url.startswith(f"rediss://{name}:")
        try:
            a, b = start(url, "na"), start(url, "nb")
            wait_ready([a, b], timeout=20)
            deliver_across(a, b, "by-name")
            # The nodes announced by IP: the seed's name checks out, the other nodes' IPs not.
            for node in cluster.nodes:
                with node.client() as r:
                    r.config_set("cluster-preferred-endpoint-type", "ip")
            late = start(url, "nc")
            body = readyz_503(late)
            assert "does not name 127.0.0.1" in body and "ssl_check_hostname=false" in body, body
            # The way out the reason gives: the CA is still checked, the name no longer.
            relaxed = start(f"{url}&ssl_check_hostname=false", "nd")
            wait_until(lambda: relaxed.http_get("/readyz")[0] == 200, 20, "ready")
        finally:
            for broker in brokers:
                code = broker.stop()
                print(f"--- broker {broker.port} exited {code}", broker.output()[-2000:], sep="\n")
    # (Not the refused one: uvloop may log the handshake it was in when it was stopped.)
    assert all("Traceback" not in broker.output() for broker in brokers if broker is not late)


def readyz_503(broker: BrokerProcess, timeout: float = 15) -> str:
    seen: list[tuple[int, str]] = []

    def down() -> bool:
        seen.append(broker.http_get("/readyz"))
        return seen[-1][0] == 503 and "TLS" in seen[-1][1]

    wait_until(down, timeout, "/readyz to give the TLS reason")
    return seen[-1][1]


def test_slot_migration_over_tls_loses_nothing(tls: TlsFiles) -> None:
    """`redis-cli --cluster reshard` (over TLS) moves the slot of B's inbox while A forwards to
    it under QoS 1: the lean link's ASK and MOVED to the target node open a TLS connection to a
    node the URL did not name, without dropping the link; nothing acknowledged is lost."""
    files = RedisTls(tls.ca, tls.server_cert, tls.server_key)
    with RedisClusterProcess(tls=files) as cluster:
        assert cluster.seeds_url.startswith("rediss://")
        (source, _), (target, _), _ = cluster.shards()
        moved: list[str] = []

        def reshard(b_id: str) -> None:
            cluster.reshard(800, source, target, pipeline=5)
            moved.append(b_id)

        pub, sub, brokers = run_under_load(cluster, reshard)
        try:
            assert cluster.primary_for(f"mcloudtt:inbox:{{{moved[0]}}}") is target
            check(pub, sub, 1)
            assert len(pub.acked) > 300
            # A MOVED to a node the link knows is followed, not a lost link (as without TLS).
            assert sum(b.metric("mcloudtt_cluster_link_losses_total") for b in brokers) == 0
        finally:
            for broker in brokers:
                code = broker.stop()
                print(f"--- broker {broker.port} exited {code}", broker.output()[-4000:], sep="\n")
        for broker in brokers:
            assert "Traceback" not in broker.output()
