"""The authentication options from the command line, the environment and a TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcloudtt_broker.config import BROKER, ConfigError
from mcloudtt_broker.server import ServerOptions


def resolve(cli: dict[str, object], env: dict[str, str], path: Path | None = None) -> dict:  # type: ignore[type-arg]
    return BROKER.resolve(cli, env, str(path) if path else None)


def test_each_auth_option_from_toml_and_environment(tmp_path: Path) -> None:
    toml = tmp_path / "broker.toml"
    toml.write_text(
        'password-file = "/etc/mcloudtt/passwords"\n'
        'acl_file = "/etc/mcloudtt/acl"\n'
        'auth-chain = ["jwt", "password-file"]\n'
        'jwt-secret-file = "/etc/mcloudtt/jwt"\n'
        "allow-anonymous = true\n"
        'acl-deny-action = "disconnect"\n'
    )
    values = resolve({}, {}, toml)
    options = BROKER.settings(ServerOptions, values)
    assert options.password_file == "/etc/mcloudtt/passwords"
    assert options.acl_file == "/etc/mcloudtt/acl"
    assert options.auth_chain == ("jwt", "password-file")
    assert options.allow_anonymous is True
    assert values["acl-deny-action"] == "disconnect"
    env = {"MCLOUDTT_AUTH_CHAIN": "password-file", "MCLOUDTT_ALLOW_ANONYMOUS": "false"}
    options = BROKER.settings(ServerOptions, resolve({}, env, toml))
    assert options.auth_chain == ("password-file",) and options.allow_anonymous is False
    # Not given anywhere: anonymous decided by whether an authenticator is configured.
    assert BROKER.settings(ServerOptions, resolve({}, {})).allow_anonymous is None


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        ({"auth-chain": ["ldap"]}, "unknown authenticator 'ldap'"),
        ({"auth-chain": ["redis"]}, "--redis is not given"),
        ({"auth-chain": ["jwt"]}, "--jwt-secret-file or --jwks-file is not given"),
        ({"tls-require-client-cert": "true"}, "--tls-require-client-cert needs --tls-ca"),
        ({"tls-ca": "ca.pem"}, "--tls-ca needs a --tls-bind or --wss-bind listener"),
        ({"jwt-audience": "mqtt"}, "--jwt-audience needs"),
        ({"acl-deny-action": "kick"}, "expected one of ignore, disconnect"),
    ],
)
def test_mistakes_are_one_line_config_errors(cli: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("-", r"\-").replace("'", "'")):
        resolve(cli, {})


def test_tls_require_client_cert_stands_alone_on_the_command_line() -> None:
    from mcloudtt_broker.cli import build_parser

    args = vars(build_parser().parse_args(["--tls-require-client-cert", "--bind", ":1883"]))
    assert args["tls-require-client-cert"] == "true"
