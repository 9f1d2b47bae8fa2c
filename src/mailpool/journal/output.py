"""`mailpool journal dump` record output: text, JSON lines and CSV.

Every record comes from a host (the label of the journal it was read from):
JSON and CSV always carry it (`host`: JSON's first key, CSV's last column, so
the columns scripts already read keep their places), so their shape does not
depend on how many journals were read; the text lines show it first only when
several journals are read.
"""

from __future__ import annotations

import csv
from typing import Any, TextIO

import msgspec

from mailpool.journal.codes import explain
from mailpool.journal.format import Record, iso_time
from mailpool.journal.summary import text_value

MAIN_FIELDS = ("queue_id", "message_id", "originator", "recipient", "size", "ip", "detail")
CSV_COLUMNS = ("seq", "time", "type", "code", "job", *MAIN_FIELDS, "explanation", "host")


def format_text(rec: Record, host: str | None = None, width: int = 0) -> str:
    """One text line; with `host`, the host label first, padded to `width`."""
    payload = " ".join(f"{k}={text_value(v)}" for k, v in rec.fields.items())
    head = f"{rec.seq:>7} {iso_time(rec.time_ns)} {rec.type} {rec.code} {rec.job}"
    if host is not None:
        head = f"{text_value(host):<{width}} {head}"
    line = f"{head}  {explain(rec.code)}"
    return f"{line}: {payload}" if payload else line


def record_dict(rec: Record, host: str | None = None) -> dict[str, Any]:
    """The record as a JSON object; `host` (first) when given."""
    obj: dict[str, Any] = {} if host is None else {"host": host}
    obj.update(seq=rec.seq, time=iso_time(rec.time_ns), type=rec.type, code=rec.code, job=rec.job)
    for key, value in rec.fields.items():
        obj.setdefault(key, value)  # the header wins over a clashing payload name
    obj.setdefault("explanation", explain(rec.code))
    return obj


def format_json(rec: Record, host: str | None = None) -> str:
    return msgspec.json.encode(record_dict(rec, host)).decode()


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return text_value(value)


def csv_row(rec: Record, host: str) -> list[str]:
    """The fixed columns; payload fields without a column are appended to
    `detail` as key=value so nothing is lost."""
    f = rec.fields
    extra = " ".join(f"{k}={text_value(v)}" for k, v in f.items() if k not in MAIN_FIELDS)
    detail = " ".join(s for s in (_csv_value(f.get("detail")), extra) if s)
    row = [str(rec.seq), iso_time(rec.time_ns), rec.type, rec.code, rec.job]
    row += [_csv_value(f.get(k)) for k in MAIN_FIELDS[:-1]]
    row += [detail, explain(rec.code), host]
    return row


class RecordOutput:
    """Writes records in one format (CSV starts with its header row).

    `hosts` are the labels of the journals read: text shows the host only when
    there are several, padded to the longest label.
    """

    def __init__(self, fmt: str, out: TextIO, *, flush: bool, hosts: list[str]) -> None:
        self.fmt, self.out, self.flush = fmt, out, flush
        self.show_host = len(hosts) > 1
        self.width = max((len(text_value(h)) for h in hosts), default=0)
        self.csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self.csv is not None:
            self.csv.writerow(CSV_COLUMNS)

    def emit(self, host: str, rec: Record) -> None:
        if self.csv is not None:
            self.csv.writerow(csv_row(rec, host))
        elif self.fmt == "json":
            self.out.write(format_json(rec, host) + "\n")
        else:
            shown = host if self.show_host else None
            self.out.write(format_text(rec, shown, self.width) + "\n")
        if self.flush:
            self.out.flush()
