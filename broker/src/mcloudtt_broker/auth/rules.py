"""Build the core's authentication chain and ACL from the shell's options (start and SIGHUP)."""

from __future__ import annotations

from collections.abc import Sequence

from ..core.auth import AuthChain, Authenticator, Authorizer
from .acl import AclFile
from .passwords import PasswordFile
from .tls import ClientCertificate

# Every authenticator by its --auth-chain name, in the default order of the chain.
AUTHENTICATORS = ("tls-cert", "password-file", "redis")


def build_chain(
    chain: Sequence[str],
    password_file: str | None,
    allow_anonymous: bool | None,
    *,
    tls_cert: bool = False,
    redis_users: Authenticator | None = None,
) -> AuthChain:
    """Raises OSError or a ValueError naming the file and line for a file that cannot be read."""
    # The Redis user store is in the chain only when named (--auth-chain redis).
    configured = {"password-file": password_file, "tls-cert": "on" if tls_cert else None}
    names = list(chain) or [name for name in AUTHENTICATORS if configured.get(name) is not None]
    links: list[Authenticator] = []
    for name in names:
        if name == "password-file":
            assert password_file is not None
            links.append(PasswordFile.load(password_file))
        elif name == "tls-cert":
            links.append(ClientCertificate())
        elif name == "redis":
            assert redis_users is not None
            links.append(redis_users)
    return AuthChain(links, allow_anonymous)


def build_authorizer(acl_file: str | None) -> Authorizer | None:
    return None if acl_file is None else AclFile.load(acl_file)
