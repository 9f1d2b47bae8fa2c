"""POP3 server protocol core, sans-IO.

RFC 1939 (POP3), RFC 2449 (CAPA, RESP-CODES, PIPELINING), RFC 3206 (AUTH and
SYS/TEMP codes), RFC 5034 (AUTH, mechanism PLAIN) and RFC 2595 STLS behind a
switch. No sockets, no clock, no maildrop: the driver feeds bytes with
`receive_data`, pulls events with `next_event`, answers decision events and
sends `data_to_send()`.

Driver loop (h11 style)::

    conn.greeting()
    while True:
        await send(conn.data_to_send())
        ev = conn.next_event()
        if ev is NEED_DATA:      read (with the inactivity timer), conn.receive_data(chunk or b"")
                                 on timer expiry: conn.timeout()
        elif ev is PAUSED:       a decision is still unanswered: a driver bug
        elif Authenticate:       check password, lock + list maildrop -> auth_ok / auth_failed /
                                 maildrop_busy / sys_temp_error
        elif Retrieve:           read the message -> message_content / sys_temp_error
        elif Update:             remove ev.deleted_uids, unlock -> update_done / sys_temp_error
        elif StartTls:           flush, TLS handshake on the raw stream -> tls_established /
                                 tls_failed
        elif ConnectionClosed:   flush, close the socket, unlock the maildrop; done
        else:                    information (Quit, Retrieved, Deleted, Undeleted,
                                 AuthAborted): journal it

Choices this module makes (the rest of mailpool relies on them):

- QUIT in TRANSACTION always emits `Update`, with an empty tuple when nothing
  is marked, so the driver has exactly one place that ends a locked session
  normally. `Update` is emitted for nothing else: EOF, `timeout()` or the
  error limit in TRANSACTION end with `ConnectionClosed` and the marks are
  forgotten (RFC 1939 section 6).
- `timeout()` sends nothing and closes (RFC 1939 section 3: the server "should
  close the TCP connection without removing any messages or sending any
  response"); `next_event()` then gives `ConnectionClosed(reason="timeout")`.
- Information events: `Quit()` (QUIT in AUTHORIZATION), `Retrieved(uid, size)`
  after a whole RETR is queued (size = octets before byte-stuffing; TOP gives
  none), `Deleted(uid)` when DELE marks, `Undeleted(uids)` when RSET unmarks
  something, `ConnectionClosed(reason)` with reason "quit", "eof", "timeout"
  or "errors" ("tls" after `tls_failed()`). After closing, `next_event()`
  returns that same `ConnectionClosed` on every call.
- Error counting: every -ERR the client caused (unknown or misplaced command,
  bad syntax or argument, line too long, refused or failed login) counts.
  [IN-USE] and [SYS/TEMP] replies do not. The `hard_error_limit`-th counted
  error is answered "-ERR too many errors" instead of its own text, and the
  connection closes: one reply per command, always.
- Lines end with CRLF; a bare LF is accepted too (hand-typed sessions). A line
  longer than `max_line` octets (terminator included) is discarded up to its
  LF and answered "-ERR line too long".
- Message sizes: `pop_normalize` (bare LF -> CRLF, a missing final CRLF added)
  defines the octets RETR sends before byte-stuffing; `pop_size` is its
  length. The driver must list messages with `pop_size` so LIST/STAT agree
  with RETR. Bare CR is left alone.
- User names are strict UTF-8; passwords are decoded UTF-8 with
  "surrogateescape", so `password.encode("utf-8", "surrogateescape")` gives
  back the exact octets the client sent.
- `user` is None until `auth_ok`: the name given to USER is not trusted yet.
- Logins (USER/PASS and AUTH) are open under TLS, or without it when
  `allow_cleartext_login`; otherwise they are refused with "-ERR [AUTH]
  Plaintext authentication disallowed on non-secure connections" and CAPA
  lists neither USER nor SASL.
- AUTH (RFC 5034): PLAIN only, run by `mailpool.protocol.sasl`; its response
  lines are never read as commands and may be up to 12288 octets. The result
  is the same `Authenticate(user, password)` decision PASS emits, so the
  driver has one login path. An exchange the core ends itself (cancelled,
  bad base64, malformed, too long, an authzid naming someone else) is
  answered -ERR, counted, and reported as `AuthAborted`.
- STLS: `Pop3Limits.stls_available` (default False). While False, STLS is an
  unknown command and is not advertised. When True (and TLS is not yet
  active), CAPA lists STLS; "STLS" is answered "+OK begin TLS negotiation",
  pipelined input after it is discarded (RFC 2595 section 4 / plaintext
  injection, CVE-2011-0411; `StartTls.discarded` counts it), the `StartTls`
  decision is emitted and `tls_established()` resumes AUTHORIZATION with TLS
  active (a USER given before is forgotten); `tls_failed()` closes silently.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Final

from mailpool.protocol.pop3_events import (
    AuthAborted,
    Authenticate,
    ConnectionClosed,
    Deleted,
    Event,
    MessageInfo,
    Pop3Limits,
    Quit,
    Retrieve,
    Retrieved,
    StartTls,
    Undeleted,
    Update,
)
from mailpool.protocol.sasl import (
    MAX_RESPONSE_LINE,
    Challenge,
    Credentials,
    SaslError,
    SaslServer,
    Step,
)
from mailpool.protocol.smtp_syntax import NEED_DATA, PAUSED, TOO_LONG, Sentinel

__all__ = [
    "AUTHORIZATION",
    "CLOSED",
    "NEED_DATA",
    "PAUSED",
    "TRANSACTION",
    "UPDATE",
    "AuthAborted",
    "Authenticate",
    "ConnectionClosed",
    "Deleted",
    "MessageInfo",
    "Pop3Connection",
    "Pop3Limits",
    "Quit",
    "Retrieve",
    "Retrieved",
    "StartTls",
    "Undeleted",
    "Update",
    "pop_normalize",
    "pop_size",
]


AUTHORIZATION: Final = "AUTHORIZATION"
TRANSACTION: Final = "TRANSACTION"
UPDATE: Final = "UPDATE"
CLOSED: Final = "CLOSED"

_DIGITS_RE = re.compile(rb"[0-9]+")
_KEYWORD_RE = re.compile(rb"[A-Za-z]{1,16}")
_CODE_RE = re.compile(r"[A-Z0-9][A-Z0-9/-]{0,40}")




# ---------------------------------------------------------------- message octets


def pop_normalize(content: bytes) -> bytes:
    """The octets RETR sends before byte-stuffing: bare LF -> CRLF, final CRLF ensured."""
    data = bytes(content).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"  # the terminating ".\r\n" must start a line of its own
    return data


def pop_size(content: bytes) -> int:
    """Size LIST and STAT report for a stored message: len(pop_normalize(content))."""
    return len(pop_normalize(content))


def _stuff(data: bytes) -> bytes:
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


def _top(data: bytes, lines: int) -> bytes:
    """Headers, the blank line, then `lines` body lines of normalized `data`."""
    if data.startswith(b"\r\n"):
        pos = 2  # no headers at all
    else:
        blank = data.find(b"\r\n\r\n")
        pos = len(data) if blank < 0 else blank + 4
    for _ in range(lines):  # `lines` may be huge: stops at the end of the data
        nl = data.find(b"\r\n", pos)
        if nl < 0:
            break
        pos = nl + 2
    return data[:pos]


def _parse_count(arg: bytes) -> int | None:
    """A non-negative decimal (ASCII digits only, no sign); None if it is not one."""
    if not _DIGITS_RE.fullmatch(arg):
        return None
    digits = arg.lstrip(b"0") or b"0"
    # int() refuses over 4300 digits; anything this big is "more than there is" anyway.
    return _HUGE if len(digits) > 18 else int(digits)


_HUGE: Final = 10**18


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ---------------------------------------------------------------- state machine

# The one transition table: (state, trigger) -> next state. Triggers in capitals
# are client commands (a command is allowed in a state iff it has an entry);
# lower-case triggers are driver answers and closes. Failed commands and errors
# leave the state unchanged.
_TRANSITIONS: Final[dict[tuple[str, str], str]] = {
    (AUTHORIZATION, "CAPA"): AUTHORIZATION,
    (AUTHORIZATION, "USER"): AUTHORIZATION,
    (AUTHORIZATION, "PASS"): AUTHORIZATION,  # Authenticate pending
    (AUTHORIZATION, "STLS"): AUTHORIZATION,  # StartTls pending
    (AUTHORIZATION, "AUTH"): AUTHORIZATION,  # an exchange, then Authenticate pending
    (AUTHORIZATION, "QUIT"): CLOSED,
    (AUTHORIZATION, "auth_ok"): TRANSACTION,
    (AUTHORIZATION, "auth_failed"): AUTHORIZATION,
    (AUTHORIZATION, "maildrop_busy"): AUTHORIZATION,
    (AUTHORIZATION, "sys_temp_error"): AUTHORIZATION,
    (AUTHORIZATION, "tls_established"): AUTHORIZATION,
    (AUTHORIZATION, "close"): CLOSED,
    (TRANSACTION, "CAPA"): TRANSACTION,
    (TRANSACTION, "STAT"): TRANSACTION,
    (TRANSACTION, "LIST"): TRANSACTION,
    (TRANSACTION, "UIDL"): TRANSACTION,
    (TRANSACTION, "RETR"): TRANSACTION,  # Retrieve pending
    (TRANSACTION, "TOP"): TRANSACTION,  # Retrieve pending
    (TRANSACTION, "DELE"): TRANSACTION,
    (TRANSACTION, "RSET"): TRANSACTION,
    (TRANSACTION, "NOOP"): TRANSACTION,
    (TRANSACTION, "QUIT"): UPDATE,  # Update pending
    (TRANSACTION, "message_content"): TRANSACTION,
    (TRANSACTION, "sys_temp_error"): TRANSACTION,
    (TRANSACTION, "close"): CLOSED,
    (UPDATE, "update_done"): CLOSED,
    (UPDATE, "sys_temp_error"): CLOSED,
    (UPDATE, "close"): CLOSED,
}
_COMMANDS: Final = frozenset(t for (_, t) in _TRANSITIONS if t.isupper())


_NO_CLEARTEXT: Final = "[AUTH] Plaintext authentication disallowed on non-secure connections"
_SASL_ERRORS: Final = {
    SaslError.BAD_BASE64: "invalid base64 data",
    SaslError.CANCELLED: "[AUTH] authentication cancelled",
    SaslError.TOO_LONG: "line too long",
    SaslError.MALFORMED: "malformed authentication response",
    SaslError.AUTHZID: "[AUTH] authentication failed",  # acting as another user: never
}


class Pop3Connection:
    """One POP3 server session. See the module docstring for the contract."""

    def __init__(self, limits: Pop3Limits) -> None:
        self._limits = limits
        self._state: str = AUTHORIZATION
        self._tls_active = limits.tls_active
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        self._discarding = False  # inside an over-long line, dropping up to its LF
        self._events: deque[Event] = deque()
        self._pending: Authenticate | Retrieve | Update | StartTls | None = None
        self._closed_event: ConnectionClosed | None = None
        self._errors = 0
        self._greeted = False
        self._user_given: str | None = None  # from USER, valid for the next command only
        self._sasl = SaslServer(("PLAIN",))
        self._cipher_info: str | None = None
        self._user: str | None = None
        self._messages: tuple[MessageInfo, ...] = ()
        self._deleted: set[int] = set()  # 0-based indexes marked by DELE

    # ------------------------------------------------------------ public state

    @property
    def state(self) -> str:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state == CLOSED

    @property
    def user(self) -> str | None:
        """The authenticated user; None until auth_ok."""
        return self._user

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def cipher_info(self) -> str | None:
        """What tls_established() was given; None until then."""
        return self._cipher_info

    @property
    def messages(self) -> tuple[MessageInfo, ...]:
        return self._messages

    @property
    def deleted_uids(self) -> tuple[str, ...]:
        return tuple(self._messages[i].uid for i in sorted(self._deleted))

    # ------------------------------------------------------------ I/O side

    def greeting(self) -> None:
        if self._greeted:
            raise RuntimeError("greeting() already sent")
        self._greeted = True
        # No APOP timestamp: passwords are stored hashed, APOP cannot be checked.
        self._reply(f"+OK {self._limits.hostname} POP3 server ready")

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; b"" means EOF. Ignored once closed."""
        if self.closed:
            return
        if not data:
            self._eof = True
            return
        if isinstance(self._pending, StartTls):
            return  # plaintext sent before the handshake must not be obeyed
        if self._discarding and b"\n" not in data:
            return  # still inside an over-long line: keep nothing
        if len(self._in) + len(data) > self._limits.max_buffer:
            raise RuntimeError("input buffer full: call receive_data only after NEED_DATA")
        self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | Sentinel:
        while True:
            if self._events:
                return self._events.popleft()
            if self._pending is not None:
                return PAUSED
            if self._closed_event is not None:
                return self._closed_event
            line = self._take_line()
            if line is None:
                if not self._eof:
                    return NEED_DATA
                self._close("eof")  # a partial last line is dropped
            elif self._sasl.active:
                mechanism = self._sasl.mechanism or ""
                if line is TOO_LONG:
                    self._auth_result(mechanism, self._sasl.too_long())
                else:
                    assert isinstance(line, bytes)
                    self._auth_result(mechanism, self._sasl.step(line))
            elif line is TOO_LONG:
                self._user_given = None
                self._err("line too long")
            else:
                assert isinstance(line, bytes)
                self._command(line)

    # ------------------------------------------------------------ driver answers

    def auth_ok(self, messages: list[MessageInfo]) -> None:
        """The maildrop is locked and listed (use pop_size for the sizes)."""
        msgs = tuple(messages)
        if not all(isinstance(m, MessageInfo) for m in msgs):
            raise TypeError("auth_ok() takes MessageInfo items")
        if len({m.uid for m in msgs}) != len(msgs):
            raise ValueError("message uids must be unique within a maildrop")
        ev = self._answer(Authenticate)
        self._messages = msgs
        self._deleted = set()
        self._user = ev.user
        self._go("auth_ok")
        self._reply(f"+OK maildrop has {self._summary()}")

    def auth_failed(self, code: str | None = "AUTH", text: str = "authentication failed") -> None:
        self._check_text(text)
        if code is not None and not _CODE_RE.fullmatch(code):
            raise ValueError(f"bad response code: {code!r}")
        self._answer(Authenticate)
        self._go("auth_failed")
        self._err(text if code is None else f"[{code}] {text}")

    def maildrop_busy(self) -> None:
        self._answer(Authenticate)
        self._go("maildrop_busy")
        self._err("[IN-USE] maildrop already locked", counted=False)

    def sys_temp_error(self, text: str) -> None:
        """Answer any pending Authenticate, Retrieve or Update with -ERR [SYS/TEMP]."""
        self._check_text(text)
        self._answer((Authenticate, Retrieve, Update))
        self._go("sys_temp_error", reason="quit")
        self._err(f"[SYS/TEMP] {text}", counted=False)

    def message_content(self, content: bytes) -> None:
        """Answer Retrieve with the message as stored."""
        ev = self._answer(Retrieve)
        data = pop_normalize(content)
        if ev.top_lines is None:
            self._out += b"+OK %d octets\r\n" % len(data)
            self._out += _stuff(data)
            self._out += b".\r\n"
            self._events.append(Retrieved(ev.uid, len(data)))
        else:
            self._out += b"+OK top of message follows\r\n"
            self._out += _stuff(_top(data, ev.top_lines))
            self._out += b".\r\n"
        self._go("message_content")

    def update_done(self, ok: bool = True) -> None:
        """Answer Update: the marked messages are gone (ok) or not all of them."""
        self._answer(Update)
        self._go("update_done", reason="quit")
        if ok:
            left = len(self._messages) - len(self._deleted)
            host = self._limits.hostname
            self._reply(f"+OK {host} POP3 server signing off ({_plural(left, 'message')} left)")
        else:
            self._err("[SYS/TEMP] some deleted messages not removed", counted=False)

    def tls_established(self, cipher_info: str = "") -> None:
        """Answer StartTls: the handshake succeeded; feed decrypted bytes from now on."""
        self._answer(StartTls)
        self._tls_active = True
        self._cipher_info = cipher_info
        self._user_given = None
        self._in.clear()
        self._discarding = False
        self._go("tls_established")

    def tls_failed(self) -> None:
        """Answer StartTls: the handshake failed; closed without a word."""
        self._answer(StartTls)
        self._close("tls")

    def timeout(self) -> None:
        """The inactivity timer expired: close silently (RFC 1939 section 3)."""
        if self.closed:
            return
        if self._pending is not None:
            raise RuntimeError("timeout() while a decision is pending")
        self._close("timeout")

    # ------------------------------------------------------------ internals

    def _reply(self, line: str) -> None:
        self._out += line.encode("utf-8") + b"\r\n"

    def _multi(self, first: str, lines: list[str]) -> None:
        self._out += "".join(f"{s}\r\n" for s in [first, *lines, "."]).encode("utf-8")

    def _err(self, text: str, counted: bool = True) -> None:
        if counted:
            self._errors += 1
            if self._errors >= self._limits.hard_error_limit:
                self._reply("-ERR too many errors")
                self._close("errors")
                return
        self._reply(f"-ERR {text}")

    @staticmethod
    def _check_text(text: str) -> None:
        if "\r" in text or "\n" in text:
            raise ValueError("reply text must be one line")

    def _go(self, trigger: str, reason: str = "") -> None:
        try:
            self._state = _TRANSITIONS[(self._state, trigger)]
        except KeyError:
            raise RuntimeError(f"{trigger} not allowed in state {self._state}") from None
        if self._state == CLOSED and self._closed_event is None:
            self._closed_event = ConnectionClosed(reason)
            self._in.clear()

    def _close(self, reason: str) -> None:
        self._pending = None
        self._go("close", reason)

    def _answer(self, kind: type | tuple[type, ...]):  # -> the pending decision
        ev = self._pending
        if not isinstance(ev, kind) or ev in self._events:
            raise RuntimeError(f"no pending decision to answer with this call (pending: {ev!r})")
        self._pending = None
        return ev

    def _decide(self, ev: Authenticate | Retrieve | Update | StartTls) -> None:
        self._pending = ev
        self._events.append(ev)

    def _take_line(self) -> bytes | Sentinel | None:
        buf = self._in
        if self._discarding:
            nl = buf.find(b"\n")
            if nl < 0:
                buf.clear()
                return None
            del buf[: nl + 1]
            self._discarding = False
            return TOO_LONG
        if self._sasl.active:  # RFC 5034 4: responses are not held to the command limit
            limit = min(MAX_RESPONSE_LINE, self._limits.max_buffer)
        else:
            limit = self._limits.max_line
        nl = buf.find(b"\n", 0, limit)
        if nl < 0:
            if len(buf) < limit:
                return None
            self._discarding = True
            return self._take_line()
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        return line[:-1] if line.endswith(b"\r") else line

    def _summary(self) -> str:
        live = [m for i, m in enumerate(self._messages) if i not in self._deleted]
        return f"{_plural(len(live), 'message')} ({sum(m.size for m in live)} octets)"

    def _command(self, line: bytes) -> None:
        user_given, self._user_given = self._user_given, None  # PASS must follow USER
        keyword, sep, rest = line.partition(b" ")
        if not _KEYWORD_RE.fullmatch(keyword):
            return self._err("unknown command")
        cmd = keyword.decode("ascii").upper()
        if cmd not in _COMMANDS or (cmd == "STLS" and not self._limits.stls_available):
            return self._err("unknown command")
        if (self._state, cmd) not in _TRANSITIONS:
            return self._err(f"{cmd} not allowed in {self._state} state")
        if cmd == "PASS":  # the password is the rest of the line, spaces included
            return self._cmd_pass(rest, user_given)
        args = rest.split(b" ") if sep else []
        if b"" in args:
            return self._err("syntax error: arguments are separated by single spaces")
        getattr(self, f"_cmd_{cmd.lower()}")(args)

    # Argument helpers: each emits its own -ERR and returns None on failure.

    def _no_args(self, args: list[bytes]) -> bool:
        if args:
            self._err("too many arguments")
            return False
        return True

    def _msg_number(self, args: list[bytes], max_args: int = 1) -> int | None:
        """0-based index of a live message from args[0]."""
        if not args:
            self._err("missing message number")
            return None
        if len(args) > max_args:
            self._err("too many arguments")
            return None
        n = _parse_count(args[0])
        if n is None:
            self._err("invalid message number")
            return None
        total = len(self._messages)
        if not 1 <= n <= total:
            self._err(f"no such message, only {_plural(total, 'message')} in maildrop")
            return None
        if n - 1 in self._deleted:
            self._err(f"message {n} already deleted")
            return None
        return n - 1

    def _logins_open(self) -> bool:
        """RFC 2595 2.1 / 3206: passwords only under TLS unless configured otherwise."""
        return self._limits.allow_cleartext_login or self._tls_active

    def _cleartext_ok(self) -> bool:
        if self._logins_open():
            return True
        self._err(_NO_CLEARTEXT)
        return False

    # Command handlers; the dispatcher has checked the state.

    def _cmd_capa(self, args: list[bytes]) -> None:
        if not self._no_args(args):
            return
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self._logins_open():
            caps += ["USER", "SASL " + " ".join(self._sasl.mechanisms)]
        if self._limits.stls_available and not self._tls_active:
            caps.append("STLS")  # RFC 2449: AUTHORIZATION capabilities show in both states
        caps.append("IMPLEMENTATION mailpool")
        self._multi("+OK Capability list follows", caps)

    def _cmd_user(self, args: list[bytes]) -> None:
        if not self._cleartext_ok():
            return
        if not args:
            return self._err("missing user name")
        if len(args) > 1:
            return self._err("too many arguments")
        try:
            name = args[0].decode("utf-8")
        except UnicodeDecodeError:
            return self._err("invalid user name")
        self._user_given = name
        self._reply("+OK send PASS")  # says nothing about whether the user exists

    def _cmd_pass(self, raw: bytes, user_given: str | None) -> None:
        if not self._cleartext_ok():
            return
        if user_given is None:
            return self._err("send USER first")
        if not raw:
            return self._err("missing password")
        self._decide(Authenticate(user_given, raw.decode("utf-8", "surrogateescape")))

    def _cmd_stls(self, args: list[bytes]) -> None:
        if not self._no_args(args):
            return
        if self._tls_active:
            return self._err("TLS already active")
        self._reply("+OK begin TLS negotiation")
        discarded = len(self._in)
        self._in.clear()  # RFC 2595 4: drop anything pipelined behind STLS
        self._discarding = False
        self._decide(StartTls(discarded))

    def _cmd_auth(self, args: list[bytes]) -> None:
        if not self._cleartext_ok():
            return
        if not args:  # RFC 1734 usage most clients still probe with
            return self._multi("+OK", list(self._sasl.mechanisms))
        if len(args) > 2:
            return self._err("too many arguments")
        mechanism = args[0].decode("latin-1").upper()  # never echoed: any octet will do
        result = self._sasl.start(mechanism, args[1] if len(args) == 2 else None)
        if result is SaslError.UNSUPPORTED:
            return self._err("unrecognized authentication mechanism")
        self._auth_result(mechanism, result)

    def _auth_result(self, mechanism: str, result: Step) -> None:
        if isinstance(result, Challenge):
            self._out += b"+ " + result.encoded() + b"\r\n"  # "+ " even when empty
        elif isinstance(result, Credentials):
            # authzid is "" or the user: PASS's decision, so login has one path.
            self._decide(Authenticate(result.username, result.password))
        else:
            self._err(_SASL_ERRORS[result])
            self._events.append(AuthAborted(mechanism, result.value))

    def _cmd_quit(self, args: list[bytes]) -> None:
        if not self._no_args(args):
            return
        if self._state == AUTHORIZATION:
            self._reply(f"+OK {self._limits.hostname} POP3 server signing off")
            self._events.append(Quit())
            self._go("QUIT", reason="quit")
        else:
            self._go("QUIT")
            self._decide(Update(self.deleted_uids))

    def _cmd_stat(self, args: list[bytes]) -> None:
        if not self._no_args(args):
            return
        live = [m for i, m in enumerate(self._messages) if i not in self._deleted]
        self._reply(f"+OK {len(live)} {sum(m.size for m in live)}")

    def _listing(self, args: list[bytes], value, heading: str) -> None:
        if args:
            i = self._msg_number(args)
            if i is not None:
                self._reply(f"+OK {i + 1} {value(self._messages[i])}")
            return
        rows = [
            f"{i + 1} {value(m)}"
            for i, m in enumerate(self._messages)
            if i not in self._deleted
        ]
        self._multi(heading, rows)

    def _cmd_list(self, args: list[bytes]) -> None:
        self._listing(args, lambda m: m.size, f"+OK {self._summary()}")

    def _cmd_uidl(self, args: list[bytes]) -> None:
        self._listing(args, lambda m: m.uid, "+OK unique-id listing follows")

    def _cmd_retr(self, args: list[bytes]) -> None:
        i = self._msg_number(args)
        if i is not None:
            self._decide(Retrieve(i + 1, self._messages[i].uid, None))

    def _cmd_top(self, args: list[bytes]) -> None:
        i = self._msg_number(args, max_args=2)
        if i is None:
            return
        if len(args) < 2:
            return self._err("missing line count")
        lines = _parse_count(args[1])
        if lines is None:
            return self._err("invalid line count")
        # A count beyond the body just gives the whole body.
        self._decide(Retrieve(i + 1, self._messages[i].uid, lines))

    def _cmd_dele(self, args: list[bytes]) -> None:
        i = self._msg_number(args)
        if i is None:
            return
        self._deleted.add(i)
        self._reply(f"+OK message {i + 1} deleted")
        self._events.append(Deleted(self._messages[i].uid))

    def _cmd_rset(self, args: list[bytes]) -> None:
        if not self._no_args(args):
            return
        restored = self.deleted_uids
        self._deleted.clear()
        self._reply(f"+OK maildrop has {self._summary()}")
        if restored:
            self._events.append(Undeleted(restored))

    def _cmd_noop(self, args: list[bytes]) -> None:
        if self._no_args(args):
            self._reply("+OK")
