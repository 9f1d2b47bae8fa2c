"""Binary journal record format and receiver naming.

A receiver is a plain file of back-to-back framed records::

    MAGIC b"\\xd7J" | body_len u32 BE | crc32(body) u32 BE | body
    body = seq u64 | time_ns i64 | type (2 ASCII) | code (2 ASCII)
           | job_len u16 | job (utf-8) | payload (msgpack map)

The frame lets a reader tell a torn tail (incomplete record at end of file)
from corruption (bad magic, absurd length, CRC mismatch, undecodable body),
and resynchronise after corruption by searching for the next MAGIC whose
frame checks out. msgspec has no streaming decoder, hence the explicit length.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import msgspec

MAGIC: Final = b"\xd7J"
HEADER: Final = struct.Struct(">2sII")  # magic, body_len, crc32(body)
BODY_FIXED: Final = struct.Struct(">Qq2s2sH")  # seq, time_ns, type, code, job_len
MAX_BODY: Final = 1 << 20  # larger lengths are garbage, not records
MIN_BODY: Final = BODY_FIXED.size + 1  # the payload map is at least one byte
ENTRY_TYPE: Final = "LG"

RECEIVER_RE: Final = re.compile(r"^receiver-(\d{8,})\.jrn$")


class Record(msgspec.Struct):
    """One journal entry. `fields` is the payload (queue_id, message_id, ...)."""

    seq: int
    time_ns: int
    type: str
    code: str
    job: str
    fields: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def time(self) -> datetime:
        return ns_to_datetime(self.time_ns)


@dataclass(frozen=True, slots=True)
class Incomplete:
    """The buffer ends inside the record: read more, or it is a torn tail."""


@dataclass(frozen=True, slots=True)
class Corrupt:
    """The bytes at the offset are not a valid record."""

    reason: str


INCOMPLETE: Final = Incomplete()

_encoder = msgspec.msgpack.Encoder()
_payload_decoder = msgspec.msgpack.Decoder(dict[str, Any])


_TWO_ASCII: dict[str, bytes] = {}  # codes and the entry type repeat: check each once


def _two_ascii(value: str, what: str) -> bytes:
    cached = _TWO_ASCII.get(value)
    if cached is not None:
        return cached
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        raw = b""
    if len(raw) != 2 or not raw.isalnum():
        raise ValueError(f"journal {what} must be 2 ASCII letters/digits, got {value!r}")
    if len(_TWO_ASCII) < 4096:
        _TWO_ASCII[value] = raw
    return raw


def encode_payload(fields: dict[str, Any]) -> bytes:
    """The msgpack payload of a record. Raises ValueError when it cannot be encoded."""
    try:
        return _encoder.encode(fields)
    except (TypeError, msgspec.EncodeError) as exc:
        raise ValueError(f"journal payload not encodable: {exc}") from None


def encode_record(rec: Record) -> bytes:
    """Frame one record. Raises ValueError for values the format cannot hold."""
    return encode_frame(rec.seq, rec.time_ns, rec.type, rec.code, rec.job,
                        encode_payload(rec.fields))


def encode_frame(seq: int, time_ns: int, type_: str, code: str, job_name: str,
                 payload: bytes) -> bytes:
    """Frame one record whose payload is already msgpack (jobs encode their own)."""
    job = job_name.encode("utf-8")
    if len(job) > 0xFFFF:
        raise ValueError("journal job name longer than 65535 bytes")
    try:
        fixed = BODY_FIXED.pack(
            seq, time_ns, _two_ascii(type_, "entry type"), _two_ascii(code, "code"), len(job))
    except struct.error as exc:
        raise ValueError(f"journal seq/time out of range: {exc}") from None
    body = b"".join((fixed, job, payload))
    if len(body) > MAX_BODY:
        raise ValueError(f"journal record body {len(body)} bytes exceeds {MAX_BODY}")
    return HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body


def _decode_body(body: memoryview) -> Record:
    seq, time_ns, typ, code, job_len = BODY_FIXED.unpack_from(body)
    job_end = BODY_FIXED.size + job_len
    if job_end >= len(body):
        raise ValueError("job length runs past the body")
    if not (typ.isalnum() and code.isalnum()):
        raise ValueError("type/code not alphanumeric")
    job = bytes(body[BODY_FIXED.size : job_end]).decode("utf-8")
    fields = _payload_decoder.decode(body[job_end:])
    return Record(seq, time_ns, typ.decode("ascii"), code.decode("ascii"), job, fields)


def decode_record(buf: bytes, offset: int = 0) -> tuple[Record, int] | Incomplete | Corrupt:
    """Decode the record starting at `offset`.

    Returns (record, next_offset), INCOMPLETE when `buf` ends before the
    record does (a prefix of a plausible record), or Corrupt(reason).
    """
    avail = len(buf) - offset
    if avail < HEADER.size:
        n = min(avail, len(MAGIC))
        if buf[offset : offset + n] != MAGIC[:n]:
            return Corrupt("bad magic")
        return INCOMPLETE
    magic, body_len, crc = HEADER.unpack_from(buf, offset)
    if magic != MAGIC:
        return Corrupt("bad magic")
    if not MIN_BODY <= body_len <= MAX_BODY:
        return Corrupt(f"bad body length {body_len}")
    start = offset + HEADER.size
    end = start + body_len
    if end > len(buf):
        return INCOMPLETE
    with memoryview(buf) as view:
        body = view[start:end]
        if zlib.crc32(body) != crc:
            return Corrupt("crc mismatch")
        try:
            rec = _decode_body(body)
        except (ValueError, struct.error, msgspec.DecodeError) as exc:
            return Corrupt(f"undecodable body: {exc}")
        finally:
            body.release()
    return rec, end


def ns_to_datetime(time_ns: int) -> datetime:
    """Exact to the microsecond (float seconds would round)."""
    secs, rem = divmod(time_ns, 1_000_000_000)
    return datetime.fromtimestamp(secs, UTC).replace(microsecond=rem // 1000)


def iso_time(time_ns: int) -> str:
    """ISO 8601 with UTC offset and microseconds, e.g. 2026-11-29T12:00:01.123456+00:00."""
    return ns_to_datetime(time_ns).isoformat(timespec="microseconds")


def datetime_to_ns(dt: datetime) -> int:
    """Naive datetimes are UTC."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def receiver_name(number: int) -> str:
    return f"receiver-{number:08d}.jrn"


def list_receivers(directory: Path) -> list[tuple[int, Path]]:
    """(number, path) of every receiver in `directory`, oldest first."""
    found = []
    for entry in directory.iterdir():
        m = RECEIVER_RE.match(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), entry))
    found.sort()
    return found
