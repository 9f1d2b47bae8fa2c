"""Byte-for-byte tests of the sans-IO SMTP server core (no sockets, no Trio)."""

from __future__ import annotations

import base64
import dataclasses
import random
from collections.abc import Callable

import pytest

from mailpool.protocol.smtp_server import (
    _KNOWN_VERBS,
    _TRANSITIONS,
    NEED_DATA,
    PAUSED,
    AuthAborted,
    Authenticate,
    ConnectionClosed,
    Etrn,
    Forbidden,
    Hello,
    ImproperPipelining,
    MailFrom,
    MessageReceived,
    Quit,
    RcptTo,
    Reset,
    ServerConnection,
    ServerLimits,
    SMTPProtocolError,
    StartTls,
    Verify,
)
from mailpool.protocol.smtp_syntax import received_with

HOST = "mx.example.org"
EHLO_REPLY = (
    b"250-mx.example.org\r\n"
    b"250-SIZE 10485760\r\n"
    b"250-8BITMIME\r\n"
    b"250-PIPELINING\r\n"
    b"250-DSN\r\n"
    b"250-ETRN\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250 HELP\r\n"
)

Answer = tuple[int, str, str | None]


def default_answer(event: object) -> Answer:
    if isinstance(event, MailFrom):
        return 250, "Ok", "2.1.0"
    if isinstance(event, RcptTo):
        return 250, "Ok", "2.1.5"
    if isinstance(event, MessageReceived):
        return 250, "Ok: queued as Q1", "2.0.0"
    assert isinstance(event, Verify)
    return 252, "Cannot VRFY user", "2.0.0"


def new(**limits: int) -> ServerConnection:
    conn = ServerConnection(ServerLimits(hostname=HOST, **limits))
    conn.greeting()
    assert conn.data_to_send() == b"220 mx.example.org ESMTP mailpool\r\n"
    return conn


def pump(
    conn: ServerConnection,
    data: bytes,
    answer: Callable[[object], Answer] = default_answer,
) -> list[object]:
    """Feed data, answer every decision event, return all events until NEED_DATA/closed."""
    conn.receive_data(data)
    events: list[object] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        assert event is not PAUSED
        events.append(event)
        if isinstance(event, MailFrom | RcptTo | MessageReceived | Verify | Etrn):
            conn.reply(*answer(event))
        if isinstance(event, ConnectionClosed | StartTls | Authenticate):
            return events  # the test answers StartTls and Authenticate itself


def ready(**limits: int) -> ServerConnection:
    conn = new(**limits)
    assert pump(conn, b"EHLO client.example\r\n") == [Hello("EHLO", "client.example")]
    assert conn.data_to_send() == EHLO_REPLY.replace(
        b"10485760", str(conn._limits.max_message_size).encode()
    )
    return conn


def in_transaction(**limits: int) -> ServerConnection:
    conn = ready(**limits)
    pump(conn, b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n")
    assert conn.data_to_send() == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
    assert conn.state == "rcpt"
    return conn


GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"


def start_data(conn: ServerConnection) -> None:
    """DATA alone, as a client must send it (RFC 2920 3.1): the 354 comes back."""
    assert pump(conn, b"DATA\r\n") == []
    assert conn.data_to_send() == GO_AHEAD
    assert conn.state == "data"


def send_message(conn: ServerConnection, body: bytes) -> tuple[list[object], bytes]:
    """DATA, then (after the 354) body; return the events and the reply bytes after it."""
    start_data(conn)
    events = pump(conn, body)
    return events, conn.data_to_send()


# -- greeting, HELO/EHLO ------------------------------------------------------------------


def test_greeting_and_ehlo() -> None:
    conn = ready()
    assert conn.helo == "client.example"
    assert conn.esmtp is True
    assert conn.state == "ready"


def test_ehlo_advertises_configured_size() -> None:
    conn = new(max_message_size=1234)
    pump(conn, b"ehlo x\r\n")
    assert b"250-SIZE 1234\r\n" in conn.data_to_send()


def test_helo() -> None:
    conn = new()
    assert pump(conn, b"HELO client.example\r\n") == [Hello("HELO", "client.example")]
    assert conn.data_to_send() == b"250 mx.example.org\r\n"
    assert conn.esmtp is False
    assert conn.helo == "client.example"


@pytest.mark.parametrize("verb", [b"HELO", b"EHLO"])
def test_hello_without_domain(verb: bytes) -> None:
    conn = new()
    assert pump(conn, verb + b"\r\n" + verb + b"   \r\n") == []
    reply = b"501 5.5.4 Syntax: " + verb + b" hostname\r\n"
    assert conn.data_to_send() == reply * 2
    assert conn.helo is None
    assert conn.state == "start"


def test_hello_resets_transaction() -> None:
    conn = in_transaction()
    assert pump(conn, b"HELO other\r\nDATA\r\n") == [Hello("HELO", "other")]
    assert conn.data_to_send() == b"250 mx.example.org\r\n503 5.5.1 Error: need RCPT command\r\n"
    assert conn.state == "ready"


def test_commands_are_case_insensitive() -> None:
    conn = new()
    events = pump(conn, b"eHlO c\r\nmail from:<a@b.c>\r\nrcpt to:<d@e.f>\r\ndata\r\n")
    events += pump(conn, b"x\r\n.\r\nnoop\r\n")
    assert events == [
        Hello("EHLO", "c"),
        MailFrom("a@b.c", {}),
        RcptTo("d@e.f", {}),
        MessageReceived("a@b.c", ("d@e.f",), b"x\r\n"),
    ]


# -- a full transaction -------------------------------------------------------------------


def test_pipelined_transaction_in_two_chunks() -> None:
    # RFC 2920 3.1: DATA ends a pipelined group; the text follows the 354.
    conn = new()
    chunk = (
        b"EHLO client.example\r\n"
        b"MAIL FROM:<alice@example.com> SIZE=20 BODY=8BITMIME\r\n"
        b"RCPT TO:<bob@example.net>\r\n"
        b"RCPT TO:<carol@example.net>\r\n"
        b"DATA\r\n"
    )
    events = pump(conn, chunk)
    assert conn.data_to_send().endswith(b"250 2.1.5 Ok\r\n" + GO_AHEAD)
    events += pump(conn, b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert events == [
        Hello("EHLO", "client.example"),
        MailFrom("alice@example.com", {"SIZE": "20", "BODY": "8BITMIME"}),
        RcptTo("bob@example.net", {}),
        RcptTo("carol@example.net", {}),
        MessageReceived(
            "alice@example.com",
            ("bob@example.net", "carol@example.net"),
            b"Subject: hi\r\n\r\nhello\r\n",
        ),
        Quit(),
        ConnectionClosed(),
    ]
    assert conn.data_to_send() == b"250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 Bye\r\n"
    assert conn.closed
    assert conn.next_event() == ConnectionClosed()
    assert conn.next_event() == ConnectionClosed()


def test_paused_until_reply_and_replies_in_order() -> None:
    conn = ready()
    conn.receive_data(b"MAIL FROM:<a@b.c>\r\nNOOP\r\nRCPT TO:<d@e.f>\r\n")
    assert conn.next_event() == MailFrom("a@b.c", {})
    assert conn.next_event() is PAUSED
    assert conn.next_event() is PAUSED
    assert conn.data_to_send() == b""  # NOOP is not answered before the pending MAIL
    conn.reply(250, "Ok", "2.1.0")
    assert conn.next_event() == RcptTo("d@e.f", {})
    assert conn.data_to_send() == b"250 2.1.0 Ok\r\n250 2.0.0 Ok\r\n"
    conn.reply(550, "Rejected", "5.1.1")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"550 5.1.1 Rejected\r\n"
    assert conn.state == "mail"


def test_reply_without_pending_event_raises() -> None:
    conn = ready()
    with pytest.raises(SMTPProtocolError):
        conn.reply(250, "Ok")


def test_multiline_reply_and_no_enhanced_code() -> None:
    conn = ready()
    pump(conn, b"VRFY bob\r\n", lambda e: (252, ["one", "two", "three"], "2.0.0"))
    assert conn.data_to_send() == b"252-2.0.0 one\r\n252-2.0.0 two\r\n252 2.0.0 three\r\n"
    pump(conn, b"VRFY bob\r\n", lambda e: (252, "plain", None))
    assert conn.data_to_send() == b"252 plain\r\n"


@pytest.mark.parametrize("code", [100, 199, 354, 600])
def test_reply_rejects_non_final_codes(code: int) -> None:
    conn = ready()
    conn.receive_data(b"VRFY x\r\n")
    assert isinstance(conn.next_event(), Verify)
    with pytest.raises(ValueError):
        conn.reply(code, "x")


def test_reply_rejects_crlf_injection() -> None:
    conn = ready()
    conn.receive_data(b"VRFY x\r\n")
    assert isinstance(conn.next_event(), Verify)
    with pytest.raises(ValueError):
        conn.reply(252, "a\r\n250 b")


def test_rejected_mail_keeps_no_transaction() -> None:
    conn = ready()
    pump(conn, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n", lambda e: (550, "No", "5.7.1"))
    assert conn.data_to_send() == b"550 5.7.1 No\r\n503 5.5.1 Error: need MAIL command\r\n"
    assert conn.state == "ready"


def test_message_reply_resets_transaction_keeps_helo() -> None:
    conn = in_transaction()
    events, out = send_message(conn, b"x\r\n.\r\nRCPT TO:<d@e.f>\r\n")
    assert events == [MessageReceived("a@example.com", ("b@example.net",), b"x\r\n")]
    assert out == b"250 2.0.0 Ok: queued as Q1\r\n503 5.5.1 Error: need MAIL command\r\n"
    assert conn.state == "ready"
    assert conn.helo == "client.example"


def test_message_rejection_also_resets() -> None:
    conn = in_transaction()
    start_data(conn)
    events = pump(conn, b"x\r\n.\r\nDATA\r\n", lambda e: (554, "Spam", "5.7.1"))
    assert len(events) == 1
    assert conn.data_to_send() == (
        b"554 5.7.1 Spam\r\n"
        b"503 5.5.1 Error: need RCPT command\r\n"
    )


def test_driver_421_closes() -> None:
    conn = ready()
    events = pump(conn, b"MAIL FROM:<a@b.c>\r\nNOOP\r\n", lambda e: (421, "Busy", "4.3.2"))
    assert events == [MailFrom("a@b.c", {}), ConnectionClosed()]
    assert conn.data_to_send() == b"421 4.3.2 Busy\r\n"
    assert conn.closed


# -- simple commands ----------------------------------------------------------------------


def test_rset_noop_help_quit() -> None:
    conn = in_transaction()
    assert pump(conn, b"RSET\r\nNOOP\r\nHELP\r\nQUIT\r\n") == [
        Reset(),
        Quit(),
        ConnectionClosed(),
    ]
    assert conn.data_to_send() == (
        b"250 2.0.0 Ok\r\n"
        b"250 2.0.0 Ok\r\n"
        b"214-2.0.0 Commands supported:\r\n"
        b"214-2.0.0 HELO EHLO MAIL RCPT DATA\r\n"
        b"214-2.0.0 RSET VRFY ETRN NOOP QUIT HELP\r\n"
        b"214 2.0.0 End of HELP info\r\n"
        b"221 2.0.0 Bye\r\n"
    )
    assert conn.closed
    assert conn.state == "closed"
    assert conn.next_event() == ConnectionClosed()


def test_rset_clears_transaction() -> None:
    conn = in_transaction()
    pump(conn, b"RSET\r\nDATA\r\nMAIL FROM:<x@y.z>\r\n")
    assert conn.data_to_send() == (
        b"250 2.0.0 Ok\r\n503 5.5.1 Error: need RCPT command\r\n250 2.1.0 Ok\r\n"
    )


def test_rset_with_argument() -> None:
    conn = ready()
    assert pump(conn, b"RSET now\r\n") == []
    assert conn.data_to_send() == b"501 5.5.4 Syntax: RSET\r\n"


def test_commands_before_helo() -> None:
    conn = new()
    events = pump(conn, b"NOOP\r\nRSET\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<a@b.c>\r\nDATA\r\n")
    assert events == [Reset()]
    assert conn.data_to_send() == (
        b"250 2.0.0 Ok\r\n"
        b"250 2.0.0 Ok\r\n"
        b"503 5.5.1 Error: send HELO/EHLO first\r\n"
        b"503 5.5.1 Error: send HELO/EHLO first\r\n"
        b"503 5.5.1 Error: need RCPT command\r\n"
    )
    assert conn.state == "start"


def test_vrfy() -> None:
    conn = new()
    assert pump(conn, b"VRFY\r\nVRFY  Bob Smith \r\n") == [Verify("Bob Smith")]
    assert conn.data_to_send() == (
        b"501 5.5.4 Syntax: VRFY address\r\n252 2.0.0 Cannot VRFY user\r\n"
    )


@pytest.mark.parametrize("verb", [b"EXPN", b"SEND", b"SOML", b"SAML", b"TURN", b"expn"])
def test_not_implemented(verb: bytes) -> None:
    conn = ready()
    assert pump(conn, verb + b" x\r\n") == []
    assert conn.data_to_send() == b"502 5.5.1 Error: command not implemented\r\n"


@pytest.mark.parametrize("line", [b"FOO", b"", b"xyzzy a:b", b"MAILFROM <a@b.c>", b"   "])
def test_unknown_command(line: bytes) -> None:
    conn = ready()
    assert pump(conn, line + b"\r\n") == []
    assert conn.data_to_send() == b"500 5.5.2 Error: command not recognized\r\n"


def test_bare_lf_ends_command_lines() -> None:
    conn = new()
    assert pump(conn, b"HELO x\nNOOP\n") == [Hello("HELO", "x")]
    assert conn.data_to_send() == b"250 mx.example.org\r\n250 2.0.0 Ok\r\n"


def test_transition_table_is_complete() -> None:
    for state in ("start", "ready", "mail", "rcpt"):
        for verb in _KNOWN_VERBS:
            assert (state, verb) in _TRANSITIONS


# -- MAIL / RCPT syntax --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (b"MAIL FROM:<>", MailFrom("", {})),
        (b"MAIL FROM: <a@b.c>", MailFrom("a@b.c", {})),
        (b"MAIL From:<a@b.c>  ", MailFrom("a@b.c", {})),
        (b'MAIL FROM:<"x y>z"@b.c>', MailFrom('"x y>z"@b.c', {})),
        (b'MAIL FROM:<"a\\"b"@b.c>', MailFrom('"a\\"b"@b.c', {})),
        (b"MAIL FROM:<@r1.org,@r2.org:u@d.org>", MailFrom("u@d.org", {})),
        (b"MAIL FROM:<u@[192.0.2.1]>", MailFrom("u@[192.0.2.1]", {})),
        (b"MAIL FROM:<u@[IPv6:2001:db8::1]>", MailFrom("u@[IPv6:2001:db8::1]", {})),
        (b"MAIL FROM:<a.b+c@sub-d.e.f> BODY=7bit", MailFrom("a.b+c@sub-d.e.f", {"BODY": "7bit"})),
        (b"MAIL FROM:<a@b.c> size=10485760", MailFrom("a@b.c", {"SIZE": "10485760"})),
    ],
)
def test_mail_accepted_forms(line: bytes, event: MailFrom) -> None:
    conn = ready()
    assert pump(conn, line + b"\r\n") == [event]
    assert conn.data_to_send() == b"250 2.1.0 Ok\r\n"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL", b"501 5.5.4 Syntax: MAIL FROM:<address>"),
        (b"MAIL a@b.c", b"501 5.5.4 Syntax: MAIL FROM:<address>"),
        (b"MAIL FROM:a@b.c", b"501 5.5.4 Syntax: MAIL FROM:<address>"),
        (b"MAIL FROM:<a@b.c", b"501 5.5.4 Syntax: MAIL FROM:<address>"),
        (b"MAIL TO:<a@b.c>", b"501 5.5.4 Syntax: MAIL FROM:<address>"),
        (b"MAIL FROM:<a@b.c>SIZE=1", b"501 5.5.4 Syntax: MAIL FROM:<address>"),
        (b"MAIL FROM:<a@b@c>", b"501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<a..b@c.d>", b"501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<a@-b.c>", b"501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<a@b.c.>", b"501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<a b@c.d>", b"501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<postmaster>", b"501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<u@[300.0.0.1]>", b"501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<u@[IPv6:zz::1]>", b"501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<@r1.org:>", b"501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<\xe9@b.c>", b"501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<a@b.c> FOO=bar", b"555 5.5.4 Unsupported option: FOO=bar"),
        (b"MAIL FROM:<a@b.c> BODY=BINARYMIME", b"555 5.5.4 Unsupported option: BODY=BINARYMIME"),
        (b"MAIL FROM:<a@b.c> SMTPUTF8", b"555 5.5.4 Unsupported option: SMTPUTF8"),
        (b"MAIL FROM:<a@b.c> =x", b"555 5.5.4 Unsupported option: =x"),
        (b"MAIL FROM:<a@b.c> SIZE=10485761", b"552 5.3.4 Message size exceeds fixed limit"),
        (b"MAIL FROM:<a@b.c> SIZE=12k", b"501 5.5.4 Bad message size syntax"),
        (b"MAIL FROM:<a@b.c> SIZE", b"501 5.5.4 Bad message size syntax"),
    ],
)
def test_mail_errors(line: bytes, reply: bytes) -> None:
    conn = ready()
    assert pump(conn, line + b"\r\n") == []
    assert conn.data_to_send() == reply + b"\r\n"
    assert conn.state == "ready"


def test_nested_mail() -> None:
    conn = in_transaction()
    assert pump(conn, b"MAIL FROM:<x@y.z>\r\n") == []
    assert conn.data_to_send() == b"503 5.5.1 Error: nested MAIL command\r\n"
    conn = ready()
    pump(conn, b"MAIL FROM:<x@y.z>\r\nMAIL FROM:<x@y.z>\r\n")
    assert conn.data_to_send() == b"250 2.1.0 Ok\r\n503 5.5.1 Error: nested MAIL command\r\n"


def test_rcpt_without_mail() -> None:
    conn = ready()
    assert pump(conn, b"RCPT TO:<a@b.c>\r\n") == []
    assert conn.data_to_send() == b"503 5.5.1 Error: need MAIL command\r\n"


@pytest.mark.parametrize(
    ("line", "address"),
    [
        (b"RCPT TO:<Postmaster>", "Postmaster"),
        (b"RCPT TO:<postmaster>", "postmaster"),
        (b"RCPT TO: <a@b.c>", "a@b.c"),
        (b"rcpt to:<@x.org:a@b.c>", "a@b.c"),
    ],
)
def test_rcpt_accepted_forms(line: bytes, address: str) -> None:
    conn = ready()
    pump(conn, b"MAIL FROM:<>\r\n")
    conn.data_to_send()
    assert pump(conn, line + b"\r\n") == [RcptTo(address, {})]
    assert conn.data_to_send() == b"250 2.1.5 Ok\r\n"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RCPT", b"501 5.5.4 Syntax: RCPT TO:<address>"),
        (b"RCPT FROM:<a@b.c>", b"501 5.5.4 Syntax: RCPT TO:<address>"),
        (b"RCPT TO:a@b.c", b"501 5.5.4 Syntax: RCPT TO:<address>"),
        (b"RCPT TO:<>", b"501 5.1.3 Bad recipient address syntax"),
        (b"RCPT TO:<a@>", b"501 5.1.3 Bad recipient address syntax"),
        (b"RCPT TO:<a>", b"501 5.1.3 Bad recipient address syntax"),
        (b"RCPT TO:<a@b.c> FOO=bar", b"555 5.5.4 Unsupported option: FOO=bar"),
    ],
)
def test_rcpt_errors(line: bytes, reply: bytes) -> None:
    conn = ready()
    pump(conn, b"MAIL FROM:<a@b.c>\r\n")
    conn.data_to_send()
    assert pump(conn, line + b"\r\n") == []
    assert conn.data_to_send() == reply + b"\r\n"


def test_too_many_recipients() -> None:
    conn = ready(max_recipients=2)
    lines = b"MAIL FROM:<a@b.c>\r\n" + b"RCPT TO:<r@x.y>\r\n" * 4
    events = pump(conn, lines)
    assert events == [MailFrom("a@b.c", {}), RcptTo("r@x.y", {}), RcptTo("r@x.y", {})]
    assert conn.data_to_send() == (
        b"250 2.1.0 Ok\r\n"
        b"250 2.1.5 Ok\r\n"
        b"250 2.1.5 Ok\r\n"
        b"452 4.5.3 Error: too many recipients\r\n"
        b"452 4.5.3 Error: too many recipients\r\n"
    )
    # the transaction carries on with the recipients accepted so far
    events, out = send_message(conn, b"hi\r\n.\r\n")
    assert events == [MessageReceived("a@b.c", ("r@x.y", "r@x.y"), b"hi\r\n")]
    assert out == b"250 2.0.0 Ok: queued as Q1\r\n"


def test_refused_recipients_do_not_count_toward_limit() -> None:
    conn = ready(max_recipients=1)
    pump(conn, b"MAIL FROM:<a@b.c>\r\n")
    pump(conn, b"RCPT TO:<r@x.y>\r\n", lambda e: (550, "No", "5.1.1"))
    pump(conn, b"RCPT TO:<s@x.y>\r\nRCPT TO:<t@x.y>\r\n")
    assert conn.data_to_send() == (
        b"250 2.1.0 Ok\r\n550 5.1.1 No\r\n250 2.1.5 Ok\r\n452 4.5.3 Error: too many recipients\r\n"
    )


# -- DATA command ----------------------------------------------------------------------------


def test_data_without_mail_or_rcpt() -> None:
    conn = ready()
    pump(conn, b"DATA\r\nMAIL FROM:<a@b.c>\r\nDATA\r\n")
    assert conn.data_to_send() == (
        b"503 5.5.1 Error: need RCPT command\r\n"
        b"250 2.1.0 Ok\r\n"
        b"503 5.5.1 Error: need RCPT command\r\n"
    )


def test_data_when_all_recipients_refused() -> None:
    conn = ready()
    pump(conn, b"MAIL FROM:<a@b.c>\r\n")
    pump(conn, b"RCPT TO:<r@x.y>\r\n", lambda e: (550, "No", "5.1.1"))
    pump(conn, b"DATA\r\n")
    assert conn.data_to_send() == (
        b"250 2.1.0 Ok\r\n550 5.1.1 No\r\n554 5.5.1 Error: no valid recipients\r\n"
    )


def test_data_with_argument() -> None:
    conn = in_transaction()
    assert pump(conn, b"DATA now\r\n") == []
    assert conn.data_to_send() == b"501 5.5.4 Syntax: DATA\r\n"
    assert conn.state == "rcpt"


# -- message content ---------------------------------------------------------------------


def test_empty_message() -> None:
    conn = in_transaction()
    events, out = send_message(conn, b".\r\n")
    assert events == [MessageReceived("a@example.com", ("b@example.net",), b"")]
    assert out == b"250 2.0.0 Ok: queued as Q1\r\n"


def test_dot_unstuffing() -> None:
    conn = in_transaction()
    body = b"..\r\n...x\r\n.y\r\na.b\r\n. \r\n"
    events, _ = send_message(conn, body + b".\r\n")
    assert events == [
        MessageReceived(
            "a@example.com", ("b@example.net",), b".\r\n..x\r\ny\r\na.b\r\n \r\n"
        )
    ]


BARE_BODY = b"a\n.\nb\r.\rc\n.\r\nd\r\n\n.\n\r\n"


def test_bare_lf_and_cr_do_not_end_or_split_data() -> None:
    conn = in_transaction()
    events, out = send_message(conn, BARE_BODY + b".\r\n")
    assert events == [MessageReceived("a@example.com", ("b@example.net",), BARE_BODY)]
    assert out == b"250 2.0.0 Ok: queued as Q1\r\n"


def test_one_byte_chunks_give_same_result() -> None:
    commands = b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"
    text = BARE_BODY + b"..stuffed\r\n.\r\nQUIT\r\n"
    stream = commands + text
    whole = new()
    expected = pump(whole, commands) + pump(whole, text)
    expected_bytes = whole.data_to_send()
    split = new()
    events: list[object] = []
    for i in range(len(stream)):
        events += pump(split, stream[i : i + 1])
    assert events == expected
    assert split.data_to_send() == expected_bytes
    assert expected[-3:] == [
        MessageReceived("a@b.c", ("d@e.f",), BARE_BODY + b".stuffed\r\n"),
        Quit(),
        ConnectionClosed(),
    ]


@pytest.mark.parametrize("seed", range(20))
def test_random_bodies_and_chunkings_round_trip(seed: int) -> None:
    rng = random.Random(seed)
    pieces = [b"a", b"b", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n."]
    body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 200))) + b"\r\n"
    # what a client sends: every CRLF-delimited line starting with "." gets one more
    lines = body.split(b"\r\n")
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    stream = stuffed + b".\r\nNOOP\r\n"
    conn = in_transaction()
    start_data(conn)
    events: list[object] = []
    pos = 0
    while pos < len(stream):
        step = rng.randrange(1, 8)
        events += pump(conn, stream[pos : pos + step])
        pos += step
    assert events == [MessageReceived("a@example.com", ("b@example.net",), body)]
    assert conn.data_to_send() == b"250 2.0.0 Ok: queued as Q1\r\n250 2.0.0 Ok\r\n"


def test_terminator_split_across_chunks() -> None:
    conn = in_transaction()
    start_data(conn)
    assert pump(conn, b"line\r") == []
    assert pump(conn, b"\n.") == []
    assert pump(conn, b"\r") == []
    events = pump(conn, b"\nNOOP\r\n")
    assert events == [MessageReceived("a@example.com", ("b@example.net",), b"line\r\n")]
    assert conn.data_to_send() == b"250 2.0.0 Ok: queued as Q1\r\n250 2.0.0 Ok\r\n"


def test_eight_bit_content_kept() -> None:
    conn = in_transaction()
    body = "Grüße\r\n".encode() + b"\x00\xff\r\n"
    events, _ = send_message(conn, body + b".\r\n")
    assert events == [MessageReceived("a@example.com", ("b@example.net",), body)]


def test_oversize_message_then_session_continues() -> None:
    conn = in_transaction(max_message_size=10)
    events, out = send_message(conn, b"0123456789\r\nmore\r\n.\r\nNOOP\r\n")
    assert events == []
    assert out == b"552 5.3.4 Error: message too large\r\n250 2.0.0 Ok\r\n"
    assert conn.state == "ready"
    pump(conn, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n")
    assert conn.data_to_send() == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
    events, out = send_message(conn, b"12345678\r\n.\r\n")
    assert events == [MessageReceived("a@b.c", ("d@e.f",), b"12345678\r\n")]
    assert out == b"250 2.0.0 Ok: queued as Q1\r\n"


def test_message_exactly_at_size_limit() -> None:
    conn = in_transaction(max_message_size=10)
    events, out = send_message(conn, b"..\r\n567890\r\n.\r\n")  # unstuffed: 3 + 8 = 11
    assert (events, out) == ([], b"552 5.3.4 Error: message too large\r\n")
    conn = in_transaction(max_message_size=11)
    events, out = send_message(conn, b"..\r\n567890\r\n.\r\n")
    assert events == [MessageReceived("a@example.com", ("b@example.net",), b".\r\n567890\r\n")]
    assert out == b"250 2.0.0 Ok: queued as Q1\r\n"


def test_oversize_content_is_not_stored() -> None:
    conn = in_transaction(max_message_size=100)
    start_data(conn)
    pump(conn, b"x" * 50 + b"\r\n" + b"y" * 60 + b"\r\n")
    assert len(conn._content) == 0


def test_long_text_line() -> None:
    conn = in_transaction(max_text_line=10)
    ok_line = b"12345678\r\n"  # exactly 10 octets with CRLF
    events, out = send_message(conn, ok_line + b".\r\n")
    assert events == [MessageReceived("a@example.com", ("b@example.net",), ok_line)]
    assert out == b"250 2.0.0 Ok: queued as Q1\r\n"
    pump(conn, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n")
    assert conn.data_to_send() == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
    events, out = send_message(conn, b"123456789\r\nok\r\n.\r\nNOOP\r\n")
    assert events == []
    assert out == b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"
    assert conn.state == "ready"


def test_long_partial_line_is_dropped() -> None:
    conn = in_transaction(max_text_line=10)
    start_data(conn)
    assert pump(conn, b"x" * 25) == []
    assert len(conn._in) < 10  # bounded: the overlong partial line was dropped
    assert pump(conn, b"x" * 25 + b"\r") == []
    assert len(conn._in) == 1  # only the CR whose LF may follow is kept
    assert pump(conn, b"\n.\r\n") == []
    assert conn.data_to_send() == b"500 5.5.2 Error: line too long\r\n"
    assert conn.state == "ready"


def test_long_line_then_dot_continuation() -> None:
    conn = in_transaction(max_text_line=10)
    start_data(conn)
    assert pump(conn, b"x" * 30) == []
    assert pump(conn, b".\r\n") == []  # the end of the long line, not a terminator
    assert conn.state == "data"
    assert pump(conn, b".\r\n") == []
    assert conn.state == "ready"
    assert conn.data_to_send() == b"500 5.5.2 Error: line too long\r\n"


def test_crlf_split_after_long_partial_line() -> None:
    conn = in_transaction(max_text_line=10)
    start_data(conn)
    pump(conn, b"x" * 20 + b"\r")
    pump(conn, b"\n.\r\n")
    assert conn.data_to_send().endswith(b"500 5.5.2 Error: line too long\r\n")
    assert conn.state == "ready"


def test_eof_mid_data() -> None:
    conn = in_transaction()
    start_data(conn)
    events = pump(conn, b"Subject: x\r\n\r\nbody\r\n")
    assert events == []
    assert pump(conn, b"") == [ConnectionClosed()]
    assert conn.closed
    assert conn.next_event() == ConnectionClosed()


def test_eof_processes_buffered_commands_first() -> None:
    conn = ready()
    conn.receive_data(b"NOOP\r\nQUIT\r\n")
    conn.receive_data(b"")
    assert conn.next_event() == Quit()
    assert conn.next_event() == ConnectionClosed()
    assert conn.data_to_send() == b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"


def test_eof_while_decision_pending() -> None:
    conn = in_transaction()
    start_data(conn)
    conn.receive_data(b"x\r\n.\r\n")
    conn.receive_data(b"")
    event = conn.next_event()
    assert event == MessageReceived("a@example.com", ("b@example.net",), b"x\r\n")
    assert conn.next_event() is PAUSED  # the complete message still gets its answer
    conn.reply(250, "Ok: queued as Q1", "2.0.0")
    assert conn.next_event() == ConnectionClosed()
    assert conn.data_to_send() == b"250 2.0.0 Ok: queued as Q1\r\n"


def test_eof_with_partial_command() -> None:
    conn = ready()
    assert pump(conn, b"NOOP") == []
    assert pump(conn, b"") == [ConnectionClosed()]
    assert conn.data_to_send() == b""


# -- command line limits, error limit, timeout, shutdown ------------------------------------------


def test_long_command_line() -> None:
    conn = ready()
    line = b"NOOP " + b"x" * 505 + b"\r\n"  # 512 octets: allowed
    assert len(line) == 512
    pump(conn, line)
    assert conn.data_to_send() == b"250 2.0.0 Ok\r\n"
    long_line = b"NOOP " + b"x" * 506 + b"\r\n"
    pump(conn, long_line + b"NOOP\r\n")
    assert conn.data_to_send() == b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"


def test_long_command_line_in_pieces_is_bounded() -> None:
    conn = ready()
    for _ in range(10):
        assert pump(conn, b"x" * 300) == []
        assert len(conn._in) < 512
    assert conn.data_to_send() == b""
    pump(conn, b"yyy\r\nNOOP\r\n")
    assert conn.data_to_send() == b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"


def test_hard_error_limit() -> None:
    conn = ready(hard_error_limit=3)
    events = pump(conn, b"FOO\r\nNOOP\r\nEXPN x\r\nDATA\r\nNOOP\r\n")
    assert events == [ConnectionClosed()]
    assert conn.data_to_send() == (
        b"500 5.5.2 Error: command not recognized\r\n"
        b"250 2.0.0 Ok\r\n"
        b"502 5.5.1 Error: command not implemented\r\n"
        b"503 5.5.1 Error: need RCPT command\r\n"
        b"421 4.7.0 mx.example.org Error: too many errors\r\n"
    )
    assert conn.closed


def test_driver_rejections_do_not_count_as_errors() -> None:
    conn = ready(hard_error_limit=2)
    for _ in range(5):
        pump(conn, b"MAIL FROM:<a@b.c>\r\n", lambda e: (550, "No", "5.7.1"))
    assert not conn.closed


def test_timeout() -> None:
    conn = ready()
    conn.receive_data(b"MAIL FROM:<a@b.c>\r\n")
    assert isinstance(conn.next_event(), MailFrom)
    conn.timeout()
    assert conn.closed
    assert conn.data_to_send() == b"421 4.4.2 mx.example.org Error: timeout exceeded\r\n"
    conn.reply(250, "Ok", "2.1.0")  # a late answer after the close is ignored
    assert conn.data_to_send() == b""
    assert conn.next_event() == ConnectionClosed()


def test_shutdown() -> None:
    conn = in_transaction()
    conn.shutdown()
    conn.shutdown()  # idempotent
    assert conn.data_to_send() == b"421 4.3.2 mx.example.org Service shutting down\r\n"
    assert conn.closed
    conn.receive_data(b"NOOP\r\n")
    assert conn.next_event() == ConnectionClosed()
    assert conn.data_to_send() == b""


# -- DSN (RFC 3461) and ETRN (RFC 1985) --------------------------------------------------------


def ready_with(**limits: int | bool) -> tuple[ServerConnection, bytes]:
    """A connection after EHLO with the given limits; returns it and the EHLO reply."""
    conn = ServerConnection(ServerLimits(hostname=HOST, **limits))  # type: ignore[arg-type]
    conn.greeting()
    conn.data_to_send()
    assert pump(conn, b"EHLO client.example\r\n") == [Hello("EHLO", "client.example")]
    return conn, conn.data_to_send()


@pytest.mark.parametrize(
    ("dsn", "etrn", "extra"),
    [
        (True, False, b"250-DSN\r\n"),
        (False, True, b"250-ETRN\r\n"),
        (False, False, b""),
    ],
)
def test_ehlo_advertises_dsn_and_etrn_when_on(dsn: bool, etrn: bool, extra: bytes) -> None:
    _, reply = ready_with(dsn=dsn, etrn=etrn)
    assert reply == (
        b"250-mx.example.org\r\n"
        b"250-SIZE 10485760\r\n"
        b"250-8BITMIME\r\n"
        b"250-PIPELINING\r\n" + extra + b"250-ENHANCEDSTATUSCODES\r\n"
        b"250 HELP\r\n"
    )


def test_help_without_etrn() -> None:
    conn, _ = ready_with(etrn=False)
    pump(conn, b"HELP\r\n")
    assert conn.data_to_send() == (
        b"214-2.0.0 Commands supported:\r\n"
        b"214-2.0.0 HELO EHLO MAIL RCPT DATA\r\n"
        b"214-2.0.0 RSET VRFY NOOP QUIT HELP\r\n"
        b"214 2.0.0 End of HELP info\r\n"
    )


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (b"MAIL FROM:<a@b.c> RET=FULL", MailFrom("a@b.c", {"RET": "FULL"}, ret="FULL")),
        (b"MAIL FROM:<a@b.c> ret=hdrs", MailFrom("a@b.c", {"RET": "hdrs"}, ret="HDRS")),
        (b"MAIL FROM:<> ENVID=Q1", MailFrom("", {"ENVID": "Q1"}, envid="Q1")),
        (
            b"MAIL FROM:<a@b.c> SIZE=5 ENVID=a+2Bb+3Dc+20d BODY=8BITMIME RET=Hdrs",
            MailFrom(
                "a@b.c",
                {"SIZE": "5", "ENVID": "a+2Bb+3Dc+20d", "BODY": "8BITMIME", "RET": "Hdrs"},
                ret="HDRS",
                envid="a+b=c d",
            ),
        ),
        (b"MAIL FROM:<a@b.c> ENVID=" + b"x" * 100, MailFrom("a@b.c", {"ENVID": "x" * 100},
                                                            envid="x" * 100)),
        (b"MAIL FROM:<a@b.c> ENVID=" + b"+41" * 100, MailFrom("a@b.c", {"ENVID": "+41" * 100},
                                                              envid="A" * 100)),
    ],
)
def test_mail_dsn_parameters(line: bytes, event: MailFrom) -> None:
    conn = ready()
    assert pump(conn, line + b"\r\n") == [event]
    assert conn.data_to_send() == b"250 2.1.0 Ok\r\n"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM:<a@b.c> RET=BOTH", b"501 5.5.4 Bad RET parameter syntax"),
        (b"MAIL FROM:<a@b.c> RET", b"501 5.5.4 Bad RET parameter syntax"),
        (b"MAIL FROM:<a@b.c> RET=FULL ret=HDRS", b"501 5.5.4 Bad RET parameter syntax"),
        (b"MAIL FROM:<a@b.c> ENVID", b"501 5.5.4 Bad ENVID parameter syntax"),
        (b"MAIL FROM:<a@b.c> ENVID=a+2b", b"501 5.5.4 Bad ENVID parameter syntax"),
        (b"MAIL FROM:<a@b.c> ENVID=a+2", b"501 5.5.4 Bad ENVID parameter syntax"),
        (b"MAIL FROM:<a@b.c> ENVID=a+", b"501 5.5.4 Bad ENVID parameter syntax"),
        (b"MAIL FROM:<a@b.c> ENVID=a+0A", b"501 5.5.4 Bad ENVID parameter syntax"),
        (b"MAIL FROM:<a@b.c> ENVID=a+C3+A9", b"501 5.5.4 Bad ENVID parameter syntax"),
        (b"MAIL FROM:<a@b.c> ENVID=" + b"x" * 101, b"501 5.5.4 Bad ENVID parameter syntax"),
        (b"MAIL FROM:<a@b.c> ENVID=a ENVID=a", b"501 5.5.4 Bad ENVID parameter syntax"),
        (b"MAIL FROM:<a@b.c> SIZE=1 size=2", b"501 5.5.4 Bad SIZE parameter syntax"),
        (b"MAIL FROM:<a@b.c> BODY=7BIT BODY=7BIT", b"501 5.5.4 Bad BODY parameter syntax"),
        (b"MAIL FROM:<a@b.c> NOTIFY=NEVER", b"555 5.5.4 Unsupported option: NOTIFY=NEVER"),
        (b"MAIL FROM:<a@b.c> ENVID=", b"555 5.5.4 Unsupported option: ENVID="),
    ],
)
def test_mail_dsn_parameter_errors(line: bytes, reply: bytes) -> None:
    conn = ready()
    assert pump(conn, line + b"\r\n") == []
    assert conn.data_to_send() == reply + b"\r\n"
    assert conn.state == "ready"


@pytest.mark.parametrize(
    "line",
    [b"MAIL FROM:<a@b.c> RET=FULL", b"MAIL FROM:<a@b.c> SIZE=1 ENVID=x"],
)
def test_mail_dsn_parameters_refused_when_dsn_off(line: bytes) -> None:
    conn, _ = ready_with(dsn=False)
    assert pump(conn, line + b"\r\n") == []
    token = line.split()[-1]
    assert conn.data_to_send() == b"555 5.5.4 Unsupported option: " + token + b"\r\n"


@pytest.mark.parametrize(
    ("params", "notify", "orcpt", "given"),
    [
        (b"NOTIFY=NEVER", ("NEVER",), None, {"NOTIFY": "NEVER"}),
        (b"notify=never", ("NEVER",), None, {"NOTIFY": "never"}),
        (b"NOTIFY=success,Delay", ("SUCCESS", "DELAY"), None, {"NOTIFY": "success,Delay"}),
        (
            b"NOTIFY=FAILURE,DELAY,SUCCESS",
            ("FAILURE", "DELAY", "SUCCESS"),
            None,
            {"NOTIFY": "FAILURE,DELAY,SUCCESS"},
        ),
        (b"ORCPT=rfc822;bob@x.test", None, "rfc822;bob@x.test", {"ORCPT": "rfc822;bob@x.test"}),
        (
            b"ORCPT=RFC822;a+2Bb+3Dc@x.test NOTIFY=FAILURE",
            ("FAILURE",),
            "RFC822;a+2Bb+3Dc@x.test".replace("+2B", "+").replace("+3D", "="),
            {"ORCPT": "RFC822;a+2Bb+3Dc@x.test", "NOTIFY": "FAILURE"},
        ),
        (b"ORCPT=x-local;", None, "x-local;", {"ORCPT": "x-local;"}),
    ],
)
def test_rcpt_dsn_parameters(
    params: bytes, notify: tuple[str, ...] | None, orcpt: str | None, given: dict[str, str]
) -> None:
    conn = ready()
    pump(conn, b"MAIL FROM:<a@b.c>\r\n")
    conn.data_to_send()
    event = RcptTo("d@e.f", dict(given), notify=notify, orcpt=orcpt)
    assert pump(conn, b"RCPT TO:<d@e.f> " + params + b"\r\n") == [event]
    assert conn.data_to_send() == b"250 2.1.5 Ok\r\n"


@pytest.mark.parametrize(
    ("params", "reply"),
    [
        (b"NOTIFY=NEVER,SUCCESS", b"501 5.5.4 Bad NOTIFY parameter syntax"),
        (b"NOTIFY=SUCCESS,NEVER", b"501 5.5.4 Bad NOTIFY parameter syntax"),
        (b"NOTIFY=SUCCESS,success", b"501 5.5.4 Bad NOTIFY parameter syntax"),
        (b"NOTIFY=SUCCESS,,FAILURE", b"501 5.5.4 Bad NOTIFY parameter syntax"),
        (b"NOTIFY=SUCCESS,", b"501 5.5.4 Bad NOTIFY parameter syntax"),
        (b"NOTIFY=SOMETIMES", b"501 5.5.4 Bad NOTIFY parameter syntax"),
        (b"NOTIFY", b"501 5.5.4 Bad NOTIFY parameter syntax"),
        (b"NOTIFY=NEVER NOTIFY=NEVER", b"501 5.5.4 Bad NOTIFY parameter syntax"),
        (b"ORCPT=bob@x.test", b"501 5.5.4 Bad ORCPT parameter syntax"),
        (b"ORCPT=;bob@x.test", b"501 5.5.4 Bad ORCPT parameter syntax"),
        (b"ORCPT=rfc(822);bob@x.test", b"501 5.5.4 Bad ORCPT parameter syntax"),
        (b"ORCPT=rfc822;b+zzob@x.test", b"501 5.5.4 Bad ORCPT parameter syntax"),
        (b"ORCPT=rfc822;a ORCPT=rfc822;a", b"501 5.5.4 Bad ORCPT parameter syntax"),
        (b"ORCPT", b"501 5.5.4 Bad ORCPT parameter syntax"),
        (b"NOTIFY=NEVER FOO", b"555 5.5.4 Unsupported option: FOO"),
        (b"RET=FULL", b"555 5.5.4 Unsupported option: RET=FULL"),
    ],
)
def test_rcpt_dsn_parameter_errors(params: bytes, reply: bytes) -> None:
    conn = ready()
    pump(conn, b"MAIL FROM:<a@b.c>\r\n")
    conn.data_to_send()
    assert pump(conn, b"RCPT TO:<d@e.f> " + params + b"\r\n") == []
    assert conn.data_to_send() == reply + b"\r\n"
    assert conn.state == "mail"


def test_orcpt_length_limit() -> None:
    conn, _ = ready_with(max_command_line=2048)
    pump(conn, b"MAIL FROM:<a@b.c>\r\n")
    conn.data_to_send()
    text = "b" * 490 + "@x.test"  # 497 characters decoded
    ok = f"RCPT TO:<d@e.f> ORCPT=rfc822;{text.replace('b', '+62', 3)}\r\n".encode()
    assert pump(conn, ok) == [RcptTo("d@e.f", {"ORCPT": ok[22:-2].decode()},
                                     orcpt=f"rfc822;{text}")]
    assert conn.data_to_send() == b"250 2.1.5 Ok\r\n"
    assert pump(conn, f"RCPT TO:<d@e.f> ORCPT=rfc822;{'b' * 494}@x.test\r\n".encode()) == []
    assert conn.data_to_send() == b"501 5.5.4 Bad ORCPT parameter syntax\r\n"


def test_rcpt_dsn_parameters_refused_when_dsn_off() -> None:
    conn, _ = ready_with(dsn=False)
    pump(conn, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f> NOTIFY=NEVER\r\n"
               b"RCPT TO:<d@e.f> ORCPT=rfc822;d@e.f\r\n")
    assert conn.data_to_send() == (
        b"250 2.1.0 Ok\r\n"
        b"555 5.5.4 Unsupported option: NOTIFY=NEVER\r\n"
        b"555 5.5.4 Unsupported option: ORCPT=rfc822;d@e.f\r\n"
    )


def test_pipelined_transaction_with_dsn_parameters() -> None:
    conn = new()

    def answer(event: object) -> Answer:
        if isinstance(event, RcptTo) and event.address == "refused@example.net":
            return 550, "No such user", "5.1.1"
        return default_answer(event)

    chunk = (
        b"EHLO client.example\r\n"
        b"MAIL FROM:<alice@example.com> SIZE=9 RET=HDRS ENVID=QQ+2B1\r\n"
        b"RCPT TO:<bob@example.net> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Bob+40example.net\r\n"
        b"RCPT TO:<refused@example.net> NOTIFY=NEVER\r\n"
        b"RCPT TO:<carol@example.net>\r\n"
        b"DATA\r\n"
    )
    events = pump(conn, chunk, answer)
    events += pump(conn, b"..hello\r\n.\r\n", answer)
    assert events == [
        Hello("EHLO", "client.example"),
        MailFrom(
            "alice@example.com",
            {"SIZE": "9", "RET": "HDRS", "ENVID": "QQ+2B1"},
            ret="HDRS",
            envid="QQ+1",
        ),
        RcptTo(
            "bob@example.net",
            {"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;Bob+40example.net"},
            notify=("SUCCESS", "DELAY"),
            orcpt="rfc822;Bob@example.net",
        ),
        RcptTo("refused@example.net", {"NOTIFY": "NEVER"}, notify=("NEVER",)),
        RcptTo("carol@example.net", {}),
        MessageReceived(
            "alice@example.com",
            ("bob@example.net", "carol@example.net"),
            b".hello\r\n",
            ret="HDRS",
            envid="QQ+1",
            notify=(("SUCCESS", "DELAY"), None),
            orcpt=("rfc822;Bob@example.net", None),
        ),
    ]
    assert conn.data_to_send() == EHLO_REPLY + (
        b"250 2.1.0 Ok\r\n"
        b"250 2.1.5 Ok\r\n"
        b"550 5.1.1 No such user\r\n"
        b"250 2.1.5 Ok\r\n"
        b"354 End data with <CR><LF>.<CR><LF>\r\n"
        b"250 2.0.0 Ok: queued as Q1\r\n"
    )


def test_dsn_details_do_not_outlive_their_transaction() -> None:
    conn = ready()
    pump(conn, b"MAIL FROM:<a@b.c> RET=FULL ENVID=e1\r\nRCPT TO:<d@e.f> NOTIFY=NEVER\r\n"
               b"RSET\r\n")
    # a refused MAIL does not leave its DSN details behind either
    pump(conn, b"MAIL FROM:<x@y.z> RET=HDRS\r\n", lambda e: (550, "No", "5.7.1"))
    pump(conn, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
    events = pump(conn, b"x\r\n.\r\n")
    assert events == [MessageReceived("a@b.c", ("d@e.f",), b"x\r\n")]
    assert conn.data_to_send() == (
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n550 5.7.1 No\r\n"
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        b"250 2.0.0 Ok: queued as Q1\r\n"
    )


@pytest.mark.parametrize(
    ("line", "node"),
    [
        (b"ETRN example.test", "example.test"),
        (b"etrn @example.test", "@example.test"),
        (b"ETRN #queue-1", "#queue-1"),
        (b"ETRN   mx1.example.test  ", "mx1.example.test"),
        (b"ETRN @localhost", "@localhost"),
    ],
)
def test_etrn_decision(line: bytes, node: str) -> None:
    conn = ready()
    conn.receive_data(line + b"\r\nNOOP\r\n")
    assert conn.next_event() == Etrn(node)
    assert conn.next_event() is PAUSED
    assert conn.data_to_send() == b""  # the NOOP waits for the ETRN answer
    conn.reply(250, "Queuing started", "2.0.0")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"250 2.0.0 Queuing started\r\n250 2.0.0 Ok\r\n"
    assert conn.state == "ready"


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "wire"),
    [
        (253, "2.0.0", "OK, 3 pending messages for node x.test started",
         b"253 2.0.0 OK, 3 pending messages for node x.test started\r\n"),
        (251, None, "OK, no messages waiting for node x.test",
         b"251 OK, no messages waiting for node x.test\r\n"),
        (458, "4.3.0", "Unable to queue messages for node x.test",
         b"458 4.3.0 Unable to queue messages for node x.test\r\n"),
        (459, "4.7.1", "Node x.test not allowed: no relay",
         b"459 4.7.1 Node x.test not allowed: no relay\r\n"),
    ],
)
def test_etrn_answers_keep_state(code: int, enhanced: str | None, text: str, wire: bytes) -> None:
    conn = ready()
    assert len(pump(conn, b"ETRN x.test\r\n", lambda e: (code, text, enhanced))) == 1
    assert conn.data_to_send() == wire
    assert conn.state == "ready"
    pump(conn, b"MAIL FROM:<a@b.c>\r\n")
    assert conn.data_to_send() == b"250 2.1.0 Ok\r\n"


def etrn_answer(event: object) -> Answer:
    if isinstance(event, Etrn):
        return 250, "Queuing started", "2.0.0"
    return default_answer(event)


@pytest.mark.parametrize(
    "line",
    [b"ETRN", b"ETRN   ", b"ETRN bad..domain", b"ETRN a b", b"ETRN #", b"ETRN @", b"ETRN -x.test",
     b"ETRN @@x.test", b"ETRN [192.0.2.1]", b"ETRN x.test."],
)
def test_etrn_syntax_errors(line: bytes) -> None:
    conn = ready()
    assert pump(conn, line + b"\r\n", etrn_answer) == []
    assert conn.data_to_send() == b"501 5.5.4 Syntax: ETRN [@]domain | #queue\r\n"


def test_etrn_sequencing() -> None:
    conn = new()
    pump(conn, b"ETRN x.test\r\nHELO c\r\nMAIL FROM:<a@b.c>\r\nETRN x.test\r\n"
               b"RCPT TO:<d@e.f>\r\nETRN x.test\r\nRSET\r\nETRN x.test\r\n", etrn_answer)
    assert conn.data_to_send() == (
        b"503 5.5.1 Error: send HELO/EHLO first\r\n"
        b"250 mx.example.org\r\n"
        b"250 2.1.0 Ok\r\n"
        b"503 5.5.1 Error: MAIL transaction in progress\r\n"
        b"250 2.1.5 Ok\r\n"
        b"503 5.5.1 Error: MAIL transaction in progress\r\n"
        b"250 2.0.0 Ok\r\n"
        b"250 2.0.0 Queuing started\r\n"
    )


def test_etrn_off_is_not_implemented_in_every_state() -> None:
    conn = ServerConnection(ServerLimits(hostname=HOST, etrn=False))
    conn.greeting()
    conn.data_to_send()
    events = pump(conn, b"ETRN x.test\r\nEHLO c\r\nETRN x.test\r\nETRN\r\n"
                        b"MAIL FROM:<a@b.c>\r\nETRN x.test\r\n")
    assert events == [Hello("EHLO", "c"), MailFrom("a@b.c", {})]
    out = conn.data_to_send()
    not_impl = b"502 5.5.1 Error: command not implemented\r\n"
    assert out.startswith(not_impl + b"250-mx.example.org\r\n")
    assert out.endswith(b"250 HELP\r\n" + not_impl * 2 + b"250 2.1.0 Ok\r\n" + not_impl)
    assert b"ETRN" not in out


# -- hostile clients: grammar limits (RFC 5321 4.5.3.1) ---------------------------------------


def mailbox(local: int, total: int) -> bytes:
    """A mailbox of ``total`` octets whose local part has ``local``."""
    return b"l" * local + b"@" + b"d" * (total - local - 5) + b".org"


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        (mailbox(64, 80), True),
        (mailbox(65, 80), False),
        (b'"' + b"x y" * 20 + b'xx"@b.c', True),  # 64 octets with its quotes
        (b'"' + b"x y" * 20 + b'xxx"@b.c', False),
        (mailbox(64, 254), True),  # "<" + 254 + ">": the 256 octets of a path
        (mailbox(64, 255), False),
        (b"@r1.org:" + mailbox(64, 246), True),  # the source route counts as sent
        (b"@r1.org:" + mailbox(64, 247), False),
    ],
)
def test_path_length_limits(path: bytes, ok: bool) -> None:
    conn = ready()
    events = pump(conn, b"MAIL FROM:<" + path + b">\r\n")
    sender = path.decode().rpartition(":")[2] if path.startswith(b"@") else path.decode()
    assert events == ([MailFrom(sender, {})] if ok else [])
    assert conn.data_to_send() == (
        b"250 2.1.0 Ok\r\n" if ok else b"501 5.1.7 Bad sender address syntax\r\n"
    )
    events = pump(conn, b"MAIL FROM:<>\r\n" if ok else b"MAIL FROM:<a@b.c>\r\n")
    conn.data_to_send()
    events = pump(conn, b"RCPT TO:<" + path + b">\r\n")
    assert events == ([RcptTo(sender, {})] if ok else [])
    assert conn.data_to_send() == (
        b"250 2.1.5 Ok\r\n" if ok else b"501 5.1.3 Bad recipient address syntax\r\n"
    )


def test_over_long_paths_count_as_errors() -> None:
    conn = ready(hard_error_limit=2)
    events = pump(conn, b"MAIL FROM:<" + mailbox(65, 70) + b">\r\n"
                        b"MAIL FROM:<" + mailbox(64, 255) + b">\r\nNOOP\r\n")
    assert events == [ConnectionClosed()]
    assert conn.data_to_send() == (
        b"501 5.1.7 Bad sender address syntax\r\n" * 2
        + b"421 4.7.0 mx.example.org Error: too many errors\r\n"
    )


# -- hostile clients: HELO/EHLO argument and control characters ---------------------------------


@pytest.mark.parametrize(
    "arg",
    [b"client.example", b"a-b.c9", b"LOCALHOST", b"[192.0.2.1]", b"[IPv6:2001:db8::1]",
     b"[ipv6:::1]", b"d" * 251 + b".org"],
)
def test_hello_accepts_domain_or_address_literal(arg: bytes) -> None:
    conn = new()
    assert pump(conn, b"EHLO  " + arg + b" \r\n") == [Hello("EHLO", arg.decode())]
    assert conn.data_to_send().startswith(b"250-mx.example.org\r\n")
    assert conn.helo == arg.decode()


@pytest.mark.parametrize(
    "arg",
    [
        b"client.example extra",  # one token only
        b"a\tb",
        b"a\x00b",
        b"host\x01",
        b"x\x1b[2J",
        b"x\x7f",
        b"x\r",  # a CR before the CRLF
        b"caf\xe9.example",  # 8-bit
        b"host.",
        b"-host",
        b"my_pc",
        b"a..b",
        b"[300.0.0.1]",
        b"[192.0.2.1",
        b"192.0.2.1]",
        b"[IPv6:fe80::1%eth0]",
        b"[IPv6:::1\x00]",
        b"[]",
        b"d" * 252 + b".org",  # 256 octets
    ],
)
def test_hello_refuses_anything_else_and_session_goes_on(arg: bytes) -> None:
    conn = new()
    assert pump(conn, b"EHLO " + arg + b"\r\nHELO " + arg + b"\r\n") == []
    assert conn.data_to_send() == (
        b"501 5.5.4 Syntax: EHLO hostname\r\n501 5.5.4 Syntax: HELO hostname\r\n"
    )
    assert conn.helo is None
    assert conn.state == "start"
    assert pump(conn, b"HELO ok.example\r\n") == [Hello("HELO", "ok.example")]
    assert conn.data_to_send() == b"250 mx.example.org\r\n"


def test_bad_hello_mid_transaction_changes_nothing() -> None:
    conn = in_transaction()
    assert pump(conn, b"HELO bad name\r\n") == []
    assert conn.data_to_send() == b"501 5.5.4 Syntax: HELO hostname\r\n"
    assert (conn.state, conn.helo, conn.esmtp) == ("rcpt", "client.example", True)


@pytest.mark.parametrize("line", [b"VRFY a\x01b", b"VRFY a\tb", b"VRFY bob\x7f", b"VRFY \x00",
                                  b"VRFY bob\r", b"VRFY x\x1b[0m"])
def test_vrfy_refuses_control_characters(line: bytes) -> None:
    conn = ready()
    assert pump(conn, line + b"\r\n") == []
    assert conn.data_to_send() == b"501 5.5.4 Syntax: VRFY address\r\n"


def test_vrfy_keeps_eight_bit_text() -> None:
    conn = ready()
    assert pump(conn, b"VRFY Ren\xe9\r\n") == [Verify("Ren\xe9")]


@pytest.mark.parametrize("line", [b"ETRN x\x01.test", b"ETRN #q\x7f", b"ETRN @x.test\x00",
                                  b"ETRN x.test\r"])
def test_etrn_refuses_control_characters(line: bytes) -> None:
    conn = ready()
    assert pump(conn, line + b"\r\n", etrn_answer) == []
    assert conn.data_to_send() == b"501 5.5.4 Syntax: ETRN [@]domain | #queue\r\n"


def strings_in(value: object) -> list[str]:
    """Every str inside an event (fields, dict keys and values, tuples)."""
    if isinstance(value, str):
        return [value]
    if dataclasses.is_dataclass(value):
        return [s for f in dataclasses.fields(value) for s in strings_in(getattr(value, f.name))]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in strings_in(k) + strings_in(v)]
    if isinstance(value, tuple | list):
        return [s for item in value for s in strings_in(item)]
    return []


VALID_LINES = [
    b"HELO client.example",
    b"EHLO [192.0.2.1]",
    b'MAIL FROM:<"a b"@b.c> ENVID=x+41 RET=FULL',
    b"MAIL FROM:<@r.org:u@[IPv6:2001:db8::1]> BODY=8BITMIME SIZE=10",
    b"RCPT TO:<d@e.f> NOTIFY=SUCCESS ORCPT=rfc822;d+40e.f",
    b"RCPT TO:<Postmaster>",
    b"VRFY Bob Smith",
    b"ETRN @x.test",
    b"ETRN #q1",
]


@pytest.mark.parametrize("control", [b"\x00", b"\t", b"\x0b", b"\x0c", b"\r", b"\x1b",
                                     b"\x1f", b"\x7f"])
def test_no_control_character_reaches_the_driver(control: bytes) -> None:
    """A control character anywhere in a valid command line: either the line is refused or
    nothing the driver gets (event fields, helo) carries a control character."""
    accepted = 0
    for template in VALID_LINES:
        for i in range(len(template) + 1):
            conn = ready()
            if template.startswith(b"RCPT"):
                pump(conn, b"MAIL FROM:<>\r\n")
            events = pump(conn, template[:i] + control + template[i:] + b"\r\n", etrn_answer)
            accepted += len(events)
            texts = [*strings_in(events), conn.helo or ""]
            assert not any(c < " " or c == "\x7f" for text in texts for c in text), events
    assert accepted > 0  # separators (a tab, a trailing CR...) still let some lines through


# -- hostile clients: non-SMTP commands -------------------------------------------------------

FORBIDDEN_REPLY = b"221 2.7.0 Error: I can break rules, too. Goodbye.\r\n"


@pytest.mark.parametrize(
    ("line", "logged"),
    [
        (b"GET / HTTP/1.1", "GET / HTTP/1.1"),
        (b"POST /cgi-bin/x HTTP/1.0", "POST /cgi-bin/x HTTP/1.0"),
        (b"CONNECT mx.example.org:25 HTTP/1.1", "CONNECT mx.example.org:25 HTTP/1.1"),
        (b"connect 192.0.2.1:25", "connect 192.0.2.1:25"),
        (b"PUT", "PUT"),
        (b"HEAD / HTTP/1.0", "HEAD / HTTP/1.0"),
        (b"OPTIONS * HTTP/1.1", "OPTIONS * HTTP/1.1"),
        (b"PROPFIND /dav HTTP/1.1", "PROPFIND /dav HTTP/1.1"),
        (b"PRI * HTTP/2.0", "PRI * HTTP/2.0"),
        (b"Host: mx.example.org", "Host: mx.example.org"),
        (b"User-Agent: curl/8.5.0", "User-Agent: curl/8.5.0"),
        (b"From: Alice <a@b.c>", "From: Alice <a@b.c>"),
        (b"Subject:hi", "Subject:hi"),
        (b"MAILFROM:<a@b.c>", "MAILFROM:<a@b.c>"),
        (b"\x16\x03\x01\x02\x00\x01\x00", "???????"),  # a TLS ClientHello
        (b"123 go", "123 go"),
        (b"<html>", "<html>"),
        (b"Host: x\r", "Host: x?"),
    ],
)
def test_forbidden_command_ends_the_session(line: bytes, logged: str) -> None:
    conn = ready()
    events = pump(conn, line + b"\r\nNOOP\r\nQUIT\r\n")
    assert events == [Forbidden(logged), ConnectionClosed()]
    assert conn.data_to_send() == FORBIDDEN_REPLY  # the pipelined NOOP and QUIT are dropped
    assert conn.closed
    assert conn.next_event() == ConnectionClosed()


def test_forbidden_in_any_command_state() -> None:
    conn = new()
    assert pump(conn, b"GET / HTTP/1.0\r\n") == [Forbidden("GET / HTTP/1.0"), ConnectionClosed()]
    assert conn.data_to_send() == FORBIDDEN_REPLY
    conn = in_transaction()
    assert pump(conn, b"Subject: hi\r\n") == [Forbidden("Subject: hi"), ConnectionClosed()]
    assert conn.data_to_send() == FORBIDDEN_REPLY


def test_forbidden_line_is_made_printable_and_cut() -> None:
    conn = ready(max_command_line=1000)
    line = b"GET /\x01\xe9" + b"a" * 300 + b" HTTP/1.1"
    [event, _] = pump(conn, line + b"\r\n")
    assert event == Forbidden("GET /??" + "a" * 93)


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (b"VRFY x HTTP/1.1", Verify("x HTTP/1.1")),  # SMTP commands are never forbidden
        (b"NOOP Host: x", None),
        (b"HELP GET", None),
    ],
)
def test_smtp_commands_are_not_forbidden(line: bytes, event: Verify | None) -> None:
    conn = ready()
    assert pump(conn, line + b"\r\n") == ([event] if event else [])
    assert not conn.closed


def test_header_inside_message_text_is_content() -> None:
    conn = in_transaction()
    events, out = send_message(conn, b"Host: x\r\nGET / HTTP/1.1\r\n.\r\n")
    assert events == [MessageReceived("a@example.com", ("b@example.net",),
                                      b"Host: x\r\nGET / HTTP/1.1\r\n")]
    assert out == b"250 2.0.0 Ok: queued as Q1\r\n"


# -- hostile clients: text before the 354 (RFC 2920 3.1) ----------------------------------------

IMPROPER = b"554 5.5.0 Error: improper command pipelining after DATA\r\n"


def test_text_before_354_ends_the_session() -> None:
    conn = in_transaction()
    events = pump(conn, b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    assert events == [ImproperPipelining("Subject: x????hi??.??QUIT??", 27), ConnectionClosed()]
    assert conn.data_to_send() == IMPROPER  # no 354, no 250, no 221
    assert conn.closed
    assert conn.next_event() == ConnectionClosed()


def test_whole_session_in_one_chunk_is_improper_pipelining() -> None:
    conn = new()
    events = pump(conn, b"EHLO c.example\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"
                        b"x\r\n.\r\n")
    assert events == [Hello("EHLO", "c.example"), MailFrom("a@b.c", {}), RcptTo("d@e.f", {}),
                      ImproperPipelining("x??.??", 6), ConnectionClosed()]
    assert conn.data_to_send() == (
        EHLO_REPLY.replace(b"client.example", b"c.example")
        + b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" + IMPROPER
    )


def test_one_octet_before_354_is_enough() -> None:
    conn = in_transaction()
    assert pump(conn, b"DATA\r\n\r") == [ImproperPipelining("?", 1), ConnectionClosed()]
    assert conn.data_to_send() == IMPROPER


def test_improper_pipelining_sample_is_cut() -> None:
    conn = in_transaction()
    [event, _] = pump(conn, b"DATA\r\n" + b"\xff" * 300)
    assert event == ImproperPipelining("?" * 100, 300)


def test_refused_data_with_text_behind_it_is_read_as_commands() -> None:
    conn = in_transaction()
    assert pump(conn, b"DATA now\r\nNOOP\r\n") == []
    assert conn.data_to_send() == b"501 5.5.4 Syntax: DATA\r\n250 2.0.0 Ok\r\n"
    conn = ready()
    assert pump(conn, b"DATA\r\nNOOP\r\n") == []
    assert conn.data_to_send() == b"503 5.5.1 Error: need RCPT command\r\n250 2.0.0 Ok\r\n"


def test_eof_after_data_is_not_improper_pipelining() -> None:
    conn = in_transaction()
    conn.receive_data(b"DATA\r\n")
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.data_to_send() == GO_AHEAD


# -- hostile clients: pregreet and refused clients ---------------------------------------------


def test_early_talker() -> None:
    conn = ServerConnection(ServerLimits(hostname=HOST))
    conn.receive_data(b"EHLO spambot\r\nMAIL FROM:<a@b.c>\r\n")
    assert conn.awaiting_first_command is False
    conn.early_talker()
    assert conn.data_to_send() == b"554 5.7.1 Error: client talked before the greeting\r\n"
    assert conn.closed
    assert conn.awaiting_first_command is False
    assert conn.next_event() == ConnectionClosed()
    assert conn.helo is None
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(
    ("first", "second"),
    [("greeting", "early_talker"), ("greeting", "greeting"), ("refuse", "greeting"),
     ("early_talker", "refuse")],
)
def test_session_opens_once(first: str, second: str) -> None:
    conn = ServerConnection(ServerLimits(hostname=HOST))
    call: dict[str, Callable[[], None]] = {
        "greeting": conn.greeting,
        "early_talker": conn.early_talker,
        "refuse": lambda: conn.refuse("No"),
    }
    call[first]()
    sent = conn.data_to_send()
    with pytest.raises(SMTPProtocolError):
        call[second]()
    assert conn.data_to_send() == b""
    assert sent != b""


def test_opening_after_shutdown_sends_nothing_more() -> None:
    conn = ServerConnection(ServerLimits(hostname=HOST))
    conn.shutdown()
    conn.greeting()
    assert conn.data_to_send() == b"421 4.3.2 mx.example.org Service shutting down\r\n"


def refused(**limits: int) -> ServerConnection:
    conn = ServerConnection(ServerLimits(hostname=HOST, **limits))
    conn.refuse("Client host rejected: Access denied")
    assert conn.data_to_send() == b"554 5.7.1 Client host rejected: Access denied\r\n"
    assert conn.refused
    return conn


NO_SERVICE = b"503 5.7.0 Error: no SMTP service here\r\n"


def test_refused_client_gets_503_until_quit() -> None:
    conn = refused()
    commands = (b"EHLO c.example\r\nHELO c.example\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n"
                b"DATA\r\nVRFY bob\r\nETRN x.test\r\nNOOP\r\nRSET\r\nHELP\r\nEXPN x\r\nFOO\r\n")
    assert pump(conn, commands) == []
    assert conn.data_to_send() == NO_SERVICE * 12
    assert (conn.helo, conn.state) == (None, "start")
    assert pump(conn, b"quit\r\n") == [Quit(), ConnectionClosed()]
    assert conn.data_to_send() == b"221 2.0.0 Bye\r\n"


def test_refused_client_hits_the_error_limit() -> None:
    conn = refused(hard_error_limit=3)
    assert pump(conn, b"EHLO c\r\n" + b"NOOP\r\n" * 5) == [ConnectionClosed()]
    assert conn.data_to_send() == (
        NO_SERVICE * 3 + b"421 4.7.0 mx.example.org Error: too many errors\r\n"
    )


def test_refused_client_forbidden_and_long_lines() -> None:
    conn = refused()
    assert pump(conn, b"NOOP " + b"x" * 600 + b"\r\n") == []
    assert conn.data_to_send() == b"500 5.5.2 Error: line too long\r\n"
    assert pump(conn, b"GET / HTTP/1.1\r\n") == [Forbidden("GET / HTTP/1.1"), ConnectionClosed()]
    assert conn.data_to_send() == FORBIDDEN_REPLY


def test_refusal_text_cannot_inject_lines() -> None:
    conn = ServerConnection(ServerLimits(hostname=HOST))
    with pytest.raises(ValueError):
        conn.refuse("No\r\n250 Ok")
    assert conn.data_to_send() == b""
    conn.greeting()  # the session was not opened by the failed call
    assert conn.data_to_send() == b"220 mx.example.org ESMTP mailpool\r\n"


# -- deadline support: the driver owns the clock -------------------------------------------------


@pytest.mark.parametrize(
    "reason", ["Error: session too long", "Error: data too slow", "Error: command too slow"]
)
def test_timeout_reason(reason: str) -> None:
    conn = in_transaction()
    conn.timeout(timeout_reason=reason)
    assert conn.data_to_send() == f"421 4.4.2 mx.example.org {reason}\r\n".encode()
    assert conn.closed
    conn.timeout(reason)  # once closed, nothing more
    assert conn.data_to_send() == b""


def test_timeout_reason_cannot_inject_lines() -> None:
    conn = ready()
    with pytest.raises(ValueError):
        conn.timeout("x\r\n250 Ok")
    assert not conn.closed
    assert conn.data_to_send() == b""


def test_awaiting_first_command() -> None:
    conn = ServerConnection(ServerLimits(hostname=HOST))
    assert conn.awaiting_first_command is False  # nothing was said yet
    conn.greeting()
    assert conn.awaiting_first_command is True
    assert pump(conn, b"EH") == []
    assert conn.awaiting_first_command is True
    pump(conn, b"LO c\r\n")
    assert conn.awaiting_first_command is False
    pump(conn, b"NOOP\r\n")
    assert conn.awaiting_first_command is False


def test_awaiting_first_command_ends_with_any_complete_line() -> None:
    conn = new()
    pump(conn, b"x" * 600)
    assert conn.awaiting_first_command is True  # still inside the (over-long) first line
    pump(conn, b"\r\n")
    assert conn.data_to_send() == b"500 5.5.2 Error: line too long\r\n"
    assert conn.awaiting_first_command is False
    conn = refused()
    assert conn.awaiting_first_command is True
    pump(conn, b"\r\n")
    assert conn.awaiting_first_command is False
    conn = new()
    conn.timeout()
    assert conn.awaiting_first_command is False


def test_in_command_line() -> None:
    conn = ready()
    assert conn.in_command_line is False
    pump(conn, b"NO")
    assert conn.in_command_line is True
    pump(conn, b"OP\r\n")
    assert conn.in_command_line is False
    pump(conn, b"NOOP\r\nRS")
    assert conn.in_command_line is True
    pump(conn, b"ET\r")
    assert conn.in_command_line is True
    pump(conn, b"\n")
    assert conn.in_command_line is False
    pump(conn, b"x" * 600)  # dropped as it comes: nothing buffered, still inside the line
    assert len(conn._in) == 0
    assert conn.in_command_line is True
    pump(conn, b"\n")
    assert conn.in_command_line is False
    assert conn.data_to_send() == (
        b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n500 5.5.2 Error: line too long\r\n"
    )
    pump(conn, b"QU")
    conn.shutdown()
    assert conn.in_command_line is False


def test_in_command_line_is_false_while_reading_text() -> None:
    conn = in_transaction()
    start_data(conn)
    pump(conn, b"partial line")
    assert conn.in_command_line is False
    pump(conn, b"\r\n.\r\nNO")
    assert conn.state == "ready"
    assert conn.in_command_line is True


def test_data_bytes_received() -> None:
    conn = in_transaction(max_text_line=10)
    assert conn.data_bytes_received == 0
    start_data(conn)
    assert conn.data_bytes_received == 0
    pump(conn, b"..ab\r\nc")  # before unstuffing; the partial line counts
    assert conn.data_bytes_received == 7
    pump(conn, b"\r")
    assert conn.data_bytes_received == 8
    pump(conn, b"\n" + b"x" * 25)  # an over-long line, dropped, still counts
    assert conn.data_bytes_received == 34
    assert len(conn._in) == 0
    pump(conn, b"\r\n.\r\nNOOP\r\n")
    assert conn.data_bytes_received == 39  # the final "." CRLF too, not what follows
    assert conn.data_to_send() == b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"
    pump(conn, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n")
    assert conn.data_to_send() == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
    assert conn.data_bytes_received == 39  # the last DATA's total until the next one
    start_data(conn)
    assert conn.data_bytes_received == 0
    events = pump(conn, b"hi\r\n.\r\n")
    assert events == [MessageReceived("a@b.c", ("d@e.f",), b"hi\r\n")]
    assert conn.data_bytes_received == 7


# -- STARTTLS (RFC 3207) -------------------------------------------------------------------------

EHLO_STARTTLS = EHLO_REPLY.replace(b"250-PIPELINING\r\n", b"250-PIPELINING\r\n250-STARTTLS\r\n")
EHLO_AUTH = EHLO_REPLY.replace(b"250-PIPELINING\r\n", b"250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n")
TLS_READY = b"220 2.0.0 Ready to start TLS\r\n"
SUBMISSION = {"starttls": True, "auth": True, "auth_required": True}


def opened(**limits: int | bool) -> ServerConnection:
    conn = ServerConnection(ServerLimits(hostname=HOST, **limits))  # type: ignore[arg-type]
    conn.greeting()
    assert conn.data_to_send() == b"220 mx.example.org ESMTP mailpool\r\n"
    return conn


def starttls(conn: ServerConnection, lines: bytes = b"STARTTLS\r\n", discarded: int = 0) -> None:
    """STARTTLS (after whatever else ``lines`` holds), then a successful handshake."""
    events = pump(conn, lines)
    assert events[-1] == StartTls(discarded)
    assert conn.data_to_send().endswith(TLS_READY)
    assert conn.next_event() is PAUSED
    conn.tls_established("TLSv1.3 TLS_AES_256_GCM_SHA384 256")
    assert conn.tls_active


def under_tls(**limits: int | bool) -> ServerConnection:
    """EHLO, STARTTLS, the handshake, EHLO again: the EHLO reply under TLS checked."""
    conn = opened(**{"starttls": True, **limits})
    starttls(conn, b"EHLO client.example\r\nSTARTTLS\r\n")
    assert pump(conn, b"EHLO client.example\r\n") == [Hello("EHLO", "client.example")]
    assert conn.data_to_send() == (EHLO_AUTH if limits.get("auth") else EHLO_REPLY)
    return conn


def test_ehlo_lists_starttls_until_tls_is_active() -> None:
    conn = opened(starttls=True)
    assert pump(conn, b"EHLO client.example\r\n") == [Hello("EHLO", "client.example")]
    assert conn.data_to_send() == EHLO_STARTTLS
    assert not conn.tls_active and conn.cipher_info is None
    starttls(conn)
    assert conn.cipher_info == "TLSv1.3 TLS_AES_256_GCM_SHA384 256"
    pump(conn, b"EHLO client.example\r\n")
    assert conn.data_to_send() == EHLO_REPLY  # STARTTLS no longer offered


def test_starttls_starts_the_session_over() -> None:
    conn = opened(starttls=True)
    pump(conn, b"EHLO client.example\r\n")
    conn.data_to_send()
    assert pump(conn, b"STARTTLS\r\n") == [StartTls(0)]
    assert conn.data_to_send() == TLS_READY
    assert conn.next_event() is PAUSED
    assert conn.next_event() is PAUSED
    conn.tls_established("TLSv1.2")
    assert (conn.state, conn.helo, conn.esmtp) == ("start", None, False)
    assert pump(conn, b"MAIL FROM:<a@b.c>\r\nSTARTTLS\r\n") == []
    assert conn.data_to_send() == (
        b"503 5.5.1 Error: send HELO/EHLO first\r\n503 5.5.1 Error: TLS already active\r\n"
    )


def test_input_pipelined_behind_starttls_is_discarded() -> None:
    # CVE-2011-0411: commands sent in plaintext with STARTTLS must never run under TLS.
    conn = opened(starttls=True)
    injected = b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n"
    events = pump(conn, b"EHLO client.example\r\nSTARTTLS\r\n" + injected)
    assert events == [Hello("EHLO", "client.example"), StartTls(len(injected))]
    assert conn.data_to_send() == EHLO_STARTTLS + TLS_READY
    conn.receive_data(b"DATA\r\n")  # still plaintext, before the handshake: dropped too
    assert conn.next_event() is PAUSED
    conn.tls_established("TLSv1.3")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b""  # the MAIL and RCPT are never answered
    assert conn.in_command_line is False
    pump(conn, b"EHLO client.example\r\nMAIL FROM:<x@y.z>\r\n")
    assert conn.data_to_send() == EHLO_REPLY + b"250 2.1.0 Ok\r\n"


def test_starttls_discards_a_partial_line_too() -> None:
    conn = opened(starttls=True)
    pump(conn, b"EHLO c.example\r\nSTARTTLS\r\nQUI")
    assert conn.next_event() is PAUSED
    conn.tls_established("TLSv1.3")
    assert pump(conn, b"T\r\n") == []  # "T" alone: the "QUI" did not survive
    assert conn.data_to_send().endswith(b"500 5.5.2 Error: command not recognized\r\n")


def test_second_starttls_after_tls() -> None:
    conn = under_tls()
    assert pump(conn, b"STARTTLS\r\n") == []
    assert conn.data_to_send() == b"503 5.5.1 Error: TLS already active\r\n"


@pytest.mark.parametrize(
    ("limits", "lines", "reply"),
    [
        ({}, b"EHLO c\r\nSTARTTLS\r\n", b"502 5.5.1 Error: command not implemented\r\n"),
        ({"starttls": True}, b"STARTTLS\r\n", b"503 5.5.1 Error: send EHLO first\r\n"),
        ({"starttls": True}, b"HELO c\r\nSTARTTLS\r\n", b"503 5.5.1 Error: send EHLO first\r\n"),
        ({"starttls": True}, b"EHLO c\r\nSTARTTLS now\r\n", b"501 5.5.4 Syntax: STARTTLS\r\n"),
        ({"starttls": True}, b"EHLO c\r\nMAIL FROM:<>\r\nSTARTTLS\r\n",
         b"503 5.5.1 Error: MAIL transaction in progress\r\n"),
        ({"tls_active": True}, b"EHLO c\r\nSTARTTLS\r\n",
         b"503 5.5.1 Error: TLS already active\r\n"),
    ],
)
def test_starttls_refused(limits: dict[str, bool], lines: bytes, reply: bytes) -> None:
    conn = opened(**limits)
    assert not any(isinstance(e, StartTls) for e in pump(conn, lines))
    assert conn.data_to_send().endswith(reply)
    assert not conn.closed


def test_tls_failed_closes_silently() -> None:
    conn = opened(starttls=True)
    pump(conn, b"EHLO c\r\nSTARTTLS\r\n")
    conn.data_to_send()
    conn.tls_failed()
    assert conn.closed
    assert conn.next_event() == ConnectionClosed()
    assert conn.data_to_send() == b""
    conn.tls_established("late")  # after the close: ignored like a late reply()
    assert not conn.tls_active


def test_starttls_answers_are_checked() -> None:
    conn = opened(starttls=True)
    with pytest.raises(SMTPProtocolError):
        conn.tls_established("x")
    with pytest.raises(SMTPProtocolError):
        conn.tls_failed()
    pump(conn, b"EHLO c\r\nSTARTTLS\r\n")
    with pytest.raises(SMTPProtocolError):
        conn.reply(250, "Ok")
    with pytest.raises(SMTPProtocolError):
        conn.auth_ok("alice")
    conn.tls_established("x")
    assert conn.next_event() is NEED_DATA


def test_implicit_tls_listener() -> None:
    conn = opened(tls_active=True, auth=True)
    assert conn.tls_active
    pump(conn, b"EHLO client.example\r\n")
    assert conn.data_to_send() == EHLO_AUTH


def test_help_lists_starttls_and_auth_when_offered() -> None:
    help_reply = (
        b"214-2.0.0 Commands supported:\r\n"
        b"214-2.0.0 HELO EHLO %sMAIL RCPT DATA\r\n"
        b"214-2.0.0 RSET VRFY ETRN NOOP QUIT HELP\r\n"
        b"214 2.0.0 End of HELP info\r\n"
    )
    conn = opened(starttls=True, auth=True)
    pump(conn, b"HELP\r\n")
    assert conn.data_to_send() == help_reply % b"STARTTLS "
    starttls(conn, b"EHLO c\r\nSTARTTLS\r\n")
    pump(conn, b"HELP\r\n")
    assert conn.data_to_send() == help_reply % b"AUTH "
    conn = opened(auth=True, auth_cleartext=True, starttls=True)
    pump(conn, b"HELP\r\n")
    assert conn.data_to_send() == help_reply % b"STARTTLS AUTH "


# -- AUTH (RFC 4954) ------------------------------------------------------------------------------


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


PLAIN_ALICE = b64(b"\0alice\0secret")
AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
AUTH_FAILED = b"535 5.7.8 Error: authentication failed\r\n"


def test_auth_not_offered_before_tls() -> None:
    conn = opened(**SUBMISSION)
    pump(conn, b"EHLO client.example\r\n")
    assert conn.data_to_send() == EHLO_STARTTLS  # no AUTH line
    assert pump(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\nAUTH LOGIN\r\n") == []
    assert conn.data_to_send() == (
        b"538 5.7.11 Encryption required for requested authentication mechanism\r\n" * 2
    )
    assert conn.authenticated_user is None


def test_auth_off_on_this_listener() -> None:
    conn = under_tls()
    assert pump(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n") == []
    assert conn.data_to_send() == b"502 5.5.1 Error: command not implemented\r\n"


def test_auth_cleartext_when_configured() -> None:
    conn = opened(auth=True, auth_cleartext=True)
    pump(conn, b"EHLO client.example\r\n")
    assert conn.data_to_send() == EHLO_AUTH
    assert pump(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n") == [
        Authenticate("PLAIN", "", "alice", "secret")
    ]


def test_auth_plain_with_initial_response() -> None:
    conn = under_tls(auth=True)
    events = pump(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
    assert events == [Authenticate("PLAIN", "", "alice", "secret")]
    assert conn.next_event() is PAUSED
    assert conn.data_to_send() == b""
    conn.auth_ok("alice")
    assert conn.data_to_send() == AUTH_OK
    assert conn.authenticated_user == "alice"
    assert pump(conn, b"MAIL FROM:<alice@example.org>\r\n") == [
        MailFrom("alice@example.org", {}, auth_user="alice")
    ]


def test_auth_plain_without_initial_response() -> None:
    conn = under_tls(auth=True)
    assert pump(conn, b"auth plain\r\n") == []
    assert conn.data_to_send() == b"334 \r\n"  # the space stays: "334" SP [base64]
    events = pump(conn, b64(b"alice\0alice\0secret") + b"\r\n")
    assert events == [Authenticate("PLAIN", "alice", "alice", "secret")]
    conn.auth_ok("Alice")
    assert conn.data_to_send() == AUTH_OK
    assert conn.authenticated_user == "Alice"  # the driver's name for the user


def test_auth_login_two_steps() -> None:
    conn = under_tls(auth=True)
    assert pump(conn, b"AUTH LOGIN\r\n") == []
    assert conn.data_to_send() == b"334 VXNlcm5hbWU6\r\n"
    assert pump(conn, b"YWxpY2U=\r\n") == []
    assert conn.data_to_send() == b"334 UGFzc3dvcmQ6\r\n"
    assert pump(conn, b"c2VjcmV0\r\n") == [Authenticate("LOGIN", "", "alice", "secret")]
    conn.auth_ok("alice")
    assert conn.data_to_send() == AUTH_OK


def test_auth_login_with_initial_user_name() -> None:
    conn = under_tls(auth=True)
    assert pump(conn, b"AUTH LOGIN YWxpY2U=\r\n") == []
    assert conn.data_to_send() == b"334 UGFzc3dvcmQ6\r\n"
    assert pump(conn, b"c2VjcmV0\r\n") == [Authenticate("LOGIN", "", "alice", "secret")]


@pytest.mark.parametrize(
    ("lines", "reply", "reason"),
    [
        (b"AUTH PLAIN\r\n*\r\n", b"501 5.7.0 Authentication aborted\r\n", "cancelled"),
        (b"AUTH LOGIN\r\nYWxpY2U=\r\n*\r\n", b"501 5.7.0 Authentication aborted\r\n",
         "cancelled"),
        (b"AUTH PLAIN\r\nnot base64!\r\n", b"501 5.5.2 Error: invalid base64\r\n",
         "bad-base64"),
        (b"AUTH PLAIN AGFsaWNl\r\n", b"501 5.5.2 Error: malformed authentication response\r\n",
         "malformed"),
        (b"AUTH PLAIN " + b64(b"root\0alice\0secret") + b"\r\n", AUTH_FAILED, "authzid"),
    ],
)
def test_auth_exchange_ended_by_the_core(lines: bytes, reply: bytes, reason: str) -> None:
    conn = under_tls(auth=True)
    events = pump(conn, lines + b"NOOP\r\n")
    mechanism = lines.split()[1].decode()
    assert events == [AuthAborted(mechanism, reason)]
    assert conn.data_to_send().endswith(reply + b"250 2.0.0 Ok\r\n")
    assert conn.authenticated_user is None
    assert conn._errors == 1


def test_auth_equals_sign_is_an_empty_initial_response() -> None:
    conn = under_tls(auth=True)
    assert pump(conn, b"AUTH LOGIN =\r\n") == [AuthAborted("LOGIN", "malformed")]
    assert conn.data_to_send() == b"501 5.5.2 Error: malformed authentication response\r\n"


def test_auth_exchange_lines_are_not_commands() -> None:
    conn = under_tls(auth=True)
    # "QUIT" is valid base64: as a response it is decoded, never run.
    assert pump(conn, b"AUTH PLAIN\r\nQUIT\r\n") == [AuthAborted("PLAIN", "malformed")]
    assert pump(conn, b"AUTH PLAIN\r\nGET / HTTP/1.1\r\n") == [AuthAborted("PLAIN", "bad-base64")]
    assert pump(conn, b"AUTH LOGIN\r\nTURN\r\n") == []  # the user name "MDM"
    assert conn.data_to_send() == (
        b"334 \r\n501 5.5.2 Error: malformed authentication response\r\n"
        b"334 \r\n501 5.5.2 Error: invalid base64\r\n"
        b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n"
    )
    assert not conn.closed


def test_auth_response_line_limit() -> None:
    conn = under_tls(auth=True)
    longest = b64(b"\0alice\0" + b"p" * 9206) + b"  "  # 12286 + CRLF = 12288: read
    assert pump(conn, b"AUTH PLAIN\r\n" + longest + b"\r\n") == [AuthAborted("PLAIN",
                                                                             "bad-base64")]
    assert conn.data_to_send() == b"334 \r\n501 5.5.2 Error: invalid base64\r\n"
    pump(conn, b"AUTH PLAIN\r\n")
    for _ in range(10):  # 12290 octets in pieces: bounded as it comes
        assert pump(conn, b"A" * 1229) == []
        assert len(conn._in) < 12288
        assert conn.in_command_line is True
    assert pump(conn, b"\r\nNOOP\r\n") == [AuthAborted("PLAIN", "too-long")]
    assert conn.data_to_send() == (
        b"334 \r\n500 5.5.6 Authentication Exchange line is too long\r\n250 2.0.0 Ok\r\n"
    )


def test_auth_command_line_keeps_the_command_limit() -> None:
    conn = under_tls(auth=True)
    assert pump(conn, b"AUTH PLAIN " + b"A" * 600 + b"\r\n") == []
    assert conn.data_to_send() == b"500 5.5.2 Error: line too long\r\n"


@pytest.mark.parametrize(
    ("lines", "reply"),
    [
        (b"AUTH\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
        (b"AUTH PLAIN a b\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
        (b"AUTH CRAM-MD5\r\n", b"504 5.5.4 Unrecognized authentication type\r\n"),
        (b"AUTH GSSAPI " + PLAIN_ALICE + b"\r\n",
         b"504 5.5.4 Unrecognized authentication type\r\n"),
        (b"MAIL FROM:<>\r\nAUTH PLAIN " + PLAIN_ALICE + b"\r\n",
         b"503 5.5.1 Error: MAIL transaction in progress\r\n"),
        (b"HELO c\r\nAUTH PLAIN " + PLAIN_ALICE + b"\r\n", b"503 5.5.1 Error: send EHLO first\r\n"),
    ],
)
def test_auth_refused(lines: bytes, reply: bytes) -> None:
    conn = under_tls(auth=True)
    assert not any(isinstance(e, Authenticate) for e in pump(conn, lines))
    assert conn.data_to_send().endswith(reply)


def test_auth_before_ehlo() -> None:
    conn = opened(tls_active=True, auth=True)
    assert pump(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n") == []
    assert conn.data_to_send() == b"503 5.5.1 Error: send EHLO first\r\n"


def test_second_auth() -> None:
    conn = under_tls(auth=True)
    pump(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
    conn.auth_ok("alice")
    assert pump(conn, b"AUTH LOGIN\r\n") == []
    assert conn.data_to_send() == AUTH_OK + b"503 5.5.1 Error: already authenticated\r\n"
    pump(conn, b"EHLO again\r\nRSET\r\n")
    assert conn.authenticated_user == "alice"  # EHLO and RSET keep the login


def test_auth_failed_then_success() -> None:
    conn = under_tls(auth=True)
    assert pump(conn, b"AUTH PLAIN " + b64(b"\0alice\0wrong") + b"\r\n") == [
        Authenticate("PLAIN", "", "alice", "wrong")
    ]
    conn.auth_failed()
    assert conn.data_to_send() == AUTH_FAILED
    assert conn.authenticated_user is None
    pump(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
    conn.auth_ok("alice")
    assert conn.data_to_send() == AUTH_OK


def test_hard_error_limit_counts_failed_logins() -> None:
    conn = under_tls(auth=True, hard_error_limit=3)
    for _ in range(2):
        pump(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        conn.auth_failed()
    assert pump(conn, b"FOO\r\n") == [ConnectionClosed()]
    assert conn.data_to_send() == (
        AUTH_FAILED * 2 + b"500 5.5.2 Error: command not recognized\r\n"
        b"421 4.7.0 mx.example.org Error: too many errors\r\n"
    )
    conn = under_tls(auth=True, hard_error_limit=2)
    pump(conn, b"AUTH PLAIN\r\n*\r\n")
    pump(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
    conn.auth_failed()
    assert conn.closed
    assert conn.data_to_send() == (
        b"334 \r\n501 5.7.0 Authentication aborted\r\n" + AUTH_FAILED
        + b"421 4.7.0 mx.example.org Error: too many errors\r\n"
    )


def test_temporary_authentication_failure() -> None:
    conn = under_tls(auth=True, hard_error_limit=1)
    pump(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\nNOOP\r\n")
    with pytest.raises(SMTPProtocolError):
        conn.reply(235, "Authentication successful", "2.7.0")  # that is auth_ok()'s
    conn.reply(454, "Temporary authentication failure", "4.7.0")
    assert pump(conn, b"") == [ConnectionClosed()]
    assert conn.data_to_send() == (
        b"454 4.7.0 Temporary authentication failure\r\n250 2.0.0 Ok\r\n"
    )  # the driver's answer is not counted: the limit of 1 was not reached
    assert conn.authenticated_user is None


def test_auth_answers_are_checked() -> None:
    conn = under_tls(auth=True)
    with pytest.raises(SMTPProtocolError):
        conn.auth_ok("alice")
    with pytest.raises(SMTPProtocolError):
        conn.auth_failed()
    pump(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
    with pytest.raises(SMTPProtocolError):
        conn.tls_established("x")
    for bad in ("", "a\r\nb", "a\x00"):
        with pytest.raises(ValueError):
            conn.auth_ok(bad)
    conn.auth_ok("alice")
    assert conn.data_to_send() == AUTH_OK


def test_pipelined_mail_waits_for_the_login() -> None:
    conn = under_tls(**SUBMISSION)
    conn.receive_data(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\nMAIL FROM:<alice@example.org>\r\n")
    assert conn.next_event() == Authenticate("PLAIN", "", "alice", "secret")
    assert conn.next_event() is PAUSED
    conn.auth_ok("alice")
    assert conn.next_event() == MailFrom("alice@example.org", {}, auth_user="alice")
    conn.reply(553, "Sender address rejected: not owned by user alice", "5.7.1")
    assert conn.data_to_send() == (
        AUTH_OK + b"553 5.7.1 Sender address rejected: not owned by user alice\r\n"
    )


def test_submission_requires_auth() -> None:
    conn = under_tls(**SUBMISSION)
    assert pump(conn, b"MAIL FROM:<a@b.c>\r\nVRFY bob\r\nETRN x.test\r\nRCPT TO:<d@e.f>\r\n") == []
    assert conn.data_to_send() == (
        b"530 5.7.0 Authentication required\r\n" * 3 + b"503 5.5.1 Error: need MAIL command\r\n"
    )
    pump(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
    conn.auth_ok("alice")
    conn.data_to_send()
    assert pump(conn, b"MAIL FROM:<a@b.c>\r\n") == [MailFrom("a@b.c", {}, auth_user="alice")]
    assert conn.data_to_send() == b"250 2.1.0 Ok\r\n"


def test_mail_without_login_has_no_auth_user() -> None:
    conn = under_tls(auth=True)
    assert pump(conn, b"MAIL FROM:<a@b.c>\r\n") == [MailFrom("a@b.c", {}, auth_user=None)]


def test_auth_required_needs_auth() -> None:
    with pytest.raises(ValueError):
        ServerLimits(hostname=HOST, auth_required=True)


@pytest.mark.parametrize(
    ("param", "reply"),
    [
        (b"AUTH=<>", b"250 2.1.0 Ok\r\n"),
        (b"AUTH=alice+40example.org", b"250 2.1.0 Ok\r\n"),
        (b"auth=<>", b"250 2.1.0 Ok\r\n"),
        (b"AUTH=", b"555 5.5.4 Unsupported option: AUTH=\r\n"),  # no esmtp-value at all
        (b"AUTH=a+4", b"501 5.5.4 Bad AUTH parameter syntax\r\n"),
    ],
)
def test_mail_auth_parameter(param: bytes, reply: bytes) -> None:
    conn = under_tls(auth=True)
    events = pump(conn, b"MAIL FROM:<a@b.c> " + param + b"\r\n")
    assert conn.data_to_send() == reply
    if reply.startswith(b"250"):
        key, value = param.decode().split("=")
        assert events == [MailFrom("a@b.c", {key.upper(): value})]


@pytest.mark.parametrize("limits", [{}, {"starttls": True, "auth": True}])
def test_mail_auth_parameter_refused_when_auth_is_not_offered(limits: dict[str, bool]) -> None:
    conn = opened(**limits)
    pump(conn, b"EHLO c\r\nMAIL FROM:<a@b.c> AUTH=<>\r\n")
    assert conn.data_to_send().endswith(b"555 5.5.4 Unsupported option: AUTH=<>\r\n")


def test_tls_forgets_a_cleartext_login() -> None:
    conn = opened(starttls=True, auth=True, auth_cleartext=True)
    pump(conn, b"EHLO c\r\nAUTH PLAIN " + PLAIN_ALICE + b"\r\n")
    conn.auth_ok("alice")
    conn.data_to_send()
    starttls(conn)
    assert conn.authenticated_user is None
    pump(conn, b"EHLO c\r\nMAIL FROM:<a@b.c>\r\n")
    assert conn.data_to_send() == EHLO_AUTH + b"250 2.1.0 Ok\r\n"


def test_password_is_hidden_and_may_hold_any_octet() -> None:
    conn = under_tls(auth=True)
    [event] = pump(conn, b"AUTH PLAIN " + b64(b"\0bob\0p\xff\tw") + b"\r\n")
    assert isinstance(event, Authenticate)
    assert event.password.encode("utf-8", "surrogateescape") == b"p\xff\tw"
    assert "p\udcff" not in repr(event) and "password" not in repr(event)


def test_in_command_line_during_an_exchange() -> None:
    conn = under_tls(auth=True)
    pump(conn, b"AUTH LOGIN\r\nYWxp")
    assert conn.in_command_line is True
    pump(conn, b"Y2U=\r\n")
    assert conn.in_command_line is False
    assert conn.state == "ready"


def test_eof_during_an_exchange() -> None:
    conn = under_tls(auth=True)
    pump(conn, b"AUTH LOGIN\r\n")
    assert pump(conn, b"") == [ConnectionClosed()]


@pytest.mark.parametrize(
    ("esmtp", "tls", "auth", "protocol"),
    [
        (False, False, False, "SMTP"),
        (True, False, False, "ESMTP"),
        (True, True, False, "ESMTPS"),
        (True, False, True, "ESMTPA"),
        (True, True, True, "ESMTPSA"),
    ],
)
def test_received_with(esmtp: bool, tls: bool, auth: bool, protocol: str) -> None:
    assert received_with(esmtp, tls, auth) == protocol


def test_close_with_ends_the_session_with_the_drivers_reply() -> None:
    conn = new()
    conn.close_with(421, "Error: too many failed authentications", "4.7.0")
    assert conn.data_to_send() == (
        b"421 4.7.0 mx.example.org Error: too many failed authentications\r\n")
    assert conn.closed and isinstance(conn.next_event(), ConnectionClosed)
