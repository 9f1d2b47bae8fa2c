"""`sendmail`: mail from cron and scripts, with the options and exit codes of Postfix's.

    sendmail [-t] [-i | -oi] [-f ADDR] [-F NAME] [--config PATH] [--] [RECIPIENT ...]
    sendmail -bs

The message is read from standard input (until end of file, or a line holding only "."
unless -i), recipients come from the arguments and, with -t, from its To/Cc/Bcc headers
(Resent-To/-Cc/-Bcc when it has those). Bcc fields are always removed, a missing From: and
Date: are added, and the message goes through mailpool.submit: durable on the incoming queue
before the exit status 0. With no host running the message waits there and is delivered when
the host starts. `-bs` speaks SMTP on standard input and output instead, through the same
protocol core as the SMTP server; every message it accepts goes the same way.

A local user is trusted as Postfix trusts one: any recipient domain is allowed. A recipient in
one of [host] local_domains that no user owns is refused at once (EX_NOUSER; 550 with -bs)
rather than bounced later, as the SMTP server refuses it at RCPT.

Exit codes are sysexits.h's, as Postfix's sendmail uses them; errors are one line on stderr.
Installed both as `mailpool sendmail` and, through a console-script alias, as `sendmail`
(which reads --config, else $MAILPOOL_CONFIG, else config/mailpool.toml).
"""

from __future__ import annotations

import argparse
import email.utils
import os
import pwd
import re
import string
import sys
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NoReturn

from mailpool.config import DEFAULT_CONFIG, ConfigError, LoadedConfig, load_config
from mailpool.submit import (
    SubmitError,
    check_address,
    is_unknown_local,
    normalize_line_ends,
    qualify,
    split_header,
    submit,
)

if TYPE_CHECKING:
    pass

# sysexits.h
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_OSERR = 71
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_CONFIG = 78

# What mailpool.submit refused, as an exit status.
_SUBMIT_EXIT = {"address": EX_DATAERR, "length": EX_DATAERR, "recipients": EX_USAGE,
                "size": EX_DATAERR, "space": EX_TEMPFAIL, "permission": EX_CANTCREAT,
                "queue": EX_TEMPFAIL}

# Postfix's sendmail accepts these and ignores them (getopt "A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:
# h:imno:p:r:q:tvx"); any other letter is refused with EX_USAGE.
_IGNORED_WITH_VALUE = "ACLOehp"
_IGNORED_FLAGS = "GUcmx"
_HANDLED = "tifrFobBNRVvXqhIn"

EPILOG = ("Exit status (sysexits.h, as Postfix's sendmail): 0 queued, 64 bad option, 65 bad "
          "address or message, 67 unknown local user, 73 queue not writable by this user, "
          "75 temporary failure, 78 bad configuration. The message is on disk when sendmail "
          "exits 0; if no host is running it waits in the incoming queue and is delivered "
          "when the host starts.")


class SendmailError(Exception):
    """Ends the command: one line on stderr, exit status `code`."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


def _fail(code: int, text: str) -> NoReturn:
    raise SendmailError(code, text)


# --- options --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Postfix sendmail's options on `parser` (also used by `mailpool sendmail`)."""
    parser.epilog = parser.epilog or EPILOG
    add = parser.add_argument
    add("-t", dest="extract", action="store_true",
        help="take recipients from the To, Cc and Bcc headers too (Bcc is removed)")
    add("-i", dest="dot_ends", action="store_false", default=True,
        help="a line holding only '.' does not end the input (also -oi)")
    add("-f", "-r", dest="sender", metavar="ADDR",
        help="envelope sender (default: your login @ the first local domain; '<>': none)")
    add("-F", dest="full_name", metavar="NAME", help="your full name, for an added From:")
    add("-o", dest="o_options", action="append", default=[], metavar="OPTION",
        help="-oi as -i; other -o options are ignored")
    add("-b", dest="mode", default="m", metavar="MODE",
        help="-bm read a message (the default), -bs speak SMTP on stdin/stdout")
    add("-B", dest="body_type", metavar="TYPE", help="7BIT or 8BITMIME (checked, else unused)")
    add("-N", dest="dsn_notify", metavar="DSN",
        help="delivery status notices: 'never' or some of 'success,delay,failure'")
    add("-R", dest="dsn_ret", metavar="RET", help="what a notice returns: 'full' or 'hdrs'")
    add("-V", dest="dsn_envid", metavar="ENVID", help="envelope id for notices")
    add("-v", dest="verbose", action="count", default=0,
        help="-vv: say the queue id on stderr (one -v says nothing, as in Postfix)")
    add("-X", dest="x_option", metavar="VALUE", help=argparse.SUPPRESS)
    add("-q", dest="queue_run", nargs="?", const="", help=argparse.SUPPRESS)
    for letter in _IGNORED_WITH_VALUE:
        try:
            add(f"-{letter}", dest="ignored", action="append", help=argparse.SUPPRESS)
        except argparse.ArgumentError:
            pass  # -h under `mailpool`: its help
    for letter in _IGNORED_FLAGS:
        add(f"-{letter}", dest="ignored", action="append_const", const=letter,
            help=argparse.SUPPRESS)
    known = set(_IGNORED_WITH_VALUE + _IGNORED_FLAGS + _HANDLED)
    for letter in string.ascii_letters:
        if letter not in known or letter in "In":
            try:
                add(f"-{letter}", dest="refused", action="append_const", const=letter,
                    help=argparse.SUPPRESS)
            except argparse.ArgumentError:
                pass
    add("recipients", nargs="*", metavar="RECIPIENT",
        help="recipient addresses (a bare name is @ the first local domain)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(EX_USAGE, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sendmail", add_help=False,
                     description="Submit a message to mailpool (Postfix sendmail options).")
    parser.add_argument("--help", action="help", help="show this help and exit")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"configuration file (default $MAILPOOL_CONFIG, else "
                             f"{DEFAULT_CONFIG})")
    add_arguments(parser)
    return parser


def _check_options(args: argparse.Namespace) -> None:
    """Refuse what Postfix refuses and what mailpool does not do; EX_USAGE."""
    for letter in args.refused or ():
        if letter == "I":
            _fail(EX_USAGE, "-I: there are no aliases to rebuild here")
        if letter == "n":
            _fail(EX_USAGE, "-n option not supported")
        _fail(EX_USAGE, f"-{letter}: unknown option")
    if args.queue_run is not None:
        _fail(EX_USAGE, "-q: not done by sendmail here: use `mailpool queue flush`")
    if args.mode not in ("m", "s"):
        hint = " (use `mailpool queue list`)" if args.mode.startswith("p") else ""
        _fail(EX_USAGE, f"unsupported: -b{args.mode}{hint}")
    if args.x_option is not None and args.x_option.startswith("V"):
        _fail(EX_USAGE, "-XV: VERP is not supported")
    if args.body_type is not None and args.body_type not in ("7BIT", "8BITMIME"):
        _fail(EX_USAGE, "-B option needs 8BITMIME or 7BIT")
    if "i" in (o[:1] for o in args.o_options):
        args.dot_ends = False
    if args.mode == "s":
        if args.extract:
            _fail(EX_USAGE, "-t can be used only in delivery mode")
        if args.recipients:
            _fail(EX_USAGE, "stand-alone mode requires no recipient")


def dsn_options(args: argparse.Namespace) -> tuple[str, str, str]:
    """(RET, ENVID, NOTIFY) as the Envelope keeps them, from -R, -V and -N."""
    ret = ""
    if args.dsn_ret is not None:
        ret = args.dsn_ret.upper()
        if ret not in ("FULL", "HDRS"):
            _fail(EX_USAGE, f"-R {args.dsn_ret!r}: expected 'full' or 'hdrs'")
    envid = args.dsn_envid or ""
    if envid and not re.fullmatch(r"[\x21-\x7e]{1,100}", envid):
        _fail(EX_USAGE, f"-V {envid!r}: an envelope id is 1 to 100 printable characters")
    notify = ""
    if args.dsn_notify is not None:
        words = [w.strip().upper() for w in args.dsn_notify.split(",")]
        allowed = {"SUCCESS", "DELAY", "FAILURE"}
        if words != ["NEVER"] and not (words and set(words) <= allowed):
            _fail(EX_USAGE, f"-N {args.dsn_notify!r}: expected 'never' or some of "
                            "'success,delay,failure'")
        notify = ",".join(dict.fromkeys(words))
    return ret, envid, notify


# --- addresses ------------------------------------------------------------------------------


def parse_address_list(text: str) -> list[str]:
    """The addresses of an RFC 5322 address list (a header value, or a command-line argument,
    which Postfix reads the same way): "a@x, Name <b@y>, group: c@z;" -> [a@x, b@y, c@z].
    Display names, comments and group names are dropped; "<>" gives ""; what is left of an
    item is returned as it is, for the caller to check."""
    out: list[str] = []
    plain: list[str] = []
    angle: list[str] | None = None  # inside (or after) "<...>": the address is in there
    in_angle = quoted = literal = False
    comment = 0
    chars = iter(text)

    def flush() -> None:
        nonlocal plain, angle
        if angle is not None:
            addr = "".join(angle).strip()
            if addr.startswith("@") and ":" in addr:  # a source route: ignored
                addr = addr.rsplit(":", 1)[1]
            out.append(addr)
        elif "".join(plain).strip():
            out.append("".join(plain).strip())
        plain, angle = [], None

    for c in chars:
        target = angle if in_angle and angle is not None else plain
        if quoted:
            target.append(c)
            if c == "\\":
                target.append(next(chars, ""))
            quoted = c != '"'
        elif comment:
            if c == "\\":
                next(chars, "")
            comment += 1 if c == "(" else -1 if c == ")" else 0
        elif literal:
            target.append(c)
            literal = c != "]"
        elif c in '"[':
            quoted, literal = c == '"', c == "["
            target.append(c)
        elif c == "(":
            comment = 1
        elif in_angle:
            if c == ">":
                in_angle = False
            else:
                target.append(c)
        elif c == "<":
            angle, in_angle = [], True
        elif c in ",;":
            flush()
        elif c == ":" and angle is None:
            plain = []  # a group's display name
        else:
            plain.append(c)
    flush()
    return out


# --- the message ----------------------------------------------------------------------------


def read_message(stream: BinaryIO, *, dot_ends: bool, limit: int) -> bytes:
    """Standard input up to end of file (or a line holding only "." when `dot_ends`), with
    leading mbox "From " lines dropped as Postfix drops them; EX_DATAERR over `limit`."""
    lines: list[bytes] = []
    size = 0
    leading = True
    while True:
        # Bounded: a line cut short by the bound already makes the message too big, so
        # no piece of a line is ever taken for a whole one.
        line = stream.readline(limit + 2 - size)
        if not line:
            break
        if leading and line.lstrip(b">").startswith(b"From "):
            continue
        leading = False
        if dot_ends and line in (b".\n", b".\r\n", b"."):
            break
        size += len(line)
        if size > limit:
            _fail(EX_DATAERR, f"message exceeds the limit of {limit} bytes "
                              "([smtp] max_message_size)")
        lines.append(line)
    return b"".join(lines)


def full_name_of(uid: int, login: str) -> str:
    """Postfix's fullname(): $NAME, else the first GECOS field ("&" is the login)."""
    name = os.environ.get("NAME", "")
    if name:
        return name
    try:
        gecos = pwd.getpwuid(uid).pw_gecos
    except KeyError:
        return ""
    return gecos.split(",", 1)[0].replace("&", login.capitalize()).strip()


def login_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        _fail(EX_OSERR, f"no login name found for user ID {os.getuid()}")


# --- the command ----------------------------------------------------------------------------


def run(args: argparse.Namespace, loaded: LoadedConfig, *,
        stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """Run with parsed options; the exit status. Errors: one line on stderr."""
    try:
        _check_options(args)
        if args.mode == "s":
            from mailpool.sendmail_bs import SmtpOnStdio

            return SmtpOnStdio(loaded, stdin or sys.stdin.buffer,
                               stdout or sys.stdout.buffer).run()
        return enqueue(args, loaded, stdin or sys.stdin.buffer)
    except SendmailError as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return exc.code


def enqueue(args: argparse.Namespace, loaded: LoadedConfig, stdin: BinaryIO) -> int:
    cfg = loaded.config
    domain = cfg.host.local_domains[0]
    ret, envid, notify = dsn_options(args)
    login = login_name()
    if args.sender is None:
        sender = f"{login}@{domain}"
    else:
        given = parse_address_list(args.sender)
        if len(given) > 1:
            _fail(EX_DATAERR, f"-f {args.sender!r}: more than one address")
        sender = qualify(given[0], domain) if given else ""
    recipients = [qualify(a, domain) for arg in args.recipients
                  for a in parse_address_list(arg)]
    if not recipients and not args.extract:
        _fail(EX_USAGE, "recipient addresses must be given as arguments or with -t")
    try:
        content = read_message(stdin, dot_ends=args.dot_ends,
                               limit=cfg.smtp.max_message_size)
    except OSError as exc:
        _fail(EX_DATAERR, f"error reading input: {exc.strerror or exc}")
    header = split_header(normalize_line_ends(content))
    if args.extract:
        names = ("resent-to", "resent-cc", "resent-bcc")
        if not header.names() & set(names):
            names = ("to", "cc", "bcc")
        recipients += [qualify(a, domain) for value in header.values(*names)
                       for a in parse_address_list(value)]
        if not recipients:
            _fail(EX_DATAERR, "no recipient addresses found in message header")
    _check_recipients(loaded, recipients)
    header = header.without("bcc", "resent-bcc")
    added: list[bytes] = []
    if "from" not in header.names() and sender:
        name = args.full_name if args.full_name is not None else full_name_of(os.getuid(),
                                                                                login)
        added.append(f"From: {email.utils.formataddr((name, sender))}\r\n".encode())
    if "date" not in header.names():
        added.append(f"Date: {email.utils.formatdate(localtime=True)}\r\n".encode())
    try:
        queue_id = submit(loaded, originator=sender, recipients=recipients,
                          content=header.plus(*added).join(), source="sendmail",
                          ret=ret, envid=envid, notify=notify)
    except SubmitError as exc:
        _fail(_SUBMIT_EXIT[exc.reason], exc.text)
    if args.verbose >= 2:
        print(f"sendmail: queued as {queue_id}", file=sys.stderr)
    return EX_OK


def _check_recipients(loaded: LoadedConfig, recipients: list[str]) -> None:
    from mailpool.directory import DirectoryError, open_directory

    for rcpt in recipients:
        try:
            check_address(rcpt, "recipient")
        except SubmitError as exc:
            _fail(EX_DATAERR, exc.text)
    local = {d.lower().rstrip(".") for d in loaded.config.host.local_domains}
    try:
        directory = open_directory(loaded)
    except DirectoryError as exc:
        _fail(EX_TEMPFAIL, f"cannot read the directory: {exc}")
    try:
        for rcpt in recipients:
            try:
                unknown = is_unknown_local(rcpt, local, directory)
            except (DirectoryError, OSError) as exc:
                _fail(EX_TEMPFAIL, f"cannot read the directory: {exc}")
            if unknown:
                _fail(EX_NOUSER, f"<{rcpt}>: User unknown in local recipient table")
    finally:
        directory.close()


# --- -bs: SMTP on standard input and output ---------------------------------------------------

# The line that ends DATA, at the start of a chunk or after a line end.
def main(argv: list[str] | None = None) -> int:
    """The `sendmail` console script."""
    try:
        args = build_parser().parse_args(argv)
    except SendmailError as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return exc.code
    path = args.config or os.environ.get("MAILPOOL_CONFIG") or DEFAULT_CONFIG
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return EX_CONFIG
    try:
        return run(args, loaded)
    except KeyboardInterrupt:
        return EX_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main())
