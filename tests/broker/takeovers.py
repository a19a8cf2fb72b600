"""The takeover cases of issue 16, shared by the black-box, cluster and in-process tests."""

from __future__ import annotations

import pytest

from .mqttraw import SESSION_EXPIRY

# (version, old clean, old expiry, new clean, new expiry, session present for the new connection)
TAKEOVERS = [
    pytest.param(4, True, 0, False, 0, False, id="311-clean1-to-clean0"),
    pytest.param(4, False, 0, False, 0, True, id="311-clean0-to-clean0"),
    pytest.param(4, False, 0, True, 0, False, id="311-clean0-to-clean1"),
    pytest.param(5, True, 0, False, 60, False, id="5-cleanstart1-expiry0-to-expiry60"),
    pytest.param(5, False, 0, False, 60, False, id="5-expiry0-to-expiry60"),
    pytest.param(5, False, 60, False, 60, True, id="5-expiry60-to-expiry60"),
    pytest.param(5, False, 60, True, 60, False, id="5-expiry60-to-cleanstart1"),
]
# MQTT 3.1 has no session-present flag to assert (None).
TAKEOVERS_31 = [
    pytest.param(3, True, 0, False, 0, None, id="31-clean1-to-clean0"),
    pytest.param(3, False, 0, False, 0, None, id="31-clean0-to-clean0"),
]
TAKEOVER_FIELDS = ("version", "old_clean", "old_exp", "new_clean", "new_exp", "present")


def session_kw(version: int, clean: bool, expiry: int) -> dict[str, object]:
    """CONNECT keywords for a session: clean flag, and a 5.0 Session Expiry when non-zero."""
    kw: dict[str, object] = {"clean": clean}
    if version == 5 and expiry:
        kw["props"] = [(SESSION_EXPIRY, expiry)]
    return kw
