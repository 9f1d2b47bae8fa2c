"""What the SMTP server core hands its driver: the events (decisions the driver answers
and notices), the limits it is built with, and its one error for a driver's misuse."""

from __future__ import annotations

from dataclasses import dataclass, field

from mailpool.protocol.smtp_syntax import Reply


class SMTPProtocolError(RuntimeError):
    """The driver used the core wrongly (e.g. reply() with no decision pending)."""


@dataclass(frozen=True)
class ServerLimits:
    hostname: str
    max_message_size: int = 10 * 1024 * 1024  # advertised in EHLO SIZE
    max_recipients: int = 100
    max_command_line: int = 512  # octets incl. CRLF (RFC 5321 4.5.3.1.4)
    max_text_line: int = 1000  # octets incl. CRLF (RFC 5321 4.5.3.1.6)
    hard_error_limit: int = 20  # like Postfix smtpd_hard_error_limit
    dsn: bool = True  # RFC 3461 MAIL/RCPT parameters
    etrn: bool = True  # RFC 1985; off: ETRN is answered 502 like EXPN
    starttls: bool = False  # RFC 3207: offer STARTTLS (while TLS is not active)
    tls_active: bool = False  # implicit TLS: the session is encrypted from the start
    auth: bool = False  # RFC 4954: AUTH on this listener, offered only while TLS is active...
    auth_cleartext: bool = False  # ...unless this says it may run without TLS
    auth_required: bool = False  # submission: MAIL (VRFY, ETRN) before AUTH gets 530

    def __post_init__(self) -> None:
        if self.auth_required and not self.auth:
            raise ValueError("auth_required needs auth")


# -- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MailFrom:
    address: str  # "" for the null reverse-path <>
    params: dict[str, str | None]  # as given, keys upper case
    ret: str | None = None  # DSN RET: "FULL" or "HDRS"
    envid: str | None = None  # DSN ENVID, xtext decoded
    auth_user: str | None = None  # the authenticated user (auth_ok) when MAIL came


@dataclass(frozen=True)
class RcptTo:
    address: str
    params: dict[str, str | None]
    notify: tuple[str, ...] | None = None  # DSN NOTIFY, upper case: ("NEVER",) or a subset
    orcpt: str | None = None  # DSN ORCPT as "addr-type;decoded-text"


@dataclass(frozen=True)
class MessageReceived:
    originator: str
    recipients: tuple[str, ...]
    content: bytes  # dot-unstuffed, CRLF line ends kept
    ret: str | None = None
    envid: str | None = None
    # Parallel to recipients, or () when no recipient carried that DSN parameter.
    notify: tuple[tuple[str, ...] | None, ...] = ()
    orcpt: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class Verify:
    argument: str


@dataclass(frozen=True)
class Etrn:
    node: str  # "example.test", "@example.test" (and subdomains) or "#queue"


@dataclass(frozen=True)
class Hello:
    kind: str  # "HELO" or "EHLO"
    domain: str


@dataclass(frozen=True)
class Reset:
    pass


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class Forbidden:
    """A non-SMTP command line (HTTP, a header, CONNECT...): answered 221, session closed."""

    line: str  # as received, non-printable characters as "?", at most 100 characters


@dataclass(frozen=True)
class ImproperPipelining:
    """DATA arrived with input already queued behind it: the client did not wait for 354
    (RFC 2920 3.1). Answered 554 instead of 354, session closed."""

    sample: str  # the start of the queued input, made printable like Forbidden.line
    octets: int  # how many octets were queued behind the DATA line


@dataclass(frozen=True)
class StartTls:
    """Decision: the 220 is queued. Flush data_to_send(), hand the raw stream to TLS, then
    tls_established(cipher_info) or tls_failed(). Bytes fed meanwhile are dropped."""

    discarded: int  # octets the client pipelined behind STARTTLS, dropped unread


@dataclass(frozen=True)
class Authenticate:
    """Decision: check the password -> auth_ok(user), auth_failed(), or reply(454, ...)
    when the directory cannot answer now."""

    mechanism: str  # "PLAIN" or "LOGIN"
    authzid: str  # "" or equal to username (anything else never gets this far)
    username: str
    password: str = field(repr=False)  # UTF-8 with "surrogateescape": any octet but NUL


@dataclass(frozen=True)
class AuthAborted:
    """An AUTH exchange the core ended itself, already answered (and counted as an error)."""

    mechanism: str
    reason: str  # "cancelled", "bad-base64", "too-long", "malformed" or "authzid"


@dataclass(frozen=True)
class ConnectionClosed:
    pass


@dataclass(frozen=True, slots=True)
class Rejection:
    """A MAIL, RCPT or end of DATA the session refused with 4xx/5xx (not a syntax error):
    what the driver logs and journals. Collected by take_rejections()."""

    command: str  # "MAIL", "RCPT" or "DATA"
    originator: str
    recipient: str  # RCPT only
    reply: Reply


Event = (
    MailFrom | RcptTo | MessageReceived | Verify | Etrn | Hello | Reset | Quit
    | Forbidden | ImproperPipelining | StartTls | Authenticate | AuthAborted | ConnectionClosed
)
DECISIONS = (MailFrom, RcptTo, MessageReceived, Verify, Etrn, StartTls, Authenticate)
