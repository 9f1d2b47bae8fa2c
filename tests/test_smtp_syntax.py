"""Tests of the SMTP grammar shared by the server and client cores."""

from __future__ import annotations

import random

import pytest

from mailpool.protocol import smtp_client, smtp_server
from mailpool.protocol.smtp_syntax import (
    ENHANCED_RE,
    MAX_DOMAIN,
    MAX_LOCAL_PART,
    MAX_PATH,
    NEED_DATA,
    PAUSED,
    TOO_LONG,
    LineReader,
    Reply,
    ReplyParser,
    ReplySyntaxError,
    address_literal_ok,
    enhanced_of,
    hello_argument_ok,
    is_mailbox,
    parse_params,
    parse_path,
    path_length_ok,
    split_path,
    xtext_decode,
    xtext_encode,
)


def test_one_set_of_sentinels() -> None:
    assert smtp_server.NEED_DATA is NEED_DATA
    assert smtp_server.PAUSED is PAUSED
    assert smtp_client.NEED_DATA is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"
    assert NEED_DATA is not PAUSED


# -- paths and parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "result"),
    [
        ("<a@b.c>", ("a@b.c", "")),
        ("<a@b.c> SIZE=1", ("a@b.c", " SIZE=1")),
        ('<"x>y"@b.c>', ('"x>y"@b.c', "")),
        ('<"x\\">y"@b.c> A', ('"x\\">y"@b.c', " A")),
        ("<>", ("", "")),
        ("a@b.c", None),
        ("<a@b.c", None),
        ("<a@b.c>SIZE=1", None),
    ],
)
def test_split_path(text: str, result: tuple[str, str] | None) -> None:
    assert split_path(text) == result


@pytest.mark.parametrize(
    ("path", "null_ok", "postmaster_ok", "result"),
    [
        ("", True, False, ""),
        ("", False, True, None),
        ("Postmaster", False, True, "Postmaster"),
        ("postmaster", True, False, None),
        ("@r1.org,@r2.org:u@d.org", False, False, "u@d.org"),
        ("@r1.org:", False, False, None),
        ("@r1.org,u@d.org", False, False, None),
        ("u@[192.0.2.1]", False, False, "u@[192.0.2.1]"),
        ("u@[256.0.2.1]", False, False, None),
        ("a..b@c.d", False, False, None),
    ],
)
def test_parse_path(path: str, null_ok: bool, postmaster_ok: bool, result: str | None) -> None:
    assert parse_path(path, null_ok=null_ok, postmaster_ok=postmaster_ok) == result


@pytest.mark.parametrize(
    ("addr", "ok"),
    [
        ("a@b.c", True),
        ('"a b"@c.d', True),
        ("a.b+c@sub-d.e", True),
        ("u@[IPv6:2001:db8::1]", True),
        ("u@[IPv6:fe80::1%eth0]", False),
        ("u@[1.2.3]", False),
        ("a@b@c", False),
        ("a@-b.c", False),
        ("a@b.c.", False),
        ("@b.c", False),
        ("a", False),
    ],
)
def test_is_mailbox(addr: str, ok: bool) -> None:
    assert is_mailbox(addr) is ok


def test_address_literal() -> None:
    assert address_literal_ok("10.0.0.255")
    assert not address_literal_ok("10.0.0.0256")
    assert address_literal_ok("ipv6:::1")
    assert not address_literal_ok("IPv6:::g")


def test_rfc5321_size_limits() -> None:
    assert (MAX_LOCAL_PART, MAX_DOMAIN, MAX_PATH) == (64, 255, 256)


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("", True),
        ("Postmaster", True),
        ("l" * 64 + "@b.c", True),
        ("l" * 65 + "@b.c", False),
        ('"' + "q" * 62 + '"@b.c', True),  # a quoted local part counts with its quotes
        ('"' + "q" * 63 + '"@b.c', False),
        ('"a@b"@' + "d" * 247, True),  # the last "@" starts the domain
        ("l" * 64 + "@" + "d" * 189, True),  # 254 octets + "<" and ">" = 256
        ("l" * 64 + "@" + "d" * 190, False),
        ("x" * 255, False),  # the path limit holds whatever the content
        ("@r.org:" + "l" * 64 + "@b.c", True),  # the local part after the source route
        ("@r.org:" + "l" * 65 + "@b.c", False),
        ("@" + "r" * 200 + ".org:u@" + "d" * 46, True),  # 254 with the route
        ("@" + "r" * 200 + ".org:u@" + "d" * 47, False),
    ],
)
def test_path_length_ok(path: str, ok: bool) -> None:
    assert path_length_ok(path) is ok


@pytest.mark.parametrize(
    ("arg", "ok"),
    [
        ("mx.example.org", True),
        ("localhost", True),
        ("a-1.b2", True),
        ("d" * 251 + ".org", True),  # 255 octets
        ("d" * 252 + ".org", False),
        ("[192.0.2.1]", True),
        ("[IPv6:2001:db8::1]", True),
        ("[IPv6:::ffff:192.0.2.1]", True),
        ("", False),
        ("a b", False),
        ("a\tb", False),
        ("a\x00", False),
        ("\x7f", False),
        ("caf\xe9", False),
        ("host.", False),
        (".host", False),
        ("ho_st", False),
        ("-host", False),
        ("[192.0.2.256]", False),
        ("[192.0.2.1] x", False),
        ("[[192.0.2.1]]", False),
        ("[IPv6:::1\x00]", False),
        ("[IPv6:fe80::1%eth0]", False),
        ("192.0.2.1", True),  # digits and dots are a (numeric-looking) domain in the grammar
    ],
)
def test_hello_argument_ok(arg: str, ok: bool) -> None:
    assert hello_argument_ok(arg) is ok


def test_parse_params() -> None:
    assert parse_params(" size=10  BODY=8BITMIME smtputf8") == {
        "SIZE": "10",
        "BODY": "8BITMIME",
        "SMTPUTF8": None,
    }
    assert parse_params("") == {}
    assert parse_params("A=1 =x B=2") == "=x"
    assert parse_params("A=b=c") == "A=b=c"
    assert parse_params("A=") == "A="
    assert parse_params("-A") == "-A"


# -- xtext ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("xtext", "text"),
    [
        ("", ""),
        ("plain!~", "plain!~"),
        ("a+2Bb+3Dc+20d", "a+b=c d"),
        ("+C3+A9t+C3+A9", "été"),
        ("+FF", "\xff"),  # not UTF-8: read as Latin-1
        ("+00", "\x00"),
    ],
)
def test_xtext_decode(xtext: str, text: str) -> None:
    assert xtext_decode(xtext) == text


@pytest.mark.parametrize(
    "xtext",
    ["a+2b", "a+", "a+2", "+G0", "a b", "a=b", "a\x7fb", "a\tb", "é", "++2B"],
)
def test_xtext_decode_rejects(xtext: str) -> None:
    assert xtext_decode(xtext) is None


def test_xtext_encode() -> None:
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_encode("bob@example.test") == "bob@example.test"
    assert xtext_encode("été\r\n") == "+C3+A9t+C3+A9+0D+0A"
    assert xtext_encode("") == ""


@pytest.mark.parametrize("seed", range(10))
def test_xtext_round_trip(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab+= \t\x00~!é€\U0001f600"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
    encoded = xtext_encode(text)
    assert all("\x21" <= c <= "\x7e" and c != "=" for c in encoded)
    assert xtext_decode(encoded) == text


# -- replies ----------------------------------------------------------------------------------


def test_reply_properties() -> None:
    r = Reply(250, "2.0.0", ("a", "b"))
    assert r.text == "a b"
    assert (r.is_positive, r.is_transient, r.is_permanent) == (True, False, False)
    assert Reply(451, None, ("x",)).is_transient
    assert Reply(550, None, ("x",)).is_permanent
    assert not Reply(354, None, ("x",)).is_positive


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (Reply(250, "2.0.0", ("a", "b")), b"250-2.0.0 a\r\n250 2.0.0 b\r\n"),
        (Reply(250, None, ("mx", "SIZE 10", "HELP")), b"250-mx\r\n250-SIZE 10\r\n250 HELP\r\n"),
        (Reply(221, None, ("",)), b"221\r\n"),
        (Reply(250, None, ("", "")), b"250-\r\n250\r\n"),
        (Reply(250, "2.0.0", ("",)), b"250 2.0.0\r\n"),
        (Reply(554, "5.7.1", ("caf\xe9",)), b"554 5.7.1 caf?\r\n"),
    ],
)
def test_reply_format(reply: Reply, wire: bytes) -> None:
    assert reply.format() == wire


def test_reply_format_refuses_bad_text() -> None:
    with pytest.raises(ValueError):
        Reply(250, None, ("a\r\n250 b",)).format()
    with pytest.raises(ValueError):
        Reply(250, None, ("a\n",)).format()
    with pytest.raises(ValueError):
        Reply(250, None, ()).format()


def test_enhanced_of() -> None:
    assert enhanced_of(Reply(550, "5.1.1", ("x",))) == "5.1.1"
    assert enhanced_of(Reply(550, None, ("x",))) == "5.0.0"
    assert enhanced_of(Reply(421, None, ("x",))) == "4.0.0"
    assert enhanced_of(Reply(250, None, ("x",))) == "2.0.0"
    assert enhanced_of(Reply(354, None, ("x",))) == "2.0.0"
    assert ENHANCED_RE.fullmatch("5.123.999")
    assert not ENHANCED_RE.fullmatch("3.0.0")
    assert not ENHANCED_RE.fullmatch("5.1234.1")


def parse_all(data: bytes, **bounds: int) -> list[Reply]:
    parser = ReplyParser(**bounds)
    parser.feed(data)
    replies = []
    while (reply := parser.next_reply()) is not None:
        replies.append(reply)
    return replies


@pytest.mark.parametrize(
    ("wire", "reply"),
    [
        (b"250 ok\r\n", Reply(250, None, ("ok",))),
        (b"250 2.1.0 Ok\r\n", Reply(250, "2.1.0", ("Ok",))),
        (b"250-2.0.0 a\r\n250 2.0.0 b\r\n", Reply(250, "2.0.0", ("a", "b"))),
        # the first line decides; a later line without a code keeps its text
        (b"550-5.1.1 a\r\n550 b\r\n", Reply(550, "5.1.1", ("a", "b"))),
        # no code on the first line: later lookalikes are text
        (b"550-a\r\n550 5.1.1 b\r\n", Reply(550, None, ("a", "5.1.1 b"))),
        # an enhanced code of another class than the reply's is text
        (b"250 5.1.1 odd\r\n", Reply(250, None, ("5.1.1 odd",))),
        (b"354 2.0.0 go\r\n", Reply(354, None, ("2.0.0 go",))),
        (b"250 2.0.0\r\n", Reply(250, "2.0.0", ("",))),
        (b"250 2.0.0x\r\n", Reply(250, None, ("2.0.0x",))),
        (b"250\r\n", Reply(250, None, ("",))),
        (b"250 \r\n", Reply(250, None, ("",))),
        (b"250-\r\n250 x\r\n", Reply(250, None, ("", "x"))),
        (b"220 mx ESMTP\n", Reply(220, None, ("mx ESMTP",))),  # bare LF read too
        (b"250-a\n250-b\r\n250 c\n", Reply(250, None, ("a", "b", "c"))),
        (b"250  two  spaces \r\n", Reply(250, None, (" two  spaces ",))),
        ("250 Grüße\r\n".encode(), Reply(250, None, ("Grüße",))),
    ],
)
def test_reply_parser(wire: bytes, reply: Reply) -> None:
    assert parse_all(wire) == [reply]


def test_reply_parser_several_replies_and_pieces() -> None:
    wire = b"250-mx\r\n250-PIPELINING\r\n250 HELP\r\n250 2.1.0 Ok\r\n354 go on\r\n"
    expected = [
        Reply(250, None, ("mx", "PIPELINING", "HELP")),
        Reply(250, "2.1.0", ("Ok",)),
        Reply(354, None, ("go on",)),
    ]
    assert parse_all(wire) == expected
    parser = ReplyParser()
    got = []
    for i in range(len(wire)):
        parser.feed(wire[i : i + 1])
        while (reply := parser.next_reply()) is not None:
            got.append(reply)
    assert got == expected
    assert not parser.buffered


def test_reply_parser_waits_for_the_last_line() -> None:
    parser = ReplyParser()
    parser.feed(b"250-a\r\n250-b\r\n")
    assert parser.next_reply() is None
    assert parser.buffered
    parser.feed(b"250 c")
    assert parser.next_reply() is None
    parser.feed(b"\r\n")
    assert parser.next_reply() == Reply(250, None, ("a", "b", "c"))


@pytest.mark.parametrize(
    ("wire", "bad"),
    [
        (b"hello\r\n", "hello"),
        (b"25 ok\r\n", "25 ok"),
        (b"2500 ok\r\n", "2500 ok"),
        (b"250x\r\n", "250x"),
        (b"150 ok\r\n", "150 ok"),
        (b"650 ok\r\n", "650 ok"),
        (b"\r\n", ""),
        (b" 250 ok\r\n", " 250 ok"),
        (b"250-a\r\n251 b\r\n", "251 b"),
        (b"250-a\r\nb\r\n", "b"),
        (b"250 a\rb\r\n", "250 a\rb"),
    ],
)
def test_reply_parser_syntax_errors(wire: bytes, bad: str) -> None:
    with pytest.raises(ReplySyntaxError) as info:
        parse_all(wire)
    assert info.value.text == bad
    assert isinstance(info.value, ValueError)


def test_reply_line_length_bound() -> None:
    ok = b"250 " + b"x" * 14 + b"\r\n"  # 20 octets with CRLF
    assert parse_all(ok, max_line=20) == [Reply(250, None, ("x" * 14,))]
    with pytest.raises(ReplySyntaxError, match="too long") as info:
        parse_all(b"250 " + b"x" * 15 + b"\r\n", max_line=20)
    assert info.value.text == "250 " + "x" * 15 + "\r"  # the first max_line octets


def test_reply_line_too_long_without_waiting_for_its_end() -> None:
    parser = ReplyParser(max_line=20)
    parser.feed(b"250 " + b"x" * 15)
    assert parser.next_reply() is None  # 19 octets: the line may still end in time
    parser.feed(b"y")
    with pytest.raises(ReplySyntaxError, match="too long"):
        parser.next_reply()


def test_reply_lines_bound() -> None:
    three = b"250-a\r\n250-b\r\n250 c\r\n"
    assert parse_all(three, max_lines=3) == [Reply(250, None, ("a", "b", "c"))]
    with pytest.raises(ReplySyntaxError, match="too many lines") as info:
        parse_all(b"250-a\r\n250-b\r\n250-c\r\n250 d\r\n", max_lines=3)
    assert info.value.text == "250 d"


@pytest.mark.parametrize(
    "reply",
    [
        Reply(250, "2.0.0", ("a", "b", "")),
        Reply(250, None, ("mx.example", "SIZE 100", "8BITMIME")),
        Reply(421, "4.3.2", ("Service shutting down",)),
        Reply(221, None, ("",)),
    ],
)
def test_format_then_parse_round_trip(reply: Reply) -> None:
    assert parse_all(reply.format()) == [reply]


# -- line reader ------------------------------------------------------------------------------


def test_line_reader() -> None:
    buf = bytearray(b"one\r\ntwo\nthree\r")
    reader = LineReader(buf, 8)
    assert reader.read_line() == b"one"
    assert reader.read_line() == b"two"
    assert reader.read_line() is NEED_DATA
    buf += b"\n"
    assert reader.read_line() == b"three"
    assert reader.read_line() is NEED_DATA
    assert buf == b""


def test_line_reader_bounds() -> None:
    buf = bytearray(b"123456\r\n1234567\r\nok\n")
    reader = LineReader(buf, 8)
    assert reader.read_line() == b"123456"  # 8 octets with CRLF
    assert reader.read_line() is TOO_LONG
    assert reader.read_line() == b"ok"
    buf += b"x" * 7
    assert reader.read_line() is NEED_DATA
    assert not reader.discarding
    buf += b"x"
    assert reader.read_line() is NEED_DATA
    assert reader.discarding
    assert buf == b""  # dropped as it came
    buf += b"more\r\nnext\r\n"
    assert reader.read_line() is TOO_LONG
    assert reader.read_line() == b"next"
