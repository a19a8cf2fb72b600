"""Authentication and authorisation: the core's ports and its decisions (sans-IO).

Authentication is an ordered chain of `Authenticator`s (EMQX's model): each looks at the
CONNECT's credentials and says ALLOW, DENY (it knows the user and the secret is wrong) or
IGNORE (not its user: ask the next one). The first that does not ignore decides. When every
authenticator ignored the client, or none is configured, anonymous access decides: a client
without a username is let in only when anonymous access is allowed (off as soon as any
authenticator is configured, unless allowed explicitly); a username nobody knows is refused.

Authorisation is one `Authorizer` asked per client and topic for three actions: PUBLISH in
(WRITE), SUBSCRIBE (the filter, SUBSCRIBE) and delivery out (READ). The core caches the answers
per session (`Session.acl_cache`) and drops every cache when the rules are reloaded. Without an
authorizer nothing is asked at all: the hot path stays as it was.

The decisions map to reason codes per version: 5.0 CONNACK 0x86 (bad user name or password),
0x87 (not authorised), 0x8C (bad authentication method); 3.1.1 and 3.1 return codes 4 and 5
(`connack_code_311`). The password never reaches a log or a counter.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from ..mqtt.reason_codes import ReasonCode

if TYPE_CHECKING:
    from .scram import Lookup, ScramSource


class Outcome(enum.IntEnum):
    ALLOW = 0
    DENY = 1  # known user, wrong secret: 0x86 / 4
    FORBID = 2  # the client is known and may not connect: 0x87 / 5
    IGNORE = 3  # not this authenticator's client: ask the next one
    UNAVAILABLE = 4  # the store cannot be asked now (Redis down): 0x88 / 3


@dataclass(frozen=True, slots=True)
class Credentials:
    client_id: str
    username: str | None
    password: bytes | None
    # Names of a verified TLS client certificate (subject CN, then the SANs); empty otherwise.
    cert_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: ReasonCode  # SUCCESS, or the CONNACK reason of the refusal
    label: str  # the /metrics label: success, anonymous, bad_username_or_password, ...
    username: str | None = None  # the identity the ACL sees (mTLS: the certificate's name)
    rights: Authorizer | None = None  # this client's own rules (JWT claims), instead of the ACL


# The outcome, the username when allowed, and optionally the client's own rights.
Result = tuple[Outcome, "str | None"] | tuple[Outcome, "str | None", "Authorizer | None"]
Answer = Callable[[Result], None]


class Authenticator(Protocol):
    """One link of the chain (a password file, a Redis user store, JWT, a client certificate).

    `authenticate` answers at once, or returns None and calls `answer` exactly once later (a
    lookup in Redis): the core never waits on I/O, the CONNECT waits in a state like LOCATING.
    """

    name: str

    def authenticate(self, credentials: Credentials, answer: Answer) -> Result | None:
        """The outcome, and the username the client is known by from now on when allowed."""
        ...


READ, WRITE, SUBSCRIBE = "read", "write", "subscribe"
ACTIONS = (READ, WRITE, SUBSCRIBE)


class Authorizer(Protocol):
    """May `username` (None: anonymous) with `client_id` do `action` on `topic`?

    For SUBSCRIBE `topic` is the topic filter (without a `$share/{group}/` prefix).
    """

    def allowed(self, client_id: str, username: str | None, action: str, topic: str) -> bool: ...


_ACCEPTED = Decision(True, ReasonCode.SUCCESS, "success")
_ANONYMOUS = Decision(True, ReasonCode.SUCCESS, "anonymous")
_NO_ANONYMOUS = Decision(False, ReasonCode.NOT_AUTHORIZED, "not_authorized")
_UNKNOWN_USER = Decision(False, ReasonCode.BAD_USER_NAME_OR_PASSWORD, "bad_username_or_password")
_UNAVAILABLE = Decision(False, ReasonCode.SERVER_UNAVAILABLE, "server_unavailable")
BAD_METHOD = Decision(False, ReasonCode.BAD_AUTHENTICATION_METHOD, "bad_authentication_method")
AUTH_LABELS = (
    "success",
    "anonymous",
    "bad_username_or_password",
    "not_authorized",
    "bad_authentication_method",
    "server_unavailable",
    "reauth_success",  # MQTT 5.0 re-authentication (AUTH 0x19), SCRAM-SHA-256
    "reauth_failure",
)


class AuthChain:
    """The ordered chain of a listener, and its anonymous rule."""

    def __init__(
        self, authenticators: Sequence[Authenticator] = (), allow_anonymous: bool | None = None
    ) -> None:
        self.authenticators = list(authenticators)
        # Anonymous access is off as soon as any authenticator is configured, unless allowed.
        self.allow_anonymous = (
            not self.authenticators if allow_anonymous is None else allow_anonymous
        )

    @property
    def scram(self) -> bool:
        """SCRAM-SHA-256 is offered: some link of the chain holds SCRAM credentials."""
        return any(hasattr(link, "scram_credential") for link in self.authenticators)

    def scram_lookup(
        self, username: str, done: Callable[[Lookup], None], start: int = 0
    ) -> Lookup | None:
        """The user's SCRAM credential from the first link that knows the user, in chain
        order; now, or None and `done(lookup)` later (exactly once)."""
        links = self.authenticators
        for index in range(start, len(links)):
            if not hasattr(links[index], "scram_credential"):
                continue
            source = cast("ScramSource", links[index])

            def later(lookup: Lookup, index: int = index) -> None:
                if lookup[0] == Outcome.IGNORE:
                    lookup_next = self.scram_lookup(username, done, index + 1)
                    if lookup_next is None:
                        return
                    lookup = lookup_next
                done(lookup)

            lookup = source.scram_credential(username, later)
            if lookup is None:
                return None
            if lookup[0] != Outcome.IGNORE:
                return lookup
        return Outcome.IGNORE, None, None

    @property
    def open(self) -> bool:
        """Everyone may connect: no authenticator, anonymous allowed (today's default)."""
        return not self.authenticators and self.allow_anonymous

    def decide(
        self, credentials: Credentials, done: Callable[[Decision], None] | None = None
    ) -> Decision | None:
        """The decision now, or None when a link answers later: then `done(decision)` follows
        exactly once (None for `done`: every link must answer at once)."""
        return self._walk(credentials, 0, done)

    def _walk(
        self, credentials: Credentials, start: int, done: Callable[[Decision], None] | None
    ) -> Decision | None:
        links = self.authenticators
        for index in range(start, len(links)):

            def later(result: Result, index: int = index) -> None:
                assert done is not None
                decision = _conclude(result, credentials)
                if decision is None:
                    decision = self._walk(credentials, index + 1, done)
                if decision is not None:
                    done(decision)

            result = links[index].authenticate(credentials, later)
            if result is None:
                if done is None:
                    raise RuntimeError(f"{links[index].name} answers later; no callback given")
                return None
            decision = _conclude(result, credentials)
            if decision is not None:
                return decision
        if credentials.username is None or not links:
            return _ANONYMOUS if self.allow_anonymous else _NO_ANONYMOUS
        return _UNKNOWN_USER


def _conclude(result: Result, credentials: Credentials) -> Decision | None:
    outcome, username = result[0], result[1]
    if outcome == Outcome.ALLOW:
        rights = result[2] if len(result) == 3 else None
        if username == credentials.username and rights is None:
            return _ACCEPTED
        return Decision(True, ReasonCode.SUCCESS, "success", username, rights)
    if outcome == Outcome.DENY:
        return _UNKNOWN_USER
    if outcome == Outcome.FORBID:
        return _NO_ANONYMOUS
    if outcome == Outcome.UNAVAILABLE:
        return _UNAVAILABLE
    return None
