"""`mailpool journal dump --summary`: one line per message.

MessageSummary condenses a message's records (time of the first, queue id,
sender, recipients, size) into its final state; the rest renders that line
as text, JSON or CSV. A message is one queue id on one host: the `host` (the
label of its journal) is the first key of JSON and the last column of CSV (so
the columns scripts already read keep their places), and starts the text line
when several journals are read.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import msgspec

from mailpool.journal.format import Record, iso_time

SUMMARY_COLUMNS = ("time", "queue_id", "sender", "recipients", "size", "state", "host")
SUMMARY_TO_WIDTH = 60  # text --summary: recipients shown, then "+N" for the rest

QUEUED: Final = "queued"
DEFERRED: Final = "deferred"
DELIVERED: Final = "delivered"
PARTIAL: Final = "partial"  # some recipients delivered, the others bounced
BOUNCED: Final = "bounced"
QUARANTINED: Final = "quarantined"
DISCARDED: Final = "discarded"
DELETED: Final = "deleted"
RELAY_REFUSED: Final = "relay refused"
# States no later record changes, but the operator's release (QR) or deletion (QD).
_FINAL_PHASES: Final = frozenset({QUARANTINED, DISCARDED, DELETED, RELAY_REFUSED})
_PHASE_OF_CODE: Final = {
    "8C": DEFERRED, "8D": DEFERRED, "86": DEFERRED,  # on a retry queue or waiting
    "8B": QUEUED, "8E": QUEUED, "8F": QUEUED, "QR": QUEUED,  # in progress again
    "QD": DELETED, "9V": RELAY_REFUSED,
}  # fmt: skip
# A record with no queue id that still stands for a message in --summary.
SUMMARY_STANDALONE: Final = frozenset({"9V"})


@dataclass(slots=True)
class MessageSummary:
    """One message condensed from its records (fed in journal order)."""

    queue_id: str | None
    time_ns: int  # of its first record
    sender: str | None = None  # "" is the null sender, None unknown
    recipients: list[str] = field(default_factory=list)
    size: int | None = None
    host: str = ""  # the label of the journal it was read from
    _keys: set[str] = field(default_factory=set)  # casefolded recipients
    _outcome: dict[str, bool] = field(default_factory=dict)  # casefolded -> delivered
    _phase: str = QUEUED
    _in_mailbox: bool = False  # a B8 was written: the next B2 is its delivery
    _sent: bool = False  # an 88: delivered to a remote server

    def add(self, rec: Record) -> None:
        f, code = rec.fields, rec.code
        originator = f.get("originator")
        if self.sender is None and isinstance(originator, str):
            self.sender = originator
        recipient = f.get("recipient")
        key = recipient.casefold() if isinstance(recipient, str) else None
        if key is not None and key not in self._keys:
            self._keys.add(key)
            self.recipients.append(recipient)
        size = f.get("size")
        if code in ("9T", "ET") and isinstance(size, int) and not isinstance(size, bool):
            self.size = size
        if code == "B8":
            self._in_mailbox = True
        elif code == "B2" and self._in_mailbox:
            # B2 also names a new COD notice's recipient (BR B1 B2): no B8 before that one
            self._in_mailbox = False
            self._record_outcome(key, delivered=True)
        elif code == "82":
            self._record_outcome(key, delivered=True)
        elif code in ("83", "7P"):  # an 83 without a recipient says why no notice was sent
            self._record_outcome(key, delivered=False)
        elif code == "88":
            self._sent = True
        elif code == "OW":
            detail = str(f.get("detail", "")).lower()
            if detail.startswith("discard"):
                self._phase = DISCARDED
            elif "quarantine" in detail or detail.startswith("kept"):
                self._phase = QUARANTINED
        elif code in _PHASE_OF_CODE and (self._phase not in _FINAL_PHASES or code[0] == "Q"):
            self._phase = _PHASE_OF_CODE[code]

    def _record_outcome(self, key: str | None, *, delivered: bool) -> None:
        if key is not None:
            self._outcome[key] = delivered

    @property
    def state(self) -> str:
        if self._phase in _FINAL_PHASES:
            return self._phase
        if not self._keys:
            return DELIVERED if self._sent else self._phase
        if len(self._outcome) < len(self._keys):
            return self._phase  # some recipients still waiting: queued or deferred
        delivered = sum(self._outcome.values())
        if delivered == len(self._outcome):
            return DELIVERED
        return BOUNCED if delivered == 0 else PARTIAL


def shorten_recipients(recipients: list[str], width: int = SUMMARY_TO_WIDTH) -> str:
    """Comma-joined, as many as fit in `width` (at least one), then `+N` for the rest."""
    shown: list[str] = []
    used = 0
    for rcpt in recipients:
        if shown and used + 1 + len(rcpt) > width:
            break
        used += len(rcpt) + (1 if shown else 0)
        shown.append(rcpt)
    rest = len(recipients) - len(shown)
    return ",".join([*shown, f"+{rest}"] if rest else shown)


def text_value(value: Any) -> str:
    """A field value in the text formats: bare when unambiguous, else as JSON."""
    if isinstance(value, str):
        if value and not any(c.isspace() or c in '"=' for c in value) and value.isprintable():
            return value
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool | int | float) or value is None:
        return json.dumps(value)
    return msgspec.json.encode(value).decode()


def summary_text(s: MessageSummary, *, show_host: bool = False, width: int = 0) -> str:
    """The text line; with show_host, the host label first, padded to `width`."""
    sender = "-" if s.sender is None else (s.sender or "<>")
    to = shorten_recipients(s.recipients) or "-"
    size = "-" if s.size is None else str(s.size)
    line = (
        f"{iso_time(s.time_ns)} {s.queue_id or '-'} from={text_value(sender)} "
        f"to={text_value(to)} size={size} state={text_value(s.state)}"
    )
    return f"{text_value(s.host):<{width}} {line}" if show_host else line


def summary_dict(s: MessageSummary) -> dict[str, Any]:
    return {
        "host": s.host,
        "time": iso_time(s.time_ns),
        "queue_id": s.queue_id,
        "sender": s.sender,
        "recipients": s.recipients,
        "size": s.size,
        "state": s.state,
    }


def summary_row(s: MessageSummary) -> list[str]:
    sender = "" if s.sender is None else (s.sender or "<>")
    size = "" if s.size is None else str(s.size)
    recipients = ",".join(s.recipients)
    return [iso_time(s.time_ns), s.queue_id or "", sender, recipients, size, s.state, s.host]


class SummaryOutput:
    """Writes summaries in one format (CSV starts with its header row); `hosts`
    are the labels of the journals read (text shows the host when several)."""

    def __init__(self, fmt: str, out: TextIO, hosts: list[str] | None = None) -> None:
        self.fmt, self.out = fmt, out
        self.show_host = len(hosts or ()) > 1
        self.width = max((len(text_value(h)) for h in hosts or ()), default=0)
        self.csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self.csv is not None:
            self.csv.writerow(SUMMARY_COLUMNS)

    def emit(self, s: MessageSummary) -> None:
        if self.csv is not None:
            self.csv.writerow(summary_row(s))
        elif self.fmt == "json":
            self.out.write(msgspec.json.encode(summary_dict(s)).decode() + "\n")
        else:
            self.out.write(summary_text(s, show_host=self.show_host, width=self.width) + "\n")
