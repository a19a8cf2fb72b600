"""Build the core's authentication chain and ACL from the shell's options (start and SIGHUP)."""

from __future__ import annotations

from collections.abc import Sequence

from ..core.auth import AuthChain, Authenticator, Authorizer
from .acl import AclFile
from .jwt_auth import JwtAuthenticator
from .passwords import PasswordFile
from .tls import ClientCertificate

# Every authenticator by its --auth-chain name, in the default order of the chain.
AUTHENTICATORS = ("tls-cert", "jwt", "password-file", "redis")


def build_chain(
    chain: Sequence[str],
    password_file: str | None,
    allow_anonymous: bool | None,
    *,
    tls_cert: bool = False,
    redis_users: Authenticator | None = None,
    jwt: dict[str, str | None] | None = None,
) -> AuthChain:
    """Raises OSError or a ValueError naming the file and line for a file that cannot be read."""
    # The Redis user store is in the chain only when named (--auth-chain redis).
    jwt_on = jwt is not None and (jwt["secret_file"] or jwt["jwks_file"])
    configured = {
        "password-file": password_file,
        "tls-cert": "on" if tls_cert else None,
        "jwt": "on" if jwt_on else None,
    }
    names = list(chain) or [name for name in AUTHENTICATORS if configured.get(name) is not None]
    links: list[Authenticator] = []
    for name in names:
        if name == "password-file":
            assert password_file is not None
            links.append(PasswordFile.load(password_file))
        elif name == "tls-cert":
            links.append(ClientCertificate())
        elif name == "jwt":
            assert jwt is not None
            links.append(JwtAuthenticator(**jwt))
        elif name == "redis":
            assert redis_users is not None
            links.append(redis_users)
    return AuthChain(links, allow_anonymous)


class AllowAll:
    """The ACL when there is no ACL file but clients may bring their own rights (JWT claims):
    a client without them may do everything, as without any ACL."""

    def allowed(self, client_id: str, username: str | None, action: str, topic: str) -> bool:
        return True


def build_authorizer(acl_file: str | None, *, claim_rights: bool = False) -> Authorizer | None:
    if acl_file is not None:
        return AclFile.load(acl_file)
    return AllowAll() if claim_rights else None
