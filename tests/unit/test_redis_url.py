"""The one Redis URL parser (`cluster/redis_url.py`): every option, every bad value, and that
redis-py reads the same URL the same way."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from mcloudtt_broker.cluster.redis_url import (
    RedisOptions,
    RedisUrlError,
    check_redis_url,
    link_error_reason,
    parse_redis_url,
)
from mcloudtt_broker.config import ConfigError, resolve
from redis.asyncio.connection import (
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redisproc import TlsFiles


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles(tmp_path_factory.mktemp("tls"))


def test_plain_url_defaults() -> None:
    assert parse_redis_url("redis://10.0.0.3") == RedisOptions(scheme="redis", host="10.0.0.3")
    options = parse_redis_url("redis://h:6380/3")
    assert (options.host, options.port, options.db, options.tls) == ("h", 6380, 3, False)
    assert options.password is None and options.username is None
    assert options.ssl_context() is None
    assert parse_redis_url("redis://h/1?db=4").db == 4  # the query wins, as in redis-py
    assert parse_redis_url("redis://[::1]:7000/0").address == "redis://[::1]:7000"


def test_users_and_passwords_are_percent_decoded() -> None:
    options = parse_redis_url("rediss://al%40ice:p%3Ass%2Fw%23@h:6378/0")
    assert (options.username, options.password) == ("al@ice", "p:ss/w#")
    only_password = parse_redis_url("redis://:s3cret@h/0")
    assert (only_password.username, only_password.password) == (None, "s3cret")
    assert parse_redis_url("redis://:@h/0").password is None  # empty: no AUTH, as redis-py
    assert "s3cret" not in only_password.address


def test_tls_options(tls: TlsFiles) -> None:
    url = (
        f"rediss://h:6378/0?ssl_ca_certs={tls.ca}&ssl_certfile={tls.client_cert}"
        f"&ssl_keyfile={tls.client_key}&ssl_cert_reqs=Optional&ssl_check_hostname=no"
    )
    options = parse_redis_url(url)
    assert options.tls and options.address == "rediss://h:6378"
    assert options.ssl_ca_certs == str(tls.ca)
    assert (options.ssl_certfile, options.ssl_keyfile) == (
        str(tls.client_cert),
        str(tls.client_key),
    )
    assert (options.ssl_cert_reqs, options.ssl_check_hostname) == ("optional", False)
    context = options.ssl_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_OPTIONAL and not context.check_hostname
    assert context is options.ssl_context()  # built once
    assert parse_redis_url(url) is options  # the same URL, the same options and context


def test_tls_defaults_verify_the_server(tls: TlsFiles) -> None:
    context = parse_redis_url(f"rediss://h/0?ssl_ca_certs={tls.ca}").ssl_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    subjects = [dict(item[0] for item in c["subject"]) for c in context.get_ca_certs()]
    assert any(s.get("organizationName") == "mcloudtt test CA" for s in subjects)
    none = parse_redis_url("rediss://h/0?ssl_cert_reqs=none").ssl_context()
    assert none is not None and none.verify_mode == ssl.CERT_NONE and not none.check_hostname


def test_unix_sockets() -> None:
    options = parse_redis_url("unix://:pw@/run/redis/redis.sock?db=2")
    assert (options.scheme, options.path, options.db, options.password) == (
        "unix",
        "/run/redis/redis.sock",
        2,
        "pw",
    )
    assert options.address == "unix:///run/redis/redis.sock"
    assert parse_redis_url("unix:///tmp/r.sock").db == 0


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw@h:6380/2",
        "redis://alice:pw@h/0",
        "rediss://:pw@h:6378/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required",
        "rediss://h/0?ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_check_hostname=false",
        "unix://:pw@/tmp/r.sock?db=3",
    ],
)
def test_redis_py_reads_the_url_the_same_way(url: str) -> None:
    ours = parse_redis_url(url).pool_kwargs()
    theirs = dict(parse_url(url))
    theirs.setdefault("connection_class", Connection)
    for key, value in theirs.items():
        if key == "ssl_check_hostname":
            assert ours[key] is bool(value)
        else:
            assert ours[key] == value, key
    expected = {"redis": Connection, "rediss": SSLConnection, "unix": UnixDomainSocketConnection}
    assert ours["connection_class"] is expected[url.partition(":")[0]]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h/0", "redis:// or rediss://"),
        ("h:6379", "redis:// or rediss://"),
        ("redis://:pw@/0", "names no host"),
        ("redis://h:99999/0", "not a Redis URL"),
        ("redis://h/zero", "database must be a number"),
        ("redis://h/0?db=-1", "database must be a number"),
        ("redis://h/0?ssl_ca_certs=/ca.pem", "needs a rediss:// URL"),
        ("rediss://h/0?ssl_ca_cert=/ca.pem", "unknown option 'ssl_ca_cert'"),
        ("rediss://h/0?ssl_cert_reqs=maybe", "none, optional or required"),
        ("rediss://h/0?ssl_check_hostname=perhaps", "true or false"),
        ("rediss://h/0?ssl_keyfile=/k.pem", "needs ssl_certfile"),
        ("unix://:pw@", "socket's path"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(RedisUrlError, match=message) as caught:
        parse_redis_url(url)
    assert "pw" not in str(caught.value)
    # The broker's configuration refuses the same URL: one line, exit 2.
    with pytest.raises(ConfigError, match=message):
        resolve({"redis": url}, {}, None)


def test_unreadable_tls_files_are_config_errors(tmp_path: Path, tls: TlsFiles) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(RedisUrlError, match=f"cannot read ssl_ca_certs {missing}"):
        check_redis_url(f"rediss://h/0?ssl_ca_certs={missing}")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(RedisUrlError, match=r"ssl_ca_certs .* not a usable PEM file"):
        check_redis_url(f"rediss://h/0?ssl_ca_certs={garbage}")
    with pytest.raises(RedisUrlError, match="cannot read ssl_certfile"):
        check_redis_url(f"rediss://h/0?ssl_certfile={missing}")
    # The key of another certificate does not go with this one.
    other = TlsFiles(tmp_path / "other")
    with pytest.raises(RedisUrlError, match=r"ssl_certfile .* not a usable PEM file"):
        check_redis_url(
            f"rediss://h/0?ssl_certfile={tls.client_cert}&ssl_keyfile={other.client_key}"
        )
    # Parsing alone reads no file (the manifests' paths exist only in the pod).
    assert parse_redis_url(f"rediss://h/0?ssl_ca_certs={missing}").ssl_ca_certs == str(missing)


def test_link_error_reasons() -> None:
    options = parse_redis_url("rediss://:pw@10.0.0.3:6378/0")
    refused = ConnectionRefusedError(111, "Connect call failed ('10.0.0.3', 6378)")
    assert link_error_reason(refused, options) == (
        "cannot reach Redis at rediss://10.0.0.3:6378: Connection refused"
    )
    wrapped = ConnectionError("Error connecting")
    wrapped.__cause__ = TimeoutError()
    assert "timed out" in link_error_reason(wrapped, options)
    wrong = ConnectionError("Redis refused the connection: WRONGPASS invalid username-password")
    assert "refused the username or password" in link_error_reason(wrong, options)
    noauth = ConnectionError("Redis refused the connection: NOAUTH Authentication required.")
    assert "wants a password (NOAUTH)" in link_error_reason(noauth, options)
    for error in (refused, wrapped, wrong, noauth):
        assert "pw" not in link_error_reason(error, options)
