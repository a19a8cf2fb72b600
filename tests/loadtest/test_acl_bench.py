"""`mcloudtt-acl-bench`'s ACL file: realistic (hundreds of rules, %c/%u patterns, deny lines) and
one that lets the bench's fan-in through, so the ACL-on figure measures checks, not refusals."""

from __future__ import annotations

from mcloudtt_broker.auth.acl import AclFile
from mcloudtt_loadtest.acl_bench import main, realistic_acl


def test_the_generated_acl_is_large_and_lets_the_bench_through() -> None:
    text = realistic_acl()
    assert len(text.splitlines()) > 1000
    assert "%c" in text and "%u" in text and " deny " in text
    acl = AclFile.parse(text)
    assert len(acl.users) == 300 and len(acl.patterns) == 100
    assert len(acl.rules_for("bench-pub-qos0-3", None)) > 50  # what a cache miss walks
    assert acl.allowed("bench-pub-qos0-3", None, "write", "sensors/3/temp")
    assert acl.allowed("bench-sub-qos0", None, "subscribe", "sensors/+/temp")
    assert acl.allowed("bench-sub-qos0", None, "read", "sensors/3/temp")
    assert not acl.allowed("bench-pub-qos0-3", None, "write", "sensors/3/temp/private")
    assert acl.allowed("d1", "operator7", "write", "tenants/operator7/site0/x")  # %u
    assert acl.allowed("dev-9", None, "write", "devices/dev-9/telemetry1")  # %c
    assert not acl.allowed("dev-9", None, "write", "devices/dev-8/telemetry1")


def test_unknown_scenarios_are_refused() -> None:
    try:
        main(["--scenarios", "qos7"])
    except SystemExit as error:
        assert "qos7" in str(error)
    else:
        raise AssertionError("accepted an unknown scenario")
