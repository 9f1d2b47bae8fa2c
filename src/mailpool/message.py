"""Small RFC 5322 helpers the receive path needs: Message-ID and trace headers."""

from __future__ import annotations

import email.utils
import re
import time
from datetime import UTC, datetime

_MSGID_HEADER = re.compile(rb"^message-id[ \t]*:(.*(?:\r?\n[ \t].*)*)",
                           re.IGNORECASE | re.MULTILINE)
_ANGLE = re.compile(rb"<([^<>\s]+)>")


def header_block(content: bytes) -> bytes:
    """The header section: everything before the first empty line."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = content.find(sep)
        if end != -1:
            return content[: end + len(sep) // 2]
    return content


def find_message_id(content: bytes) -> str | None:
    """The Message-ID without angle brackets, or None when the message has none."""
    if content.startswith((b"\r\n", b"\n")):
        return None
    match = _MSGID_HEADER.search(header_block(content))
    if not match:
        return None
    inner = _ANGLE.search(match.group(1))
    raw = inner.group(1) if inner else match.group(1).strip()
    return raw.decode("utf-8", "replace") or None


def received_header(*, helo: str, peer_ip: str, hostname: str, queue_id: str,
                    recipients: list[str], esmtp: bool, tls: str = "",
                    authenticated: bool = False) -> bytes:
    """RFC 5321 4.4 trace header, folded the way Postfix folds it; `tls` describes the
    session's encryption ("TLSv1.3 with cipher ..."), and the protocol name says it with
    RFC 3848's ESMTPS / ESMTPA / ESMTPSA."""
    proto = "SMTP"
    if esmtp:
        proto = "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")
    lines = [f"Received: from {helo or 'unknown'} ([{peer_ip}])"]
    if tls:
        lines.append(f"\t(using {tls})")
    lines.append(f"\tby {hostname} (mailpool) with {proto} id {queue_id}")
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>;")
    else:
        lines[-1] += ";"
    lines.append("\t" + _date_now())
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


_date_cache: tuple[int, str] = (0, "")


def _date_now() -> str:
    """RFC 5322 date of this second (formatted once a second: every message has one)."""
    global _date_cache
    second = int(time.time())
    if _date_cache[0] != second:
        stamp = datetime.fromtimestamp(second, UTC)
        _date_cache = (second, email.utils.format_datetime(stamp))
    return _date_cache[1]


def message_id_header(queue_id: str, hostname: str) -> tuple[str, bytes]:
    """A Message-ID for mail that came without one (Postfix's cleanup adds one too)."""
    mid = f"{queue_id}@{hostname}"
    return mid, f"Message-ID: <{mid}>\r\n".encode()
