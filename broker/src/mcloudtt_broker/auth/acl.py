"""The ACL file, in Mosquitto's syntax (users bring theirs), as the core's `Authorizer`.

    # comment
    topic read $SYS/#             <- before the first `user` line: rules for anonymous clients
    user alice
    topic readwrite alice/#       <- alice's rules (access omitted: readwrite)
    topic deny alice/secret/#     <- deny wins over every grant
    pattern read devices/%c/#     <- anywhere: every client, %u its username, %c its client id

A client may publish to a topic a `write`/`readwrite` rule matches and receive from one a
`read`/`readwrite` rule matches, unless a `deny` rule matches it. It may subscribe to a filter
when a readable rule covers every topic of the filter and no `deny` rule covers the filter
(deliveries it then may not read are still held back one by one). Patterns whose `%u` or `%c`
would bring a wildcard (`+`, `#`) or a `/` into them do not apply (Mosquitto does the same), and
`%u` patterns never apply to anonymous clients. Everything is denied that nothing allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.auth import READ, SUBSCRIBE, WRITE

_ACCESS = {"read": (True, False), "write": (False, True), "readwrite": (True, True)}


class AclFileError(ValueError):
    """A line of the ACL file that cannot be read (the message names the line)."""


@dataclass(frozen=True, slots=True)
class Rule:
    levels: tuple[str, ...]
    read: bool
    write: bool
    deny: bool


@dataclass
class AclFile:
    anonymous: list[Rule] = field(default_factory=list)
    users: dict[str, list[Rule]] = field(default_factory=dict)
    patterns: list[Rule] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> AclFile:
        return cls.parse(Path(path).read_text(encoding="utf-8"), str(path))

    @classmethod
    def parse(cls, text: str, source: str = "ACL file") -> AclFile:
        acl = cls()
        current = acl.anonymous
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keyword, _, rest = line.partition(" ")
            rest = rest.strip()
            if keyword == "user":
                if not rest:
                    raise AclFileError(f"{source} line {number}: `user` without a name")
                current = acl.users.setdefault(rest, [])
                continue
            if keyword not in ("topic", "pattern"):
                raise AclFileError(f"{source} line {number}: unknown keyword {keyword!r}")
            access, _, topic = rest.partition(" ")
            if access in _ACCESS or access == "deny":
                topic = topic.strip()
            else:
                access, topic = "readwrite", rest  # Mosquitto: access omitted is readwrite
            if not topic:
                raise AclFileError(f"{source} line {number}: {keyword} without a topic")
            read, write = _ACCESS.get(access, (False, False))
            rule = Rule(tuple(topic.split("/")), read, write, access == "deny")
            (acl.patterns if keyword == "pattern" else current).append(rule)
        return acl

    def rules_for(self, client_id: str, username: str | None) -> list[Rule]:
        rules = list(self.anonymous if username is None else self.users.get(username, ()))
        for pattern in self.patterns:
            levels = []
            for level in pattern.levels:
                if "%u" in level:
                    if username is None or not _plain(username):
                        break
                    level = level.replace("%u", username)
                if "%c" in level:
                    if not _plain(client_id):
                        break
                    level = level.replace("%c", client_id)
                levels.append(level)
            else:
                rules.append(Rule(tuple(levels), pattern.read, pattern.write, pattern.deny))
        return rules

    def allowed(self, client_id: str, username: str | None, action: str, topic: str) -> bool:
        rules = self.rules_for(client_id, username)
        levels = topic.split("/")
        if action == SUBSCRIBE:
            if any(rule.deny and filter_covers(rule.levels, levels) for rule in rules):
                return False
            return any(rule.read and filter_covers(rule.levels, levels) for rule in rules)
        if any(rule.deny and topic_matches(rule.levels, levels) for rule in rules):
            return False
        if action == READ:
            return any(rule.read and topic_matches(rule.levels, levels) for rule in rules)
        assert action == WRITE
        return any(rule.write and topic_matches(rule.levels, levels) for rule in rules)


def _plain(name: str) -> bool:
    return not ("+" in name or "#" in name or "/" in name)


def topic_matches(rule: tuple[str, ...], topic: list[str]) -> bool:
    """Does the rule (a topic filter) match this topic name? (MQTT 4.7 matching)"""
    if topic[0].startswith("$") and rule[0] in ("+", "#"):
        return False  # MQTT-4.7.2-1: a leading wildcard does not match `$` topics
    for index, level in enumerate(rule):
        if level == "#":
            return True
        if index >= len(topic):
            return False
        if level != "+" and level != topic[index]:
            return False
    return len(rule) == len(topic)


def filter_covers(rule: tuple[str, ...], topic_filter: list[str]) -> bool:
    """Does every topic the filter matches match the rule too?"""
    if topic_filter[0].startswith("$") and rule[0] in ("+", "#"):
        return False  # MQTT-4.7.2-1
    for index, level in enumerate(rule):
        if level == "#":
            return True
        if index >= len(topic_filter):
            return False
        wanted = topic_filter[index]
        if wanted == "#":
            return False
        if level == "+":
            continue
        if level != wanted:
            return False
    return len(topic_filter) == len(rule)  # longer: only a rule ending in '#' covers it
