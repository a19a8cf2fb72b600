"""The production path: brokers and the adapter reach Redis the way GKE's Memorystore is reached
(`rediss://` with a private CA and a password), and say clearly why when they cannot.

A real redis-server with TLS only (`--port 0 --tls-port`), a CA and a server certificate for
127.0.0.1 made by the test (trustme), `requirepass`; real broker and adapter processes; paho
clients over TCP.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from adapter.helpers import AdapterProcess, adapter_command
from broker.clients import PahoClient
from brokerproc import BrokerProcess, broker_command, free_port
from mcloudtt_broker.cluster.redis_url import parse_redis_url
from mcloudtt_broker.cluster.resp import Commands, open_connection
from redisproc import SecureRedisProcess, TlsFiles

from .conftest import deliver_across, start_broker, wait_ready, wait_until

PASSWORD = "s3cret-Pa55"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA that did not sign the server's certificate."""
    return TlsFiles(tmp_path_factory.mktemp("other-tls"))


@pytest.fixture
def secure_redis() -> Iterator[Callable[..., SecureRedisProcess]]:
    started: list[SecureRedisProcess] = []

    def start(**kwargs: object) -> SecureRedisProcess:
        server = SecureRedisProcess(**kwargs).start()  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def brokers() -> Iterator[Callable[..., BrokerProcess]]:
    started: list[BrokerProcess] = []

    def start(url: str, broker_id: str, *extra: str) -> BrokerProcess:
        broker = start_broker(url, broker_id, *extra)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        code = broker.stop()
        print(f"--- broker {broker.port} exited {code}", broker.output()[-3000:], sep="\n")


@pytest.fixture
def adapters() -> Iterator[Callable[..., AdapterProcess]]:
    made: list[AdapterProcess] = []

    def start(*args: str, ready: bool = True) -> AdapterProcess:
        adapter = AdapterProcess(*args)
        made.append(adapter)
        return adapter.start(ready=ready)

    yield start
    for adapter in made:
        print("--- adapter", adapter.log()[-3000:], sep="\n")
        adapter.close()


def readyz_says(process: BrokerProcess | AdapterProcess, *words: str, timeout: float = 10) -> str:
    """Wait until /readyz is 503 with every word in its body; return the body."""
    seen: list[tuple[int, str]] = []

    def check() -> bool:
        status, body = (
            process.http_get("/readyz")
            if isinstance(process, BrokerProcess)
            else process.get("/readyz")
        )
        seen.append((status, body))
        return status == 503 and all(word in body for word in words)

    try:
        wait_until(check, timeout, f"/readyz to say {words}")
    except AssertionError:
        raise AssertionError(f"/readyz said {seen[-1] if seen else None}") from None
    return seen[-1][1]


def still_alive_after_retries(broker: BrokerProcess, seconds: float = 1.5) -> None:
    """--redis-backoff-max 0.5: several retries happen in this time; the broker keeps serving."""
    time.sleep(seconds)
    assert broker.proc is not None and broker.proc.poll() is None
    assert broker.http_get("/healthz")[0] == 200
    local = PahoClient(broker.port, "local-check")
    try:
        local.subscribe("local/#", qos=1)
        local.publish("local/x", b"still serving", qos=1)
        assert local.get().payload == b"still serving"
    finally:
        local.stop()


def warned_once(broker: BrokerProcess, words: str) -> None:
    broker.stop()
    lines = [line for line in broker.output().splitlines() if words in line]
    assert len(lines) == 1, broker.output()[-3000:]
    assert "WARNING" in lines[0] and PASSWORD not in broker.output()


# ---------------------------------------------------------------- working links


def test_two_brokers_and_the_adapter_over_tls_with_a_private_ca(
    tls: TlsFiles, secure_redis, brokers, adapters, tmp_path: Path
) -> None:
    server = secure_redis(tls=tls, password=PASSWORD)
    url = f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0?ssl_ca_certs={tls.ca}"
    assert server.url == url
    a = brokers(url, "tls-a", "--tap-stream", "mcloudtt:tap")
    b = brokers(url, "tls-b", "--tap-stream", "mcloudtt:tap")
    wait_ready([a, b], timeout=15)
    deliver_across(a, b, "tls")
    deliver_across(b, a, "back")

    # The adapter reads the tap stream over the same TLS link.
    db = tmp_path / "tap.duckdb"
    adapter = adapters("--redis", url, "--duckdb", str(db), "--consumer", "c1")
    assert adapter.get("/readyz") == (200, "ready\n")
    wait_until(
        lambda: adapter.metric("mcloudtt_adapter_rows_out_total", sink="duckdb") >= 20,
        20,
        "the adapter to store the 20 messages",
    )


def test_mutual_tls_with_a_client_certificate(tls: TlsFiles, secure_redis, brokers) -> None:
    server = secure_redis(tls=tls, password=PASSWORD, auth_clients=True)
    with_cert = f"{server.url}&ssl_certfile={tls.client_cert}&ssl_keyfile={tls.client_key}"
    a = brokers(with_cert, "mtls-a")
    b = brokers(with_cert, "mtls-b")
    wait_ready([a, b], timeout=15)
    deliver_across(a, b, "mtls")
    # Without a certificate Redis refuses the handshake, and the broker says so.
    without = brokers(server.url, "mtls-none")
    readyz_says(without, "wants a client certificate", "ssl_certfile")
    still_alive_after_retries(without)
    warned_once(without, "wants a client certificate")


def test_a_unix_socket(secure_redis, brokers) -> None:
    server = secure_redis(tls=None, password=PASSWORD, unix_socket=True)
    assert server.unix_url.startswith("unix://")
    a = brokers(server.unix_url, "unix-a")
    b = brokers(server.unix_url, "unix-b")
    wait_ready([a, b], timeout=15)
    deliver_across(a, b, "unix")


def test_an_acl_user_with_its_password(tls: TlsFiles, secure_redis, brokers) -> None:
    server = secure_redis(
        tls=tls, password=PASSWORD, users=("mcloudtt on >user%pw ~* &* +@all", "default off")
    )
    # URL-encoded: `%` is `%25`.
    url = f"rediss://mcloudtt:user%25pw@127.0.0.1:{server.port}/0?ssl_ca_certs={tls.ca}"
    a = brokers(url, "acl-a")
    b = brokers(url, "acl-b")
    wait_ready([a, b], timeout=15)
    deliver_across(a, b, "acl")
    # The default user is off: the password alone (no user) is refused.
    wrong = brokers(server.url, "acl-default")
    readyz_says(wrong, "refused the username or password", "WRONGPASS")
    still_alive_after_retries(wrong)


def test_the_lean_link_and_redis_py_reach_the_same_database(tls: TlsFiles, secure_redis) -> None:
    """The same URL: the broker's pipelined link authenticates as the same user and selects the
    same database as redis-py (TLS with an ACL user, and a unix socket)."""
    server = secure_redis(
        tls=tls, password=PASSWORD, users=("bus on >bus-pw ~* &* +@all",), unix_socket=True
    )
    tls_url = f"rediss://bus:bus-pw@127.0.0.1:{server.port}/5?ssl_ca_certs={tls.ca}"
    unix_url = f"unix://:{PASSWORD}@{server.socket_path}?db=2"

    async def scenario() -> None:
        for url, db in ((tls_url, 5), (unix_url, 2)):
            options = parse_redis_url(url)
            lean = await open_connection(options, lambda error: None)
            commands = Commands()
            commands.add("SET", "written-by", "lean")
            commands.add("ACL", "WHOAMI")
            _, whoami = await lean.call(commands)
            lean.close()
            assert whoami == (b"bus" if url == tls_url else b"default")
            client = options.client()
            assert await client.get("written-by") == b"lean"
            assert await client.acl_whoami() == whoami.decode()
            info = await client.client_info()
            assert int(info["db"]) == db
            await client.aclose()
            other = parse_redis_url(url.replace(f"/{db}?", "/0?").replace(f"db={db}", "db=0"))
            zero = other.client()
            assert await zero.get("written-by") is None  # not in database 0
            await zero.aclose()

    asyncio.run(scenario())


# ---------------------------------------------------------------- clear reasons, no crash


def test_a_wrong_ca_is_a_clear_reason_and_no_crash(
    tls: TlsFiles, other_ca: TlsFiles, secure_redis, brokers, adapters, tmp_path: Path
) -> None:
    server = secure_redis(tls=tls, password=PASSWORD)
    url = server.url.replace(str(tls.ca), str(other_ca.ca))
    broker = brokers(url, "wrong-ca")
    body = readyz_says(broker, "not trusted", "ssl_ca_certs", f"127.0.0.1:{server.port}")
    assert body.startswith("not ready: TLS certificate of rediss://127.0.0.1:")
    assert PASSWORD not in body
    still_alive_after_retries(broker)
    warned_once(broker, "TLS certificate of")

    adapter = adapters("--redis", url, "--duckdb", str(tmp_path / "a.duckdb"), ready=False)
    body = readyz_says(adapter, "stream=down", "not trusted", "ssl_ca_certs")
    assert adapter.proc is not None and adapter.proc.poll() is None
    assert adapter.log().count("not trusted") == 1  # once, not once per retry


def test_a_wrong_password_is_a_clear_reason_and_no_crash(
    tls: TlsFiles, secure_redis, brokers, adapters, tmp_path: Path
) -> None:
    server = secure_redis(tls=tls, password=PASSWORD)
    wrong = brokers(server.url.replace(PASSWORD, "not-it"), "wrong-password")
    readyz_says(wrong, "refused the username or password", "WRONGPASS")
    still_alive_after_retries(wrong)
    warned_once(wrong, "refused the username or password")

    missing = brokers(server.url.replace(f":{PASSWORD}@", ""), "no-password")
    readyz_says(missing, "wants a password", "NOAUTH")
    still_alive_after_retries(missing)

    adapter = adapters(
        "--redis",
        server.url.replace(PASSWORD, "not-it"),
        "--duckdb",
        str(tmp_path / "a.duckdb"),
        ready=False,
    )
    readyz_says(adapter, "stream=down", "refused the username or password")
    assert adapter.proc is not None and adapter.proc.poll() is None


def test_an_unreachable_host_then_redis_comes(tls: TlsFiles, secure_redis, brokers) -> None:
    port = free_port()
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={tls.ca}"
    broker = brokers(url, "unreachable")
    readyz_says(broker, "cannot reach Redis", f"127.0.0.1:{port}", "Connection refused")
    still_alive_after_retries(broker)
    # The retry pattern keeps going: Redis appears on that port, the broker becomes ready.
    server = SecureRedisProcess(tls=tls, password=PASSWORD)
    server.port = port
    server.start()
    try:
        wait_until(lambda: broker.http_get("/readyz") == (200, "ready\n"), 10, "ready")
    finally:
        server.close()


# ---------------------------------------------------------------- bad configuration


@pytest.mark.parametrize("program", ["broker", "adapter"])
def test_an_unreadable_ca_file_is_one_line_and_exit_2(tmp_path: Path, program: str) -> None:
    missing = tmp_path / "no-such-ca.pem"
    url = f"rediss://:{PASSWORD}@127.0.0.1:6378/0?ssl_ca_certs={missing}"
    if program == "broker":
        command = [*broker_command(), "--redis", url, "--bind", f"127.0.0.1:{free_port()}"]
    else:
        command = [*adapter_command(), "run", "--redis", url, "--duckdb", str(tmp_path / "x.db")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"cannot read ssl_ca_certs {missing}" in lines[0]
    assert lines[0].startswith(f"mcloudtt-{program}: error:")
    assert PASSWORD not in proc.stderr
