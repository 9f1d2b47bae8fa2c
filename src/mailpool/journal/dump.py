"""`mailpool journal dump`: the DSPJRN of the source.

Filters combine with AND. --since is inclusive and --until exclusive, so
consecutive windows never show a record twice. --message-id selects every
record of the message through all components: records carrying that
Message-ID and every record carrying one of the queue ids those records name
(two passes over the receivers; with --follow, ids are also learned as
records arrive, and recent queue-id-only records are held back until it is
known whether they belong to the message).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import msgspec

from mailpool.journal.codes import CODES, explain
from mailpool.journal.format import Record, datetime_to_ns, iso_time
from mailpool.journal.reader import follow, iter_records, verify_report

PROG = "mailpool journal dump"
MAIN_FIELDS = ("queue_id", "message_id", "originator", "recipient", "size", "ip", "detail")
FOLLOW_LOOKBACK = 10_000  # records held back per --follow --message-id
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
        "-n", dest="limit", type=_arg_type(_count), metavar="N", help="at most N records"
    )
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


def normalise_message_id(value: str) -> str:
    bare = value.strip()
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1].strip()
    return bare


@dataclass(slots=True)
class DumpOptions:
    codes: frozenset[str] | None = None
    since_ns: int | None = None
    until_ns: int | None = None
    message_id: str | None = None
    queue_id: str | None = None
    job: str | None = None
    from_seq: int | None = None
    limit: int | None = None
    format: str = "text"
    follow: bool = False
    poll_interval: float = 0.5
    verify: bool = False
    queue_ids: set[str] = field(default_factory=set)  # learned for --message-id

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
            format=get("format") or "text",
            follow=bool(get("follow")),
            poll_interval=float(get("poll_interval") or 0.5),
            verify=bool(get("verify")),
        )
        if opts.format not in ("text", "json", "csv"):
            raise UsageError(f"--format: expected text, json or csv, got {opts.format!r}")
        if opts.poll_interval <= 0:
            raise UsageError(f"--poll-interval: must be positive, got {opts.poll_interval}")
        return opts

    def matches(self, rec: Record) -> bool:
        return self.matches_except_message(rec) and self.matches_message(rec)

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

    def matches_message(self, rec: Record) -> bool:
        if self.message_id is None:
            return True
        qid = rec.fields.get("queue_id")
        return self.carries_message_id(rec) or (isinstance(qid, str) and qid in self.queue_ids)

    def carries_message_id(self, rec: Record) -> bool:
        mid = rec.fields.get("message_id")
        return isinstance(mid, str) and normalise_message_id(mid) == self.message_id

    def learn(self, rec: Record) -> str | None:
        """Remember the queue ids of the selected message; returns a new one."""
        if self.message_id is not None and self.carries_message_id(rec):
            qid = rec.fields.get("queue_id")
            if isinstance(qid, str) and qid not in self.queue_ids:
                self.queue_ids.add(qid)
                return qid
        return None


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


def _text_value(value: Any) -> str:
    if isinstance(value, str):
        if value and not any(c.isspace() or c in '"=' for c in value) and value.isprintable():
            return value
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool | int | float) or value is None:
        return json.dumps(value)
    return msgspec.json.encode(value).decode()


def format_text(rec: Record) -> str:
    payload = " ".join(f"{k}={_text_value(v)}" for k, v in rec.fields.items())
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
    return _text_value(value)


def csv_row(rec: Record) -> list[str]:
    """The fixed columns; payload fields without a column are appended to
    `detail` as key=value so nothing is lost."""
    f = rec.fields
    extra = " ".join(f"{k}={_text_value(v)}" for k, v in f.items() if k not in MAIN_FIELDS)
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


def select(
    opts: DumpOptions, journal_dir: Path, stop: threading.Event | None = None
) -> Iterator[Record]:
    """The records the options select, in journal order."""
    if opts.limit == 0:
        return
    if opts.message_id is not None:
        for rec in iter_records(journal_dir):  # first pass: the message's queue ids
            opts.learn(rec)
    source: Iterable[Record]
    if opts.follow:
        source = follow(journal_dir, opts.poll_interval, from_seq=opts.from_seq, stop=stop)
    else:
        source = iter_records(journal_dir, from_seq=opts.from_seq)
    # Following a message live, its first entries (94 91 92 9T) carry only the
    # queue id and precede the 99 that names the Message-ID: hold recent
    # queue-id records back until we know whether they belong to it.
    held: deque[Record] | None = None
    if opts.follow and opts.message_id is not None:
        held = deque(maxlen=FOLLOW_LOOKBACK)
    count = 0
    for rec in source:
        batch: list[Record] = []
        new_qid = opts.learn(rec)
        if new_qid is not None and held:
            batch = [r for r in held if r.fields.get("queue_id") == new_qid]
            if batch:
                taken = {r.seq for r in batch}
                held = deque((r for r in held if r.seq not in taken), maxlen=FOLLOW_LOOKBACK)
        if opts.matches_except_message(rec):
            if opts.matches_message(rec):
                batch.append(rec)
            elif held is not None and isinstance(rec.fields.get("queue_id"), str):
                held.append(rec)
        for selected in batch:
            yield selected
            count += 1
            if opts.limit is not None and count >= opts.limit:
                return


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
        output = _Output(opts.format, out, flush=opts.follow)
        for rec in select(opts, journal_dir, stop):
            output.emit(rec)
    except KeyboardInterrupt:
        return 130 if not opts.follow else 0
    except BrokenPipeError:
        return 0  # the reader (e.g. head) has gone: not an error
    except OSError as exc:
        _error(f"cannot read journal {journal_dir}: {exc}")
        return 1
    return 0
