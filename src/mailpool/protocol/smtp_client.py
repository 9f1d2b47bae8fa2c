"""Sans-IO SMTP client protocol core (RFC 5321, 1870 SIZE, 6152 8BITMIME, 2920 PIPELINING,
3461 DSN parameters, 1985 ETRN, 3207 STARTTLS).

Shaped like the server core and h11: no sockets, no clock. The driver feeds received bytes
with ``receive_data`` (``b""`` = EOF), pulls events with ``next_event`` until ``NEED_DATA``,
and sends ``data_to_send()``. ``stage`` names the reply the client waits for, so the driver
can pick the timeout (RFC 5321 4.5.3.2); on a timeout the driver just closes the socket.

Driver loop::

    conn = ClientConnection("mx.example.org")
    while True:
        send(conn.data_to_send())
        ev = conn.next_event()
        if ev is NEED_DATA:       read with the timeout for conn.stage; conn.receive_data(chunk)
        elif StartTlsReady:       TLS handshake on the socket, then conn.tls_established()
                                  (or conn.tls_failed()); read and write through TLS from now
        elif ev is PAUSED:        a driver bug: StartTlsReady was not answered
        elif Ready:               conn.send_transaction(tx) (or send_etrn / send_quit)
        elif TransactionDone:     store ev.recipient_results(); next transaction or send_quit()
        elif HandshakeFailed:     note ev.reply; the core has queued QUIT itself (unless 421)
        elif Closed:              close the socket; done

Choices this module makes:

- The handshake: any 2xx greeting, then EHLO; a non-2xx EHLO reply other than 421 falls back
  to HELO (no extensions then). A failed handshake queues QUIT (stage "quit").
- STARTTLS (``starttls`` "try" or "require"): sent after a positive EHLO that offers it. Its
  positive reply (220) gives ``StartTlsReady`` and stage "tls": ``next_event`` returns
  ``PAUSED`` and received data is dropped until the driver reports the handshake. Octets the
  server sent after that reply were sent in plaintext, where anyone on the path may have put
  them: they are dropped too, never read as replies. After ``tls_established()`` the core
  forgets the extensions and says EHLO again (RFC 3207 4.2), then ``Ready(tls=True)``;
  ``tls_failed()`` closes (``Closed("tls handshake failed")``). Not offered, under "require":
  ``HandshakeFailed("starttls", 454 4.7.0)``, a reply of the core's own, and QUIT. STARTTLS
  refused: "try" carries on in plaintext (``Ready(tls=False)``), "require" fails the handshake
  with the server's reply. The core never sends STARTTLS twice.
- A transaction is MAIL, RCPT..., DATA, content. With PIPELINING they leave in one chunk and
  the replies are matched in order; without it, one command at a time, and DATA only after
  an accepted RCPT. If the server still holds a transaction (MAIL accepted, no final reply to
  the content) the next transaction or ETRN is preceded by an RSET of the core's own.
- A 421 ends the connection (RFC 5321 3.8): the pending operation's event carries the 421
  where no reply came, then ``Closed("421")``. An EOF or a reply syntax error while a reply
  is outstanding leaves the pending operation's outcome unknown: only ``Closed`` is emitted.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from mailpool.protocol.smtp_syntax import (
    ATEXT,
    NEED_DATA,
    PAUSED,
    Reply,
    ReplyParser,
    ReplySyntaxError,
    Sentinel,
    xtext_encode,
)

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "STARTTLS_MODES",
    "TLS_NOT_OFFERED",
    "ClientConnection",
    "Closed",
    "EtrnDone",
    "Event",
    "HandshakeFailed",
    "Ready",
    "RsetDone",
    "SMTPClientError",
    "StartTlsReady",
    "Transaction",
    "TransactionDone",
    "dot_stuff",
    "normalize_line_ends",
]


class SMTPClientError(RuntimeError):
    """The driver used the core wrongly (a command outside the idle stage, a bad argument)."""


@dataclass(frozen=True)
class Transaction:
    sender: str  # "" for the null reverse-path <>
    recipients: tuple[str, ...]
    content: bytes  # the raw message, any line ends
    ret: str | None = None  # DSN RET: "FULL" or "HDRS"
    envid: str | None = None  # DSN ENVID, plain text (xtext-encoded on the wire)
    # Parallel to recipients, or () for none: NOTIFY values, and ORCPT as "addr-type;text".
    notify: tuple[tuple[str, ...] | None, ...] = ()
    orcpt: tuple[str | None, ...] = ()
    eight_bit: bool | None = None  # None: detect (an octet > 0x7f)


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    greeting: Reply
    hello: Reply  # after STARTTLS, the reply to the EHLO said over TLS
    esmtp: bool  # EHLO accepted (False: the HELO fallback)
    tls: bool = False  # the session runs over TLS


@dataclass(frozen=True)
class HandshakeFailed:
    stage: str  # "greeting", "ehlo" (421 only), "helo" or "starttls"
    reply: Reply


@dataclass(frozen=True)
class StartTlsReady:
    """The server took STARTTLS: the driver does the TLS handshake now."""

    reply: Reply


# What recipient_results() reports for an accepted recipient whose message got no reply:
# TransactionDone built by this core never needs it.
_NO_DATA_REPLY = Reply(451, "4.3.0", ("message data was not sent",))


@dataclass(frozen=True)
class TransactionDone:
    mail: Reply
    rcpts: tuple[Reply, ...]  # parallel to the transaction's recipients
    data: Reply | None  # final reply after the dot, the refusal of DATA, or None: not sent
    dsn: bool  # the server offered DSN, so the DSN parameters were passed on

    def recipient_results(self) -> tuple[Reply, ...]:
        """Each recipient's final outcome. A failed MAIL comes first: with pipelining the
        RCPT replies after it (often 503) say nothing about the recipient."""
        if not self.mail.is_positive:
            return (self.mail,) * len(self.rcpts)
        return tuple(
            r if not r.is_positive else (self.data or _NO_DATA_REPLY) for r in self.rcpts
        )


@dataclass(frozen=True)
class EtrnDone:
    reply: Reply


@dataclass(frozen=True)
class RsetDone:
    reply: Reply


@dataclass(frozen=True)
class Closed:
    reason: str  # "quit", "421", "eof", "eof during <stage>", "protocol error: ..."


Event = Ready | HandshakeFailed | StartTlsReady | TransactionDone | EtrnDone | RsetDone | Closed

STARTTLS_MODES = ("none", "try", "require")
# What HandshakeFailed carries when TLS is required and the EHLO reply does not offer it.
TLS_NOT_OFFERED = Reply(454, "4.7.0", ("TLS is required but was not offered by the server",))


# -- message content ------------------------------------------------------------------------

_LINE_END_RE = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT_RE = re.compile(rb"^\.", re.MULTILINE)


def normalize_line_ends(content: bytes) -> bytes:
    """Every CRLF, lone CR and lone LF becomes CRLF, and the text ends with CRLF: a bare CR
    or LF never reaches the wire (RFC 5321 2.3.8). These are the octets SIZE counts."""
    text = _LINE_END_RE.sub(b"\r\n", content)
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text


def dot_stuff(text: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency on CRLF-normalised text: a leading "." is doubled."""
    return _LEADING_DOT_RE.sub(b"..", text)


# -- argument checks ----------------------------------------------------------------------

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_NODE_RE = re.compile(r"[\x21-\x7e]+")
_HOSTNAME_RE = re.compile(r"[\x21-\x7e]+")
_ATOM_RE = re.compile(rf"{ATEXT}+")
_NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def _check_transaction(tx: Transaction) -> None:
    n = len(tx.recipients)
    if n == 0:
        raise SMTPClientError("a transaction needs at least one recipient")
    for addr in (tx.sender, *tx.recipients):
        if _CONTROL_RE.search(addr):  # would end or corrupt the command line
            raise SMTPClientError(f"control character in address {addr!r}")
    if not all(tx.recipients):
        raise SMTPClientError("a recipient address is empty")
    if len(tx.notify) not in (0, n) or len(tx.orcpt) not in (0, n):
        raise SMTPClientError("notify and orcpt must be empty or parallel to recipients")
    if tx.ret is not None and tx.ret.upper() not in ("FULL", "HDRS"):
        raise SMTPClientError(f"RET must be FULL or HDRS, not {tx.ret!r}")
    for notify in tx.notify:
        if notify is None:
            continue
        values = tuple(v.upper() for v in notify)
        ok = values == ("NEVER",) or (
            bool(values) and len(set(values)) == len(values) and _NOTIFY_VALUES.issuperset(values)
        )
        if not ok:
            raise SMTPClientError(f"bad NOTIFY values {notify!r}")
    for orcpt in tx.orcpt:
        if orcpt is None:
            continue
        addr_type, semi, _ = orcpt.partition(";")
        if not semi or not _ATOM_RE.fullmatch(addr_type):
            raise SMTPClientError(f"ORCPT must be 'addr-type;text', not {orcpt!r}")


# -- the state machine ----------------------------------------------------------------------

# What an outstanding reply answers. Stage names for the driver: the same, except that the
# core's own RSET is "rset" and the dot after a DATA nobody should get is "dot".
_STAGE_OF = {"auto-rset": "rset", "dot-discard": "dot"}
_HANDSHAKE = ("greeting", "ehlo", "helo", "starttls")
_TRANSACTION = ("mail", "rcpt", "data", "dot", "dot-discard")


class ClientConnection:
    """One SMTP client session. See the module docstring for the driving protocol."""

    def __init__(self, local_hostname: str, *, starttls: str = "none",
                 max_reply_line: int = 2048, max_reply_lines: int = 200) -> None:
        if not _HOSTNAME_RE.fullmatch(local_hostname):
            raise ValueError(f"local_hostname must be printable ASCII: {local_hostname!r}")
        if starttls not in STARTTLS_MODES:
            raise ValueError(f"starttls must be one of {', '.join(STARTTLS_MODES)}: "
                             f"{starttls!r}")
        self._hostname = local_hostname
        self._starttls = starttls
        self._limits = (max_reply_line, max_reply_lines)
        self._parser = ReplyParser(max_line=max_reply_line, max_lines=max_reply_lines)
        self._tls = False
        self._tls_wait = False  # StartTlsReady emitted, the driver's handshake not reported
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._closed: Closed | None = None
        self._eof = False
        # Outstanding replies in order: (kind, recipient index or -1).
        self._expect: deque[tuple[str, int]] = deque([("greeting", -1)])
        self.extensions: dict[str, str] = {}
        self._greeting: Reply | None = None
        self._hello: Reply | None = None
        self._dirty = False  # the server holds a transaction (MAIL accepted, no final reply)
        self._op: str | None = None  # "tx" or "etrn" while one is in progress
        self._etrn_command = b""
        self._mail_command = b""
        # the transaction in progress
        self._tx: Transaction | None = None
        self._wire = b""  # dot-stuffed content
        self._pipelined = False
        self._dsn = False
        self._mail: Reply | None = None
        self._rcpts: list[Reply | None] = []
        self._data: Reply | None = None

    # -- driver API ---------------------------------------------------------------------

    @property
    def stage(self) -> str:
        if self._closed is not None:
            return "closed"
        if self._tls_wait:
            return "tls"
        if self._expect:
            kind = self._expect[0][0]
            return _STAGE_OF.get(kind, kind)
        return "idle"

    @property
    def tls_active(self) -> bool:
        """The driver reported a TLS handshake done: everything since went over TLS."""
        return self._tls

    def receive_data(self, data: bytes) -> None:
        # While the handshake is pending nothing is a reply (see the module docstring).
        if self._closed is not None or self._eof or self._tls_wait:
            return
        if data:
            self._parser.feed(data)
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | Sentinel:
        while not self._events:
            if self._closed is not None:
                return self._closed
            if self._tls_wait:
                return PAUSED
            try:
                reply = self._parser.next_reply()
            except ReplySyntaxError as exc:
                self._close(f"protocol error: {exc}")
                continue
            if reply is None:
                if not self._eof:
                    return NEED_DATA
                self._close(f"eof during {self.stage}" if self._expect else "eof")
                continue
            self._on_reply(reply)
        return self._events.popleft()

    def tls_established(self) -> None:
        """The driver's TLS handshake succeeded: EHLO again, over TLS from now on."""
        self._require_tls_wait("tls_established")
        self._tls_wait = False
        self._tls = True
        self.extensions = {}  # RFC 3207 4.2: nothing learnt in plaintext counts
        self._send(_command(f"EHLO {self._hostname}"), "ehlo")

    def tls_failed(self) -> None:
        """The driver's TLS handshake failed: the session is over (close the socket)."""
        self._require_tls_wait("tls_failed")
        self._tls_wait = False
        self._close("tls handshake failed")

    def send_transaction(self, tx: Transaction) -> None:
        self._require_idle("send_transaction")
        _check_transaction(tx)
        text = normalize_line_ends(tx.content)
        size_offered = "SIZE" in self.extensions
        limit_text = self.extensions.get("SIZE", "")
        limit = int(limit_text) if limit_text.isdigit() else 0
        self._dsn = "DSN" in self.extensions
        if limit > 0 and len(text) > limit:
            # RFC 1870 6: do not send what the server said it cannot take.
            refusal = Reply(552, "5.3.4", (f"Message size exceeds remote limit (SIZE {limit})",))
            self._events.append(TransactionDone(refusal, (refusal,) * len(tx.recipients),
                                                refusal, self._dsn))
            return
        eight_bit = tx.eight_bit if tx.eight_bit is not None else not tx.content.isascii()
        mail = f"MAIL FROM:<{tx.sender}>"
        if size_offered:
            mail += f" SIZE={len(text)}"
        if eight_bit and "8BITMIME" in self.extensions:
            mail += " BODY=8BITMIME"  # without 8BITMIME it goes anyway, as Postfix sends it
        if self._dsn and tx.envid:  # "ENVID=" would be malformed
            mail += f" ENVID={xtext_encode(tx.envid)}"
        if self._dsn and tx.ret is not None:
            mail += f" RET={tx.ret.upper()}"
        self._tx = tx
        self._wire = dot_stuff(text) + b".\r\n"
        self._pipelined = "PIPELINING" in self.extensions
        self._mail = None
        self._rcpts = [None] * len(tx.recipients)
        self._data = None
        self._op = "tx"
        self._mail_command = _command(mail)
        if self._pipelined:
            self._auto_rset()
            self._send(self._mail_command, "mail")
            for i in range(len(tx.recipients)):
                self._send(self._rcpt_command(i), "rcpt", i)
            self._send(b"DATA\r\n", "data")
        elif not self._auto_rset():
            self._send(self._mail_command, "mail")

    def send_rset(self) -> None:
        self._require_idle("send_rset")
        self._dirty = False
        self._send(b"RSET\r\n", "rset")

    def send_etrn(self, node: str) -> None:
        self._require_idle("send_etrn")
        if not _NODE_RE.fullmatch(node):
            raise SMTPClientError(f"bad ETRN node {node!r}")
        self._op = "etrn"
        self._etrn_command = _command(f"ETRN {node}")
        # ETRN is refused inside a transaction. It may end a pipelined group (RFC 2920 3.1);
        # without pipelining it waits for the RSET reply.
        rset_sent = self._auto_rset()
        if not rset_sent or "PIPELINING" in self.extensions:
            self._send(self._etrn_command, "etrn")

    def send_quit(self) -> None:
        """QUIT when idle; a no-op once QUIT is outstanding (the core sends it itself after
        a failed handshake) or the connection is closed."""
        if self.stage in ("quit", "closed"):
            return
        self._require_idle("send_quit")
        self._send(b"QUIT\r\n", "quit")

    # -- output -------------------------------------------------------------------------

    def _require_idle(self, what: str) -> None:
        if self.stage != "idle":
            raise SMTPClientError(f"{what}() needs the idle stage (stage is {self.stage!r})")

    def _require_tls_wait(self, what: str) -> None:
        if not self._tls_wait:
            raise SMTPClientError(f"{what}() needs the tls stage (stage is {self.stage!r})")

    def _send(self, command: bytes, kind: str, index: int = -1) -> None:
        self._out += command
        self._expect.append((kind, index))

    def _auto_rset(self) -> bool:
        """RSET first when the server still holds a transaction; True if sent."""
        if not self._dirty:
            return False
        self._dirty = False
        self._send(b"RSET\r\n", "auto-rset")
        return True

    def _rcpt_command(self, i: int) -> bytes:
        tx = self._tx
        assert tx is not None
        rcpt = f"RCPT TO:<{tx.recipients[i]}>"
        if self._dsn:
            notify = tx.notify[i] if tx.notify else None
            orcpt = tx.orcpt[i] if tx.orcpt else None
            if notify is not None:
                rcpt += " NOTIFY=" + ",".join(v.upper() for v in notify)
            if orcpt is not None:
                addr_type, _, text = orcpt.partition(";")
                rcpt += f" ORCPT={addr_type};{xtext_encode(text)}"
        return _command(rcpt)

    def _close(self, reason: str) -> None:
        self._closed = Closed(reason)
        self._events.append(self._closed)
        self._expect.clear()
        self._out.clear()  # nothing more goes to a peer that is gone or broken
        self._tx = None
        self._op = None

    # -- replies ------------------------------------------------------------------------

    def _on_reply(self, reply: Reply) -> None:
        if not self._expect:
            if reply.code == 421:  # e.g. the server's idle timeout
                self._close("421")
            else:
                self._close(f"protocol error: unexpected reply {reply.code} {reply.text[:80]!r}")
            return
        kind, index = self._expect.popleft()
        # Only DATA has an intermediate reply, and DATA has no final positive one.
        if kind == "data":
            fits = reply.code == 354 or reply.code >= 400
        else:
            fits = reply.code < 300 or reply.code >= 400
        if not fits:
            self._close(f"protocol error: reply {reply.code} to {_STAGE_OF.get(kind, kind)}")
            return
        if reply.code == 421:
            self._on_421(kind, index, reply)
            return
        getattr(self, "_on_" + kind.replace("-", "_"))(index, reply)

    def _on_421(self, kind: str, index: int, reply: Reply) -> None:
        if kind in _HANDSHAKE:
            self._events.append(HandshakeFailed(kind, reply))
        elif kind == "rset":
            self._events.append(RsetDone(reply))
        elif kind == "etrn" or (kind == "auto-rset" and self._op == "etrn"):
            self._events.append(EtrnDone(reply))
        elif self._op == "tx":  # auto-rset or a transaction reply
            if kind == "mail":
                self._mail = reply
            elif kind == "rcpt":
                self._rcpts[index] = reply
            elif kind == "data" or kind == "dot":
                self._data = reply
            self._finish_transaction(cause=reply)
        self._close("421")

    def _on_greeting(self, index: int, reply: Reply) -> None:
        self._greeting = reply
        if reply.is_positive:
            self._send(_command(f"EHLO {self._hostname}"), "ehlo")
        else:
            self._handshake_failed("greeting", reply)

    def _on_ehlo(self, index: int, reply: Reply) -> None:
        if not reply.is_positive:
            self._send(_command(f"HELO {self._hostname}"), "helo")
            return
        self.extensions = _parse_extensions(reply)
        self._hello = reply
        if not self._tls and self._starttls != "none" and "STARTTLS" in self.extensions:
            self._send(b"STARTTLS\r\n", "starttls")  # never pipelined (RFC 3207 4.2)
        else:
            self._ready(reply, esmtp=True)

    def _on_helo(self, index: int, reply: Reply) -> None:
        if reply.is_positive:
            self._ready(reply, esmtp=False)
        else:
            self._handshake_failed("helo", reply)

    def _ready(self, hello: Reply, *, esmtp: bool) -> None:
        if self._starttls == "require" and not self._tls:
            self._handshake_failed("starttls", TLS_NOT_OFFERED)
            return
        assert self._greeting is not None
        self._events.append(Ready(self._greeting, hello, esmtp=esmtp, tls=self._tls))

    def _on_starttls(self, index: int, reply: Reply) -> None:
        if reply.is_positive:
            self._tls_wait = True
            # Whatever came after the 220 is plaintext injected before the handshake.
            self._parser = ReplyParser(max_line=self._limits[0], max_lines=self._limits[1])
            self._events.append(StartTlsReady(reply))
        elif self._starttls == "require":
            self._handshake_failed("starttls", reply)
        else:
            assert self._greeting is not None and self._hello is not None
            self._events.append(Ready(self._greeting, self._hello, esmtp=True, tls=False))

    def _handshake_failed(self, stage: str, reply: Reply) -> None:
        self._events.append(HandshakeFailed(stage, reply))
        self._send(b"QUIT\r\n", "quit")

    def _on_auto_rset(self, index: int, reply: Reply) -> None:
        # A refused RSET is not fatal: the next reply tells what the server makes of it.
        if self._op == "tx" and not self._pipelined:
            self._send(self._mail_command, "mail")
        elif self._op == "etrn" and "PIPELINING" not in self.extensions:
            self._send(self._etrn_command, "etrn")

    def _on_mail(self, index: int, reply: Reply) -> None:
        self._mail = reply
        if reply.is_positive:
            self._dirty = True
        if self._pipelined:
            return
        if reply.is_positive:
            self._send(self._rcpt_command(0), "rcpt", 0)
        else:
            self._finish_transaction()

    def _on_rcpt(self, index: int, reply: Reply) -> None:
        self._rcpts[index] = reply
        if self._pipelined:
            return
        if index + 1 < len(self._rcpts):
            self._send(self._rcpt_command(index + 1), "rcpt", index + 1)
        elif any(r is not None and r.is_positive for r in self._rcpts):
            self._send(b"DATA\r\n", "data")
        else:
            self._finish_transaction()

    def _on_data(self, index: int, reply: Reply) -> None:
        if reply.code == 354:
            mail_ok = self._mail is not None and self._mail.is_positive
            if mail_ok and any(r is not None and r.is_positive for r in self._rcpts):
                self._send(self._wire, "dot")  # the content, its final dot included
            else:
                # Pipelined DATA went out before the RCPT refusals came back: an empty
                # message is safer than the content to nobody.
                self._send(b".\r\n", "dot-discard")
            return
        self._data = reply  # refused; _finish_transaction drops it when nobody was accepted
        self._finish_transaction()

    def _on_dot(self, index: int, reply: Reply) -> None:
        self._data = reply
        self._dirty = False
        self._finish_transaction()

    def _on_dot_discard(self, index: int, reply: Reply) -> None:
        self._dirty = False
        self._finish_transaction()

    def _finish_transaction(self, cause: Reply | None = None) -> None:
        """Emit TransactionDone; ``cause`` (a 421) stands in for every reply not received."""
        mail = self._mail or cause
        assert mail is not None and self._tx is not None
        if not mail.is_positive:
            rcpts = tuple(r or mail for r in self._rcpts)
            data = None
        else:
            filled = [r or cause for r in self._rcpts]
            assert all(r is not None for r in filled)
            rcpts = tuple(r for r in filled if r is not None)
            accepted = any(r.is_positive for r in rcpts)
            data = (self._data or cause) if accepted else None
        self._events.append(TransactionDone(mail, rcpts, data, self._dsn))
        self._tx = None
        self._op = None
        self._wire = b""

    def _on_rset(self, index: int, reply: Reply) -> None:
        self._events.append(RsetDone(reply))

    def _on_etrn(self, index: int, reply: Reply) -> None:
        self._op = None
        self._events.append(EtrnDone(reply))

    def _on_quit(self, index: int, reply: Reply) -> None:
        self._close("quit")


def _command(text: str) -> bytes:
    return text.encode("utf-8") + b"\r\n"


def _parse_extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) -> parameter text; the first line is the server's name."""
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions
