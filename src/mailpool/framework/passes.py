"""The mail server framework pass for one message from the incoming queue (QMSF).

Bridge (7A, 7H 71 72), address resolution (P2), then per recipient one of: POP local delivery
(B8 B2), forwarding to the outbound queue (C6 C1 C2) or non-delivery (a notice: 7P 7G,
AP A1 A2); a local delivery asked to confirm (DSN NOTIFY=SUCCESS) gets a COD (7R 7G, BR B1 B2).
Written as plain synchronous steps in two halves around a group commit (deliver, then
complete): everything the pass writes (Maildir copies, the outbound queue file, notices) is
made durable together, and only then is the message taken off the incoming queue.

A pass run again after a crash delivers nothing twice: Maildir names and notice ids derive
from the queue id and recipient index, so a copy that exists (in new/ or cur/) is found and
not written again, and an outbound queue file already written (possibly already being
delivered) is left alone. No separate progress record is kept: the Maildir name is the
record. (A copy a POP client fetched and deleted before the queue file's removal was durable
cannot be found; that needs a crash in the milliseconds between the copy's group commit and
the next one, and the delete's own fsync commits the earlier removal first on ext4 and XFS,
whose journals commit in order.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailpool.directory import AddressLookup
from mailpool.framework import maildir
from mailpool.framework.filters import FilterMatch, Filters
from mailpool.framework.notice_queue import NoticeSettings, QueuedNotice, queue_notice
from mailpool.framework.notices import RecipientReport, add_delivery_headers
from mailpool.framework.spool import Envelope, Spool
from mailpool.logs import DELIVERY
from mailpool.outbound.state import destination_of
from mailpool.supervisor.channel import OutboundItem

log = logging.getLogger("mailpool.framework")

TAG_LOCAL = "POP LclDel"
TAG_FORWARD = "SMTP MsgFwd"
TAG_NONDEL = "SMTP NonDel"
# Queues where a forwarded copy may already be (written by an earlier run of this pass).
_FORWARDED = ("outbound", "retry1", "retry2", "hold")


@dataclass
class FrameworkPass:
    """One message's way through the framework: its journal entries and what it produced."""

    queue_id: str
    ids: dict[str, Any]
    envelope: Envelope
    entries: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    outcome: list[tuple[str, str, Path | None]] = field(default_factory=list)
    forwarded: list[str] = field(default_factory=list)
    notices: list[tuple[str, QueuedNotice, list[str]]] = field(default_factory=list)
    handed: list[OutboundItem] = field(default_factory=list)
    filtered: bool = False  # kept in quarantine or discarded by a filter: nothing else to do

    def journal(self, code: str, **fields: Any) -> None:
        self.entries.append((code, {**fields, **self.ids}))

    def take_entries(self) -> list[tuple[str, dict[str, Any]]]:
        out, self.entries = self.entries, []
        return out


def _wants(notify: str, what: str) -> bool:
    """RFC 3461: no NOTIFY means failures (and delays) only; NEVER means nothing."""
    if not notify:
        return what in ("FAILURE", "DELAY")
    return what in notify.upper().split(",")


class Framework:
    def __init__(self, *, spool: Spool, directory: AddressLookup, mailbox_root: Path,
                 hostname: str, local_domains: list[str], postmaster: str, router: str,
                 notices: NoticeSettings, filters: Filters | None = None) -> None:
        self.spool = spool
        self.directory = directory
        self.mailbox_root = mailbox_root
        self.hostname = hostname
        self.local_domains = {d.lower() for d in local_domains}
        self.postmaster = postmaster
        self.router = router
        self.notice_settings = notices
        self.filters = filters
        self._ready_boxes: set[Path] = set()  # Maildirs known to exist (saves the stats)

    def resolve(self, address: str) -> tuple[str, str | None]:
        """(P2 tag, mailbox user) for one recipient. DirectoryError when the directory
        cannot say: the caller leaves the message queued (never a bounce for that)."""
        local, _, domain = address.rpartition("@")
        if "@" not in address:
            return (TAG_LOCAL, self.postmaster) if address.lower() == "postmaster" else (
                TAG_NONDEL, None)
        if domain.lower().rstrip(".") not in self.local_domains:
            return TAG_FORWARD, None
        user = self.directory.lookup(address)
        if user is not None:
            return TAG_LOCAL, user.name
        if local.lower() == "postmaster":
            return TAG_LOCAL, self.postmaster
        return TAG_NONDEL, None

    def deliver(self, queue_id: str, *, again: bool = True) -> FrameworkPass | None:
        """First half of the pass: write every local copy, the outbound queue file and the
        notices, none durable yet.

        None when the message is no longer queued (an earlier pass finished it). The caller
        makes the writes durable (one group commit shared with every other job), then calls
        complete(); journal entries accumulate on the returned pass in order. `again` says
        an earlier pass may have run (recovery, a retry): only then is it looked for what
        that pass left.
        """
        try:
            envelope, content = self.spool.load("incoming", queue_id)
        except FileNotFoundError:
            return None
        ids: dict[str, Any] = {"queue_id": queue_id, "message_id": envelope.message_id}
        fp = FrameworkPass(queue_id=queue_id, ids=ids, envelope=envelope)
        if envelope.source:
            # Submitted by a program (sendmail, the API): the source's EH E1 E2 ET.
            fp.journal("EH", detail=envelope.source)
            fp.journal("E1", originator=envelope.originator)
            for rcpt in envelope.recipients:
                fp.journal("E2", recipient=rcpt)
            fp.journal("ET", size=envelope.size)
        fp.journal("7A")
        fp.journal("7H")
        fp.journal("71", originator=envelope.originator)
        for rcpt in envelope.recipients:
            fp.journal("72", recipient=rcpt)
        if self.filters is not None and not envelope.filter_exempt:
            match = self.filters.check(envelope.originator, content)
            if match is not None:
                self._filter(fp, match)
                return fp
        failed: list[int] = []
        confirm: list[int] = []
        for index, rcpt in enumerate(envelope.recipients):
            tag, user = self.resolve(rcpt)
            if tag == TAG_FORWARD:
                fp.forwarded.append(rcpt)
                fp.outcome.append((rcpt, tag, None))
                continue
            if user is None:
                failed.append(index)
                fp.outcome.append((rcpt, tag, None))
                continue
            box = self.mailbox_root / user
            self._write_copy(box, queue_id, index, envelope, content, again)
            fp.outcome.append((rcpt, tag, box))
            if _wants(envelope.rcpt_notify(index), "SUCCESS"):
                confirm.append(index)
        if fp.forwarded:
            self._forward(fp, envelope, content, again)
        if failed:
            self._notice(fp, "failure", f"{queue_id}-NDR", envelope, content, failed)
        if confirm:
            self._notice(fp, "success", f"{queue_id}-COD", envelope, content, confirm)
        return fp

    def _write_copy(self, box: Path, queue_id: str, index: int, envelope: Envelope,
                    content: bytes, again: bool) -> None:
        # Return-Path and Delivered-To, as Postfix's local delivery adds them.
        copy = add_delivery_headers(content, return_path=envelope.originator,
                                    delivered_to=envelope.recipients[index])
        unique = maildir.unique_name(queue_id, index, self.hostname)
        if box not in self._ready_boxes:
            maildir.ensure_maildir(box)
            self._ready_boxes.add(box)
        try:
            maildir.deliver(box, unique, copy, sync=False, check=again)
        except FileNotFoundError:
            # The mailbox went away since it was seen (removed by hand): again.
            maildir.ensure_maildir(box)
            maildir.deliver(box, unique, copy, sync=False, check=True)

    def _forward(self, fp: FrameworkPass, envelope: Envelope, content: bytes,
                 again: bool) -> None:
        """The outbound queue file: the same message for the recipients that leave this host."""
        indexes = [i for i, r in enumerate(envelope.recipients) if r in fp.forwarded]
        out = Envelope(
            queue_id=fp.queue_id, message_id=envelope.message_id,
            originator=envelope.originator, recipients=fp.forwarded,
            received_ns=envelope.received_ns, peer_ip=envelope.peer_ip, helo=envelope.helo,
            size=envelope.size, ret=envelope.ret, envid=envelope.envid,
            notify=[envelope.rcpt_notify(i) for i in indexes] if envelope.notify else [],
            orcpt=[envelope.rcpt_orcpt(i) for i in indexes] if envelope.orcpt else [],
            relayed=envelope.relayed, notice=envelope.notice)
        if not (again and any((self.spool.root / q / fp.queue_id).exists() for q in _FORWARDED)):
            self.spool.store("outbound", out, content, sync=False)
        fp.handed.append(OutboundItem(
            fp.queue_id, "outbound",
            sorted({destination_of(r, self.router) for r in fp.forwarded}), 0.0))

    def _notice(self, fp: FrameworkPass, kind: str, notice_id: str, envelope: Envelope,
                content: bytes, indexes: list[int]) -> None:
        what = "FAILURE" if kind == "failure" else "SUCCESS"
        reports = []
        for i in indexes:
            if not _wants(envelope.rcpt_notify(i), what):
                continue
            rcpt = envelope.recipients[i]
            if kind == "failure":
                reports.append(RecipientReport(
                    final_recipient=rcpt, action="failed", status="5.1.1",
                    original_recipient=envelope.rcpt_orcpt(i) or None,
                    diagnostic_code=f"550 5.1.1 <{rcpt}>: Recipient address rejected: "
                                    "User unknown in local recipient table"))
            else:
                reports.append(RecipientReport(
                    final_recipient=rcpt, action="delivered", status="2.0.0",
                    original_recipient=envelope.rcpt_orcpt(i) or None,
                    diagnostic_code="250 2.0.0 delivered to mailbox"))
        queued = queue_notice(self.spool, self.notice_settings, kind=kind, notice_id=notice_id,
                              envelope=envelope, content=content, reports=reports)
        if queued is not None:
            fp.notices.append((kind, queued, [r.final_recipient for r in reports]))
            fp.handed.append(OutboundItem(notice_id, "incoming", [], 0.0))

    def _filter(self, fp: FrameworkPass, match: FilterMatch) -> None:
        """The source's virus filters: keep (the quarantine queue) or discard, journaled OW."""
        fp.filtered = True
        if match.action == "keep":
            self.spool.move(fp.queue_id, "incoming", "quarantine", sync=False)
            fp.journal("OW", detail=f"kept in quarantine: {match.reason}")
            log.info("%s: quarantined by filter: %s", fp.queue_id, match.reason)
        else:
            self.spool.remove("incoming", fp.queue_id, sync=False)
            fp.journal("OW", detail=f"discarded: {match.reason}")
            log.info("%s: discarded by filter: %s", fp.queue_id, match.reason)

    def park(self, queue_id: str) -> tuple[str, dict[str, Any]] | None:
        """Storage threshold: move a message to the busy queue untouched; its 7L entry (None
        when it is no longer on the incoming queue)."""
        try:
            envelope = self.spool.load_envelope("incoming", queue_id)
            self.spool.move(queue_id, "incoming", "busy", sync=False)
        except FileNotFoundError:
            return None
        return ("7L", {"queue_id": queue_id, "message_id": envelope.message_id,
                       "detail": "storage threshold: on the busy queue"})

    def complete(self, fp: FrameworkPass) -> None:
        """Second half, once every write is durable: journal it, take the message off."""
        if fp.filtered:
            return  # already off the incoming queue (quarantined or discarded)
        env = fp.envelope
        delay = time.time() - env.received_ns / 1e9
        for rcpt, tag, box in fp.outcome:
            fp.journal("P2", recipient=rcpt, tag=tag, detail=tag)
            if box is not None:
                fp.journal("B8", mailbox=str(box), detail=str(box))
                fp.journal("B2", recipient=rcpt)
                log.info(DELIVERY, fp.queue_id, rcpt, "local", delay, "sent",
                         f"delivered to mailbox {box.name}")
            elif tag == TAG_NONDEL:
                log.info(DELIVERY, fp.queue_id, rcpt, "none", delay, "bounced",
                         "5.1.1 User unknown in local recipient table")
        if fp.forwarded:
            fp.journal("C6", detail="outbound")
            fp.journal("C1", originator=env.originator)
            for rcpt in fp.forwarded:
                fp.journal("C2", recipient=rcpt)
            if env.relayed:
                fp.journal("96", detail="outbound")
        for kind, queued, recipients in fp.notices:
            new = queued.envelope
            generated = {"new_queue_id": new.queue_id, "new_message_id": new.message_id}
            if kind == "failure":
                for rcpt in recipients:
                    fp.journal("7P", recipient=rcpt)
                fp.journal("7G", detail="non-delivery notice", **generated)
                first = ("AP", "A1", "A2")
            else:
                fp.journal("7R", detail="confirmation of delivery")
                fp.journal("7G", detail="confirmation of delivery", **generated)
                first = ("BR", "B1", "B2")
            notice_ids = {"queue_id": new.queue_id, "message_id": new.message_id}
            fp.entries.append((first[0], {"detail": kind, **notice_ids}))
            fp.entries.append((first[1], {"originator": "", **notice_ids}))
            for rcpt in new.recipients:
                fp.entries.append((first[2], {"recipient": rcpt, **notice_ids}))
        # Durable at the next group commit; until then a crash re-runs the pass, which finds
        # every copy, the outbound file and the notices already there.
        self.spool.remove("incoming", fp.queue_id, sync=False)
