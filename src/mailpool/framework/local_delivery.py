"""The mail server framework pass for one message from the incoming queue (QMSF).

Bridge (7A, 7H 71 72), address resolution (P2) and POP local delivery (B8 B2), written
as plain synchronous steps in two halves around a group commit (deliver, then complete).
A message leaves the incoming queue only after every copy is durable; per-recipient
progress marks plus deterministic Maildir names make a re-run after a crash deliver
nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailpool.directory import Directory
from mailpool.framework import maildir
from mailpool.framework.spool import Spool


@dataclass
class FrameworkPass:
    """One message's way through the framework: its journal entries and per-recipient fate."""

    queue_id: str
    ids: dict[str, Any]
    entries: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    outcome: list[tuple[str, str, Path | None]] = field(default_factory=list)

    def journal(self, code: str, **fields: Any) -> None:
        self.entries.append((code, {**fields, **self.ids}))

    def take_entries(self) -> list[tuple[str, dict[str, Any]]]:
        out, self.entries = self.entries, []
        return out

TAG_LOCAL = "POP LclDel"
TAG_FORWARD = "SMTP MsgFwd"
TAG_NONDEL = "SMTP NonDel"


class LocalFramework:
    def __init__(self, *, spool: Spool, directory: Directory, mailbox_root: Path, hostname: str,
                 local_domains: list[str], postmaster: str) -> None:
        self.spool = spool
        self.directory = directory
        self.mailbox_root = mailbox_root
        self.hostname = hostname
        self.local_domains = {d.lower() for d in local_domains}
        self.postmaster = postmaster
        self._ready_boxes: set[Path] = set()  # Maildirs known to exist (saves the stats)

    def resolve(self, address: str) -> tuple[str, str | None]:
        """(P2 tag, mailbox user) for one recipient."""
        local, _, domain = address.rpartition("@")
        if "@" not in address:
            return (TAG_LOCAL, self.postmaster) if address.lower() == "postmaster" else (
                TAG_NONDEL, None)
        if domain.lower() not in self.local_domains:
            return TAG_FORWARD, None
        user = self.directory.lookup(address)
        if user is not None:
            return TAG_LOCAL, user.name
        if local.lower() == "postmaster":
            return TAG_LOCAL, self.postmaster
        return TAG_NONDEL, None

    def deliver(self, queue_id: str, *, again: bool = True) -> FrameworkPass | None:
        """First half of the pass: resolve and write every local copy, not yet durable.

        None when the message is no longer queued (an earlier pass finished it). The caller
        makes the copies durable (one group commit shared with every other job), then calls
        complete(); journal entries accumulate on the returned pass in order. `again` says
        an earlier pass may have run (recovery, a retry): only then are the mailboxes
        searched for copies it left.
        """
        try:
            envelope, content = self.spool.load("incoming", queue_id)
        except FileNotFoundError:
            return None
        ids: dict[str, Any] = {"queue_id": queue_id, "message_id": envelope.message_id}
        fp = FrameworkPass(queue_id=queue_id, ids=ids)
        fp.journal("7A")
        fp.journal("7H")
        fp.journal("71", originator=envelope.originator)
        for rcpt in envelope.recipients:
            fp.journal("72", recipient=rcpt)
        done = self.spool.delivered(queue_id)
        for index, rcpt in enumerate(envelope.recipients):
            tag, user = self.resolve(rcpt)
            if user is None:
                fp.outcome.append((rcpt, tag, None))
                continue
            box = self.mailbox_root / user
            if index not in done:
                unique = maildir.unique_name(queue_id, index, self.hostname)
                if box not in self._ready_boxes:
                    maildir.ensure_maildir(box)
                    self._ready_boxes.add(box)
                try:
                    maildir.deliver(box, unique, content, sync=False, check=again)
                except FileNotFoundError:
                    # The mailbox went away since it was seen (removed by hand): again.
                    maildir.ensure_maildir(box)
                    maildir.deliver(box, unique, content, sync=False, check=True)
                self.spool.mark_delivered(queue_id, index, sync=False)
            fp.outcome.append((rcpt, tag, box))
        return fp

    def complete(self, fp: FrameworkPass) -> None:
        """Second half, once the copies are durable: journal them, take the message off."""
        # Per recipient: P2, then B8 B2 when it went to a mailbox.
        for rcpt, tag, box in fp.outcome:
            fp.journal("P2", recipient=rcpt, tag=tag, detail=tag)
            if box is not None:
                fp.journal("B8", mailbox=str(box), detail=str(box))
                fp.journal("B2", recipient=rcpt)
        if any(box is None for _, _, box in fp.outcome):
            # Non-delivery notices and forwarding come with the outbound issue; until then
            # the message is kept on hold, never dropped.
            self.spool.move(fp.queue_id, "incoming", "hold")
            return
        # Durable at the next group commit; until then a crash re-runs the pass, which finds
        # every copy already delivered.
        self.spool.remove("incoming", fp.queue_id, sync=False)
