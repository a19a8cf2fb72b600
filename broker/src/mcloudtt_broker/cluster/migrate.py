"""`mcloudtt-broker migrate-keys --redis URL [--prefix P] [--apply]`: per-broker keys of an
older version renamed to the hash-tagged names (`P:sessions:ID` -> `P:sessions:{ID}`).

The per-broker keys carry the broker id as a hash tag (keyspace.py), on one Redis too; brokers
of this version do not read the old names, so stored sessions, undelivered inbox entries, stored
wills and the rest would be left behind. Run with every broker stopped: a live broker's presence
key is a refusal. Without `--apply` it prints what it would rename. RENAMENX keeps a key (and a
stream's consumer groups) whole and never overwrites one of the new layout. On a Redis Cluster
there is nothing to migrate (a new cluster starts empty).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from .redis_url import RedisUrlError, check_redis_url, link_error_reason

# The per-broker key kinds that took the `{ID}` hash tag.
KINDS = ("inbox", "progress", "sessions", "marks", "wills", "subs", "broker", "adopter", "adopted")


def new_name(prefix: str, key: str) -> str | None:
    """The hash-tagged name of an old per-broker key, None for any other key."""
    for kind in KINDS:
        head = f"{prefix}:{kind}:"
        if key.startswith(head):
            broker = key[len(head) :]
            if broker and "{" not in broker and "}" not in broker and ":" not in broker:
                return f"{head}{{{broker}}}"
    return None


async def _migrate(url: str, prefix: str, apply: bool, out: Any) -> int:
    options = check_redis_url(url)
    client = options.client(socket_connect_timeout=5, socket_timeout=10, decode_responses=True)
    try:
        info = await client.info("cluster")
        if info.get("cluster_enabled"):
            print("a Redis Cluster: nothing to migrate (it starts with the new names)", file=out)
            return 0
        renames: list[tuple[str, str]] = []
        for kind in KINDS:
            async for key in client.scan_iter(match=f"{prefix}:{kind}:*", count=1000):
                target = new_name(prefix, key)
                if target is not None:
                    renames.append((key, target))
        live = [old for old, _ in renames if old.startswith(f"{prefix}:broker:")]
        live += [key async for key in client.scan_iter(match=f"{prefix}:broker:{{*}}")]
        if live:
            print(
                f"refused: a broker looks alive ({live[0]} exists): stop every broker first "
                "(presence keys expire within --presence-ttl)",
                file=out,
            )
            return 1
        kept = 0
        for old, target in sorted(renames):
            if not apply:
                print(f"would rename {old} -> {target}", file=out)
            elif await client.renamenx(old, target):
                print(f"renamed {old} -> {target}", file=out)
            else:
                kept += 1
                print(f"kept {old}: {target} exists already", file=out)
        done = len(renames) - kept
        verb = "renamed" if apply else "to rename (run again with --apply)"
        print(f"{done} key(s) {verb}" + (f", {kept} kept" if kept else ""), file=out)
        return 0 if not kept else 1
    finally:
        await client.aclose()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mcloudtt-broker migrate-keys",
        description="Rename an older version's per-broker keys to the hash-tagged names "
        "(PREFIX:KIND:ID -> PREFIX:KIND:{ID}); every broker stopped.",
    )
    parser.add_argument("--redis", required=True, metavar="URL", help="the brokers' --redis")
    parser.add_argument("--prefix", default="mcloudtt", help="the brokers' --redis-prefix")
    parser.add_argument("--apply", action="store_true", help="rename (default: only print)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_migrate(args.redis, args.prefix, args.apply, sys.stdout))
    except RedisUrlError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # redis-py's errors, OSError: one line
        reason = link_error_reason(error, check_redis_url(args.redis))
        print(f"{parser.prog}: error: {reason}", file=sys.stderr)
        return 2
