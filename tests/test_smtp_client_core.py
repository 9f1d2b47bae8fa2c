"""Byte-for-byte tests of the sans-IO SMTP client core (no sockets, no Trio)."""

from __future__ import annotations

import random

import pytest

from mailpool.protocol.smtp_client import (
    NEED_DATA,
    PAUSED,
    TLS_NOT_OFFERED,
    ClientConnection,
    Closed,
    EtrnDone,
    HandshakeFailed,
    Ready,
    RsetDone,
    SMTPClientError,
    StartTlsReady,
    Transaction,
    TransactionDone,
    dot_stuff,
    normalize_line_ends,
)
from mailpool.protocol.smtp_server import (
    ConnectionClosed,
    Etrn,
    MailFrom,
    MessageReceived,
    RcptTo,
    ServerConnection,
    ServerLimits,
    Verify,
)
from mailpool.protocol.smtp_syntax import Reply

GREETING = b"220 mx.example.org ESMTP\r\n"
EHLO_FULL = (
    b"250-mx.example.org\r\n"
    b"250-SIZE 1000\r\n"
    b"250-8BITMIME\r\n"
    b"250-PIPELINING\r\n"
    b"250-DSN\r\n"
    b"250-ETRN\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250 HELP\r\n"
)
EHLO_LOCKSTEP = b"250-mx.example.org\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
EHLO_PLAIN = b"250-mx.example.org\r\n250 PIPELINING\r\n"

OK_MAIL = b"250 2.1.0 Ok\r\n"
OK_RCPT = b"250 2.1.5 Ok\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED = b"250 2.0.0 Ok: queued as Q1\r\n"

R_MAIL = Reply(250, "2.1.0", ("Ok",))
R_RCPT = Reply(250, "2.1.5", ("Ok",))
R_QUEUED = Reply(250, "2.0.0", ("Ok: queued as Q1",))
R_421 = Reply(421, "4.3.2", ("mx.example.org Service shutting down",))
B_421 = b"421 4.3.2 mx.example.org Service shutting down\r\n"


def feed(conn: ClientConnection, data: bytes) -> list[object]:
    """Hand over data; return every event until NEED_DATA or PAUSED (or Closed, included)."""
    conn.receive_data(data)
    events: list[object] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is PAUSED:
            return events
        events.append(event)
        if isinstance(event, Closed):
            return events


def connect(ehlo: bytes = EHLO_FULL) -> ClientConnection:
    conn = ClientConnection("client.example")
    assert conn.stage == "greeting"
    assert conn.data_to_send() == b""
    assert feed(conn, GREETING) == []
    assert conn.data_to_send() == b"EHLO client.example\r\n"
    assert conn.stage == "ehlo"
    [ready] = feed(conn, ehlo)
    assert isinstance(ready, Ready) and ready.esmtp
    assert conn.stage == "idle"
    assert conn.data_to_send() == b""
    return conn


def tx(*recipients: str, content: bytes = b"Subject: t\r\n\r\nhi\r\n", **kw: object) -> Transaction:
    return Transaction("alice@example.org", recipients or ("bob@example.net",), content,
                       **kw)  # type: ignore[arg-type]


# -- handshake --------------------------------------------------------------------------------


def test_greeting_and_ehlo_with_extensions() -> None:
    conn = ClientConnection("client.example")
    assert feed(conn, b"220-mx.example.org ESMTP\r\n220 second line\r\n") == []
    assert conn.data_to_send() == b"EHLO client.example\r\n"
    events = feed(conn, EHLO_FULL)
    assert events == [
        Ready(
            Reply(220, None, ("mx.example.org ESMTP", "second line")),
            Reply(250, None, ("mx.example.org", "SIZE 1000", "8BITMIME", "PIPELINING", "DSN",
                              "ETRN", "ENHANCEDSTATUSCODES", "HELP")),
            esmtp=True,
        )
    ]
    assert conn.extensions == {
        "SIZE": "1000",
        "8BITMIME": "",
        "PIPELINING": "",
        "DSN": "",
        "ETRN": "",
        "ENHANCEDSTATUSCODES": "",
        "HELP": "",
    }
    assert conn.stage == "idle"


def test_extension_keywords_are_upper_cased() -> None:
    conn = connect(b"250-mx\r\n250-auth PLAIN LOGIN\r\n250-size\r\n250 x-thing  a b \r\n")
    assert conn.extensions == {"AUTH": "PLAIN LOGIN", "SIZE": "", "X-THING": "a b"}


@pytest.mark.parametrize("refusal", [b"502 5.5.1 Error: command not implemented\r\n",
                                     b"500 Syntax error\r\n", b"451 4.3.0 try HELO\r\n"])
def test_helo_fallback(refusal: bytes) -> None:
    conn = ClientConnection("client.example")
    feed(conn, GREETING)
    conn.data_to_send()
    assert feed(conn, refusal) == []
    assert conn.stage == "helo"
    assert conn.data_to_send() == b"HELO client.example\r\n"
    [ready] = feed(conn, b"250 mx.example.org\r\n")
    assert ready == Ready(Reply(220, None, ("mx.example.org ESMTP",)),
                          Reply(250, None, ("mx.example.org",)), esmtp=False)
    assert conn.extensions == {}
    assert conn.stage == "idle"
    # no extensions: one command at a time, no parameters
    conn.send_transaction(tx(content=b"caf\xe9\r\n"))
    assert conn.data_to_send() == b"MAIL FROM:<alice@example.org>\r\n"


def test_helo_refused_too() -> None:
    conn = ClientConnection("client.example")
    feed(conn, GREETING + b"502 5.5.1 no\r\n")
    assert conn.data_to_send() == b"EHLO client.example\r\nHELO client.example\r\n"
    assert feed(conn, b"550 5.7.1 go away\r\n") == [
        HandshakeFailed("helo", Reply(550, "5.7.1", ("go away",)))
    ]
    assert conn.stage == "quit"
    assert conn.data_to_send() == b"QUIT\r\n"
    conn.send_quit()  # a no-op: QUIT is already on its way
    assert conn.data_to_send() == b""
    assert feed(conn, b"221 2.0.0 Bye\r\n") == [Closed("quit")]
    assert conn.stage == "closed"
    assert conn.next_event() == Closed("quit")


def test_greeting_refused() -> None:
    conn = ClientConnection("client.example")
    assert feed(conn, b"554 5.3.2 no SMTP service here\r\n") == [
        HandshakeFailed("greeting", Reply(554, "5.3.2", ("no SMTP service here",)))
    ]
    assert conn.data_to_send() == b"QUIT\r\n"
    assert conn.stage == "quit"
    assert feed(conn, b"") == [Closed("eof during quit")]


def test_421_at_greeting() -> None:
    conn = ClientConnection("client.example")
    assert feed(conn, b"421 mx.example.org busy\r\n") == [
        HandshakeFailed("greeting", Reply(421, None, ("mx.example.org busy",))),
        Closed("421"),
    ]
    assert conn.data_to_send() == b""
    assert conn.stage == "closed"
    conn.send_quit()  # no-op once closed
    assert conn.data_to_send() == b""


def test_421_at_ehlo() -> None:
    conn = ClientConnection("client.example")
    feed(conn, GREETING)
    conn.data_to_send()
    assert feed(conn, B_421) == [HandshakeFailed("ehlo", R_421), Closed("421")]
    assert conn.data_to_send() == b""


# -- STARTTLS -----------------------------------------------------------------------------------

EHLO_TLS = b"250-mx.example.org\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
# After the handshake the server may offer more (AUTH), and STARTTLS no more.
EHLO_AFTER_TLS = b"250-mx.example.org\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n"
TLS_GO = b"220 2.0.0 Ready to start TLS\r\n"
R_GREETING = Reply(220, None, ("mx.example.org ESMTP",))
R_EHLO_TLS = Reply(250, None, ("mx.example.org", "PIPELINING", "STARTTLS"))
R_EHLO_AFTER_TLS = Reply(250, None, ("mx.example.org", "PIPELINING", "AUTH PLAIN"))


def at_tls_stage(starttls: str = "try", go: bytes = TLS_GO) -> ClientConnection:
    """A connection whose STARTTLS was accepted: the driver's handshake is due."""
    conn = ClientConnection("client.example", starttls=starttls)
    assert feed(conn, GREETING) == []
    assert conn.data_to_send() == b"EHLO client.example\r\n"
    assert feed(conn, EHLO_TLS) == []
    assert conn.data_to_send() == b"STARTTLS\r\n"
    assert conn.stage == "starttls"
    assert feed(conn, go) == [StartTlsReady(Reply(220, "2.0.0", ("Ready to start TLS",)))]
    assert conn.stage == "tls"
    assert not conn.tls_active
    return conn


@pytest.mark.parametrize("starttls", ["try", "require"])
def test_starttls_then_ehlo_again(starttls: str) -> None:
    conn = at_tls_stage(starttls)
    assert conn.next_event() is PAUSED  # until the driver reports its handshake
    assert conn.data_to_send() == b""
    conn.tls_established()
    assert conn.tls_active
    assert conn.extensions == {}  # RFC 3207 4.2: forgotten until the new EHLO reply
    assert conn.stage == "ehlo"
    assert conn.data_to_send() == b"EHLO client.example\r\n"
    assert feed(conn, EHLO_AFTER_TLS) == [
        Ready(R_GREETING, R_EHLO_AFTER_TLS, esmtp=True, tls=True)
    ]
    assert conn.extensions == {"PIPELINING": "", "AUTH": "PLAIN"}
    assert conn.stage == "idle"
    assert conn.data_to_send() == b""
    conn.send_transaction(tx())
    assert conn.data_to_send() == (b"MAIL FROM:<alice@example.org>\r\n"
                                   b"RCPT TO:<bob@example.net>\r\nDATA\r\n")


def test_starttls_is_not_said_twice() -> None:
    conn = at_tls_stage()
    conn.tls_established()
    conn.data_to_send()
    [ready] = feed(conn, EHLO_TLS)  # still offered over TLS
    assert ready == Ready(R_GREETING, R_EHLO_TLS, esmtp=True, tls=True)
    assert conn.data_to_send() == b""


def test_octets_after_the_starttls_reply_are_never_replies() -> None:
    # Injected behind the 220 in the same segment, as in the STARTTLS command injection
    # attacks (CVE-2011-0411 the other way round): a fake EHLO reply and half a line.
    conn = at_tls_stage(go=TLS_GO + b"250-evil.example\r\n250 SIZE 1\r\n25")
    assert conn.next_event() is PAUSED
    conn.receive_data(b"0 more injected\r\n")  # before the handshake: dropped as well
    conn.receive_data(b"")
    assert conn.next_event() is PAUSED
    conn.tls_established()
    assert conn.data_to_send() == b"EHLO client.example\r\n"
    assert feed(conn, EHLO_AFTER_TLS) == [
        Ready(R_GREETING, R_EHLO_AFTER_TLS, esmtp=True, tls=True)
    ]
    assert "SIZE" not in conn.extensions


def test_starttls_failed_handshake_closes() -> None:
    conn = at_tls_stage("require")
    conn.tls_failed()
    assert conn.next_event() == Closed("tls handshake failed")
    assert conn.stage == "closed"
    assert conn.data_to_send() == b""
    conn.send_quit()  # no-op once closed
    assert conn.data_to_send() == b""


def test_starttls_none_ignores_the_offer() -> None:
    conn = ClientConnection("client.example")
    feed(conn, GREETING)
    conn.data_to_send()
    assert feed(conn, EHLO_TLS) == [Ready(R_GREETING, R_EHLO_TLS, esmtp=True, tls=False)]
    assert conn.data_to_send() == b""
    assert "STARTTLS" in conn.extensions


def test_starttls_try_not_offered_goes_plaintext() -> None:
    conn = ClientConnection("client.example", starttls="try")
    feed(conn, GREETING)
    conn.data_to_send()
    [ready] = feed(conn, EHLO_PLAIN)
    assert ready == Ready(R_GREETING, Reply(250, None, ("mx.example.org", "PIPELINING")),
                          esmtp=True, tls=False)
    assert conn.data_to_send() == b""
    assert not conn.tls_active


@pytest.mark.parametrize("ehlo", [EHLO_PLAIN, b"502 5.5.2 no EHLO\r\n"])
def test_starttls_require_not_offered(ehlo: bytes) -> None:
    conn = ClientConnection("client.example", starttls="require")
    feed(conn, GREETING)
    conn.data_to_send()
    events = feed(conn, ehlo)
    if ehlo.startswith(b"502"):  # HELO: no extensions at all, so no STARTTLS either
        assert events == []
        assert conn.data_to_send() == b"HELO client.example\r\n"
        events = feed(conn, b"250 mx.example.org\r\n")
    assert events == [HandshakeFailed("starttls", TLS_NOT_OFFERED)]
    assert TLS_NOT_OFFERED == Reply(454, "4.7.0",
                                    ("TLS is required but was not offered by the server",))
    assert conn.stage == "quit"
    assert conn.data_to_send() == b"QUIT\r\n"
    assert feed(conn, b"221 2.0.0 Bye\r\n") == [Closed("quit")]


REFUSALS = [b"454 4.7.0 TLS not available due to temporary reason\r\n",
            b"501 5.5.4 Syntax error\r\n", b"502 5.5.1 not implemented\r\n"]


@pytest.mark.parametrize("refusal", REFUSALS)
def test_starttls_refused_try_carries_on_in_plaintext(refusal: bytes) -> None:
    conn = ClientConnection("client.example", starttls="try")
    feed(conn, GREETING + EHLO_TLS)
    assert conn.data_to_send() == b"EHLO client.example\r\nSTARTTLS\r\n"
    assert feed(conn, refusal) == [Ready(R_GREETING, R_EHLO_TLS, esmtp=True, tls=False)]
    assert conn.extensions == {"PIPELINING": "", "STARTTLS": ""}  # the plaintext EHLO's
    assert conn.stage == "idle"
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("refusal", REFUSALS)
def test_starttls_refused_require_fails(refusal: bytes) -> None:
    conn = ClientConnection("client.example", starttls="require")
    feed(conn, GREETING + EHLO_TLS)
    conn.data_to_send()
    [failed] = feed(conn, refusal)
    assert isinstance(failed, HandshakeFailed) and failed.stage == "starttls"
    assert failed.reply.format() == refusal
    assert conn.data_to_send() == b"QUIT\r\n"


@pytest.mark.parametrize("starttls", ["try", "require"])
def test_421_to_starttls(starttls: str) -> None:
    conn = ClientConnection("client.example", starttls=starttls)
    feed(conn, GREETING + EHLO_TLS)
    conn.data_to_send()
    assert feed(conn, B_421) == [HandshakeFailed("starttls", R_421), Closed("421")]
    assert conn.data_to_send() == b""


def test_ehlo_refused_over_tls_falls_back_to_helo() -> None:
    conn = at_tls_stage("require")
    conn.tls_established()
    conn.data_to_send()
    assert feed(conn, b"502 5.5.1 no\r\n") == []
    assert conn.data_to_send() == b"HELO client.example\r\n"
    [ready] = feed(conn, b"250 mx.example.org\r\n")
    assert ready == Ready(R_GREETING, Reply(250, None, ("mx.example.org",)), esmtp=False,
                          tls=True)


def test_tls_calls_outside_the_tls_stage_are_refused() -> None:
    conn = ClientConnection("client.example", starttls="try")
    for call in (conn.tls_established, conn.tls_failed):
        with pytest.raises(SMTPClientError):
            call()
    conn = at_tls_stage()
    for call in (lambda: conn.send_transaction(tx()), conn.send_rset, conn.send_quit,
                 lambda: conn.send_etrn("x.test")):
        with pytest.raises(SMTPClientError):
            call()
    conn.tls_established()
    with pytest.raises(SMTPClientError):
        conn.tls_established()


@pytest.mark.parametrize("mode", ["", "may", "TRY", "encrypt"])
def test_bad_starttls_mode(mode: str) -> None:
    with pytest.raises(ValueError):
        ClientConnection("client.example", starttls=mode)


# -- a pipelined transaction ---------------------------------------------------------------------


CONTENT = b"Subject: x\r\n\r\n.line\nbare\rcr\r\n..two\r\nend\xe9"
NORMALIZED = b"Subject: x\r\n\r\n.line\r\nbare\r\ncr\r\n..two\r\nend\xe9\r\n"
STUFFED = b"Subject: x\r\n\r\n..line\r\nbare\r\ncr\r\n...two\r\nend\xe9\r\n.\r\n"


def test_content_normalisation_and_stuffing() -> None:
    assert normalize_line_ends(CONTENT) == NORMALIZED
    assert len(NORMALIZED) == 44
    assert dot_stuff(NORMALIZED) + b".\r\n" == STUFFED
    assert normalize_line_ends(b"a\r.b\n.c") == b"a\r\n.b\r\n.c\r\n"
    assert normalize_line_ends(b"a\r\r\n\n\rb\r") == b"a\r\n\r\n\r\n\r\nb\r\n"
    assert normalize_line_ends(b"") == b""
    assert dot_stuff(b".\r\n.\r\n") == b"..\r\n..\r\n"


def test_pipelined_transaction_in_one_chunk() -> None:
    conn = connect()
    conn.send_transaction(
        Transaction(
            "alice@example.org",
            ("bob@example.net", "carol@example.net"),
            CONTENT,
            ret="hdrs",
            envid="id+1 x",
            notify=(("SUCCESS", "FAILURE"), None),
            orcpt=("rfc822;bob+x@example.net", None),
        )
    )
    assert conn.stage == "mail"
    assert conn.data_to_send() == (
        b"MAIL FROM:<alice@example.org> SIZE=44 BODY=8BITMIME ENVID=id+2B1+20x RET=HDRS\r\n"
        b"RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+2Bx@example.net\r\n"
        b"RCPT TO:<carol@example.net>\r\n"
        b"DATA\r\n"
    )
    assert feed(conn, OK_MAIL) == []
    assert conn.stage == "rcpt"
    assert feed(conn, OK_RCPT + OK_RCPT) == []
    assert conn.stage == "data"
    assert conn.data_to_send() == b""
    assert feed(conn, GO_AHEAD) == []
    assert conn.stage == "dot"
    assert conn.data_to_send() == STUFFED
    [done] = feed(conn, QUEUED)
    assert done == TransactionDone(R_MAIL, (R_RCPT, R_RCPT), R_QUEUED, dsn=True)
    assert done.recipient_results() == (R_QUEUED, R_QUEUED)
    assert conn.stage == "idle"
    assert conn.data_to_send() == b""


def test_pipelined_replies_in_one_chunk() -> None:
    conn = connect()
    conn.send_transaction(tx(content=b"a\r.b\n.c"))
    assert conn.data_to_send() == (
        b"MAIL FROM:<alice@example.org> SIZE=11\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
    )
    assert feed(conn, OK_MAIL + OK_RCPT + GO_AHEAD) == []
    assert conn.data_to_send() == b"a\r\n..b\r\n..c\r\n.\r\n"
    [done] = feed(conn, QUEUED)
    assert done.recipient_results() == (R_QUEUED,)


def test_empty_message() -> None:
    conn = connect()
    conn.send_transaction(tx(content=b""))
    assert conn.data_to_send().startswith(b"MAIL FROM:<alice@example.org> SIZE=0\r\n")
    feed(conn, OK_MAIL + OK_RCPT + GO_AHEAD)
    assert conn.data_to_send() == b".\r\n"


def test_null_sender() -> None:
    conn = connect(EHLO_PLAIN)
    conn.send_transaction(Transaction("", ("postmaster@example.net",), b"x"))
    assert conn.data_to_send() == (
        b"MAIL FROM:<>\r\nRCPT TO:<postmaster@example.net>\r\nDATA\r\n"
    )


def test_refused_recipient_among_accepted_pipelined() -> None:
    conn = connect()
    conn.send_transaction(tx("a@x.test", "b@x.test", "c@x.test"))
    conn.data_to_send()
    refused = b"550 5.1.1 <b@x.test>: User unknown\r\n"
    assert feed(conn, OK_MAIL + OK_RCPT + refused + OK_RCPT + GO_AHEAD) == []
    assert conn.data_to_send() == b"Subject: t\r\n\r\nhi\r\n.\r\n"
    [done] = feed(conn, QUEUED)
    r550 = Reply(550, "5.1.1", ("<b@x.test>: User unknown",))
    assert done == TransactionDone(R_MAIL, (R_RCPT, r550, R_RCPT), R_QUEUED, dsn=True)
    assert done.recipient_results() == (R_QUEUED, r550, R_QUEUED)


def test_all_recipients_refused_pipelined_and_server_says_354() -> None:
    conn = connect()
    conn.send_transaction(tx("a@x.test", "b@x.test"))
    conn.data_to_send()
    refused = b"550 5.1.1 unknown\r\n"
    assert feed(conn, OK_MAIL + refused + b"450 4.2.0 later\r\n" + GO_AHEAD) == []
    assert conn.data_to_send() == b".\r\n"  # an empty message, never the content
    assert conn.stage == "dot"
    [done] = feed(conn, b"554 5.5.1 Error: no valid recipients\r\n")
    r550, r450 = Reply(550, "5.1.1", ("unknown",)), Reply(450, "4.2.0", ("later",))
    assert done == TransactionDone(R_MAIL, (r550, r450), None, dsn=True)
    assert done.recipient_results() == (r550, r450)
    assert conn.stage == "idle"
    # the dot ended the server's transaction: the next one starts with MAIL
    conn.send_transaction(tx())
    assert conn.data_to_send().startswith(b"MAIL FROM:")


def test_all_recipients_refused_pipelined_then_rset_before_next_transaction() -> None:
    conn = connect()
    conn.send_transaction(tx())
    conn.data_to_send()
    [done] = feed(conn, OK_MAIL + b"550 5.1.1 unknown\r\n"
                  + b"554 5.5.1 Error: no valid recipients\r\n")
    assert done.data is None
    assert done.recipient_results() == (Reply(550, "5.1.1", ("unknown",)),)
    assert conn.data_to_send() == b""
    # MAIL was accepted and nothing ended it: RSET goes first, in the same group
    conn.send_transaction(tx(content=b"x"))
    assert conn.stage == "rset"
    assert conn.data_to_send() == (
        b"RSET\r\nMAIL FROM:<alice@example.org> SIZE=3\r\nRCPT TO:<bob@example.net>\r\n"
        b"DATA\r\n"
    )
    assert feed(conn, b"250 2.0.0 Ok\r\n" + OK_MAIL + OK_RCPT + GO_AHEAD) == []
    assert conn.data_to_send() == b"x\r\n.\r\n"
    [done] = feed(conn, QUEUED)
    assert done.recipient_results() == (R_QUEUED,)


def test_mail_refused_pipelined_reports_the_mail_reply_for_everyone() -> None:
    conn = connect()
    conn.send_transaction(tx("a@x.test", "b@x.test"))
    conn.data_to_send()
    need_mail = b"503 5.5.1 Error: need MAIL command\r\n"
    [done] = feed(conn, b"451 4.3.0 try later\r\n" + need_mail * 2
                  + b"503 5.5.1 Error: need RCPT command\r\n")
    r451 = Reply(451, "4.3.0", ("try later",))
    r503 = Reply(503, "5.5.1", ("Error: need MAIL command",))
    assert done == TransactionDone(r451, (r503, r503), None, dsn=True)
    # the 503s are an artefact of pipelining: the recipients get the transient failure
    assert done.recipient_results() == (r451, r451)
    conn.send_transaction(tx())
    assert conn.data_to_send().startswith(b"MAIL FROM:")  # no RSET needed


# -- lock-step (no PIPELINING) --------------------------------------------------------------------


def test_lockstep_transaction() -> None:
    conn = connect(EHLO_LOCKSTEP)
    conn.send_transaction(tx("a@x.test", "b@x.test", "c@x.test", content=b"caf\xe9"))
    assert conn.data_to_send() == b"MAIL FROM:<alice@example.org> BODY=8BITMIME\r\n"
    assert conn.stage == "mail"
    assert feed(conn, OK_MAIL) == []
    assert conn.data_to_send() == b"RCPT TO:<a@x.test>\r\n"
    assert conn.stage == "rcpt"
    assert feed(conn, OK_RCPT) == []
    assert conn.data_to_send() == b"RCPT TO:<b@x.test>\r\n"
    assert feed(conn, b"550 5.1.1 unknown\r\n") == []
    assert conn.data_to_send() == b"RCPT TO:<c@x.test>\r\n"
    assert feed(conn, OK_RCPT) == []
    assert conn.data_to_send() == b"DATA\r\n"
    assert conn.stage == "data"
    assert feed(conn, GO_AHEAD) == []
    assert conn.data_to_send() == b"caf\xe9\r\n.\r\n"
    [done] = feed(conn, QUEUED)
    r550 = Reply(550, "5.1.1", ("unknown",))
    assert done == TransactionDone(R_MAIL, (R_RCPT, r550, R_RCPT), R_QUEUED, dsn=False)
    assert done.recipient_results() == (R_QUEUED, r550, R_QUEUED)


def test_lockstep_all_recipients_refused_sends_no_data() -> None:
    conn = connect(EHLO_LOCKSTEP)
    conn.send_transaction(tx("a@x.test", "b@x.test"))
    conn.data_to_send()
    feed(conn, OK_MAIL)
    conn.data_to_send()
    feed(conn, b"550 5.1.1 unknown\r\n")
    assert conn.data_to_send() == b"RCPT TO:<b@x.test>\r\n"
    [done] = feed(conn, b"551 5.1.6 moved\r\n")
    assert conn.data_to_send() == b""
    assert done.data is None
    assert [r.code for r in done.recipient_results()] == [550, 551]
    # the server still holds the transaction: RSET, its reply, then MAIL
    conn.send_transaction(tx())
    assert conn.data_to_send() == b"RSET\r\n"
    assert conn.stage == "rset"
    assert feed(conn, b"250 2.0.0 Ok\r\n") == []
    assert conn.data_to_send() == b"MAIL FROM:<alice@example.org>\r\n"
    assert conn.stage == "mail"


def test_lockstep_mail_refused() -> None:
    conn = connect(EHLO_LOCKSTEP)
    conn.send_transaction(tx("a@x.test", "b@x.test"))
    conn.data_to_send()
    [done] = feed(conn, b"553 5.7.1 sender rejected\r\n")
    r553 = Reply(553, "5.7.1", ("sender rejected",))
    assert done == TransactionDone(r553, (r553, r553), None, dsn=False)
    assert done.recipient_results() == (r553, r553)
    assert conn.data_to_send() == b""
    assert conn.stage == "idle"


def test_data_command_refused() -> None:
    conn = connect(EHLO_LOCKSTEP)
    conn.send_transaction(tx())
    feed(conn, OK_MAIL + OK_RCPT)
    assert conn.data_to_send().endswith(b"DATA\r\n")
    [done] = feed(conn, b"451 4.3.0 no queue space\r\n")
    r451 = Reply(451, "4.3.0", ("no queue space",))
    assert done == TransactionDone(R_MAIL, (R_RCPT,), r451, dsn=False)
    assert done.recipient_results() == (r451,)
    assert conn.data_to_send() == b""
    conn.send_transaction(tx())
    assert conn.data_to_send() == b"RSET\r\n"


# -- parameters ---------------------------------------------------------------------------------


def test_size_refusal_sends_nothing() -> None:
    conn = connect()
    big = b"x" * 998 + b"\n"  # 1000 octets on the wire: fits
    conn.send_transaction(tx(content=big))
    assert conn.data_to_send().startswith(b"MAIL FROM:<alice@example.org> SIZE=1000\r\n")
    feed(conn, OK_MAIL + OK_RCPT + GO_AHEAD + QUEUED)
    conn.data_to_send()
    conn.send_transaction(tx("a@x.test", "b@x.test", content=b"x" * 999 + b"\r"))
    assert conn.data_to_send() == b""
    assert conn.stage == "idle"
    refusal = Reply(552, "5.3.4", ("Message size exceeds remote limit (SIZE 1000)",))
    assert conn.next_event() == TransactionDone(refusal, (refusal, refusal), refusal, dsn=True)
    assert conn.next_event() is NEED_DATA


@pytest.mark.parametrize("size_line", [b"250-SIZE\r\n", b"250-SIZE 0\r\n"])
def test_size_without_limit(size_line: bytes) -> None:
    conn = connect(b"250-mx\r\n" + size_line + b"250 PIPELINING\r\n")
    conn.send_transaction(tx(content=b"x" * 5000))
    assert conn.data_to_send().startswith(b"MAIL FROM:<alice@example.org> SIZE=5002\r\n")


@pytest.mark.parametrize(
    ("ehlo", "content", "eight_bit", "mail"),
    [
        (EHLO_FULL, b"ascii", None, b"MAIL FROM:<a@x.test> SIZE=7\r\n"),
        (EHLO_FULL, b"\x80", None, b"MAIL FROM:<a@x.test> SIZE=3 BODY=8BITMIME\r\n"),
        (EHLO_FULL, b"\x80", False, b"MAIL FROM:<a@x.test> SIZE=3\r\n"),
        (EHLO_FULL, b"ascii", True, b"MAIL FROM:<a@x.test> SIZE=7 BODY=8BITMIME\r\n"),
        (EHLO_PLAIN, b"\xff", None, b"MAIL FROM:<a@x.test>\r\n"),  # sent anyway, no BODY
    ],
)
def test_body_parameter(ehlo: bytes, content: bytes, eight_bit: bool | None,
                        mail: bytes) -> None:
    conn = connect(ehlo)
    conn.send_transaction(Transaction("a@x.test", ("b@x.test",), content, eight_bit=eight_bit))
    assert conn.data_to_send().startswith(mail)


def test_dsn_parameters_only_when_offered() -> None:
    dsn_tx = Transaction("a@x.test", ("b@x.test",), b"x", ret="FULL", envid="e=1",
                         notify=(("NEVER",),), orcpt=("rfc822;b@x.test",))
    conn = connect(EHLO_PLAIN)
    conn.send_transaction(dsn_tx)
    assert conn.data_to_send() == b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n"
    [done] = feed(conn, OK_MAIL + OK_RCPT + GO_AHEAD + QUEUED)
    assert done.dsn is False
    conn = connect(EHLO_PLAIN.replace(b"250 PIPELINING", b"250-PIPELINING\r\n250 DSN"))
    conn.send_transaction(dsn_tx)
    assert conn.data_to_send() == (
        b"MAIL FROM:<a@x.test> ENVID=e+3D1 RET=FULL\r\n"
        b"RCPT TO:<b@x.test> NOTIFY=NEVER ORCPT=rfc822;b@x.test\r\n"
        b"DATA\r\n"
    )
    [done] = feed(conn, OK_MAIL + OK_RCPT + GO_AHEAD + QUEUED)
    assert done.dsn is True


def test_dsn_values_are_xtext_encoded() -> None:
    conn = connect()
    conn.send_transaction(Transaction(
        "a@x.test", ("b@x.test", "c@x.test"), b"x", envid="<id 1@x>\u00e9",
        notify=(None, ("delay", "failure")), orcpt=("utf-8;+=\u00e9", "x-local;a b")))
    assert conn.data_to_send() == (
        b"MAIL FROM:<a@x.test> SIZE=3 ENVID=<id+201@x>+C3+A9\r\n"
        b"RCPT TO:<b@x.test> ORCPT=utf-8;+2B+3D+C3+A9\r\n"
        b"RCPT TO:<c@x.test> NOTIFY=DELAY,FAILURE ORCPT=x-local;a+20b\r\n"
        b"DATA\r\n"
    )


# -- 421 ----------------------------------------------------------------------------------------


def test_421_at_mail() -> None:
    conn = connect(EHLO_LOCKSTEP)
    conn.send_transaction(tx("a@x.test", "b@x.test"))
    conn.data_to_send()
    assert feed(conn, B_421) == [
        TransactionDone(R_421, (R_421, R_421), None, dsn=False),
        Closed("421"),
    ]
    assert conn.stage == "closed"
    assert conn.data_to_send() == b""


def test_421_at_mail_pipelined() -> None:
    conn = connect()
    conn.send_transaction(tx("a@x.test", "b@x.test"))
    conn.data_to_send()
    [done, closed] = feed(conn, B_421)
    assert done == TransactionDone(R_421, (R_421, R_421), None, dsn=True)
    assert done.recipient_results() == (R_421, R_421)
    assert closed == Closed("421")


def test_421_mid_pipeline() -> None:
    conn = connect()
    conn.send_transaction(tx("a@x.test", "b@x.test", "c@x.test"))
    conn.data_to_send()
    r550 = b"550 5.1.1 unknown\r\n"
    [done, closed] = feed(conn, OK_MAIL + OK_RCPT + r550 + B_421 + b"250 2.1.5 late\r\n")
    r550_reply = Reply(550, "5.1.1", ("unknown",))
    assert done == TransactionDone(R_MAIL, (R_RCPT, r550_reply, R_421), R_421, dsn=True)
    assert done.recipient_results() == (R_421, r550_reply, R_421)
    assert closed == Closed("421")
    assert conn.data_to_send() == b""
    assert conn.next_event() == Closed("421")


@pytest.mark.parametrize("after_354", [False, True])
def test_421_to_data_or_dot(after_354: bool) -> None:
    conn = connect()
    conn.send_transaction(tx())
    conn.data_to_send()
    feed(conn, OK_MAIL + OK_RCPT + (GO_AHEAD if after_354 else b""))
    conn.data_to_send()
    [done, closed] = feed(conn, B_421)
    assert done == TransactionDone(R_MAIL, (R_RCPT,), R_421, dsn=True)
    assert done.recipient_results() == (R_421,)
    assert closed == Closed("421")


def test_421_when_idle() -> None:
    conn = connect()
    assert feed(conn, b"421 4.4.2 mx.example.org Error: timeout exceeded\r\n") == [
        Closed("421")
    ]
    with pytest.raises(SMTPClientError):
        conn.send_transaction(tx())


def test_421_to_rset_etrn_quit() -> None:
    conn = connect()
    conn.send_rset()
    assert feed(conn, B_421) == [RsetDone(R_421), Closed("421")]
    conn = connect()
    conn.send_etrn("x.test")
    assert feed(conn, B_421) == [EtrnDone(R_421), Closed("421")]
    conn = connect()
    conn.send_quit()
    assert feed(conn, B_421) == [Closed("421")]


# -- EOF, garbage, bounds ---------------------------------------------------------------------


def at_stage(stage: str) -> ClientConnection:
    """A connection waiting for the reply of the given stage."""
    if stage == "greeting":
        return ClientConnection("client.example")
    if stage == "ehlo":
        conn = ClientConnection("client.example")
        feed(conn, GREETING)
    elif stage == "helo":
        conn = ClientConnection("client.example")
        feed(conn, GREETING + b"502 no\r\n")
    elif stage == "starttls":
        conn = ClientConnection("client.example", starttls="try")
        feed(conn, GREETING + EHLO_TLS)
    else:
        conn = connect(EHLO_LOCKSTEP)
        if stage in ("mail", "rcpt", "data", "dot"):
            conn.send_transaction(tx())
            replies = {"mail": b"", "rcpt": OK_MAIL, "data": OK_MAIL + OK_RCPT,
                       "dot": OK_MAIL + OK_RCPT + GO_AHEAD}[stage]
            if replies:
                feed(conn, replies)
        elif stage == "rset":
            conn.send_rset()
        elif stage == "etrn":
            conn.send_etrn("x.test")
        elif stage == "quit":
            conn.send_quit()
    conn.data_to_send()
    assert conn.stage == stage
    return conn


STAGES = ["greeting", "ehlo", "helo", "starttls", "mail", "rcpt", "data", "dot", "rset", "etrn",
          "quit"]


@pytest.mark.parametrize("stage", STAGES)
def test_eof_while_a_reply_is_outstanding(stage: str) -> None:
    conn = at_stage(stage)
    assert feed(conn, b"250-partial reply\r\n250 ") == []
    assert feed(conn, b"") == [Closed(f"eof during {stage}")]
    assert conn.stage == "closed"
    assert conn.next_event() == Closed(f"eof during {stage}")
    conn.receive_data(b"250 ok\r\n")  # ignored
    assert conn.next_event() == Closed(f"eof during {stage}")


def test_eof_when_idle() -> None:
    conn = connect()
    assert feed(conn, b"") == [Closed("eof")]
    assert conn.stage == "closed"


def test_replies_before_eof_are_read_first() -> None:
    conn = at_stage("quit")
    conn.receive_data(b"221 2.0.0 Bye\r\n")
    conn.receive_data(b"")
    assert conn.next_event() == Closed("quit")


@pytest.mark.parametrize("stage", STAGES)
def test_garbage_reply(stage: str) -> None:
    conn = at_stage(stage)
    assert feed(conn, b"HTTP/1.1 400 Bad Request\r\n") == [
        Closed("protocol error: malformed reply line: 'HTTP/1.1 400 Bad Request'")
    ]
    assert conn.stage == "closed"
    assert conn.data_to_send() == b""


def test_reply_code_changing_within_a_reply() -> None:
    conn = at_stage("mail")
    [closed] = feed(conn, b"250-a\r\n550 b\r\n")
    assert closed == Closed("protocol error: reply code changed within a reply: '550 b'")


def test_over_long_reply_line() -> None:
    conn = ClientConnection("client.example", max_reply_line=64)
    assert feed(conn, b"220 " + b"x" * 59) == []  # 63 octets: may still end in time
    [closed] = feed(conn, b"x")
    assert isinstance(closed, Closed)
    assert closed.reason.startswith("protocol error: reply line too long: '220 xxx")


def test_too_many_reply_lines() -> None:
    conn = ClientConnection("client.example", max_reply_lines=3)
    feed(conn, GREETING)
    conn.data_to_send()
    [closed] = feed(conn, b"250-mx\r\n250-A\r\n250-B\r\n250 C\r\n")
    assert closed == Closed("protocol error: too many lines in one reply: '250 C'")


def test_unexpected_reply_when_idle() -> None:
    conn = connect()
    assert feed(conn, b"250 what\r\n") == [Closed("protocol error: unexpected reply 250 'what'")]


def test_extra_reply_after_the_last_expected_one() -> None:
    conn = connect()
    conn.send_transaction(tx())
    conn.data_to_send()
    events = feed(conn, OK_MAIL + OK_RCPT + GO_AHEAD + QUEUED + b"250 2.0.0 Ok\r\n")
    assert isinstance(events[0], TransactionDone)
    assert events[1:] == [Closed("protocol error: unexpected reply 250 'Ok'")]


@pytest.mark.parametrize(
    ("stage", "reply", "reason"),
    [
        ("mail", b"354 go\r\n", "protocol error: reply 354 to mail"),
        ("data", b"250 ok\r\n", "protocol error: reply 250 to data"),
        ("data", b"334 what\r\n", "protocol error: reply 334 to data"),
        ("dot", b"354 again\r\n", "protocol error: reply 354 to dot"),
        ("greeting", b"354 x\r\n", "protocol error: reply 354 to greeting"),
        ("starttls", b"354 x\r\n", "protocol error: reply 354 to starttls"),
    ],
)
def test_reply_of_the_wrong_kind(stage: str, reply: bytes, reason: str) -> None:
    conn = at_stage(stage)
    assert feed(conn, reply) == [Closed(reason)]


# -- ETRN, RSET, QUIT ---------------------------------------------------------------------------


def test_etrn() -> None:
    conn = connect()
    conn.send_etrn("@example.test")
    assert conn.data_to_send() == b"ETRN @example.test\r\n"
    assert conn.stage == "etrn"
    assert feed(conn, b"250 2.0.0 Queuing started\r\n") == [
        EtrnDone(Reply(250, "2.0.0", ("Queuing started",)))
    ]
    assert conn.stage == "idle"
    conn.send_etrn("#queue1")
    assert conn.data_to_send() == b"ETRN #queue1\r\n"
    assert feed(conn, b"459 4.7.1 not for you\r\n") == [
        EtrnDone(Reply(459, "4.7.1", ("not for you",)))
    ]


@pytest.mark.parametrize("ehlo", [EHLO_FULL, EHLO_LOCKSTEP])
def test_etrn_after_an_unfinished_transaction(ehlo: bytes) -> None:
    conn = connect(ehlo)
    conn.send_transaction(tx())
    conn.data_to_send()
    feed(conn, OK_MAIL + b"550 no\r\n" + (b"554 no valid recipients\r\n" if ehlo == EHLO_FULL
                                         else b""))
    conn.data_to_send()
    conn.send_etrn("x.test")
    if ehlo == EHLO_FULL:
        assert conn.data_to_send() == b"RSET\r\nETRN x.test\r\n"
    else:
        assert conn.data_to_send() == b"RSET\r\n"
        assert feed(conn, b"250 2.0.0 Ok\r\n") == []
        assert conn.data_to_send() == b"ETRN x.test\r\n"
    assert conn.stage in ("rset", "etrn")
    events = feed(conn, (b"250 2.0.0 Ok\r\n" if ehlo == EHLO_FULL else b"") + b"250 started\r\n")
    assert events == [EtrnDone(Reply(250, None, ("started",)))]


def test_rset() -> None:
    conn = connect()
    conn.send_rset()
    assert conn.data_to_send() == b"RSET\r\n"
    assert conn.stage == "rset"
    assert feed(conn, b"250 2.0.0 Ok\r\n") == [RsetDone(Reply(250, "2.0.0", ("Ok",)))]
    assert conn.stage == "idle"


def test_explicit_rset_clears_the_open_transaction() -> None:
    conn = connect(EHLO_LOCKSTEP)
    conn.send_transaction(tx())
    conn.data_to_send()
    feed(conn, OK_MAIL + b"550 no\r\n")
    conn.data_to_send()
    conn.send_rset()
    assert conn.data_to_send() == b"RSET\r\n"
    feed(conn, b"250 2.0.0 Ok\r\n")
    conn.send_transaction(tx())
    assert conn.data_to_send() == b"MAIL FROM:<alice@example.org>\r\n"


def test_quit() -> None:
    conn = connect()
    conn.send_quit()
    assert conn.data_to_send() == b"QUIT\r\n"
    assert conn.stage == "quit"
    assert feed(conn, b"221 2.0.0 Bye\r\n") == [Closed("quit")]
    assert conn.stage == "closed"
    assert conn.next_event() == Closed("quit")


# -- several transactions, chunking ---------------------------------------------------------------


def test_two_transactions_on_one_connection() -> None:
    conn = connect()
    conn.send_transaction(tx("a@x.test", content=b"one"))
    assert conn.data_to_send() == (
        b"MAIL FROM:<alice@example.org> SIZE=5\r\nRCPT TO:<a@x.test>\r\nDATA\r\n"
    )
    feed(conn, OK_MAIL + OK_RCPT + GO_AHEAD)
    assert conn.data_to_send() == b"one\r\n.\r\n"
    [first] = feed(conn, QUEUED)
    assert first.recipient_results() == (R_QUEUED,)  # type: ignore[attr-defined]
    conn.send_transaction(tx("b@x.test", content=b"two\r\n"))
    assert conn.data_to_send() == (
        b"MAIL FROM:<alice@example.org> SIZE=5\r\nRCPT TO:<b@x.test>\r\nDATA\r\n"
    )
    feed(conn, OK_MAIL + OK_RCPT + GO_AHEAD)
    assert conn.data_to_send() == b"two\r\n.\r\n"
    r2 = b"250 2.0.0 Ok: queued as Q2\r\n"
    [second] = feed(conn, r2)
    assert second == TransactionDone(R_MAIL, (R_RCPT,), Reply(250, "2.0.0",
                                                               ("Ok: queued as Q2",)), dsn=True)
    conn.send_quit()
    assert conn.data_to_send() == b"QUIT\r\n"


def dialogue(chunks: list[bytes]) -> tuple[list[object], bytes]:
    """A full session: the server's output given in the given pieces."""
    conn = ClientConnection("client.example")
    events: list[object] = []
    sent = bytearray()
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, Ready):
                conn.send_transaction(tx("a@x.test", "b@x.test", content=b".x\r\n"))
            elif isinstance(event, TransactionDone):
                conn.send_quit()
            elif isinstance(event, Closed):
                break
            sent += conn.data_to_send()  # what a driver sends before it reads on
    return events, bytes(sent)


SERVER_SIDE = (
    GREETING + EHLO_FULL + OK_MAIL + OK_RCPT + b"550-5.1.1 no\r\n550 5.1.1 such user\r\n"
    + GO_AHEAD + QUEUED + b"221 2.0.0 Bye\r\n"
)


def test_replies_byte_by_byte() -> None:
    whole_events, whole_sent = dialogue([SERVER_SIDE])
    events, sent = dialogue([SERVER_SIDE[i : i + 1] for i in range(len(SERVER_SIDE))])
    assert (events, sent) == (whole_events, whole_sent)
    assert whole_sent == (
        b"EHLO client.example\r\n"
        b"MAIL FROM:<alice@example.org> SIZE=4\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n"
        b"DATA\r\n"
        b"..x\r\n.\r\n"
        b"QUIT\r\n"
    )
    r550 = Reply(550, "5.1.1", ("no", "such user"))
    assert events[1:] == [
        TransactionDone(R_MAIL, (R_RCPT, r550), R_QUEUED, dsn=True),
        Closed("quit"),
    ]


# -- driver misuse ------------------------------------------------------------------------------


def test_commands_outside_idle_are_refused() -> None:
    conn = ClientConnection("client.example")
    with pytest.raises(SMTPClientError):
        conn.send_transaction(tx())
    with pytest.raises(SMTPClientError):
        conn.send_rset()
    with pytest.raises(SMTPClientError):
        conn.send_quit()
    conn = connect()
    conn.send_transaction(tx())
    for call in (lambda: conn.send_transaction(tx()), conn.send_rset,
                 lambda: conn.send_etrn("x.test"), conn.send_quit):
        with pytest.raises(SMTPClientError):
            call()


@pytest.mark.parametrize(
    "bad",
    [
        Transaction("a@x.test", (), b"x"),
        Transaction("a@x.test", ("",), b"x"),
        Transaction("a@x.test\r\nRSET", ("b@x.test",), b"x"),
        Transaction("a@x.test", ("b@x.test\n",), b"x"),
        Transaction("a@x.test", ("b@x.test",), b"x", ret="ALL"),
        Transaction("a@x.test", ("b@x.test",), b"x", notify=((), ())),
        Transaction("a@x.test", ("b@x.test",), b"x", notify=(("NEVER", "SUCCESS"),)),
        Transaction("a@x.test", ("b@x.test",), b"x", notify=(("SUCCESS", "SUCCESS"),)),
        Transaction("a@x.test", ("b@x.test",), b"x", notify=(("SOMETIMES",),)),
        Transaction("a@x.test", ("b@x.test",), b"x", notify=((),)),
        Transaction("a@x.test", ("b@x.test",), b"x", orcpt=("b@x.test",)),
        Transaction("a@x.test", ("b@x.test",), b"x", orcpt=("rfc 822;b@x.test",)),
    ],
)
def test_bad_transactions(bad: Transaction) -> None:
    conn = connect()
    with pytest.raises(SMTPClientError):
        conn.send_transaction(bad)
    assert conn.stage == "idle"
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("node", ["", "a b", "x\r\n", "x\t"])
def test_bad_etrn_node(node: str) -> None:
    conn = connect()
    with pytest.raises(SMTPClientError):
        conn.send_etrn(node)


@pytest.mark.parametrize("name", ["", "a b", "x\r\nQUIT"])
def test_bad_local_hostname(name: str) -> None:
    with pytest.raises(ValueError):
        ClientConnection(name)


# -- against the server core ----------------------------------------------------------------------


def decide(event: object) -> tuple[int, str, str]:
    if isinstance(event, MailFrom):
        return 250, "Ok", "2.1.0"
    if isinstance(event, RcptTo):
        if event.address.startswith("nobody@"):
            return 550, "User unknown", "5.1.1"
        return 250, "Ok", "2.1.5"
    if isinstance(event, Etrn):
        return 250, "Queuing started", "2.0.0"
    if isinstance(event, Verify):
        return 252, "Cannot VRFY", "2.0.0"
    assert isinstance(event, MessageReceived)
    return 250, "Ok: queued as Q1", "2.0.0"


def exchange(client: ClientConnection, server: ServerConnection,
             received: list[object]) -> list[object]:
    """Shuttle bytes between the cores until neither has more to say; return the client's
    events (the server's go to ``received``)."""
    events: list[object] = []
    while True:
        to_server = client.data_to_send()
        if to_server:  # b"" would mean EOF
            server.receive_data(to_server)
        while True:
            event = server.next_event()
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                break
            received.append(event)
            if isinstance(event, MailFrom | RcptTo | MessageReceived | Verify | Etrn):
                server.reply(*decide(event))
        to_client = server.data_to_send()
        if to_client:
            client.receive_data(to_client)
        if server.closed:  # its driver closes the socket
            client.receive_data(b"")
        while True:
            event = client.next_event()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, Closed):
                return events
        if not to_server and not to_client:
            return events


def start_pair(**limits: int | bool) -> tuple[ClientConnection, ServerConnection, list[object]]:
    server = ServerConnection(ServerLimits(hostname="mx.example.org", **limits))  # type: ignore
    server.greeting()
    client = ClientConnection("client.example")
    received: list[object] = []
    [ready] = exchange(client, server, received)
    assert isinstance(ready, Ready) and ready.esmtp
    return client, server, received


TRICKY = b".\r\n..\r\n.x\n.\n\r.\r\nend.\r\n.\r\n\r\n.\rlast line without end"


def test_message_arrives_intact_at_the_server_core() -> None:
    client, server, received = start_pair()
    client.send_transaction(Transaction(
        "alice@example.org", ("bob@example.net", "nobody@example.net", "carol@example.net"),
        TRICKY, ret="HDRS", envid="env 1", notify=(("SUCCESS", "FAILURE"), None, ("NEVER",)),
        orcpt=("rfc822;Bob+x@example.net", None, None)))
    [done] = exchange(client, server, received)
    assert isinstance(done, TransactionDone)
    assert [r.code for r in done.recipient_results()] == [250, 550, 250]
    message = received[-1]
    assert message == MessageReceived(
        "alice@example.org",
        ("bob@example.net", "carol@example.net"),
        normalize_line_ends(TRICKY),
        ret="HDRS",
        envid="env 1",
        notify=(("SUCCESS", "FAILURE"), ("NEVER",)),
        orcpt=("rfc822;Bob+x@example.net", None),
    )
    client.send_etrn("@example.net")
    assert exchange(client, server, received) == [
        EtrnDone(Reply(250, "2.0.0", ("Queuing started",)))
    ]
    assert received[-1] == Etrn("@example.net")
    client.send_quit()
    assert exchange(client, server, received) == [Closed("quit")]
    assert server.closed


@pytest.mark.parametrize("seed", range(10))
def test_random_content_round_trips_through_the_server_core(seed: int) -> None:
    rng = random.Random(seed)
    pieces = [b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\xe9", b" "]
    content = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 300)))
    client, server, received = start_pair(dsn=False)
    assert "DSN" not in client.extensions
    client.send_transaction(Transaction("a@x.test", ("b@x.test",), content,
                                        notify=(("NEVER",),)))
    [done] = exchange(client, server, received)
    assert isinstance(done, TransactionDone) and done.dsn is False
    assert done.recipient_results() == (R_QUEUED,)
    assert received[-1] == MessageReceived("a@x.test", ("b@x.test",),
                                           normalize_line_ends(content))


def test_size_limit_agrees_with_the_server_core() -> None:
    client, server, received = start_pair(max_message_size=10)
    client.send_transaction(Transaction("a@x.test", ("b@x.test",), b"12345678\n"))
    [done] = exchange(client, server, received)
    assert isinstance(done, TransactionDone) and done.recipient_results() == (R_QUEUED,)
    client.send_transaction(Transaction("a@x.test", ("b@x.test",), b"123456789\n"))
    assert client.data_to_send() == b""  # 11 octets: not even MAIL is sent
    [done] = exchange(client, server, received)
    assert isinstance(done, TransactionDone)
    assert done.mail == Reply(552, "5.3.4", ("Message size exceeds remote limit (SIZE 10)",))


def test_empty_envid_is_not_sent() -> None:
    conn = connect()
    conn.send_transaction(Transaction("a@x.test", ("b@x.test",), b"x", envid=""))
    assert conn.data_to_send().startswith(b"MAIL FROM:<a@x.test> SIZE=3\r\nRCPT")
