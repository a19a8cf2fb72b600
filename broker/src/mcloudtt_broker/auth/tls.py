"""Mutual TLS: the verified client certificate's subject (CN) or a SAN is the username."""

from __future__ import annotations

from typing import Any

from ..core.auth import Answer, Credentials, Outcome, Result


def certificate_names(peercert: Any) -> tuple[str, ...]:
    """Subject common names, then DNS, email and URI SANs, of `ssl.getpeercert()`'s dict.

    The TLS layer verified the certificate against --tls-ca before the socket was handed to
    us; no certificate (None or empty) gives no names.
    """
    if not peercert:
        return ()
    names: list[str] = []
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.append(value)
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in ("DNS", "email", "URI"):
            names.append(value)
    return tuple(dict.fromkeys(names))


class ClientCertificate:
    """The `tls-cert` authenticator: a client with a verified certificate is its name.

    A client that gives no username is known by the certificate's first name (CN first); one
    that gives a username is let in when the certificate carries that name. Anything else is
    left to the rest of the chain (a password, for instance).
    """

    name = "tls-cert"

    def authenticate(self, credentials: Credentials, answer: Answer) -> Result:
        names = credentials.cert_names
        if not names:
            return Outcome.IGNORE, None
        if credentials.username is None:
            return Outcome.ALLOW, names[0]
        if credentials.username in names:
            return Outcome.ALLOW, credentials.username
        return Outcome.IGNORE, None
