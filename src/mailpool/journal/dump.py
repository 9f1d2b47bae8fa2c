"""`mailpool journal dump` (the DSPJRN of the source): the command (options and
record filters: options.py; record output formats: output.py).

-n N shows the newest N records (oldest first, like tail), --head N the oldest
N. Message selectors (selection.py) pick whole messages, learnt in a first pass
over the receivers; --summary (summary.py) prints one line per message instead
of its records.

`--journal DIR` (repeatable) reads several hosts' journals as one stream merged
by time (merge.py). A message is a queue id on one host: each host's message
selector learns from its own journal, and --summary keys messages by host and
queue id. Seqs are per journal, so --from-seq takes one journal.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections import deque
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import TextIO, TypeVar

from mailpool.journal.format import Record
from mailpool.journal.merge import (
    HostRecord,
    JournalSource,
    SourceError,
    SourceFailed,
    derived_label,
    follow_merged,
    host_records,
    journal_sources,
    merged_records,
    source_problem,
)
from mailpool.journal.options import DumpOptions, UsageError, add_dump_arguments
from mailpool.journal.output import CSV_COLUMNS, RecordOutput, record_dict
from mailpool.journal.reader import verify_report
from mailpool.journal.selection import queue_id_of
from mailpool.journal.summary import SUMMARY_STANDALONE, MessageSummary, SummaryOutput

__all__ = ["CSV_COLUMNS", "DumpOptions", "UsageError", "add_dump_arguments", "record_dict",
           "run_dump", "select", "select_merged"]  # fmt: skip

PROG = "mailpool journal dump"
FOLLOW_LOOKBACK = 10_000  # records held back per journal per --follow with a message selector
T = TypeVar("T")


# --- the command ----------------------------------------------------------


def _error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _source(
    opts: DumpOptions, sources: list[JournalSource], stop: threading.Event | None
) -> Iterator[HostRecord | None]:
    """The records from --from-seq on, merged by time; following, None marks where the
    live ones begin (each journal then followed from after its last record read)."""
    last: dict[str, int] = {}
    yield from merged_records(sources, from_seq=opts.from_seq, last_seq=last)
    if opts.follow:
        yield None
        start = {s.label: last[s.label] + 1 if s.label in last else opts.from_seq
                 for s in sources}  # fmt: skip
        yield from follow_merged(sources, opts.poll_interval, start=start, stop=stop)


class _HostSelection:
    """One journal's message selection: its selector and, following, the records
    held back until it is known whether their message is selected."""

    def __init__(self, opts: DumpOptions) -> None:
        self.opts = opts
        self.messages = opts.message_selector()
        # Following, a new message's first entries (94, then 91 with the sender)
        # come before the record that selects it: hold recent queue-id records back
        # until we know whether they belong to a selected message.
        self.held: deque[Record] | None = None
        if opts.follow and self.messages.active:
            self.held = deque(maxlen=FOLLOW_LOOKBACK)

    def take(self, rec: Record) -> list[Record]:
        """The records `rec` lets through: itself, and held ones it selects."""
        batch: list[Record] = []
        new_qids = self.messages.learn(rec)
        held = self.held
        if new_qids and held:
            batch = [r for r in held if r.fields.get("queue_id") in new_qids]
            if batch:
                taken = {r.seq for r in batch}
                self.held = deque((r for r in held if r.seq not in taken), maxlen=FOLLOW_LOOKBACK)
        if self.opts.matches_except_message(rec):
            if self.messages.matches(rec):
                batch.append(rec)
            elif self.held is not None and queue_id_of(rec) is not None:
                self.held.append(rec)
        return batch


def select_merged(
    opts: DumpOptions, sources: list[JournalSource], stop: threading.Event | None = None
) -> Iterator[HostRecord | None]:
    """The records the options select from every journal, merged by time (no -n/--head).

    With --follow, None is yielded once, between the records that existed and
    the ones that arrived since; queue ids are also learned as records arrive.
    """
    hosts = {s.label: _HostSelection(opts) for s in sources}
    if opts.messages.active:
        for source in sources:  # first pass, journal by journal: each host's queue ids
            learn = hosts[source.label].messages.learn
            for item in host_records(source):
                learn(item.rec)
    for item in _source(opts, sources, stop):
        if item is None:
            yield None
            continue
        for rec in hosts[item.host].take(item.rec):
            yield HostRecord(item.host, rec)


def select(
    opts: DumpOptions, journal_dir: Path, stop: threading.Event | None = None
) -> Iterator[Record | None]:
    """select_merged over one journal, as bare records (None as there)."""
    source = JournalSource(derived_label(Path(journal_dir)), Path(journal_dir))
    for item in select_merged(opts, [source], stop):
        yield None if item is None else item.rec


def limit_records(opts: DumpOptions, items: Iterator[T | None]) -> Iterator[T]:
    """Apply --head N (the oldest N) or -n N (the newest N, then what arrives live)."""
    if opts.head is not None:
        yield from islice((r for r in items if r is not None), opts.head)
        return
    if opts.limit is None:
        yield from (r for r in items if r is not None)
        return
    if opts.limit == 0 and not opts.follow:
        return
    newest: deque[T] = deque(maxlen=opts.limit)  # bounded: only N are kept
    for item in items:
        if item is None:
            break  # the live records follow: show the newest so far, then them
        newest.append(item)
    yield from newest
    yield from (r for r in items if r is not None)


def summarize(opts: DumpOptions, sources: list[JournalSource]) -> list[MessageSummary]:
    """The selected messages condensed, ordered by their first record (merged by time).

    A message is a queue id on one host. Here the filters choose messages: a
    message is shown when it passes the selectors and any of its records passes
    the record filters; its line is built from all of its records.
    """
    selectors = {s.label: opts.message_selector() for s in sources}
    wanted: dict[str, set[str]] | None = None
    if opts.messages.active or opts.filters_records:
        # First pass, journal by journal: the messages the selectors pick and that
        # have a record passing the record filters; only their queue ids are kept.
        wanted = {}
        for source in sources:
            messages = selectors[source.label]
            touched: set[str] = set()
            for _, rec in host_records(source):
                messages.learn(rec)
                qid = queue_id_of(rec)
                if qid is not None and opts.matches_except_message(rec):
                    touched.add(qid)
            wanted[source.label] = touched & messages.selected if messages.active else touched
    # host and queue id, or host and seq of a standalone record
    found: dict[tuple[str, str | int], MessageSummary] = {}
    for host, rec in merged_records(sources):
        qid = queue_id_of(rec)
        key: tuple[str, str | int]
        if qid is not None:
            if wanted is not None and qid not in wanted[host]:
                continue
            key = (host, qid)
        elif (
            rec.code in SUMMARY_STANDALONE
            and opts.matches_except_message(rec)
            and selectors[host].matches(rec)
        ):
            key = (host, rec.seq)
        else:
            continue
        if key not in found:
            found[key] = MessageSummary(qid, rec.time_ns, host=host)
        found[key].add(rec)
    summaries = list(found.values())
    if opts.head is not None:
        return summaries[: opts.head]
    if opts.limit is not None:
        return summaries[max(0, len(summaries) - opts.limit) :]
    return summaries


def run_verify(sources: list[JournalSource], out: TextIO) -> int:
    """Verify each journal in turn; with several, each line starts with its host label."""
    status = 0
    for source in sources:
        prefix = f"{source.label}: " if len(sources) > 1 else ""
        try:
            report = verify_report(source.path)
        except OSError as exc:
            raise SourceFailed(source, exc) from exc
        for problem in report.problems:
            out.write(f"{prefix}{problem}\n")
        if report.problems:
            status = 1
            continue
        span = (
            f", seq {report.first_seq}..{report.last_seq}" if report.first_seq is not None else ""
        )
        out.write(f"{prefix}OK: {report.records} records in {report.receivers} receivers{span}\n")
    return status


def run_dump(
    args: argparse.Namespace,
    journal_dir: Path,
    out: TextIO,
    *,
    stop: threading.Event | None = None,
    host: str | None = None,
) -> int:
    """Run the dump; returns the exit status. `journal_dir` (labelled `host`, when
    given) is read when no --journal is; `stop` ends --follow (tests, embedding)."""
    try:
        opts = DumpOptions.from_args(args)
        sources = journal_sources(opts.journals, Path(journal_dir), host)
    except UsageError as exc:
        _error(str(exc))
        return 2
    except SourceError as exc:
        _error(f"--journal: {exc}")
        return 2
    if len(sources) > 1 and opts.from_seq is not None:
        _error("--from-seq: sequence numbers are per journal; use it with one --journal")
        return 2
    for source in sources:
        problem = source_problem(source)
        if problem is not None:
            _error(problem)
            return 1
    hosts = [s.label for s in sources]
    try:
        if opts.verify:
            return run_verify(sources, out)
        if opts.summary:
            lines = SummaryOutput(opts.format, out, hosts)
            for summary in summarize(opts, sources):
                lines.emit(summary)
            return 0
        output = RecordOutput(opts.format, out, flush=opts.follow, hosts=hosts)
        for item in limit_records(opts, select_merged(opts, sources, stop)):
            output.emit(item.host, item.rec)
    except KeyboardInterrupt:
        return 130 if not opts.follow else 0
    except BrokenPipeError:
        return 0  # the reader (e.g. head) has gone: not an error
    except SourceFailed as exc:
        _error(str(exc))
        return 1
    except OSError as exc:
        _error(f"cannot read journal: {exc}")
        return 1
    return 0
