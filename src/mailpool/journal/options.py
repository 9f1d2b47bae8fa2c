"""`mailpool journal dump` options: parsing, checking, and the record filters.

Filters combine with AND; --since is inclusive and --until exclusive, so
consecutive windows never show a record twice. --journal values are parsed
here and resolved into journals (with their host labels) by merge.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from mailpool.journal.codes import CODES
from mailpool.journal.format import Record, datetime_to_ns
from mailpool.journal.merge import SourceError, parse_journal_arg
from mailpool.journal.selection import (
    AddressPattern,
    MessageSelector,
    normalise_message_id,
    parse_address_pattern,
)


class UsageError(Exception):
    """A bad option value: reported in one line, never as a traceback."""


# --- option parsing -------------------------------------------------------


def parse_time(value: str) -> datetime:
    """ISO 8601 (a date alone means midnight); naive means UTC."""
    text = value.strip()
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {value!r}") from None


def parse_codes(value: str) -> list[str]:
    codes = [c.strip().upper() for c in value.split(",") if c.strip()]
    if not codes:
        raise ValueError(f"no code in {value!r}")
    unknown = [c for c in codes if c not in CODES]
    if unknown:
        raise ValueError(f"unknown journal code(s): {', '.join(unknown)}")
    return codes


def _arg_type(func: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(value: str) -> Any:
        try:
            return func(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = func.__name__
    return convert


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"not a number: {value!r}") from None
    if n < 0:
        raise ValueError(f"must not be negative: {value!r}")
    return n


def add_dump_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--journal", action="append", type=_arg_type(parse_journal_arg), metavar="[LABEL=]DIR",
        help="read this journal directory (repeatable: several hosts' journals merged by "
        "time); LABEL names its host in the output (default: the directory's name, or its "
        "parent's for a <data>/journal); without it, this host's journal",
    )  # fmt: skip
    parser.add_argument(
        "--code",
        action="extend",
        type=_arg_type(parse_codes),
        metavar="CODES",
        help="only these codes, comma separated (e.g. 94,9V); repeatable",
    )
    parser.add_argument(
        "--since", type=_arg_type(parse_time), metavar="TIME",
        help="records at or after TIME (ISO 8601; naive means UTC)",
    )  # fmt: skip
    parser.add_argument(
        "--until", type=_arg_type(parse_time), metavar="TIME",
        help="records before TIME (ISO 8601; naive means UTC)",
    )  # fmt: skip
    parser.add_argument(
        "--message-id", metavar="ID",
        help="every record of this message (angle brackets optional), "
        "including records that carry only its queue id",
    )  # fmt: skip
    parser.add_argument(
        "--sender", type=_arg_type(parse_address_pattern), metavar="ADDR",
        help="every record of the messages from ADDR (case-insensitive; * is a wildcard, "
        "e.g. '*@example.test'; <> is the null sender) and of their notices",
    )  # fmt: skip
    parser.add_argument(
        "--recipient", type=_arg_type(parse_address_pattern), metavar="ADDR",
        help="every record of the messages with a recipient matching ADDR (as --sender) "
        "and of their notices",
    )  # fmt: skip
    parser.add_argument("--queue-id", metavar="ID", help="records of this queue id")
    parser.add_argument(
        "--job", metavar="JOB",
        help="records reported by this job (e.g. smtp-server/3), or by any job of a pool "
        "(e.g. smtp-server)",
    )  # fmt: skip
    parser.add_argument(
        "--from-seq", type=_arg_type(_count), metavar="N",
        help="start at sequence number N (seqs are per journal: one journal only)",
    )  # fmt: skip
    parser.add_argument(
        "-n", dest="limit", type=_arg_type(_count), metavar="N",
        help="the newest N records (shown oldest first); with --follow, those and then "
        "new ones as they arrive",
    )  # fmt: skip
    parser.add_argument(
        "--head", type=_arg_type(_count), metavar="N",
        help="the oldest N records; with --follow, stop once N are shown",
    )  # fmt: skip
    parser.add_argument(
        "--summary", action="store_true",
        help="one line per message: time of its first record, queue id, sender, recipients, "
        "size, final state; the filters choose messages (any record passing them selects "
        "its message)",
    )  # fmt: skip
    parser.add_argument(
        "--format", choices=("text", "json", "csv"), default="text",
        help="output format (default text; json is one object per line)",
    )  # fmt: skip
    parser.add_argument(
        "--follow", action="store_true",
        help="keep running and show records as they arrive (from every journal read)",
    )  # fmt: skip
    parser.add_argument(
        "--poll-interval", type=float, default=0.5, metavar="SECONDS", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--verify", action="store_true",
        help="check integrity, journal by journal: print every corrupt range and missing "
        "sequence range; exit 1 if any",
    )  # fmt: skip


@dataclass(slots=True)
class DumpOptions:
    codes: frozenset[str] | None = None
    since_ns: int | None = None
    until_ns: int | None = None
    message_id: str | None = None
    queue_id: str | None = None
    job: str | None = None
    from_seq: int | None = None
    limit: int | None = None  # -n: the newest N
    head: int | None = None  # --head: the oldest N
    sender: AddressPattern | None = None
    recipient: AddressPattern | None = None
    summary: bool = False
    format: str = "text"
    follow: bool = False
    poll_interval: float = 0.5
    verify: bool = False
    journals: list[tuple[str | None, Path]] = field(default_factory=list)  # --journal
    messages: MessageSelector = field(init=False, default_factory=MessageSelector)

    def __post_init__(self) -> None:
        self.messages = self.message_selector()

    def message_selector(self) -> MessageSelector:
        """A fresh selector of the messages wanted (one per journal: queue ids are per host)."""
        return MessageSelector(self.message_id, self.sender, self.recipient)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DumpOptions:
        """Accept parsed values or raw strings (a Namespace built by hand)."""

        def get(name: str, default: Any = None) -> Any:
            return getattr(args, name, default)

        raw_codes = get("code") or []
        codes: list[str] = []
        for value in [raw_codes] if isinstance(raw_codes, str) else raw_codes:
            codes.extend(_checked(parse_codes, value, "--code"))
        opts = cls(
            codes=frozenset(c.upper() for c in codes) or None,
            since_ns=_time_ns(get("since"), "--since"),
            until_ns=_time_ns(get("until"), "--until"),
            message_id=normalise_message_id(get("message_id")) if get("message_id") else None,
            queue_id=get("queue_id") or None,
            job=get("job") or None,
            from_seq=_checked(_count, get("from_seq"), "--from-seq"),
            limit=_checked(_count, get("limit"), "-n"),
            head=_checked(_count, get("head"), "--head"),
            sender=_checked(parse_address_pattern, get("sender"), "--sender"),
            recipient=_checked(parse_address_pattern, get("recipient"), "--recipient"),
            summary=bool(get("summary")),
            format=get("format") or "text",
            follow=bool(get("follow")),
            poll_interval=float(get("poll_interval") or 0.5),
            verify=bool(get("verify")),
            journals=_journal_values(get("journal")),
        )
        if opts.format not in ("text", "json", "csv"):
            raise UsageError(f"--format: expected text, json or csv, got {opts.format!r}")
        if opts.poll_interval <= 0:
            raise UsageError(f"--poll-interval: must be positive, got {opts.poll_interval}")
        if opts.limit is not None and opts.head is not None:
            raise UsageError("-n (the newest N) and --head (the oldest N) exclude each other")
        if opts.summary and opts.follow:
            raise UsageError("--summary cannot follow: a message's line changes as it moves")
        return opts

    @property
    def filters_records(self) -> bool:
        """Some record filter is given (message selectors aside)."""
        return any(
            v is not None
            for v in (self.from_seq, self.codes, self.since_ns, self.until_ns, self.job,
                      self.queue_id)
        )  # fmt: skip

    def matches(self, rec: Record) -> bool:
        return self.matches_except_message(rec) and self.messages.matches(rec)

    def matches_except_message(self, rec: Record) -> bool:
        if self.from_seq is not None and rec.seq < self.from_seq:
            return False
        if self.codes is not None and rec.code not in self.codes:
            return False
        if self.since_ns is not None and rec.time_ns < self.since_ns:
            return False
        if self.until_ns is not None and rec.time_ns >= self.until_ns:
            return False
        if self.job is not None and rec.job != self.job and not rec.job.startswith(self.job + "/"):
            return False
        return self.queue_id is None or rec.fields.get("queue_id") == self.queue_id


def _checked(func: Callable[[str], Any], value: Any, option: str) -> Any:
    if value is None or not isinstance(value, str):
        return value
    try:
        return func(value)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _journal_values(value: Any) -> list[tuple[str | None, Path]]:
    """--journal values: parsed pairs, or raw strings (a Namespace built by hand)."""
    values = [] if value is None else [value] if isinstance(value, str | Path) else value
    parsed = []
    for item in values:
        if isinstance(item, tuple):
            parsed.append(item)
        else:
            try:
                parsed.append(parse_journal_arg(str(item)))
            except SourceError as exc:
                raise UsageError(f"--journal: {exc}") from None
    return parsed


def _time_ns(value: Any, option: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = _checked(parse_time, value, option)
    return datetime_to_ns(value)
