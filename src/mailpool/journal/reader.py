"""Reading receivers: record iteration, integrity verification, live follow."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from mailpool.journal.format import (
    INCOMPLETE,
    MAGIC,
    Corrupt,
    Record,
    decode_record,
    list_receivers,
    receiver_name,
)

CHUNK = 4 << 20  # read granularity; any record fits in CHUNK + one more read


@dataclass(frozen=True, slots=True)
class Good:
    """A valid record found at [start, end) of its receiver."""

    record: Record
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Bad:
    """Bytes [start, end) of a receiver that hold no valid record."""

    start: int
    end: int
    reason: str


def scan(f: BinaryIO, start: int = 0, *, final: bool = True) -> Generator[Good | Bad, None, int]:
    """Walk the records of an open receiver from byte `start`.

    Yields Good records and Bad ranges, resynchronising after corruption on
    the next MAGIC whose frame is valid. With final=True everything up to EOF
    is accounted for (an incomplete record at EOF is a Bad torn tail). With
    final=False (a live receiver) the scan stops before an incomplete or
    corrupt tail that may still be being written. Returns the offset at which
    a later scan should resume.
    """
    f.seek(start)
    buf = b""
    base = start  # file offset of buf[0]
    pos = 0
    eof = False
    bad_start: int | None = None
    bad_reason = ""

    def read_more() -> None:
        nonlocal buf, base, pos, eof
        more = f.read(CHUNK)
        if not more:
            eof = True
        buf = buf[pos:] + more
        base += pos
        pos = 0

    while True:
        if pos >= len(buf):
            if eof:
                break
            read_more()
            continue
        res = decode_record(buf, pos)
        if isinstance(res, tuple):
            rec, nxt = res
            if bad_start is not None:
                yield Bad(bad_start, base + pos, bad_reason)
                bad_start = None
            yield Good(rec, base + pos, base + nxt)
            pos = nxt
            continue
        if res is INCOMPLETE and not eof:
            read_more()
            continue
        if res is INCOMPLETE and not final and bad_start is None:
            return base + pos  # a record still being appended
        if bad_start is None:
            bad_start = base + pos
            bad_reason = (
                res.reason if isinstance(res, Corrupt) else "incomplete record (torn write)"
            )
        nxt_magic = buf.find(MAGIC, pos + 1)
        if nxt_magic >= 0:
            pos = nxt_magic
        elif eof:
            pos = len(buf)
        else:
            pos = max(pos + 1, len(buf) - (len(MAGIC) - 1))  # MAGIC may straddle reads
    if bad_start is not None:
        if not final:
            return bad_start  # maybe garbage, maybe a write in progress: look again later
        yield Bad(bad_start, base + len(buf), bad_reason)
    return base + len(buf)


def scan_path(path: Path, start: int = 0) -> Iterator[Good | Bad]:
    with path.open("rb") as f:
        yield from scan(f, start)


def _first_seq(path: Path) -> int | None:
    try:
        for item in scan_path(path):
            if isinstance(item, Good):
                return item.record.seq
    except FileNotFoundError:
        pass
    return None


def _skip_receivers(receivers: list[tuple[int, Path]], from_seq: int | None) -> int:
    """Index of the first receiver that can hold seq >= from_seq."""
    if not from_seq:
        return 0
    first = 0
    for i in range(1, len(receivers)):
        seq = _first_seq(receivers[i][1])
        if seq is not None and seq <= from_seq:
            first = i
        elif seq is not None:
            break
    return first


def iter_records(journal_dir: Path, from_seq: int | None = None) -> Iterator[Record]:
    """Every valid record, oldest receiver first; corrupt bytes are skipped."""
    journal_dir = Path(journal_dir)
    receivers = list_receivers(journal_dir)
    for _, path in receivers[_skip_receivers(receivers, from_seq) :]:
        try:
            for item in scan_path(path):
                if isinstance(item, Good) and (from_seq is None or item.record.seq >= from_seq):
                    yield item.record
        except FileNotFoundError:
            continue  # receiver removed (user managed) since we listed it


@dataclass(frozen=True, slots=True)
class Problem:
    """One integrity problem.

    kind "corrupt": bytes [start, end) of `receiver` hold no valid record.
    kind "gap": seqs first_seq..last_seq are missing before the record at
    `start` in `receiver`. kind "order": a record's seq (last_seq) does not
    follow the previous one (first_seq - 1).
    """

    kind: str
    receiver: Path
    start: int
    end: int
    reason: str = ""
    first_seq: int = 0
    last_seq: int = 0

    def __str__(self) -> str:
        name = self.receiver.name
        if self.kind == "corrupt":
            return (
                f"corrupt: {name} bytes {self.start}..{self.end} "
                f"({self.end - self.start} bytes): {self.reason}"
            )
        if self.kind == "gap":
            span = (
                f"seq {self.first_seq}"
                if self.first_seq == self.last_seq
                else f"seq {self.first_seq}..{self.last_seq}"
            )
            return f"gap: {span} missing (before {name} offset {self.start})"
        return f"order: {name} offset {self.start}: {self.reason}"


@dataclass(slots=True)
class VerifyReport:
    problems: list[Problem] = field(default_factory=list)
    records: int = 0
    receivers: int = 0
    first_seq: int | None = None
    last_seq: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_report(journal_dir: Path) -> VerifyReport:
    """Scan every receiver: corrupt ranges, missing seq ranges, seqs out of order."""
    report = VerifyReport()
    prev: int | None = None
    for _, path in list_receivers(Path(journal_dir)):
        report.receivers += 1
        try:
            f = path.open("rb")
        except FileNotFoundError:
            continue  # removed since listed (receivers are user managed)
        with f:
            _verify_receiver(report, path, scan(f), prev)
            prev = report.last_seq
    return report


def _verify_receiver(
    report: VerifyReport, path: Path, items: Iterator[Good | Bad], prev: int | None
) -> None:
    for item in items:
        if isinstance(item, Bad):
            report.problems.append(Problem("corrupt", path, item.start, item.end, item.reason))
            continue
        seq = item.record.seq
        report.records += 1
        if report.first_seq is None:
            report.first_seq = seq
        if prev is not None and seq > prev + 1:
            report.problems.append(
                Problem("gap", path, item.start, item.end, first_seq=prev + 1, last_seq=seq - 1)
            )
        elif prev is not None and seq <= prev:
            report.problems.append(
                Problem(
                    "order",
                    path,
                    item.start,
                    item.end,
                    f"seq {seq} after seq {prev}",
                    first_seq=prev + 1,
                    last_seq=seq,
                )
            )
        prev = seq if prev is None else max(prev, seq)
        report.last_seq = prev


def verify(journal_dir: Path) -> list[Problem]:
    """Every problem found; an empty list means the journal is intact."""
    return verify_report(journal_dir).problems


class Follower:
    """Reads a live journal poll by poll: each poll() yields what was appended since.

    Moves to a newer receiver once one exists (the writer finishes and syncs
    a receiver before attaching the next, so the old one is then complete).
    Never yields a record twice, nor one below `from_seq`. Several followers
    polled in turn follow several journals without threads.
    """

    def __init__(self, journal_dir: Path, *, from_seq: int | None = None) -> None:
        self.journal_dir = Path(journal_dir)
        self.from_seq = from_seq
        self.current: int | None = None  # receiver number being read
        self.offset = 0
        self.last: int | None = None  # highest seq yielded

    def poll(self) -> Iterator[Record]:
        """The records appended since the last poll, through every newer receiver."""
        while True:
            receivers = list_receivers(self.journal_dir)
            if self.current is None:
                if not receivers:
                    return
                self.current = receivers[_skip_receivers(receivers, self.from_seq)][0]
                self.offset = 0
            newer = [n for n, _ in receivers if n > self.current]
            yield from self._read(final=bool(newer))  # listed before reading: complete
            if not newer:
                return
            self.current, self.offset = newer[0], 0

    def _read(self, *, final: bool) -> Iterator[Record]:
        assert self.current is not None
        try:
            with (self.journal_dir / receiver_name(self.current)).open("rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:
                    self.offset = 0  # cut below what we read: re-read, skipping seen seqs
                gen = scan(f, self.offset, final=final)
                while True:
                    try:
                        item = next(gen)
                    except StopIteration as done:
                        self.offset = done.value
                        return
                    if isinstance(item, Good):
                        self.offset = item.end
                        seq = item.record.seq
                        if (self.from_seq is None or seq >= self.from_seq) and (
                            self.last is None or seq > self.last
                        ):
                            self.last = seq
                            yield item.record
        except FileNotFoundError:
            pass  # removed since listed (receivers are user managed)


def follow(
    journal_dir: Path,
    poll_interval: float = 0.5,
    *,
    from_seq: int | None = None,
    stop: threading.Event | None = None,
) -> Iterator[Record]:
    """Yield existing records, then records as they are appended, forever.

    Ends when `stop` is set. Raises FileNotFoundError if the directory is
    missing at the start.
    """
    journal_dir = Path(journal_dir)
    if not journal_dir.is_dir():
        raise FileNotFoundError(f"journal directory {journal_dir} does not exist")
    follower = Follower(journal_dir, from_seq=from_seq)
    while stop is None or not stop.is_set():
        yield from follower.poll()
        if stop is not None:
            stop.wait(poll_interval)
        else:
            time.sleep(poll_interval)
