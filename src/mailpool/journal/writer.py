"""The journal writer: the supervisor's single, ordered appender."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

import msgspec

from mailpool.journal.codes import check_writable
from mailpool.journal.format import (
    ENTRY_TYPE,
    Record,
    encode_frame,
    encode_payload,
    encode_record,
    list_receivers,
    receiver_name,
)
from mailpool.journal.reader import Good, scan_path

log = logging.getLogger(__name__)

# Names the dump uses for the record header; a payload field may not shadow them.
RESERVED_FIELDS = frozenset({"seq", "time", "time_ns", "type", "code", "job", "explanation"})


class Journal(Protocol):
    def open(self) -> None: ...
    def write(
        self, code: str, job: str, fields: dict[str, Any], time_ns: int | None = None
    ) -> int: ...
    def write_encoded(self, job: str, entries: list[tuple[str, int, bytes]]) -> int: ...
    def sync(self) -> None: ...
    def rotate(self) -> Path: ...
    def close(self) -> None: ...


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _normalise_fields(fields: dict[str, Any]) -> dict[str, Any]:
    if not RESERVED_FIELDS.isdisjoint(fields) or not all(type(k) is str for k in fields):
        for key in fields:
            if not isinstance(key, str):
                raise ValueError(f"journal field names must be str, got {key!r}")
            if key in RESERVED_FIELDS:
                raise ValueError(f"journal field name {key!r} is reserved for the record "
                                 "header")
    mid = fields.get("message_id")
    if isinstance(mid, str):
        bare = mid.strip()
        if bare.startswith("<") and bare.endswith(">"):
            bare = bare[1:-1]
        if bare != mid:
            fields = {**fields, "message_id": bare}
    return fields


# Cheap structural check of a ready-made payload (msgspec decodes in C).
_payload_check = msgspec.msgpack.Decoder()


def prepare_payload(fields: dict[str, Any]) -> bytes:
    """A record's payload as a job sends it: checked, message id normalised, encoded."""
    return encode_payload(_normalise_fields({k: v for k, v in fields.items() if v is not None}))


class JournalWriter:
    """Appends records to `<directory>/receiver-NNNNNNNN.jrn`.

    Single-threaded, single process. One os.write per record and no fsync per
    record: the owner calls sync() periodically and at close. Sequence
    numbers continue across receivers and restarts and are never reused.
    """

    def __init__(self, directory: Path, *, max_receiver_bytes: int = 64 * 1024 * 1024) -> None:
        if max_receiver_bytes <= 0:
            raise ValueError("max_receiver_bytes must be positive")
        self.directory = Path(directory)
        self.max_receiver_bytes = max_receiver_bytes
        self._fd: int | None = None
        self._number = 0
        self._size = 0
        self._next_seq = 1
        self._dirty = False
        self.truncated_bytes = 0  # torn/corrupt tail removed by the last open()

    @property
    def current_path(self) -> Path | None:
        if self._fd is None:
            return None
        return self.directory / receiver_name(self._number)

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def open(self) -> None:
        if self._fd is not None:
            raise RuntimeError("journal already open")
        self.directory.mkdir(parents=True, exist_ok=True)
        receivers = list_receivers(self.directory)
        self.truncated_bytes = 0
        if not receivers:
            self._next_seq = 1
            self._create(1)
            return
        number, path = receivers[-1]
        last_seq, good_end = self._scan(path)
        # An empty (just attached) last receiver: the seq lives in older ones.
        for _, older in reversed(receivers[:-1]):
            if last_seq is not None:
                break
            last_seq, _ = self._scan(older)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if good_end < size:
                # A crash mid-write left a torn record (or garbage): drop it so
                # appends follow the last good record.
                log.warning(
                    "journal %s: truncating %d bytes of torn/corrupt tail at offset %d",
                    path,
                    size - good_end,
                    good_end,
                )
                os.ftruncate(fd, good_end)
                os.fsync(fd)
                self.truncated_bytes = size - good_end
        except BaseException:
            os.close(fd)
            raise
        self._next_seq = 1 if last_seq is None else last_seq + 1
        self._fd, self._number, self._size, self._dirty = fd, number, good_end, False

    @staticmethod
    def _scan(path: Path) -> tuple[int | None, int]:
        """(highest seq, end offset of the last good record) of a receiver."""
        last_seq: int | None = None
        good_end = 0
        for item in scan_path(path):
            if isinstance(item, Good):
                good_end = item.end
                seq = item.record.seq
                last_seq = seq if last_seq is None else max(last_seq, seq)
        return last_seq, good_end

    def _create(self, number: int) -> Path:
        path = self.directory / receiver_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        _fsync_dir(self.directory)  # the new name must survive a crash too
        self._fd, self._number, self._size, self._dirty = fd, number, 0, False
        return path

    def write(self, code: str, job: str, fields: dict[str, Any], time_ns: int | None = None) -> int:
        """Append one record; returns its seq. Raises ValueError for bad input."""
        if self._fd is None:
            raise RuntimeError("journal not open")
        check_writable(code)
        rec = Record(
            seq=self._next_seq,
            time_ns=time.time_ns() if time_ns is None else time_ns,
            type=ENTRY_TYPE,
            code=code,
            job=job,
            fields=_normalise_fields(fields),
        )
        data = encode_record(rec)
        if self._size > 0 and self._size + len(data) > self.max_receiver_bytes:
            self.rotate()
        self._write_all(data)
        self._next_seq += 1
        return rec.seq

    def write_encoded(self, job: str, entries: list[tuple[str, int, bytes]]) -> int:
        """Append (code, time_ns, msgpack payload) records from `job` with one write(2);
        the payloads come ready-encoded (by prepare_payload in the job), so the single
        writer only frames them. A bad entry is skipped and logged. Returns the last seq."""
        if self._fd is None:
            raise RuntimeError("journal not open")
        chunks: list[bytes] = []
        seq = self._next_seq
        for code, time_ns, payload in entries:
            try:
                check_writable(code)
                if not isinstance(_payload_check.decode(payload), dict):
                    raise ValueError("payload is not a map")
                chunks.append(encode_frame(seq, time_ns, ENTRY_TYPE, code, job, payload))
            except (ValueError, msgspec.DecodeError):
                log.exception("journal: entry %s from %s refused", code, job)
                continue
            seq += 1
        if not chunks:
            return self._next_seq - 1
        data = b"".join(chunks)
        if self._size > 0 and self._size + len(data) > self.max_receiver_bytes:
            self.rotate()
        self._write_all(data)
        self._next_seq = seq
        return seq - 1

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except BaseException:
            # Leave no torn record behind for the next append to follow.
            if written:
                try:
                    os.ftruncate(self._fd, self._size)
                except OSError:
                    log.exception("journal: cannot remove partial record")
                    self._size += written
            raise
        self._size += written
        self._dirty = True

    def sync(self) -> None:
        if self._fd is not None and self._dirty:
            os.fdatasync(self._fd)
            self._dirty = False

    def rotate(self) -> Path:
        """Attach a new receiver (CHGJRN); returns its path."""
        if self._fd is None:
            raise RuntimeError("journal not open")
        self.sync()
        os.close(self._fd)
        self._fd = None
        return self._create(self._number + 1)

    def close(self) -> None:
        if self._fd is None:
            return
        try:
            self.sync()
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JournalWriter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullJournal:
    """Journaling disabled: the same interface, nothing written."""

    current_path: Path | None = None
    next_seq = 0

    def open(self) -> None:
        pass

    def write(self, code: str, job: str, fields: dict[str, Any], time_ns: int | None = None) -> int:
        check_writable(code)  # a bad code is a bug whether or not journaling is on
        return 0

    def write_encoded(self, job: str, entries: list[tuple[str, int, bytes]]) -> int:
        return 0

    def sync(self) -> None:
        pass

    def rotate(self) -> Path:
        return Path(os.devnull)

    def close(self) -> None:
        pass

    def __enter__(self) -> NullJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
