"""Mail from programs into the incoming queue: what `sendmail` and the send-mail API share.

A submitted message enters the queue the way an SMTP one does: checked, given a trace header
(and a Message-ID when it has none), written into `spool/incoming/` and made durable (file and
directory fsync) before `submit` returns. The framework then delivers it and journals the
source's EH E1 E2 ET for it (Envelope.source says it came from a program). A running host is
told at once over the control socket; when none answers the message simply waits in the
incoming queue, which the host hands to the framework when it starts.

Also here: the header-section reading both callers need (`split_header`), since `sendmail`
takes recipients from headers and adds missing ones, and the API refuses a file without an
end of header.
"""

from __future__ import annotations

import email.utils
import errno
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mailpool.config import LoadedConfig
from mailpool.directory import AddressLookup
from mailpool.framework.spool import Envelope, Spool
from mailpool.message import find_message_id, message_id_header
from mailpool.protocol.smtp_syntax import is_mailbox
from mailpool.storage import SpaceCheck

log = logging.getLogger("mailpool.submit")

# The source's limits (QtmmSendMail): an SMTP address is at most 256 bytes, originator and
# each recipient alike ("determined by Internet standards").
MAX_ADDRESS = 256
# Seconds to wait for a running host to take the notification; none answering is fine.
NOTIFY_TIMEOUT = 5.0


class SubmitError(Exception):
    """The message was not queued. `reason` says why, for the caller's own codes:

    "address" (bad syntax), "length" (an address over MAX_ADDRESS bytes), "recipients"
    (none), "size" (over [smtp] max_message_size), "space" (under [storage] min_free_mb),
    "permission" (the queue cannot be written by this user) or "queue" (a write failed).
    """

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason
        self.text = text


# --- header section -------------------------------------------------------------------------

_FIELD_START = re.compile(rb"[!-9;-~]+[ \t]*:")  # field name (any printable but ':'), colon
_BARE_LF = re.compile(rb"(?<!\r)\n")


def normalize_line_ends(content: bytes) -> bytes:
    """Bare LF line ends as CRLF, as they are on the wire and in every spool file (programs
    write Unix text); CRLF and lone CR stay as they are."""
    return _BARE_LF.sub(b"\r\n", content)


@dataclass(frozen=True)
class HeaderSection:
    """A message cut into its header fields (each raw, folded lines and CRLF included) and
    the body. `ended` says an empty line closed the header section (the source's "end-of-
    header statement"); without one the header section ends at the first line that is not a
    field (or at the end of the message) and the body is everything from there."""

    fields: tuple[bytes, ...]
    body: bytes
    ended: bool

    def names(self) -> set[str]:
        return {field_name(f) for f in self.fields}

    def values(self, *names: str) -> list[str]:
        """Unfolded values of the fields named (case-insensitive), in message order."""
        wanted = {n.lower() for n in names}
        return [field_value(f) for f in self.fields if field_name(f) in wanted]

    def without(self, *names: str) -> HeaderSection:
        wanted = {n.lower() for n in names}
        kept = tuple(f for f in self.fields if field_name(f) not in wanted)
        return HeaderSection(kept, self.body, self.ended)

    def plus(self, *fields: bytes) -> HeaderSection:
        """Fields added at the end of the header section (where Postfix's cleanup puts the
        headers it adds)."""
        return HeaderSection((*self.fields, *fields), self.body, self.ended)

    def join(self) -> bytes:
        """The message again; a header section that had no empty line after it gets one
        (the body must not run into added fields)."""
        return b"".join(self.fields) + b"\r\n" + self.body


def field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip(b" \t").decode("latin-1").lower()


def field_value(field: bytes) -> str:
    raw = field.split(b":", 1)[1]
    unfolded = re.sub(rb"\r?\n(?=[ \t])", b"", raw).strip()
    return unfolded.decode("utf-8", "replace")


def split_header(content: bytes) -> HeaderSection:
    """Cut `content` (CRLF line ends) into header fields and body."""
    fields: list[bytes] = []
    pos = 0
    while pos < len(content):
        end = content.find(b"\n", pos)
        end = len(content) if end < 0 else end + 1
        line = content[pos:end]
        if line in (b"\r\n", b"\n"):
            return HeaderSection(tuple(fields), content[end:], True)
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _FIELD_START.match(line):
            fields.append(line if line.endswith(b"\n") else line + b"\r\n")
        else:
            break
        pos = end
    return HeaderSection(tuple(fields), content[pos:], False)


# --- submission -----------------------------------------------------------------------------


def check_address(address: str, what: str) -> None:
    """RFC 5321 mailbox syntax and the source's length; SubmitError otherwise."""
    if len(address.encode("utf-8", "surrogateescape")) > MAX_ADDRESS:
        raise SubmitError("length", f"{what} {address[:40]!r}...: longer than "
                                    f"{MAX_ADDRESS} bytes")
    if not is_mailbox(address):
        raise SubmitError("address", f"{what} {address!r}: bad address syntax")


def received_header(*, hostname: str, queue_id: str, uid: int, protocol: str) -> bytes:
    """The trace header of a local submission (Postfix's pickup writes one like it)."""
    stamp = email.utils.format_datetime(datetime.fromtimestamp(int(time.time()), UTC))
    return (f"Received: from local (uid {uid})\r\n"
            f"\tby {hostname} (mailpool) with {protocol} id {queue_id};\r\n"
            f"\t{stamp}\r\n").encode()


def submit(loaded: LoadedConfig, *, originator: str, recipients: Sequence[str],
           content: bytes, source: str, protocol: str = "local", helo: str = "",
           ret: str = "", envid: str = "", notify: str = "") -> str:
    """Queue one message durably on the incoming queue; its queue id.

    `originator` is the reverse-path ("" = the null sender), `recipients` the envelope
    recipients (duplicates, in any letter case, are dropped as the SMTP server drops them),
    `content` the message as the program gave it (bare LF line ends are made CRLF),
    `source` "sendmail" or "api" (journaled EH by the framework), `protocol` the trace
    header's "with" word. `ret`, `envid` and `notify` ("SUCCESS,FAILURE", "NEVER", ...,
    for every recipient) are RFC 3461 DSN requests. Raises SubmitError.
    """
    cfg = loaded.config
    if originator:
        check_address(originator, "sender")
    if not recipients:
        raise SubmitError("recipients", "no recipients")
    unique: dict[str, str] = {}
    for rcpt in recipients:
        check_address(rcpt, "recipient")
        unique.setdefault(rcpt.lower(), rcpt)
    rcpts = list(unique.values())
    content = normalize_line_ends(content)
    if len(content) > cfg.smtp.max_message_size:
        raise SubmitError("size", f"message of {len(content)} bytes exceeds the limit of "
                                  f"{cfg.smtp.max_message_size} bytes")
    if SpaceCheck(loaded.data_dir, cfg.storage.min_free_mb).low():
        raise SubmitError("space", f"insufficient system storage under {loaded.data_dir}")
    try:
        spool = Spool(loaded.spool_dir)
        queue_id = spool.new_queue_id()
        prefix = received_header(hostname=cfg.host.name, queue_id=queue_id, uid=os.getuid(),
                                 protocol=protocol)
        message_id = find_message_id(content)
        if message_id is None:
            message_id, header = message_id_header(queue_id, cfg.host.name)
            prefix += header
        data = prefix + content
        envelope = Envelope(queue_id=queue_id, message_id=message_id, originator=originator,
                            recipients=rcpts, received_ns=time.time_ns(), helo=helo,
                            size=len(data), ret=ret, envid=envid,
                            notify=[notify] * len(rcpts) if notify else [], source=source)
        path = spool.store("incoming", envelope, data, sync=True)
        _give_to_spool_owner(path, loaded.spool_dir)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        reason = "permission" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) \
            else "queue"
        raise SubmitError(reason, f"cannot write the incoming queue: {where}"
                                  f"{exc.strerror or exc}") from None
    _tell_host(loaded, queue_id)
    return queue_id


def _give_to_spool_owner(path: Path, spool_dir: Path) -> None:
    """Run by root while the host runs as its own user (it dropped privileges): the file
    must be that user's or the framework cannot read it. The new owner is made durable
    with the file (a crash must not leave a file the host cannot read)."""
    if os.geteuid() != 0:
        return
    st = os.stat(spool_dir)
    if st.st_uid == 0:
        return
    os.chown(path, st.st_uid, st.st_gid)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tell_host(loaded: LoadedConfig, queue_id: str) -> None:
    """Hand the message to a running host now; without one it waits for the next start."""
    from mailpool.supervisor.control import ControlError, ControlUnavailable, request

    try:
        request(loaded.control_socket, {"op": "queue-submitted", "queue_id": queue_id},
                timeout=NOTIFY_TIMEOUT)
    except ControlUnavailable:
        return  # no host running: it takes the incoming queue when it starts
    except (ControlError, OSError, ValueError) as exc:
        log.warning("warning: %s is queued, but the running host did not take it (%s): it "
                    "is delivered when the host next starts", queue_id, exc)


def qualify(address: str, domain: str) -> str:
    """A bare name is a local user's: name@<first local domain> (Postfix's myorigin)."""
    return f"{address}@{domain}" if address and "@" not in address else address


def is_unknown_local(address: str, local_domains: set[str], directory: AddressLookup) -> bool:
    """A local-domain address that no user owns (postmaster always exists)."""
    local, _, domain = address.rpartition("@")
    if domain.lower().rstrip(".") not in local_domains or local.lower() == "postmaster":
        return False
    return directory.lookup(address) is None
