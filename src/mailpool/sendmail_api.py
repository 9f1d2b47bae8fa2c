"""The source's Send MIME Mail API (QtmmSendMail) as a Python function.

    send_mail("/home/app/out/note.mime", "app@example.test",
              [Recipient("bob@example.test", NORMAL), Recipient("audit@example.test", BCC)])

As in the source: the caller writes a complete MIME note (headers, an empty line, the body)
to a file and names it by its absolute path; the originator and each recipient (ADDT0100:
address, distribution type normal / cc / bcc, reserved 0) are the envelope. The file is sent
as it is (the caller made it: a Bcc recipient is only in the envelope), plus the trace header
and a Message-ID when it has none. It enters the incoming queue durably through
mailpool.submit, as SMTP mail does; the framework journals EH E1 E2 ET for it. Once the
message is queued the file is unlinked, as the source's framework unlinks it after taking it.

Errors raise SendMailError carrying the source's message identifier and its text:

    CPFA0A9  The object was not found.                        (no such file)
    CPFA0CE  The path name parameter ... resulted in an error. (not absolute, over 255 bytes,
                                                               not a readable regular file)
    CPF3C12  The length of data is not valid.                 (an empty or over-256-byte
                                                               originator or address)
    CPF3C17  An error occurred with input data parameter.     (address syntax, distribution
                                                               type, no end of header)
    CPF3C21  The format name ... is not valid.                (not ADDT0100)
    CPF3C39  The value for the reserved field is not valid.   (reserved is not 0)
    CPF3C88  The number of variable length records ... is not valid.   (no recipient)
    CPF3E0A  The resource limits were exceeded.               (over [smtp] max_message_size;
                                                               the queue cannot take it)

A bad configuration raises mailpool.config.ConfigError (it is not the caller's input).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mailpool.config import DEFAULT_CONFIG, LoadedConfig, load_config
from mailpool.submit import (
    MAX_ADDRESS,
    SubmitError,
    check_address,
    normalize_line_ends,
    split_header,
    submit,
)

log = logging.getLogger("mailpool.sendmail_api")

# ADDT0100 distribution types.
NORMAL = 0
CC = 1
BCC = 2
FORMAT = "ADDT0100"
MAX_FILE_NAME = 255  # bytes of the absolute path

TEXTS = {
    "CPFA0A9": "The object was not found.",
    "CPFA0CE": "The path name parameter that was specified resulted in an error.",
    "CPF3C12": "The length of data is not valid.",
    "CPF3C17": "An error occurred with input data parameter.",
    "CPF3C21": "The format name ({}) is not valid.",
    "CPF3C39": "The value for the reserved field is not valid.",
    "CPF3C88": "The number of variable length records {} is not valid.",
    "CPF3E0A": "The resource limits were exceeded.",
}


class SendMailError(Exception):
    """The API refused the call: `message_id` (e.g. "CPFA0A9"), the source's `text`, and
    `detail` saying what exactly was wrong."""

    def __init__(self, message_id: str, *, detail: str = "", value: object = "") -> None:
        self.message_id = message_id
        self.text = TEXTS[message_id].format(value)  # value: the format name, the count
        self.detail = detail
        super().__init__(f"{message_id}: {self.text}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class Recipient:
    """One ADDT0100 address structure."""

    address: str
    kind: int = NORMAL  # the distribution type: NORMAL, CC or BCC
    reserved: int = 0  # must be 0
    format_name: str = FORMAT


# SubmitError reasons as the source's messages (the parameters were checked before).
_SUBMIT_IDS = {"address": "CPF3C17", "length": "CPF3C12", "recipients": "CPF3C88",
               "size": "CPF3E0A", "space": "CPF3E0A", "permission": "CPF3E0A",
               "queue": "CPF3E0A"}


def send_mail(mime_file: str | Path, originator: str, recipients: Sequence[Recipient], *,
              config: str | Path | LoadedConfig | None = None) -> str:
    """Queue the MIME note in `mime_file` from `originator` to `recipients`; its queue id.

    `config` is the host's configuration file (default $MAILPOOL_CONFIG, else
    config/mailpool.toml) or an already loaded one. The parameters are checked in the
    order the source lists them, then the file; the first problem raises SendMailError.
    """
    path = _check_file_name(mime_file)
    _check_address(originator, "originator")
    if len(recipients) < 1:
        raise SendMailError("CPF3C88", value=0, detail="at least one recipient")
    for i, rcpt in enumerate(recipients):
        _check_recipient(i, rcpt)
    loaded = _load(config)
    content = _read(path, loaded.config.smtp.max_message_size)
    if not split_header(normalize_line_ends(content)).ended:
        raise SendMailError("CPF3C17", detail=f"{path}: no end of header (an empty line "
                                              "between the header and the body)")
    try:
        queue_id = submit(loaded, originator=originator,
                          recipients=[r.address for r in recipients], content=content,
                          source="api")
    except SubmitError as exc:
        raise _from_submit(exc) from None
    try:
        os.unlink(path)
    except OSError as exc:
        # Queued all the same: raising now would make the caller send it twice.
        log.warning("%s: queued as %s but not unlinked: %s", path, queue_id,
                    exc.strerror or exc)
    return queue_id


def _check_file_name(mime_file: str | Path) -> Path:
    name = os.fsencode(mime_file)
    if not name:
        raise SendMailError("CPF3C12", detail="empty file name")
    if not name.startswith(b"/"):
        raise SendMailError("CPFA0CE", detail=f"{os.fsdecode(name)!r}: not an absolute path")
    if len(name) > MAX_FILE_NAME:
        raise SendMailError("CPFA0CE", detail=f"file name of {len(name)} bytes: at most "
                                              f"{MAX_FILE_NAME}")
    return Path(os.fsdecode(name))


def _check_address(address: str, what: str) -> None:
    if not isinstance(address, str):
        raise SendMailError("CPF3C17", detail=f"{what} {address!r}: not a string")
    size = len(address.encode("utf-8", "surrogateescape"))
    if not 1 <= size <= MAX_ADDRESS:
        raise SendMailError("CPF3C12", detail=f"{what} of {size} bytes: 1 to {MAX_ADDRESS}")
    try:
        check_address(address, what)
    except SubmitError as exc:
        raise _from_submit(exc) from None


def _from_submit(exc: SubmitError) -> SendMailError:
    return SendMailError(_SUBMIT_IDS[exc.reason], detail=exc.text,
                         value=0 if exc.reason == "recipients" else "")


def _check_recipient(index: int, rcpt: Recipient) -> None:
    what = f"recipient {index + 1}"
    if not isinstance(rcpt, Recipient):
        raise SendMailError("CPF3C17", detail=f"{what}: {rcpt!r} is not a Recipient")
    if rcpt.format_name != FORMAT:
        raise SendMailError("CPF3C21", value=rcpt.format_name,
                            detail=f"{what}: expected {FORMAT}")
    if rcpt.reserved != 0:
        raise SendMailError("CPF3C39", detail=f"{what}: reserved is {rcpt.reserved!r}, not 0")
    if type(rcpt.kind) is not int or rcpt.kind not in (NORMAL, CC, BCC):
        raise SendMailError("CPF3C17", detail=f"{what}: distribution type {rcpt.kind!r}: "
                                              "0 (normal), 1 (cc) or 2 (bcc)")
    _check_address(rcpt.address, what)


def _load(config: str | Path | LoadedConfig | None) -> LoadedConfig:
    if isinstance(config, LoadedConfig):
        return config
    return load_config(config or os.environ.get("MAILPOOL_CONFIG") or DEFAULT_CONFIG)


def _read(path: Path, limit: int) -> bytes:
    """The file, or the source's error for it (one over the limit is not read)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise SendMailError("CPFA0CE", detail=f"{path}: not a regular file")
        if st.st_size > limit:
            raise SendMailError("CPF3E0A", detail=f"{path}: {st.st_size} bytes, the limit is "
                                                  f"{limit} ([smtp] max_message_size)")
        with open(path, "rb") as f:
            return f.read(limit + 1)  # a file still growing is caught by submit's check
    except FileNotFoundError:
        raise SendMailError("CPFA0A9", detail=str(path)) from None
    except OSError as exc:
        raise SendMailError("CPFA0CE", detail=f"{path}: {exc.strerror or exc}") from None
