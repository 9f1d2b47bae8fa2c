"""What is queued, read straight from the spool (works with the host stopped): `queue list`.

One record per message with `postqueue -j`'s field names, so scripts written for Postfix keep
working: queue_name, queue_id, arrival_time (Unix seconds), message_size, sender, recipients
(a list of {"address", "delay_reason"}), plus next_attempt (Unix seconds or null) and
attempts. Only recipients still to be served are listed, as postqueue does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from mailpool.framework.spool import Spool, SpoolError
from mailpool.outbound.state import OUTBOUND_QUEUES, PENDING, load_state


def queued(spool: Spool, queues: tuple[str, ...] = Spool.QUEUES) -> Iterator[dict[str, Any]]:
    for queue in queues:
        for queue_id in spool.list(queue):
            try:
                envelope = spool.load_envelope(queue, queue_id)
            except FileNotFoundError:
                continue  # delivered while we looked
            except SpoolError as exc:
                yield {"queue_name": queue, "queue_id": queue_id, "error": str(exc)}
                continue
            recipients: list[dict[str, str]] = []
            next_attempt: float | None = None
            attempts = 0
            if queue in OUTBOUND_QUEUES:
                try:
                    state = load_state(spool, queue_id, len(envelope.recipients))
                except SpoolError as exc:
                    yield {"queue_name": queue, "queue_id": queue_id, "error": str(exc)}
                    continue
                attempts = state.attempts
                next_attempt = state.next_attempt or None
                for rcpt, rs in zip(envelope.recipients, state.recipients, strict=True):
                    if rs.status == PENDING:
                        entry = {"address": rcpt}
                        if rs.reason:
                            entry["delay_reason"] = rs.reason
                        recipients.append(entry)
            else:
                recipients = [{"address": rcpt} for rcpt in envelope.recipients]
            yield {"queue_name": queue, "queue_id": queue_id,
                   "arrival_time": envelope.received_ns // 1_000_000_000,
                   "message_size": envelope.size, "sender": envelope.originator,
                   "recipients": recipients, "next_attempt": next_attempt,
                   "attempts": attempts, "message_id": envelope.message_id}


def show(spool: Spool, queue_id: str, part: str = "all") -> str:
    """What `queue show` prints: the envelope, each recipient's state, then the message
    ("all"), only its headers ("headers") or only its body ("body")."""
    queue = spool.find(queue_id)
    if queue is None:
        raise ValueError(f"{queue_id}: no such message in any queue")
    envelope, content = spool.load(queue, queue_id)
    head, _, body = content.partition(b"\r\n\r\n")
    if part == "headers":
        return (head + b"\r\n").decode("utf-8", "replace").replace("\r\n", "\n")
    if part == "body":
        return body.decode("utf-8", "replace").replace("\r\n", "\n")
    lines = [f"*** ENVELOPE ({queue}) ***",
             f"queue_id: {queue_id}",
             f"message_id: {envelope.message_id}",
             "arrival_time: " + time.strftime("%Y-%m-%d %H:%M:%S %z",
                                              time.localtime(envelope.received_ns / 1e9)),
             f"message_size: {envelope.size}",
             f"sender: {envelope.originator or '<>'}",
             f"client: [{envelope.peer_ip}] helo={envelope.helo}" if envelope.peer_ip else
             "client: local"]
    states = None
    if queue in OUTBOUND_QUEUES:
        state = load_state(spool, queue_id, len(envelope.recipients))
        states = state.recipients
        lines.append(f"attempts: {state.attempts}, next attempt: "
                     + (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.next_attempt))
                        if state.next_attempt else "now"))
    for i, rcpt in enumerate(envelope.recipients):
        line = f"recipient: {rcpt}"
        if envelope.rcpt_notify(i):
            line += f" NOTIFY={envelope.rcpt_notify(i)}"
        if states is not None:
            rs = states[i]
            line += f" [{rs.status}" + (f": {rs.reason}" if rs.reason else "") + "]"
        lines.append(line)
    lines.append("*** MESSAGE CONTENTS ***")
    lines.append(content.decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n"))
    lines.append("*** END OF MESSAGE ***")
    return "\n".join(lines) + "\n"


# mailq's marks after the queue id: being delivered or due, on hold.
_MARKS = {"outbound": "*", "hold": "!", "quarantine": "!"}


def mailq_text(rows: list[dict[str, Any]]) -> str:
    """The table `mailq` prints."""
    if not rows:
        return "Mail queue is empty\n"
    lines = ["-Queue ID-              --Size-- ----Arrival Time---- -Sender/Recipient-------"]
    total = 0
    for row in rows:
        if "error" in row:
            lines.append(f"{row['queue_id']:<23}  (unreadable: {row['error']})")
            continue
        total += row["message_size"]
        arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(row["arrival_time"]))
        qid = row["queue_id"] + _MARKS.get(row["queue_name"], "")
        lines.append(f"{qid:<23} {row['message_size']:>9} {arrival}  "
                     f"{row['sender'] or 'MAILER-DAEMON'}")
        reasons: dict[str, list[str]] = {}
        for rcpt in row["recipients"]:
            reasons.setdefault(rcpt.get("delay_reason", ""), []).append(rcpt["address"])
        for reason, addresses in reasons.items():
            if reason:
                lines.append(f"{'':>56}({reason})")
            lines += [f"{'':>56}{addr}" for addr in addresses]
        lines.append("")
    kb = (total + 1023) // 1024
    n = len(rows)
    lines.append(f"-- {kb} Kbytes in {n} Request{'s' if n != 1 else ''}.")
    return "\n".join(lines) + "\n"
