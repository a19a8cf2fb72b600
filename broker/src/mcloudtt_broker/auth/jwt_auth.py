"""The `jwt` authenticator: a JSON Web Token in the CONNECT's password field (PyJWT).

HS256 with a shared secret (`--jwt-secret-file`, the file's bytes without a final newline),
RS256 and ES256 with public keys from a JWKS file (`--jwks-file`, picked by the token's `kid`).
`exp` is required; `exp`, `nbf` and, with `--jwt-audience`, `aud` are checked. The token's
`sub` is the username (a client that names another user is refused). A password that is not a
JWT is left to the rest of the chain.

Claims may carry the client's topic rights, which then replace the ACL for it:
`"acl": {"pub": [filters], "sub": [filters], "all": [filters]}` (publish, subscribe and
receive, both).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt

from ..core.auth import READ, SUBSCRIBE, Answer, Credentials, Outcome, Result
from .acl import filter_covers, topic_matches


class ClaimRights:
    """Topic rights from a token's `acl` claim."""

    def __init__(self, claim: Any) -> None:
        if not isinstance(claim, dict):
            raise ValueError("acl claim is not an object")

        def filters(key: str) -> list[tuple[str, ...]]:
            items = claim.get(key, [])
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError(f"acl claim {key!r} is not a list of topic filters")
            return [tuple(item.split("/")) for item in items]

        both = filters("all")
        self.write = filters("pub") + both
        self.read = filters("sub") + both

    def allowed(self, client_id: str, username: str | None, action: str, topic: str) -> bool:
        levels = topic.split("/")
        if action == SUBSCRIBE:
            return any(filter_covers(rule, levels) for rule in self.read)
        rules = self.read if action == READ else self.write
        return any(topic_matches(rule, levels) for rule in rules)


class JwtAuthenticator:
    name = "jwt"

    def __init__(
        self,
        *,
        secret_file: str | None = None,
        jwks_file: str | None = None,
        audience: str | None = None,
    ) -> None:
        self.secret = None
        if secret_file is not None:
            self.secret = Path(secret_file).read_bytes().rstrip(b"\r\n")
            if not self.secret:
                raise ValueError(f"{secret_file}: empty JWT secret")
        self.keys: dict[str | None, Any] = {}
        if jwks_file is not None:
            try:
                keyset = jwt.PyJWKSet.from_dict(json.loads(Path(jwks_file).read_text()))
            except (json.JSONDecodeError, jwt.PyJWTError) as error:
                raise ValueError(f"{jwks_file}: not a JWKS file ({error})") from None
            for key in keyset.keys:
                self.keys[key.key_id] = key
        self.audience = audience

    def authenticate(self, credentials: Credentials, answer: Answer) -> Result:
        token = (credentials.password or b"").decode("ascii", "replace")
        if token.count(".") != 2:
            return Outcome.IGNORE, None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return Outcome.IGNORE, None  # not a JWT: a password for the next link
        try:
            claims = self._verify(token, header)
            rights = ClaimRights(claims["acl"]) if "acl" in claims else None
        except (jwt.PyJWTError, ValueError, KeyError):
            return Outcome.DENY, None  # expired, not yet valid, wrong audience or signature
        subject = claims.get("sub")
        username = credentials.username
        if isinstance(subject, str):
            if username is not None and username != subject:
                return Outcome.DENY, None
            username = subject
        return Outcome.ALLOW, username, rights

    def _verify(self, token: str, header: dict[str, Any]) -> dict[str, Any]:
        algorithm = header.get("alg")
        if algorithm == "HS256" and self.secret is not None:
            key: Any = self.secret
        elif algorithm in ("RS256", "ES256") and self.keys:
            kid = header.get("kid")
            found = self.keys.get(kid)
            if found is None and kid is None and len(self.keys) == 1:
                found = next(iter(self.keys.values()))
            if found is None:
                raise KeyError("no such key")
            key = found.key
        else:
            raise ValueError(f"algorithm {algorithm!r} not accepted")
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=[algorithm], audience=self.audience, options={"require": ["exp"]}
        )
        return claims
