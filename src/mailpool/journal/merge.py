"""Several hosts' journals as one stream (`mailpool journal dump --journal DIR ...`).

Each journal is a `JournalSource`: a directory and the label of its host. Its
records are read by their own iterator (`iter_records`: one receiver open at a
time, read in CHUNK-sized pieces) and the iterators are merged by record time
with a heap (`heapq.merge`): memory is bounded by the number of journals, not
by their size, and nothing is loaded whole. A journal's own records keep their
journal (seq) order; across journals the earlier time comes first, ties going
to the journal given first. Times come from each host's clock, so the order
across hosts is as good as their clocks agree.

Following, each journal is polled in turn (a `Follower` each, no threads) and
the records one round finds are merged by time the same way.

The records do not name their host: a label is given (`--journal LABEL=DIR`)
or derived from the path: the directory's name, or its parent's when it is
called `journal` (`<data>/journal`); labels that would clash take more of
their paths (`a/var`, `b/var`) until they differ.
"""

from __future__ import annotations

import heapq
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from mailpool.journal.format import Record, list_receivers
from mailpool.journal.reader import Follower, iter_records


class SourceError(ValueError):
    """A bad --journal value, or journals whose labels cannot be told apart."""


@dataclass(frozen=True, slots=True)
class JournalSource:
    """One host's journal directory and the label its records are shown with."""

    label: str
    path: Path


class HostRecord(NamedTuple):
    """A record and the label of the host (journal) it was read from."""

    host: str
    rec: Record


def _check_label(label: str, value: str) -> str:
    if any(c.isspace() or not c.isprintable() for c in label):
        raise SourceError(f"bad host label {label!r} in {value!r}: no spaces or control characters")
    return label


def parse_journal_arg(value: str) -> tuple[str | None, Path]:
    """`DIR` or `LABEL=DIR` (a LABEL has no `/`: `./a=b` is the directory `a=b`)."""
    label, sep, rest = value.partition("=")
    if sep and label and "/" not in label and os.sep not in label:
        if not rest:
            raise SourceError(f"no directory after {label}= in {value!r}")
        return _check_label(label, value), Path(rest)
    if not value.strip():
        raise SourceError("empty journal directory")
    return None, Path(value)


def _label_parts(path: Path) -> list[str]:
    """The path's components from the root, a last `journal` left out."""
    parts = [p for p in Path(os.path.abspath(path)).parts if p != os.sep]
    if len(parts) > 1 and parts[-1] == "journal":
        parts.pop()
    return parts or [str(path)]


def derived_label(path: Path) -> str:
    """The label of a journal given without one: `<data>/journal` is `<data>`'s name."""
    return _label_parts(path)[-1]


def journal_sources(
    given: Iterable[tuple[str | None, Path]], default_dir: Path, default_label: str | None = None
) -> list[JournalSource]:
    """The journals to read: those given (parsed --journal values), else `default_dir`."""
    given = list(given)
    if not given:
        return [JournalSource(default_label or derived_label(default_dir), Path(default_dir))]
    seen: dict[str, Path] = {}
    for _, path in given:
        real = os.path.realpath(path)
        if real in seen:
            raise SourceError(f"journal directory {path} given twice (as {seen[real]})")
        seen[real] = path
    explicit = [label for label, _ in given if label is not None]
    clashing = [label for label, n in Counter(explicit).items() if n > 1]
    if clashing:
        raise SourceError(f"host label {clashing[0]} names two journals")
    parts = {i: _label_parts(path) for i, (label, path) in enumerate(given) if label is None}
    depth = dict.fromkeys(parts, 1)
    while True:  # lengthen clashing derived labels until they differ
        labels = {i: "/".join(p[-depth[i] :]) for i, p in parts.items()}
        counts = Counter([*labels.values(), *explicit])
        longer = [i for i, lb in labels.items() if counts[lb] > 1 and depth[i] < len(parts[i])]
        if not longer:
            break
        for i in longer:
            depth[i] += 1
    sources = [
        JournalSource(label if label is not None else labels[i], path)
        for i, (label, path) in enumerate(given)
    ]
    counts = Counter(s.label for s in sources)
    for s in sources:
        if counts[s.label] > 1:
            raise SourceError(
                f"two journals would both be labelled {s.label}: name them with LABEL=DIR"
            )
    return sources


def source_problem(source: JournalSource) -> str | None:
    """Why the journal cannot be read (one line naming the directory), or None."""
    path = source.path
    if not path.exists():
        return f"journal directory {path} does not exist"
    if not path.is_dir():
        return f"journal directory {path} is not a directory"
    try:
        for _, receiver in list_receivers(path):
            try:
                with receiver.open("rb"):
                    pass
            except FileNotFoundError:
                continue  # removed since listed (receivers are user managed)
    except OSError as exc:
        return read_error(source, exc)
    return None


def read_error(source: JournalSource, exc: OSError) -> str:
    """One line for an error reading a journal, naming its directory (and the file)."""
    reason = exc.strerror or str(exc)
    where = f"journal directory {source.path}"
    if exc.filename and Path(os.fsdecode(exc.filename)) != source.path:
        where = f"{os.fsdecode(exc.filename)} in {where}"
    return f"cannot read {where}: {reason}"


class SourceFailed(Exception):
    """An OSError while reading one journal, with the journal it came from."""

    def __init__(self, source: JournalSource, error: OSError) -> None:
        super().__init__(read_error(source, error))
        self.source, self.error = source, error


def _time(item: HostRecord) -> int:
    return item.rec.time_ns


def _tagged(
    source: JournalSource, records: Iterable[Record], last_seq: dict[str, int] | None = None
) -> Iterator[HostRecord]:
    try:
        for rec in records:
            if last_seq is not None:
                last_seq[source.label] = rec.seq
            yield HostRecord(source.label, rec)
    except OSError as exc:
        raise SourceFailed(source, exc) from exc


def host_records(
    source: JournalSource, *, from_seq: int | None = None, last_seq: dict[str, int] | None = None
) -> Iterator[HostRecord]:
    """One journal's records, in journal order; a read error becomes SourceFailed."""
    return _tagged(source, iter_records(source.path, from_seq=from_seq), last_seq)


def merged_records(
    sources: list[JournalSource],
    *,
    from_seq: int | None = None,
    last_seq: dict[str, int] | None = None,
) -> Iterator[HostRecord]:
    """Every record of every journal, merged by time (streaming, a heap of one per journal).

    `last_seq`, when given, receives each journal's last seq read (for following on).
    """
    streams = [host_records(s, from_seq=from_seq, last_seq=last_seq) for s in sources]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=_time)


def follow_merged(
    sources: list[JournalSource],
    poll_interval: float,
    *,
    start: dict[str, int | None],
    stop: threading.Event | None = None,
) -> Iterator[HostRecord]:
    """Records as they are appended to any journal, from seq `start[label]` of each.

    Polls every journal in turn; what one round finds is merged by time. Ends when
    `stop` is set.
    """
    followers = [(s, Follower(s.path, from_seq=start.get(s.label))) for s in sources]
    while stop is None or not stop.is_set():
        batches = [list(_tagged(s, f.poll())) for s, f in followers]
        yield from heapq.merge(*batches, key=_time)
        if stop is not None:
            stop.wait(poll_interval)
        else:
            time.sleep(poll_interval)
