"""Notices as new messages: built by mailpool.framework.notices, stored in the incoming queue.

A notice goes to the originator with the null sender `<>`, so nothing ever answers it. Who
gets it (RFC 5321 4.5.4, RFC 3461):
- a message from `<>` (or itself a notice) that fails gets its failure notice sent to the
  postmaster instead (the "double bounce"); a notice to the postmaster that fails is dropped
  (journaled by the caller), so there is never a bounce loop;
- delay and success notices are never sent about a message from `<>`;
- the source's NONDELIVERY tracking user, when configured, gets a copy of every failure notice.
Notice ids derive from the original's queue id, so a pass run again after a crash finds the
notice it already wrote instead of writing a second.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from mailpool.framework.notices import OriginalMessage, RecipientReport, build_notice
from mailpool.framework.spool import Envelope, Spool

POSTMASTER = "postmaster"


@dataclass(frozen=True)
class NoticeSettings:
    hostname: str               # the reporting MTA
    sender: str                 # From: of notices (the source's "responsible person")
    nondelivery_copy: str       # address of the NONDELIVERY tracking user, or ""
    max_original_size: int
    postmaster: str             # where double bounces go: postmaster@<first local domain>

    @classmethod
    def from_config(cls, cfg: object) -> NoticeSettings:
        host = cfg.host  # type: ignore[attr-defined]
        notices = cfg.notices  # type: ignore[attr-defined]
        copy = notices.nondelivery_user
        if copy and "@" not in copy:
            copy = f"{copy}@{host.local_domains[0]}"
        return cls(hostname=host.name, sender=notices.from_ or f"MAILER-DAEMON@{host.name}",
                   nondelivery_copy=copy, max_original_size=notices.max_original_size,
                   postmaster=f"{POSTMASTER}@{host.local_domains[0]}")


@dataclass(frozen=True)
class QueuedNotice:
    envelope: Envelope       # the notice's own envelope (in the incoming queue)
    postmaster_copy: bool    # sent to the postmaster about a message that had no sender
    existed: bool            # an earlier run of the same pass had already queued it


def recipient_of(kind: str, envelope: Envelope, postmaster: str) -> tuple[str, bool] | None:
    """(where the notice goes, whether it is a postmaster copy), or None: no notice."""
    if envelope.originator and not envelope.notice:
        return envelope.originator, False
    if kind != "failure":
        return None  # no delay or success reports about mail nobody can answer
    if envelope.notice and envelope.recipients and all(
            r.lower().partition("@")[0] == POSTMASTER for r in envelope.recipients):
        return None  # a postmaster copy that failed: the end of the line
    return postmaster, True


def queue_notice(spool: Spool, settings: NoticeSettings, *, kind: str, notice_id: str,
                 envelope: Envelope, content: bytes, reports: Sequence[RecipientReport],
                 now: float | None = None) -> QueuedNotice | None:
    """Write the notice into the incoming queue (not yet durable: the caller's group commit
    makes it so). None when no notice is due."""
    target = recipient_of(kind, envelope, settings.postmaster)
    if target is None or not reports:
        return None
    to, postmaster_copy = target
    existing = spool.find(notice_id)
    if existing is not None:
        return QueuedNotice(spool.load_envelope(existing, notice_id), postmaster_copy, True)
    now = time.time() if now is None else now
    original = OriginalMessage(
        queue_id=envelope.queue_id, message_id=envelope.message_id,
        originator=envelope.originator, arrival=envelope.received_ns / 1e9,
        envid=envelope.envid or None, ret=envelope.ret or None, content=content)
    notice = build_notice(kind=kind, original=original, reports=reports,
                          reporting_mta=settings.hostname, sender=settings.sender, to=to,
                          now=now, queue_id=notice_id,
                          max_original_size=settings.max_original_size,
                          postmaster_copy=postmaster_copy)
    recipients = [to]
    if kind == "failure" and settings.nondelivery_copy and settings.nondelivery_copy != to:
        recipients.append(settings.nondelivery_copy)
    new = Envelope(queue_id=notice_id, message_id=notice.message_id, originator="",
                   recipients=recipients, received_ns=int(now * 1e9), helo=settings.hostname,
                   size=len(notice.content), notice=kind)
    spool.store("incoming", new, notice.content, sync=False)
    return QueuedNotice(new, postmaster_copy, False)
