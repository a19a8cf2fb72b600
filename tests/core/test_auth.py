"""Authentication and ACL decisions in the core: reason codes per version, caches, counters."""

from __future__ import annotations

import pytest
from broker.mqttraw import PUBACK, PUBLISH, PUBREC
from mcloudtt_broker.auth.acl import AclFile
from mcloudtt_broker.auth.passwords import PasswordFile, hash_password, verify_password
from mcloudtt_broker.core.auth import AuthChain, Credentials, Outcome

from broker import mqttraw as raw

from .harness import Cluster

USERS = {"alice": hash_password(b"secret", ln=4), "bob": hash_password(b"hunter2", ln=4)}

ACL = """
# anonymous clients
topic read public/#
user alice
topic readwrite alice/#
topic deny alice/secret/#
topic read shared/#
user bob
topic write shared/bob
pattern readwrite devices/%c/#
pattern read home/%u/#
"""


def core_with(*, anonymous: bool | None = None, acl: str | None = None, **settings: object):
    cluster = Cluster(("a",), **settings)
    core = cluster.cores["a"]
    core.set_rules(
        AuthChain([PasswordFile(dict(USERS))], anonymous),
        AclFile.parse(acl) if acl is not None else None,
    )
    return cluster, core


# CONNACK codes: 5.0 reason codes; 3.1.1 and 3.1 return codes 4 and 5.
@pytest.mark.parametrize(
    ("version", "bad_password", "no_user"), [(5, 0x86, 0x87), (4, 4, 5), (3, 4, 5)]
)
def test_password_file_accepts_the_right_password_and_refuses_others(
    version: int, bad_password: int, no_user: int
) -> None:
    cluster, core = core_with()
    ok = cluster.client("a", version=version)
    assert ok.connect("c1", username="alice", password=b"secret").code == 0
    assert core.sessions["c1"].username == "alice"
    wrong = cluster.client("a", version=version)
    assert wrong.connect("c2", username="alice", password=b"nope").code == bad_password
    assert not wrong.open
    unknown = cluster.client("a", version=version)
    assert unknown.connect("c3", username="mallory", password=b"x").code == bad_password
    anonymous = cluster.client("a", version=version)
    # Anonymous access is off as soon as an authenticator is configured.
    assert anonymous.connect("c4").code == no_user
    assert dict(core.stats.auth) == {
        "success": 1,
        "bad_username_or_password": 2,
        "not_authorized": 1,
    }


def test_anonymous_allowed_explicitly_beside_a_password_file() -> None:
    cluster, core = core_with(anonymous=True)
    assert cluster.client("a").connect("anon").code == 0
    # A username the chain does not know is still refused.
    assert cluster.client("a").connect("x", username="eve", password=b"x").code == 0x86
    assert core.stats.auth["anonymous"] == 1


def test_no_authenticator_lets_everyone_in_as_before() -> None:
    cluster = Cluster(("a",))
    assert cluster.client("a").connect("x", username="any", password=b"thing").code == 0
    assert cluster.client("a", version=4).connect("y").code == 0


class Named:
    """An authenticator that knows one user and says ALLOW or DENY for it."""

    def __init__(self, name: str, user: str, outcome: Outcome) -> None:
        self.name, self.user, self.outcome = name, user, outcome
        self.asked = 0

    def authenticate(self, credentials: Credentials, answer: object) -> tuple[Outcome, str | None]:
        self.asked += 1
        if credentials.username != self.user:
            return Outcome.IGNORE, None
        return self.outcome, self.user


def test_the_chain_asks_in_order_and_the_first_that_knows_the_user_decides() -> None:
    first = Named("first", "carol", Outcome.DENY)
    second = Named("second", "carol", Outcome.ALLOW)
    creds = Credentials("c", "carol", b"pw")
    assert not AuthChain([first, second]).decide(creds).allowed
    assert (first.asked, second.asked) == (1, 0)
    assert AuthChain([second, first]).decide(creds).allowed
    assert (first.asked, second.asked) == (1, 1)
    # Not known by the first: the second decides.
    other = Named("other", "dave", Outcome.DENY)
    assert AuthChain([other, second]).decide(creds).allowed


def test_password_hashes_are_salted_and_checked() -> None:
    one, two = hash_password(b"pw", ln=4), hash_password(b"pw", ln=4)
    assert one != two and one.startswith("$scrypt$ln=4,r=8,p=1$")
    assert verify_password(b"pw", one) and not verify_password(b"pW", one)
    assert not verify_password(b"pw", "$scrypt$garbage")


@pytest.mark.parametrize("version", [5, 4])
def test_acl_denies_publish_with_0x87_in_5_and_drops_it_in_311(version: int) -> None:
    cluster, core = core_with(acl=ACL)
    sub = cluster.client("a", version=version)
    sub.connect("sub", username="alice", password=b"secret")
    sub.subscribe(("shared/#", 1))
    bob = cluster.client("a", version=version)
    bob.connect("bobc", username="bob", password=b"hunter2")
    bob.publish("shared/bob", b"ok", qos=1)
    pid = bob.next_id()
    bob.send(raw.publish("shared/other", b"no", version=version, qos=1, packet_id=pid))
    ack = bob.expect(PUBACK)
    assert ack.packet_id == pid
    assert ack.code == (0x87 if version == 5 else 0)  # 3.1.1: acknowledged, dropped
    assert [p.payload for p in sub.publishes()] == [b"ok"]
    assert core.stats.acl["write", "deny"] == 1
    assert core.stats.acl["write", "allow"] == 1


def test_acl_qos2_denied_publish_gets_pubrec_0x87() -> None:
    cluster, _ = core_with(acl=ACL)
    bob = cluster.client("a")
    bob.connect("bobc", username="bob", password=b"hunter2")
    bob.send(raw.publish("nope", b"x", version=5, qos=2, packet_id=7))
    assert bob.expect(PUBREC).code == 0x87


@pytest.mark.parametrize(("version", "code"), [(5, 0x87), (4, 0x80)])
def test_acl_denies_a_subscription(version: int, code: int) -> None:
    cluster, core = core_with(acl=ACL)
    alice = cluster.client("a", version=version)
    alice.connect("a1", username="alice", password=b"secret")
    ack = alice.subscribe("alice/#", "alice/secret/x", "bob/#", "public/+")
    assert ack.codes == [0, code, code, code]
    assert core.stats.acl["subscribe", "deny"] == 3


def test_mqtt31_denied_subscription_closes_the_connection() -> None:
    cluster, _ = core_with(acl=ACL)
    alice = cluster.client("a", version=3)
    alice.connect("a1", username="alice", password=b"secret")
    alice.send(raw.subscribe(1, [("bob/#", 0)], version=3))
    assert not alice.open


def test_acl_holds_back_deliveries_the_subscriber_may_not_read() -> None:
    # alice may subscribe to alice/# but not read alice/secret/...: delivery is checked too.
    cluster, core = core_with(acl=ACL)
    alice = cluster.client("a")
    alice.connect("a1", username="alice", password=b"secret")
    alice.subscribe("alice/#")
    alice.publish("alice/secret/x", b"hidden")  # her own write is denied too
    alice.publish("alice/open", b"seen")
    assert [p.topic for p in alice.publishes()] == ["alice/open"]
    # A retained message she may not read is not sent on subscribe either.
    core.set_rules(None, None)
    alice.publish("alice/secret/r", b"kept", retain=True)
    alice.publish("alice/r", b"kept", retain=True)
    alice.unsubscribe("alice/#")
    alice.take()
    core.set_rules(None, AclFile.parse(ACL))
    alice.subscribe("alice/#")
    assert [p.topic for p in alice.publishes()] == ["alice/r"]


def test_patterns_substitute_username_and_client_id() -> None:
    cluster, _ = core_with(acl=ACL, anonymous=True)
    bob = cluster.client("a")
    bob.connect("dev7", username="bob", password=b"hunter2")
    assert bob.subscribe(
        "devices/dev7/#", "devices/dev8/#", "home/bob/+", "home/alice/#"
    ).codes == [
        0,
        0x87,
        0,
        0x87,
    ]
    anon = cluster.client("a")
    anon.connect("devX")
    # %c applies to anonymous clients, %u never does.
    assert anon.subscribe("devices/devX/a", "home/+/x", "public/news").codes == [0, 0x87, 0]


def test_reload_drops_cached_decisions_and_changes_running_rights() -> None:
    cluster, core = core_with(acl=ACL)
    bob = cluster.client("a")
    bob.connect("b1", username="bob", password=b"hunter2")
    assert bob.subscribe("shared/x").codes == [0x87]
    assert core.sessions["b1"].acl_cache
    core.set_rules(None, AclFile.parse(ACL + "topic read shared/#\n"))
    assert core.sessions["b1"].acl_cache == {}
    assert bob.subscribe("shared/x").codes == [0]


def test_deny_action_disconnect_closes_the_client() -> None:
    cluster, _ = core_with(acl=ACL, acl_deny_action="disconnect")
    bob = cluster.client("a")
    bob.connect("b1", username="bob", password=b"hunter2")
    bob.publish("not/allowed", b"x")
    assert not bob.open


def test_decisions_are_cached_per_session() -> None:
    cluster, core = core_with(acl=ACL)
    calls: list[tuple[str, str]] = []
    acl = AclFile.parse(ACL)
    real = acl.allowed

    def counting(client_id: str, username: str | None, action: str, topic: str) -> bool:
        calls.append((action, topic))
        return real(client_id, username, action, topic)

    acl.allowed = counting  # type: ignore[method-assign]
    core.set_rules(None, acl)
    alice = cluster.client("a")
    alice.connect("a1", username="alice", password=b"secret")
    alice.subscribe("alice/#")
    for _ in range(5):
        alice.publish("alice/t", b"x")
    assert len(alice.take(PUBLISH)) == 5
    assert calls == [("subscribe", "alice/#"), ("write", "alice/t"), ("read", "alice/t")]
    assert core.stats.acl["read", "allow"] == 5


class Later:
    """An authenticator that answers when the test says so (as a lookup in Redis would)."""

    name = "later"

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.waiting: list[tuple[Credentials, object]] = []

    def authenticate(self, credentials: Credentials, answer: object) -> None:
        self.waiting.append((credentials, answer))
        return None

    def answer(self, outcome: Outcome) -> None:
        credentials, answer = self.waiting.pop(0)
        answer((outcome, credentials.username))  # type: ignore[operator]
        self.cluster.pump()  # the in-memory bus locates the session


def test_a_later_answer_holds_connect_and_the_packets_behind_it() -> None:
    cluster = Cluster(("a",))
    core = cluster.cores["a"]
    later = Later(cluster)
    core.set_rules(AuthChain([later, PasswordFile(dict(USERS))]), None)
    client = cluster.client("a")
    client.send(raw.connect("c1", version=5, username="zoe", password=b"pw"))
    client.send(raw.subscribe(1, [("t", 0)], version=5))  # waits in the decoder
    assert client.take() == [] and client.open
    assert core.sessions == {}
    later.answer(Outcome.ALLOW)
    [connack, suback] = client.take()
    assert (connack.code, suback.codes) == (0, [0])
    assert core.sessions["c1"].username == "zoe"
    # IGNORE goes on to the next link, which refuses a wrong password.
    other = cluster.client("a")
    other.send(raw.connect("c2", version=5, username="alice", password=b"wrong"))
    later.answer(Outcome.IGNORE)
    assert other.expect(raw.CONNACK).code == 0x86
    # Closed while waiting: the late answer does nothing.
    gone = cluster.client("a")
    gone.send(raw.connect("c3", version=5, username="zoe", password=b"pw"))
    gone.drop()
    later.answer(Outcome.ALLOW)
    assert "c3" not in core.sessions
    unavailable = cluster.client("a", version=4)
    unavailable.send(raw.connect("c4", version=4, username="zoe", password=b"pw"))
    later.answer(Outcome.UNAVAILABLE)
    assert unavailable.expect(raw.CONNACK).code == 3  # 3.1.1: server unavailable


@pytest.mark.parametrize(("version", "code"), [(5, 0x87), (4, 5)])
def test_a_will_on_a_topic_the_client_may_not_write_refuses_the_connect(version, code) -> None:
    cluster, core = core_with(acl=ACL)
    refused = cluster.client("a", version=version)
    will = raw.Will("bob/last", b"gone")
    assert refused.connect("a1", username="alice", password=b"secret", will=will).code == code
    allowed = cluster.client("a", version=version)
    will = raw.Will("alice/last", b"gone")
    assert allowed.connect("a2", username="alice", password=b"secret", will=will).code == 0
    assert core.stats.acl["write", "deny"] == 1


def test_acl_file_syntax_and_matching() -> None:
    acl = AclFile.parse(
        "topic public/#\n"  # access omitted: readwrite (as Mosquitto)
        "user eve\n"
        "topic read a/+/c\n"
        "pattern write in/%u/%c\n"
    )
    assert acl.allowed("c", None, "write", "public/x")
    assert acl.allowed("c", "eve", "read", "a/b/c") and not acl.allowed("c", "eve", "read", "a/b")
    assert not acl.allowed("c", "eve", "write", "a/b/c")
    assert acl.allowed("c1", "eve", "write", "in/eve/c1")
    # A wildcard (or '/') brought in by %u / %c never applies.
    assert not acl.allowed("c1", "ev+", "write", "in/ev+/c1")
    assert not acl.allowed("#", "eve", "write", "in/eve/#")
    # '#' in a rule does not reach `$` topics (MQTT-4.7.2-1), nor covers a `$` filter.
    wide = AclFile.parse("topic read #\n")
    assert not wide.allowed("c", None, "read", "$SYS/x")
    assert not wide.allowed("c", None, "subscribe", "$SYS/#")
    assert wide.allowed("c", None, "subscribe", "#")
    assert AclFile.parse("topic read a/#\n").allowed("c", None, "subscribe", "a")
    assert not AclFile.parse("topic read a/+\n").allowed("c", None, "subscribe", "a/#")
    with pytest.raises(ValueError, match="line 2: unknown keyword 'topics'"):
        AclFile.parse("user x\ntopics read a\n")
