"""The mail server framework pass for one message from the incoming queue (QMSF).

Bridge (7A, 7H 71 72), address resolution (P2) and POP local delivery (B8 B2), written
as plain synchronous steps: a framework job runs them in a worker thread. A message
leaves the incoming queue only after every recipient is delivered; per-recipient progress
marks plus deterministic Maildir names make a re-run after a crash deliver nothing twice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailpool.directory import Directory
from mailpool.framework import maildir
from mailpool.framework.spool import Spool

JournalFn = Callable[..., None]
DurableFn = Callable[[], bool]

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

    def process(self, queue_id: str, journal: JournalFn, make_durable: DurableFn) -> bool:
        """Run the whole framework pass; True when the message left the incoming queue.

        Writes are not fsynced one by one: `make_durable()` (a group commit shared with every
        other job) runs once the Maildir copies exist and before the queue file goes.
        """
        try:
            envelope, content = self.spool.load("incoming", queue_id)
        except FileNotFoundError:
            return True  # already done by an earlier pass
        ids: dict[str, Any] = {"queue_id": queue_id, "message_id": envelope.message_id}
        journal("7A", **ids)
        journal("7H", **ids)
        journal("71", originator=envelope.originator, **ids)
        for rcpt in envelope.recipients:
            journal("72", recipient=rcpt, **ids)
        done = self.spool.delivered(queue_id)
        undeliverable: list[str] = []
        outcome: list[tuple[str, str, Path | None]] = []
        for index, rcpt in enumerate(envelope.recipients):
            tag, user = self.resolve(rcpt)
            if user is None:
                undeliverable.append(rcpt)
                outcome.append((rcpt, tag, None))
                continue
            box = self.mailbox_root / user
            if index not in done:
                unique = maildir.unique_name(queue_id, index, self.hostname)
                maildir.ensure_maildir(box)
                maildir.deliver(box, unique, content, sync=False)
                self.spool.mark_delivered(queue_id, index, sync=False)
            outcome.append((rcpt, tag, box))
        if not make_durable():
            return False  # nothing is lost: the queue file stays and is tried again
        # Journaled once durable, per recipient: P2, then B8 B2 when it went to a mailbox.
        for rcpt, tag, box in outcome:
            journal("P2", recipient=rcpt, tag=tag, detail=tag, **ids)
            if box is not None:
                journal("B8", mailbox=str(box), detail=str(box), **ids)
                journal("B2", recipient=rcpt, **ids)
        if undeliverable:
            # Non-delivery notices and forwarding come with the outbound issue; until then
            # the message is kept on hold, never dropped.
            self.spool.move(queue_id, "incoming", "hold")
            return True
        # Durable at the next group commit; until then a crash re-runs this pass, which
        # finds every copy already delivered.
        self.spool.remove("incoming", queue_id, sync=False)
        return True
