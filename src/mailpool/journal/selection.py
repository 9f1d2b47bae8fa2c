"""Which messages `mailpool journal dump` selects: --message-id, --sender, --recipient.

Selectors pick whole messages, that is queue ids; a record with no queue id (a
9V relay refusal) is its own message. --sender and --recipient also select the
notices generated for a selected message (the `new_queue_id` of its 7G record).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mailpool.journal.format import Record


@dataclass(frozen=True, slots=True)
class AddressPattern:
    """An address, or one with `*` wildcards; case-insensitive. `<>` is the null sender."""

    text: str
    regex: re.Pattern[str]

    def matches(self, address: str) -> bool:
        bare = address.strip()
        if bare.startswith("<") and bare.endswith(">"):
            bare = bare[1:-1].strip()
        return self.regex.fullmatch(bare) is not None


def parse_address_pattern(value: str) -> AddressPattern:
    text = value.strip()
    if len(text) >= 2 and text[0] == "<" and text[-1] == ">":
        text = text[1:-1].strip()  # "<>" stays: the null sender
    elif not text:
        raise ValueError("empty address pattern (the null sender is <>)")
    bad = sorted({c for c in text if c.isspace() or not c.isprintable() or c in "<>"})
    if bad:
        raise ValueError(f"bad address pattern {value!r}: {''.join(bad)!r} cannot occur in it")
    # Only `*` is special: ?, [ and friends are literal address characters.
    parts = (".*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", text))
    return AddressPattern(text, re.compile("".join(parts), re.IGNORECASE | re.DOTALL))


def normalise_message_id(value: str) -> str:
    bare = value.strip()
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1].strip()
    return bare


def queue_id_of(rec: Record) -> str | None:
    """The record's queue id, None when it has none."""
    qid = rec.fields.get("queue_id")
    return qid if isinstance(qid, str) and qid else None


def _field_matches(rec: Record, name: str, pattern: AddressPattern) -> bool:
    value = rec.fields.get(name)
    return isinstance(value, str) and pattern.matches(value)


@dataclass(slots=True)
class MessageSelector:
    """--message-id, --sender and --recipient: the messages (queue ids) wanted.

    Learns from records in journal order and keeps only matching queue ids. A
    queue id is selected once it has matched every selector given (the 91 with
    the sender and the 92s with the recipients come in the same batch), or
    when a selected message's 7G names it as its notice (--sender/--recipient):
    the 7G follows the records that selected the message in every journal
    mailpool writes, so one pass in order finds notices of notices too.
    """

    message_id: str | None = None
    sender: AddressPattern | None = None
    recipient: AddressPattern | None = None
    selected: set[str] = field(default_factory=set)
    _criteria: list[set[str]] = field(default_factory=list)
    _by_id: set[str] = field(default_factory=set)
    _by_sender: set[str] = field(default_factory=set)
    _by_recipient: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        wanted = (self.message_id, self.sender, self.recipient)
        found = (self._by_id, self._by_sender, self._by_recipient)
        self._criteria = [s for w, s in zip(wanted, found, strict=True) if w is not None]

    @property
    def active(self) -> bool:
        return bool(self._criteria)

    @property
    def follows_notices(self) -> bool:
        return self.sender is not None or self.recipient is not None

    def carries_message_id(self, rec: Record) -> bool:
        mid = rec.fields.get("message_id")
        return isinstance(mid, str) and normalise_message_id(mid) == self.message_id

    def record_matches(self, rec: Record) -> bool:
        """The record by itself satisfies every selector given."""
        return (
            self.active
            and (self.message_id is None or self.carries_message_id(rec))
            and (self.sender is None or _field_matches(rec, "originator", self.sender))
            and (self.recipient is None or _field_matches(rec, "recipient", self.recipient))
        )

    def learn(self, rec: Record) -> list[str]:
        """Note what `rec` tells about its message; the queue ids it newly selects."""
        qid = queue_id_of(rec)
        if qid is None or not self._criteria:
            return []
        new: list[str] = []
        if qid not in self.selected:
            if self.message_id is not None and self.carries_message_id(rec):
                self._by_id.add(qid)
            if self.sender is not None and _field_matches(rec, "originator", self.sender):
                self._by_sender.add(qid)
            if self.recipient is not None and _field_matches(rec, "recipient", self.recipient):
                self._by_recipient.add(qid)
            if all(qid in found for found in self._criteria):
                self.selected.add(qid)
                new.append(qid)
                for found in self._criteria:  # from now on `selected` says it all
                    found.discard(qid)
        if self.follows_notices and rec.code == "7G" and qid in self.selected:
            notice = rec.fields.get("new_queue_id")
            if isinstance(notice, str) and notice and notice not in self.selected:
                self.selected.add(notice)
                new.append(notice)
        return new

    def matches(self, rec: Record) -> bool:
        """The record belongs to a selected message (every record does without selectors)."""
        if not self._criteria:
            return True
        qid = queue_id_of(rec)
        return qid in self.selected if qid is not None else self.record_matches(rec)
