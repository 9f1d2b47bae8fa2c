"""What the POP3 server core is built with and hands its driver: its limits, the messages
of a maildrop as the driver lists them, and the events (decisions the driver answers, and
notices)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_UID_RE = re.compile(r"[\x21-\x7e]{1,70}")
_HOST_RE = re.compile(r"[\x21-\x7e]{1,255}")

# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Pop3Limits:
    hostname: str
    max_line: int = 255  # RFC 2449: commands up to 255 octets incl. CRLF
    allow_cleartext_login: bool = True  # False: USER/PASS refused until TLS is active
    tls_active: bool = False  # True from the start on an implicit-TLS port
    hard_error_limit: int = 10
    stls_available: bool = False  # the STLS hook: advertise and accept STLS
    max_buffer: int = 1 << 20  # unprocessed input; the driver reads only on NEED_DATA

    def __post_init__(self) -> None:
        if not _HOST_RE.fullmatch(self.hostname):
            raise ValueError(f"hostname must be printable ASCII without spaces: {self.hostname!r}")
        if self.max_line < 16:
            raise ValueError("max_line must be at least 16")
        if self.hard_error_limit < 1:
            raise ValueError("hard_error_limit must be at least 1")
        if self.max_buffer < self.max_line:
            raise ValueError("max_buffer must be at least max_line")


@dataclass(frozen=True)
class MessageInfo:
    uid: str  # 1-70 printable chars 0x21-0x7E (RFC 1939 UIDL)
    size: int  # pop_size() of the stored message

    def __post_init__(self) -> None:
        if not isinstance(self.uid, str) or not _UID_RE.fullmatch(self.uid):
            raise ValueError(f"uid must be 1-70 chars in 0x21-0x7E: {self.uid!r}")
        if self.size < 0:
            raise ValueError(f"size must not be negative: {self.size}")


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Authenticate:
    """Decision: check the password, then lock and list the maildrop."""

    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Retrieve:
    """Decision: read message `index` (1-based); top_lines is None for RETR.

    top_lines is capped at 10**18 (any larger count means the whole body too).
    """

    index: int
    uid: str
    top_lines: int | None


@dataclass(frozen=True)
class Update:
    """Decision: remove these messages (message-number order), then unlock."""

    deleted_uids: tuple[str, ...]


@dataclass(frozen=True)
class StartTls:
    """Decision (only with stls_available): flush, handshake, then tls_established() or
    tls_failed(). Bytes fed meanwhile are dropped."""

    discarded: int  # octets the client pipelined behind STLS, dropped unread


@dataclass(frozen=True)
class AuthAborted:
    """An AUTH exchange the core ended itself, already answered -ERR (and counted)."""

    mechanism: str
    reason: str  # "cancelled", "bad-base64", "too-long", "malformed" or "authzid"


@dataclass(frozen=True)
class Quit:
    """QUIT in AUTHORIZATION; a ConnectionClosed follows."""


@dataclass(frozen=True)
class Retrieved:
    """A whole RETR reply is queued: `size` octets before byte-stuffing."""

    uid: str
    size: int


@dataclass(frozen=True)
class Deleted:
    """DELE marked this message (removed only if the session QUITs)."""

    uid: str


@dataclass(frozen=True)
class Undeleted:
    """RSET unmarked these messages."""

    uids: tuple[str, ...]


@dataclass(frozen=True)
class ConnectionClosed:
    """The session is over: flush data_to_send(), then close the socket."""

    reason: str = "eof"  # "quit", "eof", "timeout", "errors"


Event = (
    Authenticate
    | Retrieve
    | Update
    | StartTls
    | Quit
    | Retrieved
    | Deleted
    | Undeleted
    | AuthAborted
    | ConnectionClosed
)
DECISIONS = (Authenticate, Retrieve, Update, StartTls)
