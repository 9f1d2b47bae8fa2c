"""The directory from the command line: `mailpool user ...` (its users) and `mailpool
directory ...` (the directory as a whole: its backend, moving it, and the LDAP address book
from cli_ldap). `add_user_commands` and `add_directory_commands` add the two groups.

mailpool.cli is imported inside the functions: cli imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailpool.config import LoadedConfig
    from mailpool.directory import User, UserDirectory


def _cli() -> ModuleType:
    import mailpool.cli  # here, not at the top: mailpool.cli imports this module

    return mailpool.cli


def _fail(message: str) -> Exception:
    return _cli().CliError(message)


# --- users (the source's WRKDIRE) -----------------------------------------------------


@contextmanager
def opened_directory(loaded: LoadedConfig) -> Iterator[UserDirectory]:
    """The directory `[directory] backend` names, closed (a database connection ended
    cleanly) when the command is done: every command here opens it this way."""
    from mailpool.directory import open_directory

    if loaded.config.directory.backend == "file":
        loaded.data_dir.mkdir(parents=True, exist_ok=True)
    directory = open_directory(loaded)
    try:
        yield directory
    finally:
        directory.close()


def cmd_user_add(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.directory import PasswordHashError, validate_address

    local = {d.lower() for d in loaded.config.host.local_domains}
    addresses = []
    for addr in args.address:
        norm = validate_address(addr)
        domain = norm.rpartition("@")[2]
        if domain not in local:
            raise _fail(f"--address {addr!r}: domain {domain!r} is not in host.local_domains "
                           f"of {loaded.path} ({', '.join(sorted(local))})")
        addresses.append(norm)
    password = None
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise _fail("--password-stdin: no password on standard input")
    try:
        with opened_directory(loaded) as directory:
            user = directory.add_user(args.name, addresses, password,
                                      password_hash=args.password_hash)
    except PasswordHashError as exc:
        raise _fail(f"--password-hash: {exc}") from None
    print(f"user {user.name} added: {', '.join(user.addresses)}"
          + (" (POP password set)" if password else
             " (POP password hash imported)" if args.password_hash else " (no POP password)"))
    return 0


def _password_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--password-stdin", action="store_true",
                       help="read the POP password from the first line of standard input")
    group.add_argument("--password-hash", metavar="HASH",
                       help="keep a Dovecot password hash as it is, e.g. from a passwd-file: "
                            "{ARGON2ID}, {ARGON2I}, {BLF-CRYPT}, {SHA512-CRYPT} or "
                            "{SHA256-CRYPT} (quote it: it contains $)")


def cmd_user_list(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    with opened_directory(loaded) as directory:
        users = directory.users()
    if args.json:
        print(json.dumps({"users": [{"name": u.name, "addresses": u.addresses,
                                      "pop_login": bool(u.password_hash)} for u in users]}))
        return 0
    for u in users:
        print(f"{u.name:20} {'pop' if u.password_hash else '-':4} {', '.join(u.addresses)}")
    return 0


def cmd_user_remove(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    with opened_directory(loaded) as directory:
        user = directory.remove_user(args.name)
    print(f"user {user.name} removed; mailbox {loaded.mailbox_dir / user.name} kept")
    return 0


def cmd_user_passwd(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.directory import PasswordHashError

    if args.password_hash is not None:
        try:
            with opened_directory(loaded) as directory:
                directory.set_password(args.name, None, password_hash=args.password_hash)
        except PasswordHashError as exc:
            raise _fail(f"--password-hash: {exc}") from None
        print(f"password hash for {args.name} imported")
        return 0
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise _fail("no terminal to ask the password on: use --password-stdin or "
                           "--password-hash")
        password = getpass.getpass(f"New POP password for {args.name}: ")
    if not password:
        raise _fail("empty password refused")
    with opened_directory(loaded) as directory:
        directory.set_password(args.name, password)
    print(f"password for {args.name} changed")
    return 0


def add_user_commands(sub: argparse._SubParsersAction) -> None:
    """The `user` subcommand group: add, list, remove, passwd."""
    leaf = _cli()._leaf
    user = sub.add_parser("user", help="system distribution directory (WRKDIRE)").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    p = leaf(user, "add", cmd_user_add, "add a user with one or more addresses")
    p.add_argument("name", help="user name (also the mailbox directory): [a-z0-9][a-z0-9._-]*")
    p.add_argument("--address", action="append", required=True, metavar="ADDR",
                   help="a mail address of the user, in one of host.local_domains "
                        "(repeat for more)")
    _password_options(p)
    p = leaf(user, "list", cmd_user_list, "list users")
    p.add_argument("--json", action="store_true", help="one JSON document for scripts")
    p = leaf(user, "remove", cmd_user_remove, "remove a user (the mailbox is kept)")
    p.add_argument("name", help="the user to remove")
    p = leaf(user, "passwd", cmd_user_passwd, "set a user's password (POP3, SMTP AUTH)")
    p.add_argument("name", help="the user")
    _password_options(p)


# --- migrate ----------------------------------------------------------------------------


def _target_dsn(args: argparse.Namespace, loaded: LoadedConfig) -> str:
    dsn = args.dsn if args.dsn is not None else loaded.config.directory.dsn
    if not dsn.strip():
        raise _fail(f"no database to migrate to: give --dsn or set directory.dsn "
                    f"([directory] dsn) in {loaded.path}")
    return dsn


def _plan(source: list[User], existing: dict[str, User], replace: bool
          ) -> tuple[list[tuple[str, User]], dict[str, str]]:
    """What to do with each file user: ("copy"|"replace"|"unchanged", user), and the
    refused users (name -> why)."""
    from mailpool.directory import DirectoryError, User, normalise_addresses

    owners = {a: u.name for u in existing.values() for a in u.addresses}
    actions: list[tuple[str, User]] = []
    refused: dict[str, str] = {}
    for u in source:
        try:
            user = User(u.name, normalise_addresses(u.addresses), u.password_hash)
        except DirectoryError as exc:
            refused[u.name] = str(exc)
            continue
        there = existing.get(user.name)
        if there == user:
            actions.append(("unchanged", user))
            continue
        taken = [f"{a!r} (user {owners[a]!r})" for a in user.addresses
                 if owners.get(a, user.name) != user.name]
        if taken:
            refused[user.name] = f"address {', '.join(taken)} already in the database"
        elif there is None:
            actions.append(("copy", user))
        elif replace:
            actions.append(("replace", user))
        else:
            what = [w for w, differs in (("addresses", there.addresses != user.addresses),
                                         ("password", there.password_hash != user.password_hash))
                    if differs]
            refused[user.name] = (f"the database has a different record "
                                  f"({' and '.join(what)}); --replace overwrites it")
    return actions, refused


def cmd_directory_migrate(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.config import redact_dsn
    from mailpool.directory import (
        DirectoryError,
        DirectoryUnavailable,
        FileDirectory,
        open_postgres,
    )

    dsn = _target_dsn(args, loaded)
    source = FileDirectory(loaded.directory_file)
    users = source.users()
    if not loaded.directory_file.exists():
        print(f"{loaded.directory_file}: no directory file (no users to copy)",
              file=sys.stderr)
    try:
        target = open_postgres(loaded.config.directory, dsn)
    except DirectoryError as exc:
        if args.dsn is None:
            raise
        raise _fail(f"--dsn: {str(exc).removeprefix('directory.dsn: ')}") from None
    try:
        actions, refused = _plan(users, {u.name: u for u in target.users()}, args.replace)
        counts = {"copy": 0, "replace": 0, "unchanged": 0}
        for action, user in actions:
            if action != "unchanged" and not args.dry_run:
                try:
                    target.put_user(user, replace=action == "replace")
                except DirectoryUnavailable as exc:
                    raise _fail(f"{exc} ({counts['copy']} copied, {counts['replace']} "
                                "replaced so far: run it again when the database is back)"
                                ) from None
                except DirectoryError as exc:  # changed by someone else meanwhile
                    refused[user.name] = str(exc)
                    continue
            counts[action] += 1
            if action != "unchanged":
                verb = {"copy": "copied", "replace": "replaced"}[action]
                print(f"{'would be ' if args.dry_run else ''}{verb}: {user.name}")
        where = target.describe()
    finally:
        target.close()
    for name, why in refused.items():
        print(f"refused: user {name!r}: {why}", file=sys.stderr)
    print(f"{loaded.directory_file} -> {where}: {counts['copy']} copied, "
          f"{counts['unchanged']} unchanged, {counts['replace']} replaced, "
          f"{len(refused)} refused" + (" (dry run: nothing written)" if args.dry_run else ""))
    cfg = loaded.config.directory
    if not refused and (cfg.backend != "postgresql" or cfg.dsn != dsn):
        print(f"to use it, set in {loaded.path}:\n[directory]\nbackend = \"postgresql\"")
        if cfg.dsn != dsn:
            print(f"dsn = {json.dumps(redact_dsn(dsn))}"
                  + ("  # the real password in place of ***" if redact_dsn(dsn) != dsn else ""))
    if refused:
        raise _fail(f"{len(refused)} user(s) not copied (see above): {', '.join(refused)}")
    return 0


# --- status -----------------------------------------------------------------------------


def cmd_directory_status(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.directory import schema

    cfg = loaded.config.directory
    with opened_directory(loaded) as directory:
        status: dict[str, object] = {"backend": cfg.backend, "where": directory.describe(),
                                     "users": len(directory.users())}
        if cfg.backend == "postgresql":
            status["schema_version"] = directory.schema_version()  # type: ignore[attr-defined]
            status["schema_latest"] = schema.LATEST
        else:
            status["exists"] = loaded.directory_file.exists()
    if args.json:
        print(json.dumps(status))
        return 0
    print(f"backend: {status['backend']}")
    print(f"where:   {status['where']}" + ("" if status.get("exists", True) else
                                           " (not created yet: no users added)"))
    print(f"users:   {status['users']}")
    if "schema_version" in status:
        print(f"schema:  version {status['schema_version']} (latest this mailpool knows: "
              f"{status['schema_latest']})")
    return 0


# --- the group ----------------------------------------------------------------------------


def add_directory_commands(sub: argparse._SubParsersAction) -> None:
    """The `directory` subcommand group: migrate, status, export, sync-ldap (cli_ldap)."""
    from mailpool.cli_ldap import add_ldap_commands

    directory = sub.add_parser(
        "directory", help="the directory as a whole: backends, LDAP address book"
    ).add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    leaf = _cli()._leaf
    p = leaf(directory, "migrate", cmd_directory_migrate,
              "copy the directory file's users (password hashes as they are) into "
              "PostgreSQL; safe to run again")
    p.add_argument("--to", required=True, choices=["postgresql"],
                   help="the backend to copy into (postgresql)")
    p.add_argument("--dsn", metavar="DSN",
                   help="the database's connection string (default: [directory] dsn; "
                        "libpq also reads a password from $PGPASSWORD or ~/.pgpass)")
    p.add_argument("--replace", action="store_true",
                   help="overwrite users the database has with a different record (without "
                        "it they are refused and the exit status is 1)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be copied and write nothing")
    p = leaf(directory, "status", cmd_directory_status,
              "the configured backend, where it is, how many users, its schema version")
    p.add_argument("--json", action="store_true", help="one JSON document for scripts")
    add_ldap_commands(directory)
