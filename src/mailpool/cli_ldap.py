"""`mailpool directory export --ldif` and `mailpool directory sync-ldap`: the LDAP address
book (see mailpool.ldap_book). `add_ldap_commands` adds both to the `directory` group.

mailpool.cli is imported inside the functions: cli imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mailpool.ldap_book import LdapBookError, export_ldif, sync_ldap

if TYPE_CHECKING:
    from mailpool.config import LoadedConfig
    from mailpool.directory import User

PASSWORD_ENV = "MAILPOOL_LDAP_PASSWORD"


def _users(loaded: LoadedConfig) -> list[User]:
    """The directory's users, from whichever backend `[directory] backend` names."""
    from mailpool.cli_directory import opened_directory

    with opened_directory(loaded) as directory:
        return directory.users()


def _default_base(loaded: LoadedConfig) -> str:
    # The host's first local domain as dc= components: example.test -> dc=example,dc=test.
    domain = loaded.config.host.local_domains[0]
    return ",".join(f"dc={label}" for label in domain.lower().split("."))


def cmd_directory_export(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.cli import CliError

    base = args.base or _default_base(loaded)
    users = _users(loaded)
    try:
        if args.output is None:
            export_ldif(users, base, sys.stdout)
            sys.stdout.flush()
        else:
            # Written beside the target and renamed: a failed export leaves no half file.
            tmp = args.output.with_name(f".{args.output.name}.tmp")
            try:
                with open(tmp, "w", encoding="ascii", newline="\n") as out:
                    count = export_ldif(users, base, out)
                os.replace(tmp, args.output)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            print(f"{count} entries written to {args.output}", file=sys.stderr)
    except LdapBookError as exc:
        raise CliError(f"--base: {exc}") from None
    return 0


def _password(args: argparse.Namespace) -> str:
    from mailpool.cli import CliError

    if args.bind_password_stdin:
        password, source = sys.stdin.readline().rstrip("\r\n"), "--bind-password-stdin"
    elif args.bind_password_file is not None:
        try:
            text = args.bind_password_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"--bind-password-file {args.bind_password_file}: "
                           f"{exc.strerror or exc}") from None
        password, source = (text.splitlines() or [""])[0], str(args.bind_password_file)
    elif PASSWORD_ENV in os.environ:
        password, source = os.environ[PASSWORD_ENV], f"${PASSWORD_ENV}"
    else:
        raise CliError(f"no bind password: use --bind-password-file, --bind-password-stdin "
                       f"or ${PASSWORD_ENV}")
    if not password:
        raise CliError(f"{source}: empty bind password")
    return password


def cmd_directory_sync_ldap(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.cli import CliError

    password = _password(args)
    try:
        result = sync_ldap(_users(loaded), args.url, args.base, args.bind_dn, password,
                           timeout=args.timeout, dry_run=args.dry_run, starttls=args.starttls,
                           ca_file=str(args.ca_file) if args.ca_file else None)
    except LdapBookError as exc:
        raise CliError(str(exc)) from None
    if args.dry_run:
        for action in result.actions:
            print(f"would {action}")
    for dn in result.foreign:
        print(f"left alone: {dn} (not an entry mailpool manages)", file=sys.stderr)
    print(f"{args.url}: {result.added} added, {result.changed} changed, {result.removed} "
          f"removed, {result.unchanged} unchanged"
          + (" (dry run: nothing written)" if args.dry_run else ""))
    return 0


def _seconds(text: str) -> float:
    value = float(text)  # argparse turns the ValueError into a usage error naming the option
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0 and at most 3600")
    return value


def add_ldap_commands(directory: argparse._SubParsersAction) -> None:
    """Add `export` and `sync-ldap` to the `mailpool directory` subcommand group."""
    from mailpool.cli import _leaf

    base_help = ("the base DN: entries go under ou=people,BASE, or under BASE itself if it "
                 "starts with ou=")
    export = _leaf(directory, "export", cmd_directory_export,
                   "write the directory as an LDAP address book (never passwords)")
    fmt = export.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--ldif", action="store_true",
                     help="LDIF (RFC 2849): inetOrgPerson entries with uid, cn, sn and mail")
    export.add_argument("--base", metavar="DN",
                        help=base_help + " (default: dc= components of the first "
                             "host.local_domains entry)")
    export.add_argument("--output", metavar="FILE", type=Path,
                        help="write to FILE (replaced atomically) instead of standard output")

    sync = _leaf(directory, "sync-ldap", cmd_directory_sync_ldap,
                 "make an LDAP server's address book match the directory: add, change and "
                 "remove mailpool's entries, nothing else")
    sync.add_argument("--url", required=True,
                      help="the server: ldap://HOST[:PORT] or ldaps://HOST[:PORT]")
    sync.add_argument("--base", metavar="DN", required=True, help=base_help)
    sync.add_argument("--bind-dn", metavar="DN", required=True,
                      help="the DN to bind as; it must be allowed to write under the base")
    secret = sync.add_mutually_exclusive_group()
    secret.add_argument("--bind-password-file", metavar="FILE", type=Path,
                        help=f"read the bind password from the first line of FILE "
                             f"(default: ${PASSWORD_ENV})")
    secret.add_argument("--bind-password-stdin", action="store_true",
                        help="read the bind password from the first line of standard input")
    sync.add_argument("--starttls", action="store_true",
                      help="upgrade an ldap:// connection with StartTLS before binding")
    sync.add_argument("--ca-file", metavar="FILE", type=Path,
                      help="CA certificates (PEM) to verify the server's certificate with "
                           "(default: the system's)")
    sync.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                      help="connect and answer timeout (default: 10)")
    sync.add_argument("--dry-run", action="store_true",
                      help="print what would change and write nothing")
