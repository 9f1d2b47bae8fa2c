"""Byte-for-byte tests of the sans-IO POP3 server core (mailpool.protocol.pop3)."""

from __future__ import annotations

import base64

import pytest

from mailpool.protocol.pop3 import (
    AUTHORIZATION,
    CLOSED,
    NEED_DATA,
    PAUSED,
    TRANSACTION,
    UPDATE,
    AuthAborted,
    Authenticate,
    ConnectionClosed,
    Deleted,
    MessageInfo,
    Pop3Connection,
    Pop3Limits,
    Quit,
    Retrieve,
    Retrieved,
    StartTls,
    Undeleted,
    Update,
    pop_normalize,
    pop_size,
)

HOST = "pop.example.test"
GREETING = b"+OK pop.example.test POP3 server ready\r\n"

# Three stored messages: CRLF; bare LF with dot lines; a dot first line and no final newline.
M1 = b"From: a@example\r\nSubject: one\r\n\r\nline1\r\nline2\r\n"
M2 = b"From: b@example\nSubject: two\n\n.hidden\nbody\n..two\n.\n"
M3 = b".Subject: three\r\n\r\nlast"
STORE = {"uid-1": M1, "uid-2": M2, "uid-3": M3}
INFOS = [MessageInfo(uid, pop_size(body)) for uid, body in STORE.items()]
SIZES = (47, 58, 25)
TOTAL = sum(SIZES)  # 130

M1_WIRE = b"+OK 47 octets\r\n" + M1 + b".\r\n"
M2_WIRE = (
    b"+OK 58 octets\r\n"
    b"From: b@example\r\nSubject: two\r\n\r\n..hidden\r\nbody\r\n...two\r\n..\r\n"
    b".\r\n"
)
M3_WIRE = b"+OK 25 octets\r\n..Subject: three\r\n\r\nlast\r\n.\r\n"
SIGNOFF = b"+OK pop.example.test POP3 server signing off"


# ---------------------------------------------------------------- helpers


def new(**kw) -> Pop3Connection:
    conn = Pop3Connection(Pop3Limits(hostname=HOST, **kw))
    conn.greeting()
    assert conn.data_to_send() == GREETING
    return conn


def feed(conn: Pop3Connection, data: bytes | None = None) -> tuple[bytes, list]:
    """Feed data (None: nothing, b"": EOF); return (output, events up to a stop)."""
    if data is not None:
        conn.receive_data(data)
    events = []
    while True:
        ev = conn.next_event()
        events.append(ev)
        if ev is NEED_DATA or ev is PAUSED or isinstance(ev, ConnectionClosed):
            return conn.data_to_send(), events


def login(infos=INFOS, **kw) -> Pop3Connection:
    conn = new(**kw)
    out, evs = feed(conn, b"USER alice\r\nPASS secret\r\n")
    assert out == b"+OK send PASS\r\n"
    assert evs == [Authenticate("alice", "secret"), PAUSED]
    conn.auth_ok(list(infos))
    out, evs = feed(conn)
    assert out.startswith(b"+OK maildrop has ")
    assert evs == [NEED_DATA]
    assert conn.state == TRANSACTION
    return conn


def tx(conn: Pop3Connection, line: bytes) -> bytes:
    """One command with no event expected; its reply."""
    out, evs = feed(conn, line)
    assert evs == [NEED_DATA]
    return out


def run(chunks, store=STORE, **kw) -> tuple[bytes, list]:
    """Drive a whole session, answering decisions from `store` like a driver would."""
    conn = Pop3Connection(Pop3Limits(hostname=HOST, **kw))
    conn.greeting()
    out = bytearray(conn.data_to_send())
    events = []
    chunks = [*chunks, b""]
    while True:
        ev = conn.next_event()
        out += conn.data_to_send()
        if ev is NEED_DATA:
            conn.receive_data(chunks.pop(0))
            continue
        assert ev is not PAUSED
        events.append(ev)
        if isinstance(ev, Authenticate):
            conn.auth_ok([MessageInfo(u, pop_size(b)) for u, b in store.items()])
        elif isinstance(ev, Retrieve):
            conn.message_content(store[ev.uid])
        elif isinstance(ev, Update):
            conn.update_done(True)
        elif isinstance(ev, ConnectionClosed):
            out += conn.data_to_send()
            return bytes(out), events


# ---------------------------------------------------------------- message octets


def test_pop_normalize_and_size():
    assert pop_normalize(b"") == b""
    assert pop_normalize(b"a\nb\n") == b"a\r\nb\r\n"
    assert pop_normalize(b"a\r\nb") == b"a\r\nb\r\n"  # final CRLF added
    assert pop_normalize(b"a\r\r\nb\rc\r\n") == b"a\r\r\nb\rc\r\n"  # bare CR left alone
    assert pop_normalize(bytearray(b"x\n")) == b"x\r\n"
    assert [pop_size(m) for m in (M1, M2, M3)] == list(SIZES)
    assert pop_size(b"a\nb") == 6


def _unstuff(wire: bytes) -> bytes:
    """Client side: strip the status line and terminator, undo byte-stuffing."""
    first, _, rest = wire.partition(b"\r\n")
    assert first.startswith(b"+OK")
    assert rest.endswith(b"\r\n.\r\n") or rest == b".\r\n"
    body = rest[: -len(b".\r\n")]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_list_sizes_equal_retr_octets(n):
    conn = login()
    listed = tx(conn, b"LIST %d\r\n" % n)
    assert listed == b"+OK %d %d\r\n" % (n, SIZES[n - 1])
    feed(conn, b"RETR %d\r\n" % n)
    conn.message_content(STORE[f"uid-{n}"])
    wire, evs = feed(conn)
    assert evs == [Retrieved(f"uid-{n}", SIZES[n - 1]), NEED_DATA]
    assert len(_unstuff(wire)) == SIZES[n - 1]
    assert wire.startswith(b"+OK %d octets\r\n" % SIZES[n - 1])


# ---------------------------------------------------------------- greeting, CAPA


def test_greeting_once_and_no_apop_timestamp():
    conn = Pop3Connection(Pop3Limits(hostname=HOST))
    assert conn.state == AUTHORIZATION and not conn.closed and conn.user is None
    conn.greeting()
    assert conn.data_to_send() == GREETING
    with pytest.raises(RuntimeError):
        conn.greeting()


CAPA_FULL = (
    b"+OK Capability list follows\r\n"
    b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nUSER\r\nSASL PLAIN\r\n"
    b"IMPLEMENTATION mailpool\r\n.\r\n"
)
CAPA_NO_USER = CAPA_FULL.replace(b"USER\r\nSASL PLAIN\r\n", b"")
NO_CLEARTEXT = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections\r\n"


def test_capa_authorization_and_transaction():
    assert tx(new(), b"CAPA\r\n") == CAPA_FULL
    assert tx(login(), b"CAPA\r\n") == CAPA_FULL
    assert tx(new(), b"capa\r\n") == CAPA_FULL


def test_capa_without_cleartext_hides_user_until_tls():
    assert tx(new(allow_cleartext_login=False), b"CAPA\r\n") == CAPA_NO_USER
    assert tx(new(allow_cleartext_login=False, tls_active=True), b"CAPA\r\n") == CAPA_FULL


def test_capa_takes_no_argument():
    assert tx(new(), b"CAPA x\r\n") == b"-ERR too many arguments\r\n"


def test_capa_advertises_stls_only_with_hook():
    assert b"STLS" not in tx(new(), b"CAPA\r\n")
    assert tx(new(stls_available=True), b"CAPA\r\n") == CAPA_FULL.replace(
        b"SASL PLAIN\r\n", b"SASL PLAIN\r\nSTLS\r\n"
    )
    assert b"STLS" not in tx(new(stls_available=True, tls_active=True), b"CAPA\r\n")


# ---------------------------------------------------------------- AUTHORIZATION


def test_login_success():
    conn = new()
    out, evs = feed(conn, b"USER alice\r\n")
    assert (out, evs) == (b"+OK send PASS\r\n", [NEED_DATA])
    out, evs = feed(conn, b"PASS secret\r\n")
    assert (out, evs) == (b"", [Authenticate("alice", "secret"), PAUSED])
    assert feed(conn) == (b"", [PAUSED])  # still waiting for the driver
    assert conn.state == AUTHORIZATION and conn.user is None
    conn.auth_ok(INFOS)
    assert feed(conn) == (b"+OK maildrop has 3 messages (130 octets)\r\n", [NEED_DATA])
    assert conn.state == TRANSACTION and conn.user == "alice"
    assert conn.messages == tuple(INFOS)


@pytest.mark.parametrize(
    ("infos", "reply"),
    [
        ([], b"+OK maildrop has 0 messages (0 octets)\r\n"),
        (INFOS[:1], b"+OK maildrop has 1 message (47 octets)\r\n"),
    ],
)
def test_login_maildrop_counts(infos, reply):
    conn = new()
    feed(conn, b"USER alice\r\nPASS secret\r\n")
    conn.auth_ok(infos)
    assert feed(conn) == (reply, [NEED_DATA])


def test_password_is_rest_of_line_and_hidden_from_repr():
    conn = new()
    _, evs = feed(conn, b"user Bob\r\npass  my secret \r\n")
    assert evs == [Authenticate("Bob", " my secret "), PAUSED]
    assert "secret" not in repr(evs[0])


def test_password_octets_round_trip():
    conn = new()
    _, evs = feed(conn, b"USER b\xc3\xa9a\r\nPASS p\xff\xfe\xc3\xa9\r\n")
    ev = evs[0]
    assert ev.user == "b\u00e9a"
    assert ev.password.encode("utf-8", "surrogateescape") == b"p\xff\xfe\xc3\xa9"


@pytest.mark.parametrize(
    ("lines", "reply"),
    [
        (b"PASS secret\r\n", b"-ERR send USER first\r\n"),
        (b"USER\r\n", b"-ERR missing user name\r\n"),
        (b"USER \r\n", b"-ERR syntax error: arguments are separated by single spaces\r\n"),
        (b"USER a b\r\n", b"-ERR too many arguments\r\n"),
        (b"USER \xff\r\n", b"-ERR invalid user name\r\n"),
        (b"USER alice\r\nPASS\r\n", b"+OK send PASS\r\n-ERR missing password\r\n"),
        (b"USER alice\r\nPASS \r\n", b"+OK send PASS\r\n-ERR missing password\r\n"),
        # PASS must come right after USER (RFC 1939).
        (b"USER alice\r\nCAPA\r\nPASS x\r\n", b"+OK send PASS\r\n" + CAPA_FULL
         + b"-ERR send USER first\r\n"),
        (b"USER alice\r\nXYZ\r\nPASS x\r\n", b"+OK send PASS\r\n-ERR unknown command\r\n"
         b"-ERR send USER first\r\n"),
        (b"USER alice\r\nPASS x\r\n", None),  # sanity: this one does authenticate
    ],
)
def test_authorization_argument_errors(lines, reply):
    conn = new()
    out, evs = feed(conn, lines)
    if reply is None:
        assert evs[0] == Authenticate("alice", "x")
        return
    assert (out, evs) == (reply, [NEED_DATA])
    assert conn.state == AUTHORIZATION


def test_user_after_user_replaces_name():
    conn = new()
    _, evs = feed(conn, b"USER a\r\nUSER b\r\nPASS p\r\n")
    assert evs == [Authenticate("b", "p"), PAUSED]


def test_auth_failed_then_retry():
    conn = new()
    feed(conn, b"USER alice\r\nPASS wrong\r\n")
    conn.auth_failed()
    assert feed(conn) == (b"-ERR [AUTH] authentication failed\r\n", [NEED_DATA])
    assert conn.state == AUTHORIZATION and conn.user is None
    # The failed PASS used up the USER.
    assert tx(conn, b"PASS secret\r\n") == b"-ERR send USER first\r\n"
    feed(conn, b"USER alice\r\nPASS secret\r\n")
    conn.auth_ok(INFOS)
    assert feed(conn)[0] == b"+OK maildrop has 3 messages (130 octets)\r\n"


def test_auth_failed_without_code_and_custom_text():
    conn = new()
    feed(conn, b"USER a\r\nPASS b\r\n")
    conn.auth_failed(None, "no such mailbox or bad password")
    assert feed(conn)[0] == b"-ERR no such mailbox or bad password\r\n"
    feed(conn, b"USER a\r\nPASS b\r\n")
    conn.auth_failed("SYS/PERM", "account disabled")
    assert feed(conn)[0] == b"-ERR [SYS/PERM] account disabled\r\n"


def test_maildrop_in_use():
    conn = new()
    feed(conn, b"USER alice\r\nPASS secret\r\n")
    conn.maildrop_busy()
    assert feed(conn) == (b"-ERR [IN-USE] maildrop already locked\r\n", [NEED_DATA])
    assert conn.state == AUTHORIZATION and conn.user is None


def test_sys_temp_error_on_authenticate():
    conn = new()
    feed(conn, b"USER alice\r\nPASS secret\r\n")
    conn.sys_temp_error("directory unavailable")
    assert feed(conn) == (b"-ERR [SYS/TEMP] directory unavailable\r\n", [NEED_DATA])
    assert conn.state == AUTHORIZATION


def test_cleartext_disabled():
    conn = new(allow_cleartext_login=False)
    assert tx(conn, b"USER alice\r\n") == NO_CLEARTEXT
    assert tx(conn, b"PASS secret\r\n") == NO_CLEARTEXT
    assert conn.state == AUTHORIZATION


def test_cleartext_disabled_but_tls_active():
    conn = new(allow_cleartext_login=False, tls_active=True)
    _, evs = feed(conn, b"USER alice\r\nPASS secret\r\n")
    assert evs == [Authenticate("alice", "secret"), PAUSED]


def test_quit_in_authorization():
    conn = new()
    out, evs = feed(conn, b"QUIT\r\n")
    assert out == SIGNOFF + b"\r\n"
    assert evs == [Quit(), ConnectionClosed("quit")]
    assert conn.closed and conn.state == CLOSED
    assert conn.next_event() == ConnectionClosed("quit")  # stays closed


def test_quit_in_authorization_with_argument():
    assert tx(new(), b"QUIT now\r\n") == b"-ERR too many arguments\r\n"


@pytest.mark.parametrize(
    "cmd", [b"STAT", b"LIST", b"UIDL", b"RETR 1", b"DELE 1", b"RSET", b"TOP 1 0", b"NOOP"]
)
def test_transaction_commands_refused_in_authorization(cmd):
    name = cmd.split()[0]
    assert tx(new(), cmd + b"\r\n") == b"-ERR " + name + b" not allowed in AUTHORIZATION state\r\n"


@pytest.mark.parametrize("cmd", [b"USER alice", b"PASS x"])
def test_authorization_commands_refused_in_transaction(cmd):
    name = cmd.split()[0]
    assert tx(login(), cmd + b"\r\n") == b"-ERR " + name + b" not allowed in TRANSACTION state\r\n"


@pytest.mark.parametrize(
    "line",
    [b"APOP alice c4c9334bac560ecc979e58001b3e22fb", b"STLS", b"XYZZY", b"", b" STAT",
     b"RE-TR 1", b"\xc3\xa9TAT", b"STAT\t", b"AVERYLONGKEYWORDINDEED"],
)
def test_unknown_commands(line):
    assert tx(new(), line + b"\r\n") == b"-ERR unknown command\r\n"
    assert tx(login(), line + b"\r\n") == b"-ERR unknown command\r\n"


# ---------------------------------------------------------------- TRANSACTION


def test_stat_list_uidl_noop():
    conn = login()
    assert tx(conn, b"STAT\r\n") == b"+OK 3 130\r\n"
    assert tx(conn, b"LIST\r\n") == (
        b"+OK 3 messages (130 octets)\r\n1 47\r\n2 58\r\n3 25\r\n.\r\n"
    )
    assert tx(conn, b"LIST 2\r\n") == b"+OK 2 58\r\n"
    assert tx(conn, b"UIDL\r\n") == (
        b"+OK unique-id listing follows\r\n1 uid-1\r\n2 uid-2\r\n3 uid-3\r\n.\r\n"
    )
    assert tx(conn, b"UIDL 3\r\n") == b"+OK 3 uid-3\r\n"
    assert tx(conn, b"NOOP\r\n") == b"+OK\r\n"
    assert tx(conn, b"noop\r\n") == b"+OK\r\n"
    assert tx(conn, b"LiSt 1\r\n") == b"+OK 1 47\r\n"


def test_empty_maildrop_listings():
    conn = login(infos=[])
    assert tx(conn, b"STAT\r\n") == b"+OK 0 0\r\n"
    assert tx(conn, b"LIST\r\n") == b"+OK 0 messages (0 octets)\r\n.\r\n"
    assert tx(conn, b"UIDL\r\n") == b"+OK unique-id listing follows\r\n.\r\n"
    assert tx(conn, b"RETR 1\r\n") == b"-ERR no such message, only 0 messages in maildrop\r\n"


@pytest.mark.parametrize("cmd", [b"STAT", b"RSET", b"NOOP", b"QUIT"])
def test_no_argument_commands_refuse_arguments(cmd):
    assert tx(login(), cmd + b" 1\r\n") == b"-ERR too many arguments\r\n"


NO_SUCH = b"-ERR no such message, only 3 messages in maildrop\r\n"
INVALID = b"-ERR invalid message number\r\n"
SYNTAX = b"-ERR syntax error: arguments are separated by single spaces\r\n"
BAD_NUMBERS = [
    (b"0", NO_SUCH),
    (b"4", NO_SUCH),
    (b"99999999999999999999", NO_SUCH),
    (b"00", NO_SUCH),
    (b"-1", INVALID),
    (b"+1", INVALID),
    (b"abc", INVALID),
    (b"1a", INVALID),
    (b"1.0", INVALID),
    (b"0x1", INVALID),
    ("\u0661".encode(), INVALID),  # ARABIC-INDIC DIGIT ONE: str.isdigit() would say yes
    (b"\xff", INVALID),
    (b" 1", SYNTAX),  # two spaces after the keyword
]


@pytest.mark.parametrize("cmd", [b"LIST", b"UIDL", b"RETR", b"DELE", b"TOP"])
@pytest.mark.parametrize(("arg", "reply"), BAD_NUMBERS)
def test_bad_message_numbers(cmd, arg, reply):
    conn = login()
    tail = b" 0" if cmd == b"TOP" else b""
    assert tx(conn, cmd + b" " + arg + tail + b"\r\n") == reply
    assert conn.state == TRANSACTION and conn.deleted_uids == ()


@pytest.mark.parametrize("cmd", [b"RETR", b"DELE", b"TOP"])
def test_missing_message_number(cmd):
    assert tx(login(), cmd + b"\r\n") == b"-ERR missing message number\r\n"


@pytest.mark.parametrize("cmd", [b"LIST", b"UIDL", b"RETR", b"DELE"])
def test_too_many_arguments_and_spacing(cmd):
    conn = login()
    assert tx(conn, cmd + b" 1 2\r\n") == b"-ERR too many arguments\r\n"
    assert tx(conn, cmd + b" 1 \r\n") == SYNTAX
    assert tx(conn, cmd + b"  1\r\n") == SYNTAX
    assert tx(conn, cmd + b" \r\n") == SYNTAX


@pytest.mark.parametrize("cmd", [b"LIST 2", b"UIDL 2", b"RETR 2", b"DELE 2", b"TOP 2 1"])
def test_deleted_message_refused(cmd):
    conn = login()
    feed(conn, b"DELE 2\r\n")
    assert tx(conn, cmd + b"\r\n") == b"-ERR message 2 already deleted\r\n"


def test_retr_exact_bytes_and_event():
    conn = login()
    out, evs = feed(conn, b"RETR 1\r\n")
    assert (out, evs) == (b"", [Retrieve(1, "uid-1", None), PAUSED])
    conn.message_content(M1)
    assert feed(conn) == (M1_WIRE, [Retrieved("uid-1", 47), NEED_DATA])


def test_retr_converts_bare_lf_and_byte_stuffs():
    conn = login()
    _, evs = feed(conn, b"RETR 2\r\n")
    assert evs[0] == Retrieve(2, "uid-2", None)
    conn.message_content(M2)
    assert feed(conn) == (M2_WIRE, [Retrieved("uid-2", 58), NEED_DATA])


def test_retr_first_line_dot_and_missing_final_newline():
    conn = login()
    feed(conn, b"RETR 3\r\n")
    conn.message_content(M3)
    assert feed(conn) == (M3_WIRE, [Retrieved("uid-3", 25), NEED_DATA])


def test_retr_empty_message():
    conn = login(infos=[MessageInfo("e", 0)])
    feed(conn, b"RETR 1\r\n")
    conn.message_content(b"")
    assert feed(conn) == (b"+OK 0 octets\r\n.\r\n", [Retrieved("e", 0), NEED_DATA])


def test_retr_sys_temp_error_keeps_transaction():
    conn = login()
    feed(conn, b"RETR 1\r\n")
    conn.sys_temp_error("cannot read message")
    assert feed(conn) == (b"-ERR [SYS/TEMP] cannot read message\r\n", [NEED_DATA])
    assert conn.state == TRANSACTION


TOP_HEAD = b"+OK top of message follows\r\n"
M2_HEAD = b"From: b@example\r\nSubject: two\r\n\r\n"


@pytest.mark.parametrize(
    ("n", "body"),
    [
        (0, b""),
        (1, b"..hidden\r\n"),
        (3, b"..hidden\r\nbody\r\n...two\r\n"),
        (4, b"..hidden\r\nbody\r\n...two\r\n..\r\n"),
        (5, b"..hidden\r\nbody\r\n...two\r\n..\r\n"),
        (99999999999999999999, b"..hidden\r\nbody\r\n...two\r\n..\r\n"),
    ],
)
def test_top(n, body):
    conn = login()
    out, evs = feed(conn, b"TOP 2 %d\r\n" % n)
    # Counts beyond 18 digits are capped: still "the whole body".
    assert (out, evs) == (b"", [Retrieve(2, "uid-2", min(n, 10**18)), PAUSED])
    conn.message_content(M2)
    # TOP gives no Retrieved event: the message was not read whole.
    assert feed(conn) == (TOP_HEAD + M2_HEAD + body + b".\r\n", [NEED_DATA])


def test_numbers_beyond_int_conversion_limits():
    conn = login(max_line=20000)
    digits = b"9" * 6000
    assert tx(conn, b"RETR " + digits + b"\r\n") == NO_SUCH
    assert tx(conn, b"LIST " + b"0" * 6000 + b"1\r\n") == b"+OK 1 47\r\n"
    _, evs = feed(conn, b"TOP 1 " + digits + b"\r\n")
    assert evs[0] == Retrieve(1, "uid-1", 10**18)
    conn.message_content(M1)
    assert feed(conn)[0] == TOP_HEAD + M1 + b".\r\n"


@pytest.mark.parametrize(
    ("content", "n", "sent"),
    [
        (b"Subject: x\r\nX: y\r\n", 5, b"Subject: x\r\nX: y\r\n"),  # no blank line: headers only
        (b"\r\nbody1\r\nbody2\r\n", 1, b"\r\nbody1\r\n"),  # no headers
        (b"A: b\n\nl1\nl2", 1, b"A: b\r\n\r\nl1\r\n"),  # bare LF, no final newline
        (b"A: b\n\nl1\nl2", 2, b"A: b\r\n\r\nl1\r\nl2\r\n"),
        (b"", 3, b""),
    ],
)
def test_top_shapes(content, n, sent):
    conn = login(infos=[MessageInfo("x", pop_size(content))])
    feed(conn, b"TOP 1 %d\r\n" % n)
    conn.message_content(content)
    assert feed(conn)[0] == TOP_HEAD + sent + b".\r\n"


@pytest.mark.parametrize(
    ("args", "reply"),
    [
        (b"TOP 1", b"-ERR missing line count\r\n"),
        (b"TOP 1 -1", b"-ERR invalid line count\r\n"),
        (b"TOP 1 +1", b"-ERR invalid line count\r\n"),
        (b"TOP 1 abc", b"-ERR invalid line count\r\n"),
        (b"TOP 1 1.5", b"-ERR invalid line count\r\n"),
        (b"TOP 1 2 3", b"-ERR too many arguments\r\n"),
        (b"TOP 1  2", SYNTAX),
        (b"TOP 1 2 ", SYNTAX),
    ],
)
def test_top_bad_line_count(args, reply):
    assert tx(login(), args + b"\r\n") == reply


def test_dele_hides_message_and_rset_restores():
    conn = login()
    out, evs = feed(conn, b"DELE 1\r\n")
    assert (out, evs) == (b"+OK message 1 deleted\r\n", [Deleted("uid-1"), NEED_DATA])
    assert tx(conn, b"STAT\r\n") == b"+OK 2 83\r\n"
    assert tx(conn, b"LIST\r\n") == b"+OK 2 messages (83 octets)\r\n2 58\r\n3 25\r\n.\r\n"
    assert tx(conn, b"UIDL\r\n") == b"+OK unique-id listing follows\r\n2 uid-2\r\n3 uid-3\r\n.\r\n"
    assert tx(conn, b"LIST 3\r\n") == b"+OK 3 25\r\n"  # numbers do not shift
    out, evs = feed(conn, b"DELE 3\r\n")
    assert (out, evs) == (b"+OK message 3 deleted\r\n", [Deleted("uid-3"), NEED_DATA])
    assert conn.deleted_uids == ("uid-1", "uid-3")
    out, evs = feed(conn, b"RSET\r\n")
    assert out == b"+OK maildrop has 3 messages (130 octets)\r\n"
    assert evs == [Undeleted(("uid-1", "uid-3")), NEED_DATA]
    assert tx(conn, b"STAT\r\n") == b"+OK 3 130\r\n"
    assert conn.deleted_uids == ()


def test_rset_with_nothing_deleted_has_no_event():
    assert tx(login(), b"RSET\r\n") == b"+OK maildrop has 3 messages (130 octets)\r\n"


# ---------------------------------------------------------------- UPDATE and endings


def test_quit_with_deletions_updates():
    conn = login()
    feed(conn, b"DELE 3\r\n")
    feed(conn, b"DELE 1\r\n")
    out, evs = feed(conn, b"QUIT\r\n")
    assert (out, evs) == (b"", [Update(("uid-1", "uid-3")), PAUSED])  # number order
    assert conn.state == UPDATE and not conn.closed
    conn.update_done()
    out, evs = feed(conn)
    assert out == SIGNOFF + b" (1 message left)\r\n"
    assert evs == [ConnectionClosed("quit")]
    assert conn.closed


def test_quit_without_deletions_still_updates_with_empty_tuple():
    conn = login()
    assert feed(conn, b"QUIT\r\n") == (b"", [Update(()), PAUSED])
    conn.update_done(True)
    assert feed(conn) == (SIGNOFF + b" (3 messages left)\r\n", [ConnectionClosed("quit")])


def test_update_failed():
    conn = login()
    feed(conn, b"DELE 1\r\nQUIT\r\n")
    conn.update_done(ok=False)
    assert feed(conn) == (
        b"-ERR [SYS/TEMP] some deleted messages not removed\r\n",
        [ConnectionClosed("quit")],
    )


def test_update_sys_temp_error_closes():
    conn = login()
    feed(conn, b"DELE 1\r\nQUIT\r\n")
    conn.sys_temp_error("maildrop vanished")
    assert feed(conn) == (b"-ERR [SYS/TEMP] maildrop vanished\r\n", [ConnectionClosed("quit")])


def test_eof_in_transaction_never_updates():
    conn = login()
    feed(conn, b"DELE 1\r\nDELE 2\r\n")
    out, evs = feed(conn, b"QUI")  # a partial command, then EOF
    assert (out, evs) == (b"", [NEED_DATA])
    out, evs = feed(conn, b"")
    assert (out, evs) == (b"", [ConnectionClosed("eof")])
    assert conn.closed
    assert conn.next_event() == ConnectionClosed("eof")


def test_eof_in_authorization():
    conn = new()
    assert feed(conn, b"") == (b"", [ConnectionClosed("eof")])


def test_quit_then_eof_in_one_chunk_still_updates():
    conn = login()
    conn.receive_data(b"DELE 2\r\nQUIT\r\n")
    conn.receive_data(b"")  # EOF arrives while the QUIT is still buffered
    out, evs = feed(conn)
    assert out == b"+OK message 2 deleted\r\n"
    assert evs == [Deleted("uid-2"), Update(("uid-2",)), PAUSED]
    conn.update_done()
    assert feed(conn) == (SIGNOFF + b" (2 messages left)\r\n", [ConnectionClosed("quit")])


def test_input_after_quit_is_ignored():
    conn = new()
    out, evs = feed(conn, b"QUIT\r\nNOOP\r\n")
    assert (out, evs) == (SIGNOFF + b"\r\n", [Quit(), ConnectionClosed("quit")])
    conn.receive_data(b"STAT\r\n")
    assert feed(conn) == (b"", [ConnectionClosed("quit")])


def test_timeout_closes_silently_without_update():
    conn = login()
    feed(conn, b"DELE 1\r\n")
    conn.timeout()
    assert feed(conn) == (b"", [ConnectionClosed("timeout")])
    conn.timeout()  # harmless once closed
    assert conn.closed


def test_timeout_while_decision_pending_is_a_driver_bug():
    conn = login()
    feed(conn, b"RETR 1\r\n")
    with pytest.raises(RuntimeError):
        conn.timeout()


# ---------------------------------------------------------------- lines and errors


def test_line_of_exactly_max_line_is_accepted():
    name = b"x" * (255 - len(b"USER \r\n"))
    assert tx(new(), b"USER " + name + b"\r\n") == b"+OK send PASS\r\n"


def test_long_line_discarded_then_next_command_runs():
    long = b"USER " + b"x" * 249 + b"\r\n"  # 256 octets
    assert len(long) == 256
    assert tx(new(), long + b"NOOP\r\nCAPA\r\n") == (
        b"-ERR line too long\r\n-ERR NOOP not allowed in AUTHORIZATION state\r\n" + CAPA_FULL
    )


def test_long_line_bytewise_gives_one_error():
    conn = new()
    out = bytearray()
    for b in b"X" * 5000 + b"\r\nCAPA\r\n":
        o, evs = feed(conn, bytes([b]))
        assert evs == [NEED_DATA]
        out += o
    assert bytes(out) == b"-ERR line too long\r\n" + CAPA_FULL


def test_long_line_ended_by_eof_gets_no_reply():
    conn = new()
    feed(conn, b"A" * 1000)
    assert feed(conn, b"") == (b"", [ConnectionClosed("eof")])


def test_small_max_line():
    conn = new(max_line=16)
    assert tx(conn, b"USER 012345678\r\n") == b"+OK send PASS\r\n"  # 16 octets
    assert tx(conn, b"USER 0123456789\r\n") == b"-ERR line too long\r\n"


def test_bare_lf_line_end_accepted():
    assert tx(new(), b"CAPA\n") == CAPA_FULL


def test_error_limit_closes():
    conn = new()
    out, evs = feed(conn, b"BAD\r\n" * 12)
    assert out == b"-ERR unknown command\r\n" * 9 + b"-ERR too many errors\r\n"
    assert evs == [ConnectionClosed("errors")]


def test_error_limit_counts_all_client_errors_not_in_use():
    conn = new(hard_error_limit=3)
    feed(conn, b"USER a\r\nPASS b\r\n")
    conn.maildrop_busy()  # not the client's fault: not counted
    assert feed(conn)[0] == b"-ERR [IN-USE] maildrop already locked\r\n"
    feed(conn, b"USER a\r\nPASS b\r\n")
    conn.auth_failed()  # 1
    assert feed(conn)[0] == b"-ERR [AUTH] authentication failed\r\n"
    assert tx(conn, b"STAT\r\n") == b"-ERR STAT not allowed in AUTHORIZATION state\r\n"  # 2
    feed(conn, b"USER a\r\nPASS b\r\n")
    conn.auth_failed()  # 3
    assert feed(conn) == (b"-ERR too many errors\r\n", [ConnectionClosed("errors")])


def test_error_limit_in_transaction_drops_deletions():
    conn = login(hard_error_limit=2)
    feed(conn, b"DELE 1\r\n")
    out, evs = feed(conn, b"RETR 0\r\nRETR 9\r\nQUIT\r\n")
    assert out == NO_SUCH + b"-ERR too many errors\r\n"
    assert evs == [ConnectionClosed("errors")]  # no Update: the QUIT was never read


# ---------------------------------------------------------------- pipelining


SESSION = (
    b"CAPA\r\nUSER alice\r\nPASS secret\r\nSTAT\r\nLIST\r\nUIDL 2\r\nRETR 2\r\n"
    b"TOP 1 1\r\nDELE 1\r\nDELE 2\r\nRSET\r\nDELE 3\r\nRETR 3\r\nlist\r\nQUIT\r\n"
)
SESSION_OUT = (
    GREETING
    + CAPA_FULL
    + b"+OK send PASS\r\n"
    + b"+OK maildrop has 3 messages (130 octets)\r\n"
    + b"+OK 3 130\r\n"
    + b"+OK 3 messages (130 octets)\r\n1 47\r\n2 58\r\n3 25\r\n.\r\n"
    + b"+OK 2 uid-2\r\n"
    + M2_WIRE
    + TOP_HEAD + b"From: a@example\r\nSubject: one\r\n\r\nline1\r\n.\r\n"
    + b"+OK message 1 deleted\r\n"
    + b"+OK message 2 deleted\r\n"
    + b"+OK maildrop has 3 messages (130 octets)\r\n"
    + b"+OK message 3 deleted\r\n"
    + b"-ERR message 3 already deleted\r\n"
    + b"+OK 2 messages (105 octets)\r\n1 47\r\n2 58\r\n.\r\n"
    + SIGNOFF + b" (2 messages left)\r\n"
)
SESSION_EVENTS = [
    Authenticate("alice", "secret"),
    Retrieve(2, "uid-2", None),
    Retrieved("uid-2", 58),
    Retrieve(1, "uid-1", 1),
    Deleted("uid-1"),
    Deleted("uid-2"),
    Undeleted(("uid-1", "uid-2")),
    Deleted("uid-3"),
    Update(("uid-3",)),
    ConnectionClosed("quit"),
]


def test_pipelined_session_in_one_chunk():
    assert run([SESSION]) == (SESSION_OUT, SESSION_EVENTS)


def test_session_fed_one_byte_at_a_time():
    assert run([bytes([b]) for b in SESSION]) == (SESSION_OUT, SESSION_EVENTS)


def test_session_in_odd_chunks_with_lf_only():
    data = SESSION.replace(b"\r\n", b"\n")
    chunks = [data[i : i + 7] for i in range(0, len(data), 7)]
    assert run(chunks) == (SESSION_OUT, SESSION_EVENTS)


def test_pipelined_commands_wait_behind_a_decision():
    conn = login()
    out, evs = feed(conn, b"RETR 1\r\nSTAT\r\nNOOP\r\n")
    assert (out, evs) == (b"", [Retrieve(1, "uid-1", None), PAUSED])
    conn.message_content(M1)
    out, evs = feed(conn)
    assert evs == [Retrieved("uid-1", 47), NEED_DATA]
    assert out == M1_WIRE + b"+OK 3 130\r\n+OK\r\n"


# ---------------------------------------------------------------- STLS hook


def test_stls_hook():
    conn = new(stls_available=True, allow_cleartext_login=False)
    assert tx(conn, b"USER alice\r\n") == NO_CLEARTEXT
    out, evs = feed(conn, b"STLS\r\nUSER injected\r\n")
    assert (out, evs) == (b"+OK begin TLS negotiation\r\n", [StartTls(15), PAUSED])
    conn.receive_data(b"PASS injected\r\n")  # plaintext before the handshake: dropped
    conn.tls_established()
    assert conn.tls_active
    assert feed(conn) == (b"", [NEED_DATA])
    assert tx(conn, b"CAPA\r\n") == CAPA_FULL
    assert tx(conn, b"STLS\r\n") == b"-ERR TLS already active\r\n"
    _, evs = feed(conn, b"USER alice\r\nPASS secret\r\n")
    assert evs == [Authenticate("alice", "secret"), PAUSED]
    conn.auth_ok(INFOS)
    feed(conn)
    assert tx(conn, b"STLS\r\n") == b"-ERR STLS not allowed in TRANSACTION state\r\n"


def test_stls_discards_pipelined_user():
    conn = new(stls_available=True)
    out, evs = feed(conn, b"CAPA\r\nSTLS\r\nUSER alice\r\n")
    assert out == CAPA_FULL.replace(b"SASL PLAIN\r\n", b"SASL PLAIN\r\nSTLS\r\n") + (
        b"+OK begin TLS negotiation\r\n")
    assert evs == [StartTls(len(b"USER alice\r\n")), PAUSED]
    conn.tls_established("TLSv1.3 TLS_AES_128_GCM_SHA256 128")
    assert conn.cipher_info == "TLSv1.3 TLS_AES_128_GCM_SHA256 128"
    assert feed(conn) == (b"", [NEED_DATA])  # the USER is never answered...
    assert tx(conn, b"PASS secret\r\n") == b"-ERR send USER first\r\n"  # ...nor remembered


def test_stls_discards_a_partial_line_too():
    conn = new(stls_available=True)
    feed(conn, b"STLS\r\nQUI")
    conn.tls_established()
    assert tx(conn, b"T\r\n") == b"-ERR unknown command\r\n"


def test_stls_refused_forms():
    conn = new(stls_available=True)
    assert tx(conn, b"STLS now\r\n") == b"-ERR too many arguments\r\n"
    assert tx(new(stls_available=True, tls_active=True), b"STLS\r\n") == (
        b"-ERR TLS already active\r\n")


def test_tls_failed_closes_silently():
    conn = new(stls_available=True)
    feed(conn, b"STLS\r\n")
    conn.tls_failed()
    assert feed(conn) == (b"", [ConnectionClosed("tls")])
    assert not conn.tls_active
    with pytest.raises(RuntimeError):
        conn.tls_failed()


# ---------------------------------------------------------------- AUTH (RFC 5034)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


PLAIN_ALICE = b64(b"\0alice\0secret")


def test_auth_lists_mechanisms():
    assert tx(new(), b"AUTH\r\n") == b"+OK\r\nPLAIN\r\n.\r\n"


def test_auth_plain_with_initial_response():
    conn = new()
    out, evs = feed(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\nSTAT\r\n")
    assert (out, evs) == (b"", [Authenticate("alice", "secret"), PAUSED])
    conn.auth_ok(INFOS)
    assert feed(conn) == (b"+OK maildrop has 3 messages (130 octets)\r\n+OK 3 130\r\n",
                          [NEED_DATA])
    assert conn.state == TRANSACTION and conn.user == "alice"


def test_auth_plain_after_empty_continuation():
    conn = new()
    assert tx(conn, b"auth plain\r\n") == b"+ \r\n"
    out, evs = feed(conn, b64(b"alice\0alice\0p\xffw") + b"\r\n")
    assert out == b""
    assert evs == [Authenticate("alice", "p\udcffw"), PAUSED]
    assert evs[0].password.encode("utf-8", "surrogateescape") == b"p\xffw"


def test_auth_plain_failure_is_the_pass_failure():
    conn = new()
    feed(conn, b"AUTH PLAIN " + b64(b"\0alice\0wrong") + b"\r\n")
    conn.auth_failed()
    assert feed(conn) == (b"-ERR [AUTH] authentication failed\r\n", [NEED_DATA])
    assert conn.state == AUTHORIZATION and conn.user is None
    feed(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
    conn.maildrop_busy()
    assert feed(conn)[0] == b"-ERR [IN-USE] maildrop already locked\r\n"


@pytest.mark.parametrize(
    ("lines", "reply", "reason"),
    [
        (b"AUTH PLAIN\r\n*\r\n", b"+ \r\n-ERR [AUTH] authentication cancelled\r\n",
         "cancelled"),
        (b"AUTH PLAIN\r\nnot base64\r\n", b"+ \r\n-ERR invalid base64 data\r\n",
         "bad-base64"),
        (b"AUTH PLAIN *\r\n", b"-ERR invalid base64 data\r\n", "bad-base64"),
        # "QUIT" is valid base64: as a response it is decoded, never run.
        (b"AUTH PLAIN\r\nQUIT\r\n", b"+ \r\n-ERR malformed authentication response\r\n",
         "malformed"),
        (b"AUTH PLAIN =\r\n", b"-ERR malformed authentication response\r\n", "malformed"),
        (b"AUTH PLAIN " + b64(b"bob\0alice\0secret") + b"\r\n",
         b"-ERR [AUTH] authentication failed\r\n", "authzid"),
    ],
)
def test_auth_exchange_ended_by_the_core(lines, reply, reason):
    conn = new(hard_error_limit=2)
    out, evs = feed(conn, lines + b"NOOP\r\n")
    assert out == reply + b"-ERR too many errors\r\n"  # counted: the NOOP is the 2nd error
    assert evs == [AuthAborted("PLAIN", reason), ConnectionClosed("errors")]


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"AUTH LOGIN", b"-ERR unrecognized authentication mechanism\r\n"),
        (b"AUTH CRAM-MD5", b"-ERR unrecognized authentication mechanism\r\n"),
        (b"AUTH \xff\xfe", b"-ERR unrecognized authentication mechanism\r\n"),
        (b"AUTH PLAIN a b", b"-ERR too many arguments\r\n"),
        (b"AUTH  PLAIN", b"-ERR syntax error: arguments are separated by single spaces\r\n"),
    ],
)
def test_auth_refused_forms(line, reply):
    assert tx(new(), line + b"\r\n") == reply


def test_auth_in_transaction():
    assert tx(login(), b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n") == (
        b"-ERR AUTH not allowed in TRANSACTION state\r\n")


def test_auth_uses_up_a_given_user():
    conn = new()
    out, evs = feed(conn, b"USER alice\r\nAUTH PLAIN\r\n*\r\nPASS secret\r\n")
    assert out == (
        b"+OK send PASS\r\n+ \r\n-ERR [AUTH] authentication cancelled\r\n"
        b"-ERR send USER first\r\n"
    )
    assert evs == [AuthAborted("PLAIN", "cancelled"), NEED_DATA]


def test_logins_refused_without_tls():
    conn = new(allow_cleartext_login=False)
    for line in (b"AUTH", b"AUTH PLAIN", b"AUTH PLAIN " + PLAIN_ALICE, b"USER alice"):
        assert tx(conn, line + b"\r\n") == NO_CLEARTEXT
    assert tx(conn, b"CAPA\r\n") == CAPA_NO_USER
    conn = new(allow_cleartext_login=False, tls_active=True)
    assert tx(conn, b"CAPA\r\n") == CAPA_FULL
    _, evs = feed(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
    assert evs == [Authenticate("alice", "secret"), PAUSED]


def test_logins_open_after_stls():
    conn = new(stls_available=True, allow_cleartext_login=False)
    assert tx(conn, b"CAPA\r\n") == CAPA_NO_USER.replace(
        b"PIPELINING\r\n", b"PIPELINING\r\nSTLS\r\n")
    assert tx(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n") == NO_CLEARTEXT
    feed(conn, b"STLS\r\n")
    conn.tls_established()
    assert tx(conn, b"CAPA\r\n") == CAPA_FULL
    _, evs = feed(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
    assert evs == [Authenticate("alice", "secret"), PAUSED]


def test_auth_response_line_limit():
    conn = new()
    longest = b64(b"\0alice\0" + b"p" * 9206)  # 12284 octets + CRLF: within 12288
    assert tx(conn, b"AUTH PLAIN\r\n") == b"+ \r\n"
    _, evs = feed(conn, longest + b"\r\n")
    assert evs == [Authenticate("alice", "p" * 9206), PAUSED]
    conn.auth_failed()
    feed(conn)
    assert tx(conn, b"AUTH PLAIN\r\n") == b"+ \r\n"
    for _ in range(10):  # 12290 octets in pieces: never held whole
        assert feed(conn, b"A" * 1229) == (b"", [NEED_DATA])
        assert len(conn._in) < 12288
    out, evs = feed(conn, b"\r\nNOOP\r\n")
    assert out == b"-ERR line too long\r\n-ERR NOOP not allowed in AUTHORIZATION state\r\n"
    assert evs == [AuthAborted("PLAIN", "too-long"), NEED_DATA]


def test_auth_response_limit_respects_a_small_buffer():
    conn = new(max_buffer=1024)
    assert tx(conn, b"AUTH PLAIN\r\n") == b"+ \r\n"
    out, evs = feed(conn, b"A" * 1024)  # cannot end within the buffer: dropped, not raised
    assert (out, evs) == (b"", [NEED_DATA])
    out, evs = feed(conn, b"\r\n")
    assert out == b"-ERR line too long\r\n"


def test_error_limit_counts_auth_failures():
    conn = new(hard_error_limit=2)
    feed(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
    conn.auth_failed()
    assert feed(conn) == (b"-ERR [AUTH] authentication failed\r\n", [NEED_DATA])
    feed(conn, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
    conn.auth_failed()  # the limit-th error is answered with the limit's words
    assert feed(conn) == (b"-ERR too many errors\r\n", [ConnectionClosed("errors")])


def test_eof_during_auth_exchange():
    conn = new()
    tx(conn, b"AUTH PLAIN\r\n")
    assert feed(conn, b"") == (b"", [ConnectionClosed("eof")])


# ---------------------------------------------------------------- driver contract


def test_answers_without_pending_decision_raise():
    conn = new()
    for call in (
        lambda: conn.auth_ok([]),
        conn.auth_failed,
        conn.maildrop_busy,
        lambda: conn.sys_temp_error("x"),
        lambda: conn.message_content(b""),
        conn.update_done,
        conn.tls_established,
    ):
        with pytest.raises(RuntimeError):
            call()
    feed(conn, b"USER a\r\nPASS b\r\n")
    with pytest.raises(RuntimeError):
        conn.message_content(b"x")
    with pytest.raises(RuntimeError):
        conn.update_done()


def test_answer_must_follow_next_event():
    conn = new()
    conn.receive_data(b"USER a\r\nPASS b\r\n")
    with pytest.raises(RuntimeError):
        conn.auth_ok([])  # the Authenticate has not been returned yet


def test_bad_driver_values():
    conn = new()
    feed(conn, b"USER a\r\nPASS b\r\n")
    with pytest.raises(ValueError):
        conn.auth_ok([MessageInfo("u", 1), MessageInfo("u", 2)])
    with pytest.raises(ValueError):
        conn.auth_failed("AUTH", "two\r\nlines")
    with pytest.raises(ValueError):
        conn.auth_failed("bad code", "x")
    conn.auth_failed()
    assert feed(conn)[0] == b"-ERR [AUTH] authentication failed\r\n"


@pytest.mark.parametrize("uid", ["", "a b", "x" * 71, "caf\u00e9", "tab\t"])
def test_message_info_rejects_bad_uid(uid):
    with pytest.raises(ValueError):
        MessageInfo(uid, 1)


def test_message_info_and_limits_validation():
    assert MessageInfo("~" * 70, 0).uid == "~" * 70
    with pytest.raises(ValueError):
        MessageInfo("u", -1)
    for bad in ({"hostname": ""}, {"hostname": "a b"}, {"hostname": "h", "max_line": 8},
                {"hostname": "h", "hard_error_limit": 0}):
        with pytest.raises(ValueError):
            Pop3Limits(**bad)


def test_input_buffer_is_bounded():
    conn = new(max_buffer=1024)
    conn.receive_data(b"NOOP\r\n" * 100)
    with pytest.raises(RuntimeError):
        conn.receive_data(b"NOOP\r\n" * 100)
