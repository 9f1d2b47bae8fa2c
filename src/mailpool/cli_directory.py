"""`mailpool directory ...`: the directory as a whole (its backend, moving it, the LDAP
address book). `add_directory_commands` adds the group to the main parser.

mailpool.cli is imported inside the functions: cli imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import json
import sys
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailpool.config import LoadedConfig
    from mailpool.directory import User


def _cli() -> ModuleType:
    import mailpool.cli  # here, not at the top: mailpool.cli imports this module

    return mailpool.cli


def _fail(message: str) -> Exception:
    return _cli().CliError(message)


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
    from mailpool.directory import open_directory, schema

    cfg = loaded.config.directory
    directory = open_directory(loaded)
    try:
        status: dict[str, object] = {"backend": cfg.backend, "where": directory.describe(),
                                     "users": len(directory.users())}
        if cfg.backend == "postgresql":
            status["schema_version"] = directory.schema_version()  # type: ignore[attr-defined]
            status["schema_latest"] = schema.LATEST
        else:
            status["exists"] = loaded.directory_file.exists()
    finally:
        directory.close()
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
