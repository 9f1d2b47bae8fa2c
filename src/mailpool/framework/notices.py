"""Delivery status notifications (RFC 3464, RFC 3461, RFC 6522), built with the email package.

A notice tells a message's originator what became of it: failure (non-delivery), delay or
success. It is an RFC 6522 multipart/report of three parts: a text for people in the style of
Postfix, the machine-readable message/delivery-status, and the original message (whole, or
only its header section). The caller queues the bytes with the null sender `<>`.

Pure: the clock value and the notice's queue id come in, so the same call gives the same
bytes (the MIME boundary is derived from them too). The notice is always 7-bit ASCII
(UTF-8 only in From/To when one of those addresses needs it), whatever the original holds.

Size: the original is returned whole only up to `max_original_size` octets, else its header
section, cut to fit. Every report field is capped (a remote reply at 512 characters), so a
notice is at most max_original_size + 6 KiB + 4 KiB per recipient even with every field at
its cap; a usual notice about two recipients adds about 2 KB to the original.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as email_policy
from email.errors import HeaderParseError
from email.headerregistry import Address, HeaderRegistry
from email.message import EmailMessage, Message, MIMEPart
from email.policy import Policy
from email.utils import format_datetime
from typing import Any

from mailpool.protocol.smtp_syntax import ENHANCED_RE

KINDS = ("failure", "delay", "success")
# The per-recipient actions (RFC 3464 2.3.3) each kind of notice reports.
ACTIONS = {
    "failure": frozenset({"failed"}),
    "delay": frozenset({"delayed"}),
    "success": frozenset({"delivered", "relayed", "expanded"}),
}
# The status class (RFC 3463) each action may carry: an expired message fails with 4.4.7.
_STATUS_CLASSES = {"failed": "45", "delayed": "4", "delivered": "2", "relayed": "2",
                   "expanded": "2"}
SUBJECTS = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}
POSTMASTER_SUBJECT = "Postmaster Copy: Undelivered Mail"
FROM_NAME = "Mail Delivery System"

# Field caps: a remote reply line is at most 512 octets (RFC 5321 4.5.3.1.5), an ORCPT 500.
_MAX_DIAGNOSTIC = 512
_MAX_ADDRESS = 600
_MAX_HOST = 255
# Recipients explained one by one in the text part; the report part lists them all.
_MAX_TEXT_RECIPIENTS = 25
# Quoted-printable writes an octet in up to 3 characters plus soft line breaks.
_QP_GROWTH = 4

_WHITESPACE = re.compile(r"\s+")
_HEADER_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_QUEUE_ID = re.compile(r"[A-Za-z0-9._-]+")
_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[\x21-\x5a\x5e-\x7e]+\]")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")  # an atom (RFC 3461 4.2)
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class RecipientReport:
    final_recipient: str  # the address we tried, e.g. "bob@far.test"
    action: str  # "failed" | "delayed" | "delivered" | "relayed" | "expanded"
    status: str  # enhanced status code, e.g. "5.1.1", "4.4.1", "2.0.0"
    original_recipient: str | None = None  # from ORCPT, "rfc822;bob@far.test" (type;address)
    diagnostic_code: str | None = None  # the remote reply, written as "smtp; <reply>"
    remote_mta: str | None = None  # e.g. "mx1.far.test" (written as "dns; mx1.far.test")
    last_attempt: float | None = None  # Unix seconds
    will_retry_until: float | None = None  # for "delayed"


@dataclass(frozen=True)
class OriginalMessage:
    queue_id: str
    message_id: str  # without angle brackets; may be ""
    originator: str  # envelope sender
    arrival: float  # Unix seconds
    envid: str | None  # DSN ENVID (decoded); written as Original-Envelope-Id
    ret: str | None  # "FULL", "HDRS" or None (FULL for failures, HDRS for delay/success)
    content: bytes  # the original message as stored (CRLF line ends)


@dataclass(frozen=True)
class Notice:
    kind: str  # "failure" | "delay" | "success"
    content: bytes  # the whole RFC 5322 message, CRLF line ends
    message_id: str  # the notice's Message-ID without brackets


# -- message/delivery-status fields ---------------------------------------------------------


class _DsnField:
    """A DSN field (RFC 3464 2.1): printable ASCII, folded at spaces only.

    The email package folds a word too long for one line into RFC 2047 encoded words, which
    DSN readers take literally: a long URL in a remote reply would come back as
    "=?utf-8?q?...?=". Values here are made printable ASCII and capped beforehand, so plain
    whitespace folding always does and keeps every line under 998 octets.
    """

    max_count = None

    @classmethod
    def parse(cls, value: str, kwds: dict[str, Any]) -> None:
        kwds["parse_tree"] = None
        kwds["decoded"] = value

    def fold(self, *, policy: Policy) -> str:
        limit = policy.max_line_length or 0
        lines = [f"{self.name}:"]  # type: ignore[attr-defined]
        for i, word in enumerate(str(self).split(" ")):
            if i and limit and len(lines[-1]) + 1 + len(word) > limit:
                lines.append(" " + word)  # unfolding drops the CRLF: the space is kept
            else:
                lines[-1] += " " + word
        return policy.linesep.join(lines) + policy.linesep


# Header blocks of the report part: every field a _DsnField, never an encoded word.
_DSN_POLICY = email_policy.SMTP.clone(
    header_factory=HeaderRegistry(default_class=_DsnField, use_default_map=False))


def _printable(text: str, limit: int) -> str:
    """One line of printable ASCII, at most limit characters: whitespace runs become one space
    and anything else outside ASCII is written \\x{HEX} (the escape of RFC 6533)."""
    text = _WHITESPACE.sub(" ", text).strip()
    out = "".join(ch if " " <= ch <= "~" else f"\\x{{{ord(ch):X}}}" for ch in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _address_field(address: str) -> str:
    """`rfc822; addr`; an address that is not printable ASCII (SMTPUTF8) takes RFC 6533's
    `utf-8;` type in its 7-bit form, so the report part stays plain ASCII."""
    if address and all(" " <= ch <= "~" for ch in address):
        return "rfc822; " + _printable(address, _MAX_ADDRESS)
    escaped = "".join(
        ch if "!" <= ch <= "~" and ch not in "\\+=" else f"\\x{{{ord(ch):X}}}" for ch in address)
    return "utf-8; " + _printable(escaped, _MAX_ADDRESS)


def _original_recipient_field(orcpt: str) -> str:
    addr_type, semi, address = orcpt.partition(";")
    addr_type = addr_type.strip()
    if not semi or not _ADDR_TYPE.fullmatch(addr_type):
        return _address_field(orcpt)
    return f"{addr_type}; {_printable(address, _MAX_ADDRESS)}"


def _date(timestamp: float) -> str:
    """RFC 5322 date-time, in UTC (no local time zone: the module is pure)."""
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))


def _block(fields: list[tuple[str, str]]) -> Message:
    block = Message(policy=_DSN_POLICY)
    for name, value in fields:
        block[name] = value
    return block


def _report_part(original: OriginalMessage, reports: Sequence[RecipientReport],
                 reporting_mta: str) -> MIMEPart:
    per_message = [("Reporting-MTA", f"dns; {reporting_mta}"),
                   ("X-Mailpool-Queue-ID", _printable(original.queue_id, _MAX_HOST))]
    if original.envid:
        per_message.append(("Original-Envelope-Id", _printable(original.envid, _MAX_ADDRESS)))
    per_message.append(("Arrival-Date", _date(original.arrival)))
    blocks = [_block(per_message)]
    for r in reports:
        fields = [("Final-Recipient", _address_field(r.final_recipient))]
        if r.original_recipient:
            fields.append(("Original-Recipient", _original_recipient_field(r.original_recipient)))
        fields += [("Action", r.action), ("Status", r.status)]
        if r.remote_mta:
            fields.append(("Remote-MTA", "dns; " + _printable(r.remote_mta, _MAX_HOST)))
        if r.diagnostic_code:
            fields.append(("Diagnostic-Code",
                           "smtp; " + _printable(r.diagnostic_code, _MAX_DIAGNOSTIC)))
        if r.last_attempt is not None:
            fields.append(("Last-Attempt-Date", _date(r.last_attempt)))
        if r.action == "delayed" and r.will_retry_until is not None:
            fields.append(("Will-Retry-Until", _date(r.will_retry_until)))
        blocks.append(_block(fields))
    part = MIMEPart(policy=email_policy.SMTP)
    part["Content-Type"] = "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    # The generator writes a list payload of header blocks separated by empty lines, which
    # is how the parser reads message/delivery-status back.
    part.set_payload(blocks)
    return part


# -- the original message --------------------------------------------------------------------


def _is_plain_message(content: bytes) -> bool:
    """Whether the original can go back whole as a 7bit message/rfc822: ASCII without NUL,
    CRLF line ends only, lines of at most 998 octets, a header field first and an empty
    line ending the header section."""
    if not content.isascii() or b"\0" in content or b"\r\n\r\n" not in content:
        return False
    if not _HEADER_NAME.match(content):
        return False
    return all(b"\r" not in line and b"\n" not in line and len(line) <= 998
               for line in content.split(b"\r\n"))


def _header_section(content: bytes, cap: int) -> tuple[bytes, bool]:
    """The original's header section (up to its first empty line, or all of it when there is
    none), cut at a line end to at most cap octets; and whether it was cut."""
    kept: list[bytes] = []
    size = 0
    for line in content[: cap + 1].splitlines(keepends=True):
        if not line.rstrip(b"\r\n"):
            return b"".join(kept), False
        if size + len(line) > cap:
            return b"".join(kept), True
        kept.append(line)
        size += len(line)
    return b"".join(kept), False


def _is_plain_text(data: bytes) -> bool:
    return (data.isascii() and not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", data)
            and all(len(line) <= 998 for line in data.splitlines()))


def _headers_part(content: bytes, cap: int) -> tuple[MIMEPart, bool]:
    """text/rfc822-headers with the original's header section (RFC 6522 3), and whether it
    was cut. Odd bytes (8-bit, controls, overlong lines) travel quoted-printable: UTF-8 as
    such, anything else labelled ISO-8859-1, which keeps every octet as it was."""
    section, cut = _header_section(content, cap)
    if _is_plain_text(section):
        text, charset, cte = section.decode("ascii"), "us-ascii", "7bit"
    else:
        section, cut2 = _header_section(content, cap // _QP_GROWTH)
        cut = cut or cut2
        if section.isascii():
            text, charset = section.decode("ascii"), "us-ascii"
        else:
            try:
                text, charset = section.decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                text, charset = section.decode("latin-1"), "iso-8859-1"
        cte = "quoted-printable"
    part = MIMEPart(policy=email_policy.SMTP)
    part.set_content(text, subtype="rfc822-headers", charset=charset, cte=cte)
    part["Content-Description"] = "Message headers"
    return part, cut


def _message_part(content: bytes) -> MIMEPart:
    part = MIMEPart(policy=email_policy.SMTP)
    part["Content-Type"] = "message/rfc822"
    part["Content-Description"] = "Message"
    # A string payload is written out as it is: parsing the original and letting the
    # generator write it again would refold its long header lines (even into encoded
    # words). _is_plain_message() has made sure it is 7-bit with CRLF line ends.
    part.set_payload(content.decode("ascii"))
    return part


def _original_part(original: OriginalMessage, full: bool,
                   max_size: int) -> tuple[MIMEPart, str]:
    """Part 3 and a sentence for the text part saying what it holds."""
    size = len(original.content)
    if full and size <= max_size and _is_plain_message(original.content):
        return _message_part(original.content), "Your message is attached below."
    part, cut = _headers_part(original.content, max_size)
    if not full:
        note = "The headers of your message are attached below."
    elif size > max_size:
        note = (f"Your message is {size} octets long, over the {max_size}-octet limit for"
                " returned mail, so only its headers are attached below.")
    else:
        note = ("Your message is not plain 7-bit text with CRLF line ends, so only its"
                " headers are attached below.")
    if cut:
        note += f" They were cut to fit in {max_size} octets."
    return part, note


# -- the text for people ---------------------------------------------------------------------

# RFC 3463: the subject (second number) of a status, and a few common details.
_STATUS_SUBJECTS = {"0": "other or undefined status", "1": "addressing status",
                    "2": "mailbox status", "3": "mail system status",
                    "4": "network and routing status", "5": "mail delivery protocol status",
                    "6": "message content or media status", "7": "security or policy status"}
_STATUS_DETAILS = {"1.1": "bad destination mailbox address",
                   "1.2": "bad destination system address",
                   "1.3": "bad destination mailbox address syntax",
                   "2.1": "mailbox disabled, not accepting messages", "2.2": "mailbox full",
                   "2.3": "message length exceeds administrative limit",
                   "3.4": "message too big for system", "4.1": "no answer from host",
                   "4.2": "bad connection", "4.4": "unable to route",
                   "4.6": "routing loop detected", "4.7": "delivery time expired",
                   "7.1": "delivery not authorized, message refused"}


def _status_meaning(status: str) -> str:
    _, subject, detail = status.split(".")
    return _STATUS_DETAILS.get(f"{subject}.{detail}",
                               _STATUS_SUBJECTS.get(subject, "other or undefined status"))


def _explain(r: RecipientReport) -> str:
    """One recipient's line of the text part, as Postfix writes it: `<addr>: reason`."""
    mta = _printable(r.remote_mta, _MAX_HOST) if r.remote_mta else None
    said = _printable(r.diagnostic_code, _MAX_DIAGNOSTIC) if r.diagnostic_code else None
    if r.action in ("failed", "delayed"):
        if said:
            reason = f"host {mta} said: {said}" if mta else said
        else:
            reason = f"{_status_meaning(r.status)} (status {r.status})"
            if mta:
                reason += f", at host {mta}"
    elif r.action == "delivered":
        reason = f"delivered via {mta}" if mta else "delivered to mailbox"
        reason += f": {said}" if said else ""
    elif r.action == "relayed":
        reason = f"relayed to {mta}" if mta else "relayed"
        reason += ", which does not report delivery" + (f": {said}" if said else "")
    else:
        reason = "delivered to the addresses it expands to (a list or an alias)"
    address = _printable(r.final_recipient, _MAX_ADDRESS)
    return textwrap.fill(f"<{address}>: {reason}", width=76, subsequent_indent="    ",
                         break_long_words=False, break_on_hyphens=False)


_WARNING_BANNER = "\n".join(["#" * 68, "# THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND YOUR"
                                               " MESSAGE.  #", "#" * 68])


def _paragraph(text: str) -> str:
    return textwrap.fill(text, width=72, break_long_words=False, break_on_hyphens=False)


def _age(seconds: float) -> str:
    hours = int(seconds // 3600)
    if hours < 1:
        return "less than an hour"
    if hours < 48:
        return f"more than {hours} hour(s)"
    return f"more than {hours // 24} day(s)"


def _text(kind: str, original: OriginalMessage, reports: Sequence[RecipientReport],
          reporting_mta: str, note: str, postmaster_copy: bool, now: float) -> str:
    paragraphs = [f"This is the mail system at host {reporting_mta}."]
    if postmaster_copy:
        paragraphs.append(
            "This is a copy for the postmaster. The message attached below is itself a"
            " delivery notice, sent with the null sender, that could not be delivered; it"
            " cannot be returned to anyone else.")
    elif kind == "failure":
        paragraphs.append(
            "I'm sorry to tell you that your message could not be delivered to one or more"
            " recipients. The reasons are given below.")
    elif kind == "delay":
        paragraphs.append(_WARNING_BANNER)
        sentence = (f"Your message could not be delivered for {_age(now - original.arrival)}"
                    " to the recipients below.")
        until = [r.will_retry_until for r in reports if r.will_retry_until is not None]
        if until:
            sentence += f" It will be retried until {_date(max(until))}."
        paragraphs.append(sentence)
    else:
        sentence = "Your message was delivered to the destinations listed below."
        if any(r.action == "relayed" for r in reports):
            sentence += (" Where it was relayed, the next system does not report delivery,"
                         " so you may still get a notice of a delivery error from there.")
        paragraphs.append(sentence)
    if original.message_id:
        note = f"Your message's Message-ID: <{_printable(original.message_id, _MAX_ADDRESS)}>. "\
            + note
    paragraphs.append(note)
    if kind != "success":
        paragraphs.append("For further help, write to the postmaster of this host and include"
                          " this report.")
    out = [p if p is _WARNING_BANNER else _paragraph(p) for p in paragraphs]
    out.append("                   The mail system")
    out += [_explain(r) for r in reports[:_MAX_TEXT_RECIPIENTS]]
    if len(reports) > _MAX_TEXT_RECIPIENTS:
        out.append(f"... and {len(reports) - _MAX_TEXT_RECIPIENTS} more recipient(s), all"
                   " listed in the delivery report.")
    return "\n\n".join(out) + "\n"


# -- the notice ------------------------------------------------------------------------------


def _check(kind: str, reports: Sequence[RecipientReport], postmaster_copy: bool,
           header_values: dict[str, str]) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown notice kind {kind!r}")
    if not reports:
        raise ValueError("a notice needs at least one recipient report")
    if postmaster_copy and kind != "failure":
        raise ValueError("a postmaster copy is a failure notice")
    for r in reports:
        if r.action not in ACTIONS[kind]:
            raise ValueError(f"action {r.action!r} in a {kind} notice")
        if not ENHANCED_RE.fullmatch(r.status) or r.status[0] not in _STATUS_CLASSES[r.action]:
            raise ValueError(f"status {r.status!r} for action {r.action!r}")
    for name, value in header_values.items():
        if not value or _CONTROLS.search(value):
            raise ValueError(f"{name} {value!r} is empty or holds control characters")
    # Both go into the Message-ID (id-left@id-right) and the boundary.
    if not _QUEUE_ID.fullmatch(header_values["queue_id"]):
        raise ValueError(f"queue_id {header_values['queue_id']!r} is not a queue id")
    if not _HOST.fullmatch(header_values["reporting_mta"]):
        raise ValueError(f"reporting_mta {header_values['reporting_mta']!r} is not a host name")


def _address(addr_spec: str, display_name: str = "") -> Address:
    try:
        return Address(display_name=display_name, addr_spec=addr_spec)
    except (ValueError, HeaderParseError) as exc:
        local, at, domain = addr_spec.rpartition("@")
        if at and local and domain and not addr_spec.isascii():
            # The parser refuses non-ASCII local parts, which SMTPUTF8 (RFC 6531) allows.
            return Address(display_name, local, domain)
        raise ValueError(f"{addr_spec!r} is not a mail address: {exc}") from None


def _boundary(queue_id: str, now: float, reporting_mta: str, parts: list[bytes]) -> str:
    """A boundary found in no part, derived from the inputs so the notice is reproducible."""
    base = f"{queue_id}.{int(now)}/{reporting_mta}"
    candidate, n = base, 0
    while any(candidate.encode() in part for part in parts):
        n += 1
        candidate = f"{base}/{n}"
    return candidate


def build_notice(*, kind: str, original: OriginalMessage, reports: Sequence[RecipientReport],
                 reporting_mta: str, sender: str, to: str, now: float, queue_id: str,
                 max_original_size: int = 64 * 1024, postmaster_copy: bool = False) -> Notice:
    """The notice of `kind` about `original` for `reports`, from `sender` to `to`.

    `queue_id` is the notice's own (it makes the Message-ID), `now` its Date. ValueError for
    inconsistent arguments (unknown kind, an action or status that does not fit it, control
    characters in header values); odd original content never raises.
    """
    _check(kind, reports, postmaster_copy, {"reporting_mta": reporting_mta, "sender": sender,
                                            "to": to, "queue_id": queue_id})
    ret = (original.ret or ("FULL" if kind == "failure" else "HDRS")).upper()
    original_part, note = _original_part(original, ret == "FULL", max(max_original_size, 0))
    text_part = MIMEPart(policy=email_policy.SMTP)
    text = _text(kind, original, reports, reporting_mta, note, postmaster_copy, now)
    text_part.set_content(text, charset="us-ascii", cte="7bit")  # lines wrapped, ASCII
    text_part["Content-Description"] = "Notification"
    parts = [text_part, _report_part(original, reports, reporting_mta), original_part]

    # From and To are the only fields that may hold a non-ASCII address (SMTPUTF8 sender);
    # plain SMTP would write those as encoded words, which is not valid in an address.
    utf8 = not (sender.isascii() and to.isascii())
    policy = email_policy.SMTPUTF8 if utf8 else email_policy.SMTP
    tag = "postmaster" if postmaster_copy else kind
    message_id = f"{queue_id}.{tag}@{reporting_mta}"
    msg = EmailMessage(policy=policy)
    msg["Date"] = _date(now)
    msg["From"] = _address(sender, FROM_NAME)
    msg["To"] = _address(to)
    msg["Subject"] = POSTMASTER_SUBJECT if postmaster_copy else SUBJECTS[kind]
    msg["Message-ID"] = f"<{message_id}>"
    msg["Auto-Submitted"] = "auto-replied"  # RFC 3834: auto-responders never answer it
    msg["MIME-Version"] = "1.0"
    boundary = _boundary(queue_id, now, reporting_mta, [p.as_bytes() for p in parts])
    msg.add_header("Content-Type", "multipart/report", report_type="delivery-status",
                   boundary=boundary)
    for part in parts:
        msg.attach(part)
    return Notice(kind=kind, content=msg.as_bytes(), message_id=message_id)


def add_delivery_headers(content: bytes, *, return_path: str, delivered_to: str) -> bytes:
    """`Return-Path: <return_path>` and `Delivered-To: delivered_to` prepended to a stored
    message, as Postfix's local delivery writes them; the message itself is left as it is.
    The null sender gives `Return-Path: <>`. ValueError for CR or LF in either value."""
    for name, value in (("return_path", return_path), ("delivered_to", delivered_to)):
        if "\r" in value or "\n" in value:
            raise ValueError(f"{name} {value!r} holds CR or LF")
    head = f"Return-Path: <{return_path}>\r\nDelivered-To: {delivered_to}\r\n"
    return head.encode("utf-8") + content
