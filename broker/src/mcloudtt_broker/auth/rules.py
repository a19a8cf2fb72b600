"""Build the core's authentication chain and ACL from the shell's options (start and SIGHUP)."""

from __future__ import annotations

from collections.abc import Sequence

from ..core.auth import AuthChain, Authenticator, Authorizer
from .acl import AclFile
from .passwords import PasswordFile

# Every authenticator by its --auth-chain name, in the default order of the chain.
AUTHENTICATORS = ("password-file",)


def build_chain(
    chain: Sequence[str], password_file: str | None, allow_anonymous: bool | None
) -> AuthChain:
    """Raises OSError or a ValueError naming the file and line for a file that cannot be read."""
    configured: dict[str, str | None] = {"password-file": password_file}
    names = list(chain) or [name for name in AUTHENTICATORS if configured[name] is not None]
    links: list[Authenticator] = []
    for name in names:
        if name == "password-file":
            assert password_file is not None
            links.append(PasswordFile.load(password_file))
    return AuthChain(links, allow_anonymous)


def build_authorizer(acl_file: str | None) -> Authorizer | None:
    return None if acl_file is None else AclFile.load(acl_file)
