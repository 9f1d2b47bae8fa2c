"""`mailpool journal dump` (the DSPJRN of the source): options, record filters,
record output formats (text, JSON, CSV) and the command.

Filters combine with AND; --since is inclusive and --until exclusive, so
consecutive windows never show a record twice. -n N shows the newest N records
(oldest first, like tail), --head N the oldest N. Message selectors
(selection.py) pick whole messages, learnt in a first pass over the receivers;
--summary (summary.py) prints one line per message instead of its records.
"""

from __future__ import annotations

import argparse
import csv
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

import msgspec

from mailpool.journal.codes import CODES, explain
from mailpool.journal.format import Record, datetime_to_ns, iso_time
from mailpool.journal.reader import follow, iter_records, verify_report
from mailpool.journal.selection import (
    AddressPattern,
    MessageSelector,
    normalise_message_id,
    parse_address_pattern,
    queue_id_of,
)
from mailpool.journal.summary import (
    SUMMARY_STANDALONE,
    MessageSummary,
    SummaryOutput,
    text_value,
)

PROG = "mailpool journal dump"
MAIN_FIELDS = ("queue_id", "message_id", "originator", "recipient", "size", "ip", "detail")
FOLLOW_LOOKBACK = 10_000  # records held back per --follow with a message selector
CSV_COLUMNS = ("seq", "time", "type", "code", "job", *MAIN_FIELDS, "explanation")


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
        "--from-seq", type=_arg_type(_count), metavar="N", help="start at sequence number N"
    )
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
        "--follow", action="store_true", help="keep running and show records as they arrive"
    )
    parser.add_argument(
        "--poll-interval", type=float, default=0.5, metavar="SECONDS", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--verify", action="store_true",
        help="check integrity: print every corrupt range and missing sequence range; "
        "exit 1 if any",
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
    messages: MessageSelector = field(init=False, default_factory=MessageSelector)

    def __post_init__(self) -> None:
        self.messages = MessageSelector(self.message_id, self.sender, self.recipient)

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


def _time_ns(value: Any, option: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = _checked(parse_time, value, option)
    return datetime_to_ns(value)


# --- output ---------------------------------------------------------------


def format_text(rec: Record) -> str:
    payload = " ".join(f"{k}={text_value(v)}" for k, v in rec.fields.items())
    head = f"{rec.seq:>7} {iso_time(rec.time_ns)} {rec.type} {rec.code} {rec.job}"
    line = f"{head}  {explain(rec.code)}"
    return f"{line}: {payload}" if payload else line


def record_dict(rec: Record) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "seq": rec.seq,
        "time": iso_time(rec.time_ns),
        "type": rec.type,
        "code": rec.code,
        "job": rec.job,
    }
    for key, value in rec.fields.items():
        obj.setdefault(key, value)  # the header wins over a clashing payload name
    obj.setdefault("explanation", explain(rec.code))
    return obj


def format_json(rec: Record) -> str:
    return msgspec.json.encode(record_dict(rec)).decode()


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return text_value(value)


def csv_row(rec: Record) -> list[str]:
    """The fixed columns; payload fields without a column are appended to
    `detail` as key=value so nothing is lost."""
    f = rec.fields
    extra = " ".join(f"{k}={text_value(v)}" for k, v in f.items() if k not in MAIN_FIELDS)
    detail = " ".join(s for s in (_csv_value(f.get("detail")), extra) if s)
    row = [str(rec.seq), iso_time(rec.time_ns), rec.type, rec.code, rec.job]
    row += [_csv_value(f.get(k)) for k in MAIN_FIELDS[:-1]]
    row += [detail, explain(rec.code)]
    return row


class _Output:
    def __init__(self, fmt: str, out: TextIO, flush: bool) -> None:
        self.fmt, self.out, self.flush = fmt, out, flush
        self.csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self.csv is not None:
            self.csv.writerow(CSV_COLUMNS)

    def emit(self, rec: Record) -> None:
        if self.csv is not None:
            self.csv.writerow(csv_row(rec))
        elif self.fmt == "json":
            self.out.write(format_json(rec) + "\n")
        else:
            self.out.write(format_text(rec) + "\n")
        if self.flush:
            self.out.flush()


# --- the command ----------------------------------------------------------


def _error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _source(
    opts: DumpOptions, journal_dir: Path, stop: threading.Event | None
) -> Iterator[Record | None]:
    """The records from --from-seq on; following, None marks where the live ones begin."""
    last: int | None = None
    for rec in iter_records(journal_dir, from_seq=opts.from_seq):
        last = rec.seq
        yield rec
    if opts.follow:
        yield None
        start = opts.from_seq if last is None else last + 1
        yield from follow(journal_dir, opts.poll_interval, from_seq=start, stop=stop)


def select(
    opts: DumpOptions, journal_dir: Path, stop: threading.Event | None = None
) -> Iterator[Record | None]:
    """The records the options select, in journal order (no -n/--head limit).

    With --follow, None is yielded once, between the records that existed and
    the ones that arrived since; queue ids are also learned as records arrive.
    """
    messages = opts.messages
    if messages.active:
        for rec in iter_records(journal_dir):  # first pass: the selected queue ids
            messages.learn(rec)
    # Following, a new message's first entries (94, then 91 with the sender)
    # come before the record that selects it: hold recent queue-id records back
    # until we know whether they belong to a selected message.
    held: deque[Record] | None = None
    if opts.follow and messages.active:
        held = deque(maxlen=FOLLOW_LOOKBACK)
    for rec in _source(opts, journal_dir, stop):
        if rec is None:
            yield None
            continue
        batch: list[Record] = []
        new_qids = messages.learn(rec)
        if new_qids and held:
            batch = [r for r in held if r.fields.get("queue_id") in new_qids]
            if batch:
                taken = {r.seq for r in batch}
                held = deque((r for r in held if r.seq not in taken), maxlen=FOLLOW_LOOKBACK)
        if opts.matches_except_message(rec):
            if messages.matches(rec):
                batch.append(rec)
            elif held is not None and queue_id_of(rec) is not None:
                held.append(rec)
        yield from batch


def limit_records(opts: DumpOptions, items: Iterator[Record | None]) -> Iterator[Record]:
    """Apply --head N (the oldest N) or -n N (the newest N, then what arrives live)."""
    if opts.head is not None:
        yield from islice((r for r in items if r is not None), opts.head)
        return
    if opts.limit is None:
        yield from (r for r in items if r is not None)
        return
    if opts.limit == 0 and not opts.follow:
        return
    newest: deque[Record] = deque(maxlen=opts.limit)  # bounded: only N are kept
    for item in items:
        if item is None:
            break  # the live records follow: show the newest so far, then them
        newest.append(item)
    yield from newest
    yield from (r for r in items if r is not None)


def summarize(opts: DumpOptions, journal_dir: Path) -> list[MessageSummary]:
    """The selected messages condensed, ordered by their first record.

    Here the filters choose messages: a message is shown when it passes the
    selectors and any of its records passes the record filters; its line is
    built from all of its records.
    """
    messages = opts.messages
    wanted: set[str] | None = None
    if messages.active or opts.filters_records:
        # First pass: the messages the selectors pick and that have a record passing
        # the record filters; only their queue ids are kept.
        touched: set[str] = set()
        for rec in iter_records(journal_dir):
            messages.learn(rec)
            qid = queue_id_of(rec)
            if qid is not None and opts.matches_except_message(rec):
                touched.add(qid)
        wanted = touched & messages.selected if messages.active else touched
    found: dict[str | int, MessageSummary] = {}  # queue id, or seq of a standalone record
    for rec in iter_records(journal_dir):
        qid = queue_id_of(rec)
        if qid is not None:
            if wanted is None or qid in wanted:
                if qid not in found:
                    found[qid] = MessageSummary(qid, rec.time_ns)
                found[qid].add(rec)
        elif rec.code in SUMMARY_STANDALONE and opts.matches(rec):
            found[rec.seq] = MessageSummary(None, rec.time_ns)
            found[rec.seq].add(rec)
    summaries = list(found.values())
    if opts.head is not None:
        return summaries[: opts.head]
    if opts.limit is not None:
        return summaries[max(0, len(summaries) - opts.limit) :]
    return summaries


def run_verify(journal_dir: Path, out: TextIO) -> int:
    report = verify_report(journal_dir)
    for problem in report.problems:
        out.write(f"{problem}\n")
    if report.problems:
        return 1
    span = f", seq {report.first_seq}..{report.last_seq}" if report.first_seq is not None else ""
    out.write(f"OK: {report.records} records in {report.receivers} receivers{span}\n")
    return 0


def run_dump(
    args: argparse.Namespace,
    journal_dir: Path,
    out: TextIO,
    *,
    stop: threading.Event | None = None,
) -> int:
    """Run the dump; returns the exit status. `stop` ends --follow (tests, embedding)."""
    try:
        opts = DumpOptions.from_args(args)
    except UsageError as exc:
        _error(str(exc))
        return 2
    journal_dir = Path(journal_dir)
    if not journal_dir.exists():
        _error(f"journal directory {journal_dir} does not exist")
        return 1
    if not journal_dir.is_dir():
        _error(f"journal directory {journal_dir} is not a directory")
        return 1
    try:
        if opts.verify:
            return run_verify(journal_dir, out)
        if opts.summary:
            lines = SummaryOutput(opts.format, out)
            for summary in summarize(opts, journal_dir):
                lines.emit(summary)
            return 0
        output = _Output(opts.format, out, flush=opts.follow)
        for rec in limit_records(opts, select(opts, journal_dir, stop)):
            output.emit(rec)
    except KeyboardInterrupt:
        return 130 if not opts.follow else 0
    except BrokenPipeError:
        return 0  # the reader (e.g. head) has gone: not an error
    except OSError as exc:
        _error(f"cannot read journal {journal_dir}: {exc}")
        return 1
    return 0
