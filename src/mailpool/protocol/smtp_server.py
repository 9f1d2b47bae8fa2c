"""Sans-IO SMTP server protocol core (RFC 5321, 1870 SIZE, 6152 8BITMIME, 2920 PIPELINING,
2034/3463 enhanced codes, 3461 DSN parameters, 1985 ETRN, 3207 STARTTLS, 4954 AUTH).

Shaped like h11: the driver feeds bytes with ``receive_data`` (``b""`` = EOF), pulls events
with ``next_event`` and drains reply bytes with ``data_to_send``. Policy decisions (accept a
sender, a recipient, a message, answer VRFY or ETRN) belong to the driver: the core returns a
decision event and pauses until the driver calls ``reply()``. Everything else (syntax,
sequencing, limits) the core answers itself, in command order, so pipelined input works.

Every buffer is bounded: command lines by ``max_command_line``, partial DATA lines by
``max_text_line`` and stored message content by ``max_message_size``. The one unbounded
buffer is unread input that the driver hands over while a decision is pending; a driver
should answer decisions before reading more from the socket.

Hostile clients: the session opens with exactly one of ``greeting()``, ``refuse(text)`` (the
driver's connection restrictions refused the client; only QUIT is served) or
``early_talker()`` (the client spoke before the greeting; closed at once). Non-SMTP input
(HTTP, a mail header sent as a command) ends the session with a ``Forbidden`` event, a DATA
with input already queued behind it with ``ImproperPipelining``. The driver owns the clock:
``awaiting_first_command``, ``in_command_line`` and ``data_bytes_received`` let it apply its
deadlines, ``timeout(reason)`` ends the session with 421. Nothing the core hands the driver
outside message content and passwords can hold a control character.

TLS lives in the driver: the core answers STARTTLS with 220, drops every byte the client
sent behind it (plaintext injection, CVE-2011-0411) and emits ``StartTls``; the driver
flushes ``data_to_send()``, does the handshake and calls ``tls_established(cipher_info)``
(the session starts over: no HELO, no transaction, not authenticated) or ``tls_failed()``
(closed silently). AUTH PLAIN/LOGIN exchanges run in the core (``mailpool.protocol.sasl``;
their lines are never read as commands); the ``Authenticate`` decision is answered with
``auth_ok(user)``, ``auth_failed()`` or a ``reply()`` of 454/421. An exchange the core ends
itself (cancelled, bad base64...) is answered and reported as ``AuthAborted``.
"""

from __future__ import annotations

import re

from mailpool.protocol import smtp_server_replies as R
from mailpool.protocol.sasl import (
    MAX_RESPONSE_LINE,
    Challenge,
    Credentials,
    SaslError,
    SaslServer,
    Step,
)
from mailpool.protocol.smtp_server_events import (
    DECISIONS,
    AuthAborted,
    Authenticate,
    ConnectionClosed,
    Etrn,
    Event,
    Forbidden,
    Hello,
    ImproperPipelining,
    MailFrom,
    MessageReceived,
    Quit,
    RcptTo,
    Rejection,
    Reset,
    ServerLimits,
    SMTPProtocolError,
    StartTls,
    Verify,
)
from mailpool.protocol.smtp_syntax import (
    ATEXT,
    DOMAIN_RE,
    NEED_DATA,
    PAUSED,
    TOO_LONG,
    LineReader,
    Reply,
    Sentinel,
    hello_argument_ok,
    parse_params,
    parse_path,
    path_length_ok,
    split_path,
    xtext_decode,
)

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "AuthAborted",
    "Authenticate",
    "ConnectionClosed",
    "Etrn",
    "Event",
    "Forbidden",
    "Hello",
    "ImproperPipelining",
    "MailFrom",
    "MessageReceived",
    "Quit",
    "RcptTo",
    "Reset",
    "SMTPProtocolError",
    "Sentinel",
    "ServerConnection",
    "ServerLimits",
    "StartTls",
    "Verify",
]




# -- command syntax -------------------------------------------------------------------

_DIGITS_RE = re.compile(r"[0-9]+")
_FROM_RE = re.compile(r"FROM:[ \t]*", re.IGNORECASE)
_TO_RE = re.compile(r"TO:[ \t]*", re.IGNORECASE)
_VERB_SPLIT_RE = re.compile(r"[ \t]+")
_ATOM_RE = re.compile(rf"{ATEXT}+")
_QUEUE_NAME_RE = re.compile(r"#[\x21-\x7e]+")
_PRINTABLE_RE = re.compile(r"[\x20-\x7e]*")  # RFC 3461: ENVID/ORCPT text is printable ASCII
_NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_MAX_ENVID = 100  # RFC 3461 4.4
_MAX_ORCPT = 500  # RFC 3461 4.2
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_UNPRINTABLE_RE = re.compile(r"[^\x20-\x7e]")
_SAMPLE_MAX = 100  # characters of hostile input an event carries (Postfix logs as many)

# Non-SMTP input, as Postfix's smtpd_forbidden_commands = CONNECT GET POST
# regexp:{{/^[^A-Z]/ Bogus}} plus its header check: an HTTP client or proxy probe, a
# message header sent as a command (a client that missed the 354), binary (a TLS
# handshake). Only lines whose verb is not an SMTP command are checked.
_FORBIDDEN_VERBS = frozenset({"CONNECT", "GET", "POST", "PUT", "HEAD", "OPTIONS"})
_HTTP_REQUEST_RE = re.compile(r"[!-~]+[ \t]+[!-~]+[ \t]+HTTP/[0-9]\.[0-9]", re.IGNORECASE)
_HEADER_RE = re.compile(r"[!-9;-~]+:")  # RFC 5322 field name, then the colon
_LETTER_RE = re.compile(r"[A-Za-z]")  # Postfix regexp tables ignore case: /^[^A-Z]/i


def _printable(raw: bytes) -> str:
    """Hostile input made safe to journal: at most 100 characters, non-printables as "?"."""
    return _UNPRINTABLE_RE.sub("?", raw[:_SAMPLE_MAX].decode("latin-1"))


def _shown_path(arg: str, prefix: re.Pattern[str]) -> str:
    """The address of a MAIL/RCPT argument refused before parsing, for the log only."""
    m = prefix.match(arg)
    split = split_path(arg[m.end():]) if m else None
    shown = split[0].strip("<>") if split else arg
    return _UNPRINTABLE_RE.sub("?", shown[:_SAMPLE_MAX])


def _forbidden(verb: str, line: str) -> bool:
    """Whether a line whose verb is no SMTP command is non-SMTP input (``line`` stripped)."""
    return (
        verb in _FORBIDDEN_VERBS
        or _HTTP_REQUEST_RE.fullmatch(line) is not None
        or _HEADER_RE.match(line) is not None
        or (line != "" and _LETTER_RE.match(line) is None)
    )


def _dsn_text(value: str, limit: int) -> str | None:
    """Decoded xtext of a DSN parameter, or None when malformed or too long."""
    text = xtext_decode(value)
    if text is None or len(text) > limit or not _PRINTABLE_RE.fullmatch(text):
        return None
    return text


def _parse_notify(value: str) -> tuple[str, ...] | None:
    items = tuple(item.upper() for item in value.split(","))
    if items == ("NEVER",):
        return items
    if len(set(items)) != len(items) or not _NOTIFY_VALUES.issuperset(items):
        return None
    return items


def _parse_orcpt(value: str) -> str | None:
    addr_type, semi, xtext = value.partition(";")
    if not semi or not _ATOM_RE.fullmatch(addr_type):
        return None
    text = _dsn_text(xtext, _MAX_ORCPT)
    return None if text is None else f"{addr_type};{text}"


def _etrn_node_ok(node: str) -> bool:
    if node.startswith("#"):
        return bool(_QUEUE_NAME_RE.fullmatch(node))
    return bool(DOMAIN_RE.fullmatch(node[1:] if node.startswith("@") else node))


# -- replies --------------------------------------------------------------------------------


# -- the state machine ----------------------------------------------------------------------

# States: "start" (no HELO yet), "ready" (HELO seen, no transaction), "mail" (sender
# accepted, no recipient yet), "rcpt" (>= 1 recipient accepted), "data" (reading message
# text), "closed". A pending decision is not a state: it only blocks next_event().
_COMMAND_STATES = ("start", "ready", "mail", "rcpt")
_UNIMPLEMENTED_VERBS = ("EXPN", "SEND", "SOML", "SAML", "TURN")

# (state, verb) -> handler method name, or a fixed error reply. Complete for every
# command state and known verb, so dispatch never needs a fallback.
_TRANSITIONS: dict[tuple[str, str], str | Reply] = {}
for _state in _COMMAND_STATES:
    _TRANSITIONS.update(
        {
            (_state, "HELO"): "_cmd_hello",
            (_state, "EHLO"): "_cmd_hello",
            (_state, "RSET"): "_cmd_rset",
            (_state, "NOOP"): "_cmd_noop",
            (_state, "QUIT"): "_cmd_quit",
            (_state, "HELP"): "_cmd_help",
            (_state, "VRFY"): "_cmd_vrfy",
            # Both check the state themselves: "not offered here" comes before sequencing.
            (_state, "STARTTLS"): "_cmd_starttls",
            (_state, "AUTH"): "_cmd_auth",
        }
    )
    for _verb in _UNIMPLEMENTED_VERBS:
        _TRANSITIONS[_state, _verb] = R.NOT_IMPLEMENTED
_TRANSITIONS.update(
    {
        ("start", "MAIL"): R.NEED_HELO,
        ("ready", "MAIL"): "_cmd_mail",
        ("mail", "MAIL"): R.NESTED_MAIL,
        ("rcpt", "MAIL"): R.NESTED_MAIL,
        ("start", "RCPT"): R.NEED_HELO,
        ("ready", "RCPT"): R.NEED_MAIL,
        ("mail", "RCPT"): "_cmd_rcpt",
        ("rcpt", "RCPT"): "_cmd_rcpt",
        ("start", "DATA"): R.NEED_RCPT,
        ("ready", "DATA"): R.NEED_RCPT,
        ("mail", "DATA"): "_cmd_data_without_rcpt",
        ("rcpt", "DATA"): "_cmd_data",
        ("start", "ETRN"): R.NEED_HELO,
        ("ready", "ETRN"): "_cmd_etrn",
        ("mail", "ETRN"): R.IN_TRANSACTION,
        ("rcpt", "ETRN"): R.IN_TRANSACTION,
    }
)
_KNOWN_VERBS = frozenset(verb for _, verb in _TRANSITIONS)
del _state, _verb


class ServerConnection:
    """One SMTP server session. See the module docstring for the driving protocol."""

    # A job holds thousands of these (idle sessions): slots, not a dict each (about 1.5 KiB
    # less per session).
    __slots__ = (
        "_content", "_data_consumed", "_data_partial", "_envid", "_eof", "_errors", "_in",
        "_limits", "_line_carry", "_line_seen", "_lines", "_notify", "_opened", "_orcpt",
        "_originator", "_out", "_pending", "_rcpt_tried", "_recipients", "_refused",
        "_rejections", "_ret", "_sasl", "_sasl_lines", "_too_large", "_too_long",
        "authenticated_user", "cipher_info", "closed", "esmtp", "helo", "state", "tls_active",
    )

    def __init__(self, limits: ServerLimits) -> None:
        self._limits = limits
        self.state: str = "start"
        self.helo: str | None = None
        self.esmtp: bool = False
        self.closed: bool = False
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        self._lines = LineReader(self._in, limits.max_command_line)
        self._pending: (MailFrom | RcptTo | MessageReceived | Verify | Etrn | StartTls
                        | Authenticate | None) = None
        self.tls_active: bool = limits.tls_active
        self.cipher_info: str | None = None  # from tls_established()
        self.authenticated_user: str | None = None  # from auth_ok()
        self._sasl = SaslServer()
        self._sasl_lines = LineReader(self._in, MAX_RESPONSE_LINE)  # AUTH exchange lines
        self._errors = 0
        self._opened = False  # greeting(), refuse() or early_talker() was called
        self._refused = False
        self._line_seen = False  # a complete command line (even an over-long one) was read
        self._rejections: list[Rejection] = []
        # transaction
        self._originator = ""
        self._recipients: list[str] = []
        self._rcpt_tried = False
        self._ret: str | None = None
        self._envid: str | None = None
        self._notify: list[tuple[str, ...] | None] = []  # parallel to _recipients
        self._orcpt: list[str | None] = []
        # DATA phase
        self._content = bytearray()
        self._line_carry = 0  # bytes of the current line already consumed (and dropped)
        self._too_long = False
        self._too_large = False
        self._data_consumed = 0  # octets of the current DATA scanned and dropped from _in
        self._data_partial = 0  # octets of an unfinished text line left in _in

    # -- driver API ---------------------------------------------------------------------
    # A session opens with exactly one of greeting(), refuse() and early_talker().

    def greeting(self) -> None:
        self._open(Reply(220, None, (f"{self._limits.hostname} ESMTP mailpool",)))

    def refuse(self, text: str) -> None:
        """Instead of greeting(): the client is refused (554 5.7.1 <text>). RFC 5321 3.1: the
        server then waits for QUIT, so QUIT gets 221 and everything else 503, counted toward
        the hard error limit; no decision or Hello/Reset event is ever emitted."""
        self._open(Reply(554, "5.7.1", (text,)))
        self._refused = True

    def early_talker(self) -> None:
        """Instead of greeting(): the client sent before the greeting went out (a spambot
        that does not wait for it). Answer 554 and close; the input is discarded."""
        self._open(R.EARLY_TALKER)
        self._close()

    @property
    def refused(self) -> bool:
        return self._refused

    @property
    def awaiting_first_command(self) -> bool:
        """Between the greeting (or refusal) and the end of the client's first command line."""
        return self._opened and not self.closed and not self._line_seen

    @property
    def in_command_line(self) -> bool:
        """Whether part of a command line whose end has not arrived is buffered (or is being
        dropped for its length): the driver keeps one deadline across the whole line.
        Meaningful when next_event() has returned NEED_DATA."""
        if self.closed or self.state not in _COMMAND_STATES:
            return False
        reader = self._sasl_lines if self._sasl.active else self._lines
        return (bool(self._in) and self._in[-1] != 0x0A) or reader.discarding

    @property
    def data_bytes_received(self) -> int:
        """Octets of the current (or last) DATA's text as they came: before unstuffing,
        over-long lines that were dropped included, the final "." CRLF included once seen.
        Counts what next_event() has scanned; reset when the next DATA is accepted."""
        return self._data_consumed + self._data_partial

    def receive_data(self, data: bytes) -> None:
        # Input after close or after EOF is ignored: nothing will ever read it.
        if self.closed or self._eof:
            return
        if data and isinstance(self._pending, StartTls):
            return  # plaintext sent before the handshake must never be read
        if data:
            self._in += data
        else:
            self._eof = True

    def next_event(self) -> Event | Sentinel:
        if self._pending is not None:
            return PAUSED
        while not self.closed:
            if self.state == "data":
                result = self._step_data()
            elif self._sasl.active:
                result = self._step_auth()
            else:
                result = self._step_command()
            if result is NEED_DATA:
                if not self._eof:
                    return NEED_DATA
                self._close()  # EOF: an unfinished transaction is simply dropped
                break
            if result is not None:
                if isinstance(result, DECISIONS):
                    self._pending = result
                return result
        return ConnectionClosed()

    def reply(self, code: int, text: str | list[str], enhanced: str | None = None) -> None:
        event = self._pending
        if event is None:
            if self.closed:
                return  # the session ended (timeout/shutdown) while the driver was deciding
            raise SMTPProtocolError("reply() called with no decision event pending")
        if not (200 <= code <= 599) or 300 <= code <= 399:
            raise ValueError(f"reply code {code} is not a 2xx/4xx/5xx answer")
        if isinstance(event, StartTls):
            raise SMTPProtocolError("StartTls is answered by tls_established() or tls_failed()")
        if isinstance(event, Authenticate) and code < 400:
            raise SMTPProtocolError("a successful AUTH is answered by auth_ok()")
        lines = [text] if isinstance(text, str) else list(text)
        if not lines:
            raise ValueError("reply text must have at least one line")
        self._send(code, lines, enhanced)
        self._pending = None
        accepted = 200 <= code <= 299
        if not accepted and isinstance(event, MailFrom | RcptTo | MessageReceived):
            self._rejected(event, Reply(code, enhanced, tuple(lines)))
        if isinstance(event, MailFrom):
            if accepted:
                self._reset_transaction()
                self._originator = event.address
                self._ret = event.ret
                self._envid = event.envid
                self.state = "mail"
        elif isinstance(event, RcptTo):
            if accepted:
                self._recipients.append(event.address)
                self._notify.append(event.notify)
                self._orcpt.append(event.orcpt)
                self.state = "rcpt"
        elif isinstance(event, MessageReceived):
            self._end_transaction()
        if code == 421:  # RFC 5321 3.8: 421 means the server closes the channel
            self._close()

    def tls_established(self, cipher_info: str) -> None:
        """Answer StartTls: the handshake succeeded, feed decrypted bytes from now on. The
        session starts over (RFC 3207 4.2): no HELO, no transaction, not authenticated."""
        if self.closed:
            return  # timed out or shut down during the handshake
        if not isinstance(self._pending, StartTls):
            raise SMTPProtocolError("tls_established() with no StartTls pending")
        self._pending = None
        self.tls_active = True
        self.cipher_info = cipher_info
        self.helo = None
        self.esmtp = False
        self.authenticated_user = None
        self._end_transaction()
        self._in.clear()
        self._lines.discarding = False

    def tls_failed(self) -> None:
        """Answer StartTls: the handshake failed. Closed without a word: the stream is in
        no state to carry one."""
        if self.closed:
            return
        if not isinstance(self._pending, StartTls):
            raise SMTPProtocolError("tls_failed() with no StartTls pending")
        self._close()

    def auth_ok(self, user: str) -> None:
        """Answer Authenticate: the password is right; ``user`` is who the client is now
        (the directory's name for it), given to every later MailFrom as auth_user."""
        if self.closed:
            return
        if not isinstance(self._pending, Authenticate):
            raise SMTPProtocolError("auth_ok() with no Authenticate pending")
        if not user or _CONTROL_RE.search(user):
            raise ValueError(f"bad user name: {user!r}")
        self._pending = None
        self.authenticated_user = user
        self._send(235, ["Authentication successful"], "2.7.0")

    def auth_failed(self) -> None:
        """Answer Authenticate: wrong user or password (535, counted toward the hard error
        limit). The delay before it is the driver's."""
        if self.closed:
            return
        if not isinstance(self._pending, Authenticate):
            raise SMTPProtocolError("auth_failed() with no Authenticate pending")
        self._pending = None
        self._error(R.AUTH_FAILED)

    def close_with(self, code: int, text: str, enhanced: str) -> None:
        """The driver ends the session (e.g. too many failed logins): `code enhanced host
        text`, then closed; the same as a 421 from reply(), but with no decision pending."""
        self._abort(f"{self._limits.hostname} {text}", enhanced, code)

    def timeout(self, timeout_reason: str = "Error: timeout exceeded") -> None:
        """The driver's deadline passed: 421 4.4.2 <hostname> <timeout_reason>, closed."""
        self._abort(f"{self._limits.hostname} {timeout_reason}", "4.4.2")

    def shutdown(self) -> None:
        self._abort(f"{self._limits.hostname} Service shutting down", "4.3.2")

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def has_rejections(self) -> bool:
        return bool(self._rejections)

    def take_rejections(self) -> list[Rejection]:
        """The refusals since the last call (usually none): MAIL, RCPT or DATA answered 4xx
        or 5xx by the driver or by the core's limits (size, recipient count, AUTH needed)."""
        out, self._rejections = self._rejections, []
        return out

    def _rejected(self, event: MailFrom | RcptTo | MessageReceived | None,
                  reply: Reply) -> None:
        if isinstance(event, MailFrom):
            self._rejections.append(Rejection("MAIL", event.address, "", reply))
        elif isinstance(event, RcptTo):
            self._rejections.append(Rejection("RCPT", self._originator, event.address, reply))
        else:
            self._rejections.append(Rejection("DATA", self._originator, "", reply))

    # -- output -------------------------------------------------------------------------

    def _send(self, code: int, lines: list[str] | tuple[str, ...], enhanced: str | None) -> None:
        self._out += Reply(code, enhanced, tuple(lines)).format()

    def _answer(self, reply: Reply) -> None:
        self._out += reply.format()

    def _error(self, reply: Reply) -> None:
        """Send a core-generated 4xx/5xx and enforce the hard error limit."""
        self._answer(reply)
        self._errors += 1
        if self._errors >= self._limits.hard_error_limit:
            self._send(421, [f"{self._limits.hostname} Error: too many errors"], "4.7.0")
            self._close()

    def _open(self, first: Reply) -> None:
        if self._opened:
            raise SMTPProtocolError("the session was already opened")
        wire = first.format()  # a bad text raises before anything changes
        self._opened = True
        if not self.closed:  # a shutdown() may have come first: then it said all
            self._out += wire

    def _abort(self, text: str, enhanced: str, code: int = 421) -> None:
        if self.closed:
            return
        self._send(code, [text], enhanced)
        self._close()

    def _close(self) -> None:
        self.closed = True
        self.state = "closed"
        self._pending = None
        self._in.clear()
        self._reset_transaction()

    # -- transaction --------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        self._originator = ""
        self._recipients = []
        self._rcpt_tried = False
        self._ret = None
        self._envid = None
        self._notify = []
        self._orcpt = []
        self._content = bytearray()
        self._line_carry = 0
        self._too_long = False
        self._too_large = False

    def _end_transaction(self) -> None:
        self._reset_transaction()
        self.state = "ready" if self.helo is not None else "start"

    # -- command phase ------------------------------------------------------------------

    def _step_command(self) -> Event | Sentinel | None:
        line_bytes = self._lines.read_line()
        if line_bytes is NEED_DATA:
            return NEED_DATA
        self._line_seen = True
        if line_bytes is TOO_LONG:
            self._error(R.LINE_TOO_LONG)
            return None
        assert isinstance(line_bytes, bytes)
        line = line_bytes.decode("latin-1").strip(" \t")
        parts = _VERB_SPLIT_RE.split(line, maxsplit=1)
        verb = parts[0].upper()
        arg = parts[1] if len(parts) > 1 else ""
        known = verb in _KNOWN_VERBS
        if not known and _forbidden(verb, line):
            self._answer(R.FORBIDDEN)
            self._close()  # pipelined input after it is dropped with the buffer
            return Forbidden(_printable(line_bytes))
        if self._refused:
            if verb == "QUIT":
                return self._cmd_quit(verb, arg)
            self._error(R.NO_SERVICE)
            return None
        if not known:
            self._error(R.NOT_RECOGNIZED)
            return None
        if verb == "ETRN" and not self._limits.etrn:
            self._error(R.NOT_IMPLEMENTED)
            return None
        action = _TRANSITIONS[self.state, verb]
        if isinstance(action, Reply):
            self._error(action)
            return None
        handler = getattr(self, action)
        return handler(verb, arg)

    def _cmd_hello(self, verb: str, arg: str) -> Event | None:
        # The name ends up in a Received header: only a domain or address literal will do.
        if not hello_argument_ok(arg):
            self._error(R.HELLO_SYNTAX[verb])
            return None
        domain = arg
        self.helo = domain
        self.esmtp = verb == "EHLO"
        self._end_transaction()
        limits = self._limits
        if self.esmtp:
            lines = [
                limits.hostname,
                f"SIZE {limits.max_message_size}",
                "8BITMIME",
                "PIPELINING",
                *(["STARTTLS"] if self._starttls_offered() else []),
                *(["AUTH PLAIN LOGIN"] if self._auth_offered() else []),
                *(["DSN"] if limits.dsn else []),
                *(["ETRN"] if limits.etrn else []),
                "ENHANCEDSTATUSCODES",
                "HELP",
            ]
            self._send(250, lines, None)
        else:
            self._send(250, [limits.hostname], None)
        return Hello(verb, domain)

    def _path_and_params(self, arg: str, prefix: re.Pattern[str], syntax: Reply,
                         bad: Reply, *, null_ok: bool, postmaster_ok: bool
                         ) -> tuple[str, list[tuple[str, str, str]], dict[str, str | None]] | None:
        """MAIL/RCPT argument: (address, [(token, NAME, value)], parameters), or None once
        the error reply is queued. A parameter named twice is refused here."""
        m = prefix.match(arg)
        split = split_path(arg[m.end() :]) if m else None
        if split is None:
            self._error(syntax)
            return None
        path, rest = split
        address = None
        if path_length_ok(path):
            address = parse_path(path, null_ok=null_ok, postmaster_ok=postmaster_ok)
        if address is None:
            self._error(bad)
            return None
        params = parse_params(rest)
        if isinstance(params, str):
            self._error(R.unsupported(params))
            return None
        tokens: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        for token in rest.split():
            key, _, value = token.partition("=")
            key = key.upper()
            if key in seen:  # RFC 5321 4.1.2 / 1869: a keyword appears at most once
                self._error(R.bad_param(key))
                return None
            seen.add(key)
            tokens.append((token, key, value))
        return address, tokens, params

    def _cmd_mail(self, verb: str, arg: str) -> Event | None:
        if not self._auth_satisfied():
            self._rejected(MailFrom(_shown_path(arg, _FROM_RE), {}), R.AUTH_REQUIRED)
            return None
        parsed = self._path_and_params(arg, _FROM_RE, R.MAIL_SYNTAX, R.BAD_SENDER,
                                       null_ok=True, postmaster_ok=False)
        if parsed is None:
            return None
        address, tokens, params = parsed
        dsn = self._limits.dsn
        ret: str | None = None
        envid: str | None = None
        for token, key, value in tokens:
            if key == "SIZE":
                if not _DIGITS_RE.fullmatch(value):
                    self._error(R.BAD_SIZE)
                    return None
                if int(value) > self._limits.max_message_size:
                    self._error(R.SIZE_EXCEEDED)
                    self._rejected(MailFrom(address, params), R.SIZE_EXCEEDED)
                    return None
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                pass
            elif key == "RET" and dsn:
                ret = value.upper()
                if ret not in ("FULL", "HDRS"):
                    self._error(R.bad_param(key))
                    return None
            elif key == "ENVID" and dsn:
                envid = _dsn_text(value, _MAX_ENVID) if value else None
                if envid is None:
                    self._error(R.bad_param(key))
                    return None
            elif key == "AUTH" and self._auth_offered():
                # RFC 4954 5: the submitter's identity ("<>" unknown). Never trusted:
                # accepted when well formed and ignored (we relay nothing on its word).
                if not value or xtext_decode(value) is None:
                    self._error(R.bad_param(key))
                    return None
            else:
                self._error(R.unsupported(token))
                return None
        return MailFrom(address, params, ret=ret, envid=envid,
                        auth_user=self.authenticated_user)

    def _cmd_rcpt(self, verb: str, arg: str) -> Event | None:
        if len(self._recipients) >= self._limits.max_recipients:
            # Not counted as an error: a client pipelining a long recipient list would
            # otherwise be cut off mid-transaction (Postfix does the same).
            self._answer(R.TOO_MANY_RCPTS)
            self._rejected(RcptTo(_shown_path(arg, _TO_RE), {}), R.TOO_MANY_RCPTS)
            return None
        self._rcpt_tried = True
        parsed = self._path_and_params(arg, _TO_RE, R.RCPT_SYNTAX, R.BAD_RECIPIENT,
                                       null_ok=False, postmaster_ok=True)
        if parsed is None:
            return None
        address, tokens, params = parsed
        dsn = self._limits.dsn
        notify: tuple[str, ...] | None = None
        orcpt: str | None = None
        for token, key, value in tokens:
            if key == "NOTIFY" and dsn:
                notify = _parse_notify(value)
                if notify is None:
                    self._error(R.bad_param(key))
                    return None
            elif key == "ORCPT" and dsn:
                orcpt = _parse_orcpt(value)
                if orcpt is None:
                    self._error(R.bad_param(key))
                    return None
            else:
                self._error(R.unsupported(token))
                return None
        return RcptTo(address, params, notify=notify, orcpt=orcpt)

    def _cmd_data_without_rcpt(self, verb: str, arg: str) -> None:
        self._error(R.NO_VALID_RCPT if self._rcpt_tried else R.NEED_RCPT)

    def _cmd_data(self, verb: str, arg: str) -> Event | None:
        if arg:
            self._error(R.DATA_SYNTAX)
            return None
        if self._in:
            # RFC 2920 3.1: DATA ends a pipelined group; a client that sends text before
            # the 354 is a spambot (or would have its text read as commands after a 5xx).
            event = ImproperPipelining(_printable(bytes(self._in[:_SAMPLE_MAX])), len(self._in))
            self._answer(R.IMPROPER_PIPELINING)
            self._close()
            return event
        self._send(354, ["End data with <CR><LF>.<CR><LF>"], None)
        self.state = "data"
        self._content = bytearray()
        self._line_carry = 0
        self._too_long = False
        self._too_large = False
        self._data_consumed = 0
        self._data_partial = 0
        return None

    def _cmd_rset(self, verb: str, arg: str) -> Event | None:
        if arg:
            self._error(R.RSET_SYNTAX)
            return None
        self._end_transaction()
        self._answer(R.OK)
        return Reset()

    def _cmd_noop(self, verb: str, arg: str) -> None:
        self._answer(R.OK)

    def _cmd_quit(self, verb: str, arg: str) -> Event:
        self._send(221, ["Bye"], "2.0.0")
        self._close()
        return Quit()

    def _cmd_help(self, verb: str, arg: str) -> None:
        lines = R.help_lines(self._limits.etrn, self._starttls_offered(), self._auth_offered())
        self._send(214, lines, "2.0.0")

    def _cmd_vrfy(self, verb: str, arg: str) -> Event | None:
        if not self._auth_satisfied():
            return None
        if not arg or _CONTROL_RE.search(arg):
            self._error(R.VRFY_SYNTAX)
            return None
        return Verify(arg)

    def _cmd_etrn(self, verb: str, arg: str) -> Event | None:
        # RFC 1985: 501 for a missing or bad argument; the driver answers 250-253/458/459.
        if not self._auth_satisfied():
            return None
        if not _etrn_node_ok(arg):
            self._error(R.ETRN_SYNTAX)
            return None
        return Etrn(arg)

    # -- STARTTLS and AUTH ---------------------------------------------------------------

    def _starttls_offered(self) -> bool:
        return self._limits.starttls and not self.tls_active

    def _auth_offered(self) -> bool:
        """Whether AUTH is offered now (listed in EHLO): never over cleartext unless told."""
        limits = self._limits
        return limits.auth and (self.tls_active or limits.auth_cleartext)

    def _auth_satisfied(self) -> bool:
        """RFC 4954 6: where authentication is required, 530 until it is in force."""
        if self._limits.auth_required and self.authenticated_user is None:
            self._error(R.AUTH_REQUIRED)
            return False
        return True

    def _cmd_starttls(self, verb: str, arg: str) -> Event | None:
        if self.tls_active:
            self._error(R.TLS_ACTIVE)
        elif not self._limits.starttls:
            self._error(R.NOT_IMPLEMENTED)
        elif arg:
            self._error(R.STARTTLS_SYNTAX)
        elif not self.esmtp:  # RFC 3207: an extension, so after EHLO
            self._error(R.NEED_EHLO)
        elif self.state != "ready":
            self._error(R.IN_TRANSACTION)
        else:
            self._send(220, ["Ready to start TLS"], "2.0.0")
            # RFC 3207 6: whatever came behind the command was sent before the handshake.
            discarded = len(self._in)
            self._in.clear()
            return StartTls(discarded)
        return None

    def _cmd_auth(self, verb: str, arg: str) -> Event | None:
        args = _VERB_SPLIT_RE.split(arg) if arg else []
        if not self._limits.auth:
            self._error(R.NOT_IMPLEMENTED)
        elif not self._auth_offered():
            self._error(R.ENCRYPTION_REQUIRED)
        elif not self.esmtp:
            self._error(R.NEED_EHLO)
        elif self.state != "ready":
            self._error(R.IN_TRANSACTION)
        elif self.authenticated_user is not None:  # RFC 4954 4: one AUTH per session
            self._error(R.ALREADY_AUTHENTICATED)
        elif not 1 <= len(args) <= 2:
            self._error(R.AUTH_SYNTAX)
        else:
            mechanism = args[0].upper()
            initial = args[1].encode("latin-1") if len(args) == 2 else None
            result = self._sasl.start(mechanism, initial)
            if result is SaslError.UNSUPPORTED:
                self._error(R.UNKNOWN_MECHANISM)
                return None
            self._sasl_lines.discarding = False
            return self._auth_result(mechanism, result)
        return None

    def _step_auth(self) -> Event | Sentinel | None:
        """One line of an AUTH exchange: a response, never a command."""
        line = self._sasl_lines.read_line()
        if line is NEED_DATA:
            return NEED_DATA
        mechanism = self._sasl.mechanism or ""
        if line is TOO_LONG:
            return self._auth_result(mechanism, self._sasl.too_long())
        assert isinstance(line, bytes)
        return self._auth_result(mechanism, self._sasl.step(line))

    def _auth_result(self, mechanism: str, result: Step) -> Event | None:
        if isinstance(result, Challenge):
            # "334" SP [base64] (RFC 4954 4): the space stays even when the challenge is empty.
            self._out += b"334 " + result.encoded() + b"\r\n"
            return None
        if isinstance(result, Credentials):
            return Authenticate(mechanism, result.authzid, result.username, result.password)
        self._error(R.SASL_ERRORS[result])
        return AuthAborted(mechanism, result.value)

    # -- DATA phase ---------------------------------------------------------------------

    def _step_data(self) -> Event | Sentinel | None:
        """Consume complete CRLF lines; only "." CRLF at a line start ends the message.

        Bare CR and bare LF are ordinary content here (RFC 5321 4.1.1.4), which is what
        keeps "\\n.\\n" or "\\r.\\r" inside a body from ending it early.
        """
        buf = self._in
        text_limit = self._limits.max_text_line
        size_limit = self._limits.max_message_size
        pos = 0
        try:
            while True:
                cr = buf.find(b"\r\n", pos)
                if cr < 0:
                    pending = len(buf) - pos
                    if pending and pending + self._line_carry >= text_limit:
                        # The line cannot end within the limit any more: drop what we have
                        # (keeping a trailing CR whose LF may come next) and go on scanning.
                        keep = 1 if buf[-1] == 0x0D else 0
                        self._line_carry += pending - keep
                        pos += pending - keep
                        self._too_long = True
                        self._content = bytearray()
                    self._data_partial = len(buf) - pos
                    return NEED_DATA
                end = cr + 2
                at_line_start = self._line_carry == 0
                if at_line_start and end - pos == 3 and buf[pos] == 0x2E:
                    pos = end
                    self._data_partial = 0
                    return self._finish_data()
                if end - pos + self._line_carry > text_limit:
                    self._too_long = True
                    self._content = bytearray()
                elif not (self._too_long or self._too_large):
                    start = pos + 1 if at_line_start and buf[pos] == 0x2E else pos
                    if len(self._content) + end - start > size_limit:
                        self._too_large = True
                        self._content = bytearray()
                    else:
                        self._content += buf[start:end]
                self._line_carry = 0
                pos = end
        finally:
            self._data_consumed += pos
            del buf[:pos]

    def _finish_data(self) -> Event | None:
        if self._too_large:
            self._rejected(None, R.MESSAGE_TOO_LARGE)
            self._end_transaction()
            self._error(R.MESSAGE_TOO_LARGE)
            return None
        if self._too_long:
            self._end_transaction()
            self._error(R.LINE_TOO_LONG)
            return None
        # DSN details only when some recipient carried them: () keeps the common case small.
        notify = tuple(self._notify) if any(n is not None for n in self._notify) else ()
        orcpt = tuple(self._orcpt) if any(o is not None for o in self._orcpt) else ()
        event = MessageReceived(self._originator, tuple(self._recipients), bytes(self._content),
                                ret=self._ret, envid=self._envid, notify=notify, orcpt=orcpt)
        self._content = bytearray()
        # The state stays "data" until the driver answers; reply() ends the transaction.
        return event
