"""`mcloudtt-broker passwd FILE USER [--delete]`: add, change or remove a user of a password file.

The password is read from standard input when it is not a terminal (one line, the newline
dropped), else asked twice without echo. The file is created when missing (mode 0600) and
replaced atomically; a running broker reads it again on SIGHUP. `--scram` stores SCRAM-SHA-256
credentials for MQTT 5 enhanced authentication (the plain password works with them too).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from .passwords import PasswordFileError, hash_password, read_file, write_file


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mcloudtt-broker passwd",
        description="Add, change (the password from standard input, or asked) or delete a user "
        "of a password file (--password-file).",
    )
    parser.add_argument("file", metavar="FILE")
    parser.add_argument("user", metavar="USER")
    parser.add_argument("--delete", action="store_true", help="remove the user")
    parser.add_argument(
        "--scram",
        action="store_true",
        help="store SCRAM-SHA-256 credentials (salt, StoredKey, ServerKey) instead of an scrypt "
        "hash: the user can then also log in with MQTT 5 enhanced authentication",
    )
    args = parser.parse_args(argv)
    prog = parser.prog
    if not args.user or ":" in args.user:
        print(f"{prog}: error: a username is not empty and has no ':'", file=sys.stderr)
        return 2
    path = Path(args.file)
    try:
        users = read_file(path) if path.exists() else {}
    except (OSError, PasswordFileError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    if args.delete:
        if users.pop(args.user, None) is None:
            print(f"{prog}: error: no user {args.user!r} in {path}", file=sys.stderr)
            return 1
    else:
        if sys.stdin.isatty():
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                print(f"{prog}: error: the passwords differ", file=sys.stderr)
                return 1
        else:
            password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            print(f"{prog}: error: empty password", file=sys.stderr)
            return 1
        users[args.user] = hash_password(password.encode(), scram=args.scram)
    try:
        write_file(path, users)
    except OSError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0
