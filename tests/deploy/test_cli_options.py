"""Every option the manifests hand the broker and the adapter (arguments and MCLOUDTT_*
variables, after Kubernetes expands $(VAR)) is one their real command lines accept, with a value
they accept. An unknown MCLOUDTT_* variable would be ignored silently, so this is the only place
such a mistake shows before a cluster does."""

from __future__ import annotations

from typing import Any

import pytest

from .manifests import PASSWORD, container, example_values, find, mounts, runtime_env, under_mount

pytestmark = pytest.mark.timeout(900)

Docs = dict[str, list[dict[str, Any]]]
DEPLOYED = ("base", "kind", "gke")


def _container_ports(workload: dict[str, Any], name: str) -> set[int]:
    return {p["containerPort"] for p in container(workload, name).get("ports", [])}


@pytest.mark.parametrize("overlay", DEPLOYED)
def test_broker_accepts_what_the_manifests_pass(docs: Docs, overlay: str) -> None:
    from mcloudtt_broker.cli import build_parser
    from mcloudtt_broker.config import OPTIONS, env_name, resolve

    d = docs[overlay]
    sts = find(d, "StatefulSet", "mcloudtt-broker")
    broker = container(sts, "broker")
    env = runtime_env(d, sts, "broker")

    known = {env_name(option.name) for option in OPTIONS} | {"MCLOUDTT_CONFIG"}
    given = {k for k in env if k.startswith("MCLOUDTT_")}
    assert given - known == set(), f"not broker options: {sorted(given - known)}"

    try:
        args = build_parser().parse_args(list(broker.get("args", [])))
    except SystemExit as error:
        pytest.fail(f"mcloudtt-broker rejects the arguments {broker.get('args')}: exit {error}")
    values = resolve(vars(args), env, None)  # raises ConfigError on a bad value

    assert values["id"] == sts["metadata"]["name"] + "-0"
    ports = _container_ports(sts, "broker")
    listeners = values["bind"] + values["ws-bind"] + values["tls-bind"] + [values["http"]]
    for host, port in listeners:
        assert host == "0.0.0.0", f"{host}:{port} is not reachable from outside the pod"
        assert port in ports, f"listener port {port} is not a container port"
    assert values["tap-stream"] == "mcloudtt:tap"

    # The Redis URL, as the broker's links (lean and redis-py) will read it.
    url = values["redis"]
    assert url is not None and "$(" not in url, url
    mounted = mounts(sts, "broker")
    _check_redis_url(url, overlay, mounted)
    if overlay == "gke":
        for path in (values["tls-cert"], values["tls-key"]):
            mount = under_mount(path, list(mounted))
            assert mount and mounted[mount]["secret"]["secretName"] == "mcloudtt-broker-tls"
    else:
        redis_service = find(d, "Service", "mcloudtt-redis")
        assert 6379 in {p["port"] for p in redis_service["spec"]["ports"]}


def _check_redis_url(url: str, overlay: str, mounted: dict[str, dict[str, Any]]) -> None:
    """The rendered URL fed to the real parser (`cluster/redis_url.py`)."""
    from mcloudtt_broker.cluster.redis_url import parse_redis_url

    options = parse_redis_url(url)  # raises RedisUrlError on anything it cannot use
    assert options.password == PASSWORD  # from the Secret, through secretKeyRef and $(VAR)
    assert options.username is None and options.db == 0
    kwargs = options.pool_kwargs()
    assert (kwargs["password"], kwargs["db"]) == (PASSWORD, 0)
    if overlay == "gke":
        values = example_values()
        assert options.tls and options.scheme == "rediss"
        assert (options.host, str(options.port)) == (values["REDIS_HOST"], values["REDIS_PORT"])
        # The server is verified against Memorystore's CA, hostname (IP) included.
        assert (options.ssl_cert_reqs, options.ssl_check_hostname) == ("required", True)
        ca = options.ssl_ca_certs
        assert ca is not None and kwargs["ssl_ca_certs"] == ca
        ca_mount = under_mount(ca, list(mounted))
        assert ca_mount, f"{ca} is not on a mounted volume"
        assert mounted[ca_mount]["configMap"]["name"] == "mcloudtt-redis-ca"
        key = ca.removeprefix(ca_mount.rstrip("/") + "/")
        items = mounted[ca_mount]["configMap"].get("items")
        assert key == "ca.pem" if not items else key in {i["path"] for i in items}
    else:
        assert not options.tls
        assert (options.host, options.port) == ("mcloudtt-redis", 6379)


@pytest.mark.parametrize("overlay", DEPLOYED)
def test_adapter_accepts_what_the_manifests_pass(docs: Docs, overlay: str) -> None:
    from mcloudtt_adapter import cli
    from mcloudtt_adapter.config import ADAPTER

    d = docs[overlay]
    dep = find(d, "Deployment", "mcloudtt-adapter")
    adapter = container(dep, "adapter")
    env = runtime_env(d, dep, "adapter")

    known = {ADAPTER.env_name(option.name) for option in ADAPTER.options} | {ADAPTER.config_env}
    given = {k for k in env if k.startswith("MCLOUDTT_")}
    assert given - known == set(), f"not adapter options: {sorted(given - known)}"

    argv = list(adapter.get("command", [])[1:]) + list(adapter.get("args", []))
    assert argv[:1] == ["run"], argv
    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit as error:
        pytest.fail(f"mcloudtt-adapter rejects {argv}: exit {error}")
    # Exactly this environment; raises ConfigError on a bad value, both sinks or no source.
    config, _ = cli.config_from_args(args, env)

    assert config.redis_mode == "stream" and config.tap_stream == "mcloudtt:tap"
    assert config.http is not None
    host, port = config.http
    assert host == "0.0.0.0" and port in _container_ports(dep, "adapter")

    mounted = mounts(dep, "adapter")
    writable = [p for p, m in mounted.items() if not m.get("readOnly")]
    # readOnlyRootFilesystem: whatever the adapter writes must be on a writable volume.
    assert under_mount(config.dead_letter_file, writable), config.dead_letter_file
    assert config.redis is not None
    _check_redis_url(config.redis, overlay, mounted)
    if overlay == "gke":
        assert config.bigquery == example_values()["BIGQUERY_TABLE"]
        assert config.duckdb is None
    else:
        assert config.duckdb and config.bigquery is None
        mount = under_mount(config.duckdb, writable)
        assert mount and "persistentVolumeClaim" in mounted[mount], "DuckDB must be on the volume"
