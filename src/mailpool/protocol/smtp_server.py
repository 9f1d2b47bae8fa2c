"""Sans-IO SMTP server protocol core (RFC 5321, 1870 SIZE, 6152 8BITMIME, 2920, 2034/3463).

Shaped like h11: the driver feeds bytes with ``receive_data`` (``b""`` = EOF), pulls events
with ``next_event`` and drains reply bytes with ``data_to_send``. Policy decisions (accept a
sender, a recipient, a message, answer VRFY) belong to the driver: the core returns a
decision event and pauses until the driver calls ``reply()``. Everything else (syntax,
sequencing, limits) the core answers itself, in command order, so pipelined input works.

Every buffer is bounded: command lines by ``max_command_line``, partial DATA lines by
``max_text_line`` and stored message content by ``max_message_size``. The one unbounded
buffer is unread input that the driver hands over while a decision is pending; a driver
should answer decisions before reading more from the socket.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, NamedTuple

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "ConnectionClosed",
    "Event",
    "Hello",
    "MailFrom",
    "MessageReceived",
    "Quit",
    "RcptTo",
    "Reset",
    "SMTPProtocolError",
    "Sentinel",
    "ServerConnection",
    "ServerLimits",
    "Verify",
]


class Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = Sentinel("NEED_DATA")
PAUSED: Final = Sentinel("PAUSED")


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


# -- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MailFrom:
    address: str  # "" for the null reverse-path <>
    params: dict[str, str | None]


@dataclass(frozen=True)
class RcptTo:
    address: str
    params: dict[str, str | None]


@dataclass(frozen=True)
class MessageReceived:
    originator: str
    recipients: tuple[str, ...]
    content: bytes  # dot-unstuffed, CRLF line ends kept


@dataclass(frozen=True)
class Verify:
    argument: str


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
class ConnectionClosed:
    pass


Event = MailFrom | RcptTo | MessageReceived | Verify | Hello | Reset | Quit | ConnectionClosed
_DECISIONS = (MailFrom, RcptTo, MessageReceived, Verify)


# -- address and parameter syntax (RFC 5321 4.1.2) ------------------------------------------

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
_MAILBOX_RE = re.compile(
    rf"(?:{_DOT_STRING}|{_QUOTED_STRING})@(?:({_DOMAIN})|\[([^\[\]\\]*)\])"
)
_ADL_RE = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:")
_PARAM_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")
_SNUM_RE = re.compile(r"[0-9]{1,3}")
_DIGITS_RE = re.compile(r"[0-9]+")
_FROM_RE = re.compile(r"FROM:[ \t]*", re.IGNORECASE)
_TO_RE = re.compile(r"TO:[ \t]*", re.IGNORECASE)
_VERB_SPLIT_RE = re.compile(r"[ \t]+")


def _address_literal_ok(literal: str) -> bool:
    if literal[:5].lower() == "ipv6:":
        addr = literal[5:]
        if "%" in addr:  # zone ids are not part of RFC 5321 IPv6-addr
            return False
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            return False
        return True
    parts = literal.split(".")
    return len(parts) == 4 and all(_SNUM_RE.fullmatch(p) and int(p) <= 255 for p in parts)


def _split_path(text: str) -> tuple[str, str] | None:
    """Split "<path> params" into (path without brackets, params). None = no <...>."""
    if not text.startswith("<"):
        return None
    in_quote = False
    i = 1
    while i < len(text):
        c = text[i]
        if in_quote and c == "\\":
            i += 2  # quoted-pair: the next char is literal, even '"' or '>'
            continue
        if c == '"':
            in_quote = not in_quote
        elif c == ">" and not in_quote:
            rest = text[i + 1 :]
            if rest and rest[0] not in " \t":
                return None
            return text[1:i], rest
        i += 1
    return None


def _parse_path(path: str, *, null_ok: bool, postmaster_ok: bool) -> str | None:
    """Validate a path's content; return the mailbox (source route dropped) or None."""
    if path == "":
        return "" if null_ok else None
    if postmaster_ok and path.lower() == "postmaster":
        return path
    if path.startswith("@"):
        m = _ADL_RE.match(path)
        if m is None:
            return None
        path = path[m.end() :]  # RFC 5321 4.1.1.3: source routes MUST be ignored
    m = _MAILBOX_RE.fullmatch(path)
    if m is None:
        return None
    if m.group(2) is not None and not _address_literal_ok(m.group(2)):
        return None
    return path


def _parse_params(text: str) -> dict[str, str | None] | str:
    """Parse esmtp-params; return the dict, or the first malformed token."""
    params: dict[str, str | None] = {}
    for token in text.split():
        m = _PARAM_RE.fullmatch(token)
        if m is None:
            return token
        params[m.group(1).upper()] = m.group(2)
    return params


# -- replies --------------------------------------------------------------------------------


class _Reply(NamedTuple):
    code: int
    enhanced: str | None
    text: str


_NOT_IMPLEMENTED = _Reply(502, "5.5.1", "Error: command not implemented")
_NOT_RECOGNIZED = _Reply(500, "5.5.2", "Error: command not recognized")
_LINE_TOO_LONG = _Reply(500, "5.5.2", "Error: line too long")
_NEED_HELO = _Reply(503, "5.5.1", "Error: send HELO/EHLO first")
_NESTED_MAIL = _Reply(503, "5.5.1", "Error: nested MAIL command")
_NEED_MAIL = _Reply(503, "5.5.1", "Error: need MAIL command")
_NEED_RCPT = _Reply(503, "5.5.1", "Error: need RCPT command")
_NO_VALID_RCPT = _Reply(554, "5.5.1", "Error: no valid recipients")
_MAIL_SYNTAX = _Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
_RCPT_SYNTAX = _Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
_DATA_SYNTAX = _Reply(501, "5.5.4", "Syntax: DATA")
_RSET_SYNTAX = _Reply(501, "5.5.4", "Syntax: RSET")
_VRFY_SYNTAX = _Reply(501, "5.5.4", "Syntax: VRFY address")
_BAD_SENDER = _Reply(501, "5.1.7", "Bad sender address syntax")
_BAD_RECIPIENT = _Reply(501, "5.1.3", "Bad recipient address syntax")
_BAD_SIZE = _Reply(501, "5.5.4", "Bad message size syntax")
_SIZE_EXCEEDED = _Reply(552, "5.3.4", "Message size exceeds fixed limit")
_TOO_MANY_RCPTS = _Reply(452, "4.5.3", "Error: too many recipients")
_MESSAGE_TOO_LARGE = _Reply(552, "5.3.4", "Error: message too large")
_OK = _Reply(250, "2.0.0", "Ok")

_HELP_LINES = [
    "Commands supported:",
    "HELO EHLO MAIL RCPT DATA",
    "RSET VRFY NOOP QUIT HELP",
    "End of HELP info",
]


# -- the state machine ----------------------------------------------------------------------

# States: "start" (no HELO yet), "ready" (HELO seen, no transaction), "mail" (sender
# accepted, no recipient yet), "rcpt" (>= 1 recipient accepted), "data" (reading message
# text), "closed". A pending decision is not a state: it only blocks next_event().
_COMMAND_STATES = ("start", "ready", "mail", "rcpt")
_UNIMPLEMENTED_VERBS = ("EXPN", "SEND", "SOML", "SAML", "TURN")

# (state, verb) -> handler method name, or a fixed error reply. Complete for every
# command state and known verb, so dispatch never needs a fallback.
_TRANSITIONS: dict[tuple[str, str], str | _Reply] = {}
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
        }
    )
    for _verb in _UNIMPLEMENTED_VERBS:
        _TRANSITIONS[_state, _verb] = _NOT_IMPLEMENTED
_TRANSITIONS.update(
    {
        ("start", "MAIL"): _NEED_HELO,
        ("ready", "MAIL"): "_cmd_mail",
        ("mail", "MAIL"): _NESTED_MAIL,
        ("rcpt", "MAIL"): _NESTED_MAIL,
        ("start", "RCPT"): _NEED_HELO,
        ("ready", "RCPT"): _NEED_MAIL,
        ("mail", "RCPT"): "_cmd_rcpt",
        ("rcpt", "RCPT"): "_cmd_rcpt",
        ("start", "DATA"): _NEED_RCPT,
        ("ready", "DATA"): _NEED_RCPT,
        ("mail", "DATA"): "_cmd_data_without_rcpt",
        ("rcpt", "DATA"): "_cmd_data",
    }
)
_KNOWN_VERBS = frozenset(verb for _, verb in _TRANSITIONS)
del _state, _verb


class ServerConnection:
    """One SMTP server session. See the module docstring for the driving protocol."""

    def __init__(self, limits: ServerLimits) -> None:
        self._limits = limits
        self.state: str = "start"
        self.helo: str | None = None
        self.esmtp: bool = False
        self.closed: bool = False
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        self._pending: MailFrom | RcptTo | MessageReceived | Verify | None = None
        self._errors = 0
        self._discarding_command = False  # skipping an over-long command line
        # transaction
        self._originator = ""
        self._recipients: list[str] = []
        self._rcpt_tried = False
        # DATA phase
        self._content = bytearray()
        self._line_carry = 0  # bytes of the current line already consumed (and dropped)
        self._too_long = False
        self._too_large = False

    # -- driver API ---------------------------------------------------------------------

    def greeting(self) -> None:
        self._send(220, [f"{self._limits.hostname} ESMTP mailpool"], None)

    def receive_data(self, data: bytes) -> None:
        # Input after close or after EOF is ignored: nothing will ever read it.
        if self.closed or self._eof:
            return
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
            else:
                result = self._step_command()
            if result is NEED_DATA:
                if not self._eof:
                    return NEED_DATA
                self._close()  # EOF: an unfinished transaction is simply dropped
                break
            if result is not None:
                if isinstance(result, _DECISIONS):
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
        lines = [text] if isinstance(text, str) else list(text)
        if not lines:
            raise ValueError("reply text must have at least one line")
        self._send(code, lines, enhanced)
        self._pending = None
        accepted = 200 <= code <= 299
        if isinstance(event, MailFrom):
            if accepted:
                self._reset_transaction()
                self._originator = event.address
                self.state = "mail"
        elif isinstance(event, RcptTo):
            if accepted:
                self._recipients.append(event.address)
                self.state = "rcpt"
        elif isinstance(event, MessageReceived):
            self._end_transaction()
        if code == 421:  # RFC 5321 3.8: 421 means the server closes the channel
            self._close()

    def timeout(self) -> None:
        self._abort(f"{self._limits.hostname} Error: timeout exceeded", "4.4.2")

    def shutdown(self) -> None:
        self._abort(f"{self._limits.hostname} Service shutting down", "4.3.2")

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- output -------------------------------------------------------------------------

    def _send(self, code: int, lines: list[str], enhanced: str | None) -> None:
        last = len(lines) - 1
        for i, line in enumerate(lines):
            if "\r" in line or "\n" in line:
                raise ValueError("reply text must not contain CR or LF")
            text = " ".join(p for p in (enhanced, line) if p)
            sep = "-" if i < last else " "
            out = f"{code}{sep}{text}" if text or sep == "-" else f"{code}"
            self._out += out.encode("ascii", "replace") + b"\r\n"

    def _answer(self, reply: _Reply) -> None:
        self._send(reply.code, [reply.text], reply.enhanced)

    def _error(self, reply: _Reply) -> None:
        """Send a core-generated 4xx/5xx and enforce the hard error limit."""
        self._answer(reply)
        self._errors += 1
        if self._errors >= self._limits.hard_error_limit:
            self._send(421, [f"{self._limits.hostname} Error: too many errors"], "4.7.0")
            self._close()

    def _abort(self, text: str, enhanced: str) -> None:
        if self.closed:
            return
        self._send(421, [text], enhanced)
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
        self._content = bytearray()
        self._line_carry = 0
        self._too_long = False
        self._too_large = False

    def _end_transaction(self) -> None:
        self._reset_transaction()
        self.state = "ready" if self.helo is not None else "start"

    # -- command phase ------------------------------------------------------------------

    def _step_command(self) -> Event | Sentinel | None:
        buf = self._in
        limit = self._limits.max_command_line
        end = buf.find(b"\n")
        if end < 0:
            # Any line continuing this buffer is already longer than allowed: drop it now
            # rather than store it, and remember to answer once its end arrives.
            if len(buf) >= limit:
                self._discarding_command = True
                buf.clear()
            return NEED_DATA
        raw = bytes(buf[: end + 1])
        del buf[: end + 1]
        if self._discarding_command or len(raw) > limit:
            self._discarding_command = False
            self._error(_LINE_TOO_LONG)
            return None
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]  # bare LF tolerated here
        line = raw.decode("latin-1").strip(" \t")
        parts = _VERB_SPLIT_RE.split(line, maxsplit=1)
        verb = parts[0].upper()
        arg = parts[1] if len(parts) > 1 else ""
        if verb not in _KNOWN_VERBS:
            self._error(_NOT_RECOGNIZED)
            return None
        action = _TRANSITIONS[self.state, verb]
        if isinstance(action, _Reply):
            self._error(action)
            return None
        handler = getattr(self, action)
        return handler(verb, arg)

    def _cmd_hello(self, verb: str, arg: str) -> Event | None:
        if not arg:
            self._error(_Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
            return None
        domain = arg.split()[0]
        self.helo = domain
        self.esmtp = verb == "EHLO"
        self._end_transaction()
        host = self._limits.hostname
        if self.esmtp:
            lines = [
                host,
                f"SIZE {self._limits.max_message_size}",
                "8BITMIME",
                "PIPELINING",
                "ENHANCEDSTATUSCODES",
                "HELP",
            ]
            self._send(250, lines, None)
        else:
            self._send(250, [host], None)
        return Hello(verb, domain)

    def _path_and_params(self, arg: str, prefix: re.Pattern[str], syntax: _Reply,
                         bad: _Reply, *, null_ok: bool, postmaster_ok: bool
                         ) -> tuple[str, str, dict[str, str | None]] | None:
        """MAIL/RCPT argument: (address, parameter text, parameters), or None once the
        error reply is queued."""
        m = prefix.match(arg)
        split = _split_path(arg[m.end() :]) if m else None
        if split is None:
            self._error(syntax)
            return None
        path, rest = split
        address = _parse_path(path, null_ok=null_ok, postmaster_ok=postmaster_ok)
        if address is None:
            self._error(bad)
            return None
        params = _parse_params(rest)
        if isinstance(params, str):
            self._error(_Reply(555, "5.5.4", f"Unsupported option: {params}"))
            return None
        return address, rest, params

    def _cmd_mail(self, verb: str, arg: str) -> Event | None:
        parsed = self._path_and_params(arg, _FROM_RE, _MAIL_SYNTAX, _BAD_SENDER,
                                       null_ok=True, postmaster_ok=False)
        if parsed is None:
            return None
        address, rest, params = parsed
        for token in rest.split():
            key, _, value = token.partition("=")
            key = key.upper()
            if key == "SIZE":
                if not _DIGITS_RE.fullmatch(value):
                    self._error(_BAD_SIZE)
                    return None
                if int(value) > self._limits.max_message_size:
                    self._error(_SIZE_EXCEEDED)
                    return None
            elif not (key == "BODY" and value.upper() in ("7BIT", "8BITMIME")):
                self._error(_Reply(555, "5.5.4", f"Unsupported option: {token}"))
                return None
        return MailFrom(address, params)

    def _cmd_rcpt(self, verb: str, arg: str) -> Event | None:
        if len(self._recipients) >= self._limits.max_recipients:
            # Not counted as an error: a client pipelining a long recipient list would
            # otherwise be cut off mid-transaction (Postfix does the same).
            self._answer(_TOO_MANY_RCPTS)
            return None
        self._rcpt_tried = True
        parsed = self._path_and_params(arg, _TO_RE, _RCPT_SYNTAX, _BAD_RECIPIENT,
                                       null_ok=False, postmaster_ok=True)
        if parsed is None:
            return None
        address, rest, params = parsed
        if params:  # RCPT takes no parameters here (no DSN yet)
            self._error(_Reply(555, "5.5.4", f"Unsupported option: {rest.split()[0]}"))
            return None
        return RcptTo(address, params)

    def _cmd_data_without_rcpt(self, verb: str, arg: str) -> None:
        self._error(_NO_VALID_RCPT if self._rcpt_tried else _NEED_RCPT)

    def _cmd_data(self, verb: str, arg: str) -> None:
        if arg:
            self._error(_DATA_SYNTAX)
            return
        self._send(354, ["End data with <CR><LF>.<CR><LF>"], None)
        self.state = "data"
        self._content = bytearray()
        self._line_carry = 0
        self._too_long = False
        self._too_large = False

    def _cmd_rset(self, verb: str, arg: str) -> Event | None:
        if arg:
            self._error(_RSET_SYNTAX)
            return None
        self._end_transaction()
        self._answer(_OK)
        return Reset()

    def _cmd_noop(self, verb: str, arg: str) -> None:
        self._answer(_OK)

    def _cmd_quit(self, verb: str, arg: str) -> Event:
        self._send(221, ["Bye"], "2.0.0")
        self._close()
        return Quit()

    def _cmd_help(self, verb: str, arg: str) -> None:
        self._send(214, _HELP_LINES, "2.0.0")

    def _cmd_vrfy(self, verb: str, arg: str) -> Event | None:
        if not arg:
            self._error(_VRFY_SYNTAX)
            return None
        return Verify(arg)

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
                    return NEED_DATA
                end = cr + 2
                at_line_start = self._line_carry == 0
                if at_line_start and end - pos == 3 and buf[pos] == 0x2E:
                    pos = end
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
            del buf[:pos]

    def _finish_data(self) -> Event | None:
        if self._too_large:
            self._end_transaction()
            self._error(_MESSAGE_TOO_LARGE)
            return None
        if self._too_long:
            self._end_transaction()
            self._error(_LINE_TOO_LONG)
            return None
        event = MessageReceived(self._originator, tuple(self._recipients), bytes(self._content))
        self._content = bytearray()
        # The state stays "data" until the driver answers; reply() ends the transaction.
        return event
