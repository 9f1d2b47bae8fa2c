"""Delivery status notifications: built bytes parsed back with the email package."""

from __future__ import annotations

import email
import email.policy
import random
import re
from email.message import EmailMessage
from typing import Any

import pytest

from mailpool.framework.notices import (
    Notice,
    OriginalMessage,
    RecipientReport,
    add_delivery_headers,
    build_notice,
)

MTA = "mail.example.test"
DAEMON = "MAILER-DAEMON@mail.example.test"
ARRIVAL = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
NOW = ARRIVAL + 300

HEADERS = (b"Received: from client.example.test by mail.example.test; Tue, 14 Nov 2023\r\n"
           b" 22:13:20 +0000\r\n"
           b"From: Alice <alice@example.test>\r\n"
           b"To: bob@far.test, carol@far.test\r\n"
           b"Subject: lunch\r\n"
           b"Message-ID: <m1@example.test>\r\n")
CONTENT = HEADERS + b"\r\nSee you at noon.\r\n"

BOB = RecipientReport(
    final_recipient="bob@far.test", action="failed", status="5.1.1",
    original_recipient="rfc822;Bob@Far.test",
    diagnostic_code="550 5.1.1 <bob@far.test>: User unknown",
    remote_mta="mx1.far.test", last_attempt=ARRIVAL + 60)
CAROL = RecipientReport(
    final_recipient="carol@far.test", action="failed", status="4.4.7", last_attempt=ARRIVAL + 120)


def original(content: bytes = CONTENT, **kw: Any) -> OriginalMessage:
    fields: dict[str, Any] = dict(queue_id="Q0001", message_id="m1@example.test",
                                  originator="alice@example.test", arrival=ARRIVAL,
                                  envid="env-42", ret=None, content=content)
    fields.update(kw)
    return OriginalMessage(**fields)


def notice(kind: str = "failure", reports: tuple[RecipientReport, ...] = (BOB, CAROL),
           orig: OriginalMessage | None = None, **kw: Any) -> Notice:
    args: dict[str, Any] = dict(kind=kind, original=orig or original(), reports=reports,
                                reporting_mta=MTA, sender=DAEMON, to="alice@example.test",
                                now=NOW, queue_id="N0001")
    args.update(kw)
    return build_notice(**args)


def parse(n: Notice) -> EmailMessage:
    """The notice parsed back, after the checks every notice must pass on the wire."""
    assert n.content.endswith(b"\r\n")
    lines = n.content.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines)  # CRLF only
    assert max(len(line) for line in lines) <= 998
    msg = email.message_from_bytes(n.content, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.defects == []
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"] == f"<{n.message_id}>"
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    return msg


def parts(msg: EmailMessage) -> list[EmailMessage]:
    found = list(msg.iter_parts())
    assert len(found) == 3
    assert found[0].get_content_type() == "text/plain"
    assert found[1].get_content_type() == "message/delivery-status"
    return found  # type: ignore[return-value]


def text_of(part: EmailMessage) -> str:
    """A text part's content with its CRLF line ends read as newlines."""
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def prose(part: EmailMessage) -> str:
    """A text part's words, one space apart (for sentences, wherever the lines break)."""
    return " ".join(text_of(part).split())


def dsn_blocks(msg: EmailMessage) -> list[dict[str, str]]:
    blocks = parts(msg)[1].get_payload()
    assert isinstance(blocks, list)
    return [{name: str(value) for name, value in block.items()} for block in blocks]


def raw_part(n: Notice, index: int) -> bytes:
    """Part `index` (0-based) exactly as it stands between the boundary lines."""
    boundary = email.message_from_bytes(n.content).get_boundary()
    assert boundary is not None
    delimiter = b"\r\n--" + boundary.encode()
    body = n.content.split(delimiter)
    assert body[-1] == b"--\r\n"
    return body[index + 1].removeprefix(b"\r\n")


# -- failure ---------------------------------------------------------------------------------


def test_failure_notice_headers_and_parts() -> None:
    n = notice()
    msg = parse(n)
    assert n.kind == "failure"
    assert n.message_id == "N0001.failure@mail.example.test"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.test>"
    assert msg["To"] == "alice@example.test"
    assert msg["Date"] == "Tue, 14 Nov 2023 22:18:20 +0000"
    text, _, returned = parts(msg)
    body = text_of(text)
    assert body.startswith("This is the mail system at host mail.example.test.\n")
    assert ("<bob@far.test>: host mx1.far.test said: 550 5.1.1 <bob@far.test>: User\n"
            "    unknown\n") in body
    assert "<carol@far.test>: delivery time expired (status 4.4.7)\n" in body
    assert "<m1@example.test>" in body
    # The whole original, byte for byte, as a message/rfc822 part.
    assert returned.get_content_type() == "message/rfc822"
    assert raw_part(n, 2) == (b"Content-Type: message/rfc822\r\n"
                              b"Content-Description: Message\r\n\r\n" + CONTENT)
    inner = returned.get_content()
    assert inner["Subject"] == "lunch"


def test_failure_report_fields_for_two_recipients() -> None:
    n = notice()
    assert dsn_blocks(parse(n)) == [
        {"Reporting-MTA": "dns; mail.example.test", "X-Mailpool-Queue-ID": "Q0001",
         "Original-Envelope-Id": "env-42", "Arrival-Date": "Tue, 14 Nov 2023 22:13:20 +0000"},
        {"Final-Recipient": "rfc822; bob@far.test", "Original-Recipient": "rfc822; Bob@Far.test",
         "Action": "failed", "Status": "5.1.1", "Remote-MTA": "dns; mx1.far.test",
         "Diagnostic-Code": "smtp; 550 5.1.1 <bob@far.test>: User unknown",
         "Last-Attempt-Date": "Tue, 14 Nov 2023 22:14:20 +0000"},
        {"Final-Recipient": "rfc822; carol@far.test", "Action": "failed", "Status": "4.4.7",
         "Last-Attempt-Date": "Tue, 14 Nov 2023 22:15:20 +0000"},
    ]
    # The wire form: header blocks separated by one empty line, none after the last.
    assert raw_part(n, 1) == (
        b"Content-Type: message/delivery-status\r\n"
        b"Content-Description: Delivery report\r\n"
        b"\r\n"
        b"Reporting-MTA: dns; mail.example.test\r\n"
        b"X-Mailpool-Queue-ID: Q0001\r\n"
        b"Original-Envelope-Id: env-42\r\n"
        b"Arrival-Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        b"\r\n"
        b"Final-Recipient: rfc822; bob@far.test\r\n"
        b"Original-Recipient: rfc822; Bob@Far.test\r\n"
        b"Action: failed\r\n"
        b"Status: 5.1.1\r\n"
        b"Remote-MTA: dns; mx1.far.test\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 <bob@far.test>: User unknown\r\n"
        b"Last-Attempt-Date: Tue, 14 Nov 2023 22:14:20 +0000\r\n"
        b"\r\n"
        b"Final-Recipient: rfc822; carol@far.test\r\n"
        b"Action: failed\r\n"
        b"Status: 4.4.7\r\n"
        b"Last-Attempt-Date: Tue, 14 Nov 2023 22:15:20 +0000\r\n")


def test_no_envid_no_original_envelope_id() -> None:
    blocks = dsn_blocks(parse(notice(orig=original(envid=None))))
    assert "Original-Envelope-Id" not in blocks[0]


def test_long_diagnostic_folds_at_spaces_never_as_encoded_words() -> None:
    url = "https://support.example.test/mail/?p=NotAuthorizedError-" + "x" * 60
    reply = f"550-5.7.1 [192.0.2.7] Our policy\r\n550 5.7.1 forbids this. See {url} for more"
    n = notice(reports=(RecipientReport("bob@far.test", "failed", "5.7.1",
                                        diagnostic_code=reply, remote_mta="mx1.far.test"),))
    assert b"=?" not in n.content
    fields = dsn_blocks(parse(n))[1]
    # A multi-line reply becomes one line; the long word is kept whole.
    assert fields["Diagnostic-Code"] == (
        f"smtp; 550-5.7.1 [192.0.2.7] Our policy 550 5.7.1 forbids this. See {url} for more")
    raw = raw_part(n, 1)
    assert f"\r\n {url}\r\n for more\r\n".encode() in raw
    assert all(len(line) <= 78 or url.encode() in line for line in raw.split(b"\r\n"))


def test_diagnostic_is_capped_and_made_ascii() -> None:
    reply = "550 5.1.1 Benutzer unbekannt: \u00fcber " + "y " * 600
    n = notice(reports=(RecipientReport("bob@far.test", "failed", "5.1.1",
                                        diagnostic_code=reply),))
    n.content.decode("ascii")
    code = dsn_blocks(parse(n))[1]["Diagnostic-Code"]
    assert code.startswith("smtp; 550 5.1.1 Benutzer unbekannt: \\x{FC}ber y y ")
    assert code.endswith("...")
    assert len(code) == len("smtp; ") + 512


def test_ret_hdrs_returns_only_the_header_section() -> None:
    n = notice(orig=original(ret="HDRS"))
    returned = parts(parse(n))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload(decode=True) == HEADERS
    assert b"See you at noon." not in n.content
    assert "The headers of your message are attached below." in prose(parts(parse(n))[0])


def test_oversize_original_goes_back_as_headers_only_and_says_so() -> None:
    big = HEADERS + b"\r\n" + (b"z" * 70 + b"\r\n") * 2000
    n = notice(orig=original(big), max_original_size=10_000)
    text, _, returned = parts(parse(n))
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload(decode=True) == HEADERS
    assert (f"Your message is {len(big)} octets long, over the 10000-octet limit for returned"
            " mail, so only its headers are attached below.") in prose(text)
    assert len(n.content) < 10_000


def test_header_section_longer_than_the_limit_is_cut_at_a_line_end() -> None:
    headers = b"".join(b"X-Trace-%04d: %s\r\n" % (i, b"t" * 60) for i in range(200))
    n = notice(orig=original(headers + b"\r\nbody\r\n"), max_original_size=2048)
    text, _, returned = parts(parse(n))
    kept = returned.get_payload(decode=True)
    assert headers.startswith(kept)
    assert 2048 - 80 < len(kept) <= 2048 and kept.endswith(b"\r\n")
    assert "They were cut to fit in 2048 octets." in prose(text)


def test_notice_size_is_bounded() -> None:
    limit = 64 * 1024
    body = (b"x" * 70 + b"\r\n") * ((limit - len(HEADERS) - 2) // 72)
    exact = HEADERS + b"\r\n" + body + b"y" * (limit - len(HEADERS) - 4 - len(body)) + b"\r\n"
    assert len(exact) == limit
    long_reply = "550 5.1.1 " + "w" * 2000
    reports = tuple(RecipientReport(f"rcpt{i}@far.test", "failed", "5.1.1",
                                    original_recipient=f"rfc822;rcpt{i}@far.test",
                                    diagnostic_code=long_reply, remote_mta="m" * 300)
                    for i in range(2))
    n = notice(reports=reports, orig=original(b"From: a@b.test\r\n" + exact))  # just over
    assert parts(parse(n))[2].get_content_type() == "text/rfc822-headers"
    n = notice(reports=reports, orig=original(exact))  # exactly at the limit: whole
    assert parts(parse(n))[2].get_content_type() == "message/rfc822"
    assert len(n.content) <= limit + 6 * 1024 + 2 * 4 * 1024
    assert len(notice(orig=original(exact)).content) <= limit + 2048  # two usual recipients
    # Headers needing quoted-printable are cut so that they still fit.
    eight_bit = b"".join(b"X-H%05d: \xff\xfe\xfd\xfc\xfb\xfa\r\n" % i for i in range(10_000))
    n = notice(orig=original(eight_bit + b"\r\n"))
    kept = parts(parse(n))[2].get_payload(decode=True)
    assert eight_bit.startswith(kept) and limit // 4 - 80 < len(kept) <= limit // 4
    assert len(n.content) <= limit + 2048


@pytest.mark.parametrize("count", [1, 30])
def test_notice_size_bound_with_every_field_at_its_cap(count: int) -> None:
    limit = 64 * 1024
    huge = "\u00e9" * 3000
    orig = original(b"X-Long: " + b"h" * 900 + b"\r\n" * 100_000, message_id="m" * 3000,
                    envid="e" * 3000, queue_id="Q" * 64)
    reports = tuple(RecipientReport(huge + str(i), "failed", "5.1.1", "rfc822;" + "o" * 3000,
                                    "d " * 3000, "m" * 3000, ARRIVAL) for i in range(count))
    n = notice(reports=reports, orig=orig, reporting_mta="h" * 200, queue_id="N" * 64,
               sender="MAILER-DAEMON@" + "h" * 200, to="x" * 60 + "@" + "y" * 190)
    assert len(parts(parse(n))[1].get_payload()) == count + 1
    assert len(n.content) <= limit + 6 * 1024 + count * 4 * 1024


# -- delay and success -----------------------------------------------------------------------


def test_delay_notice() -> None:
    report = RecipientReport(
        "bob@far.test", "delayed", "4.4.1", diagnostic_code="421 4.4.1 Try again later",
        remote_mta="mx1.far.test", last_attempt=ARRIVAL + 4 * 3600,
        will_retry_until=ARRIVAL + 5 * 86400)
    n = notice("delay", (report,), now=ARRIVAL + 4 * 3600 + 60, queue_id="N0002")
    msg = parse(n)
    assert n.message_id == "N0002.delay@mail.example.test"
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    text, _, returned = parts(msg)
    body = text_of(text)
    assert "# THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND YOUR MESSAGE.  #" in body
    assert "could not be delivered for more than 4 hour(s)" in body
    assert "retried until Sun, 19 Nov 2023 22:13:20" in body
    assert dsn_blocks(msg)[1] == {
        "Final-Recipient": "rfc822; bob@far.test", "Action": "delayed", "Status": "4.4.1",
        "Remote-MTA": "dns; mx1.far.test", "Diagnostic-Code": "smtp; 421 4.4.1 Try again later",
        "Last-Attempt-Date": "Wed, 15 Nov 2023 02:13:20 +0000",
        "Will-Retry-Until": "Sun, 19 Nov 2023 22:13:20 +0000"}
    # RET defaults to HDRS for a delay; RET=FULL returns the whole message.
    assert returned.get_content_type() == "text/rfc822-headers"
    full = parts(parse(notice("delay", (report,), orig=original(ret="FULL"))))[2]
    assert full.get_content_type() == "message/rfc822"


def test_success_notice() -> None:
    reports = (RecipientReport("dave@example.test", "delivered", "2.0.0",
                               last_attempt=ARRIVAL + 1),
               RecipientReport("erin@far.test", "relayed", "2.0.0", remote_mta="mx2.far.test",
                               diagnostic_code="250 2.0.0 Ok: queued as 4XYZ",
                               last_attempt=ARRIVAL + 2,
                               will_retry_until=ARRIVAL + 9))  # ignored: not delayed
    n = notice("success", reports)
    msg = parse(n)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    text, _, returned = parts(msg)
    body = text_of(text)
    assert "<dave@example.test>: delivered to mailbox\n" in body
    assert ("<erin@far.test>: relayed to mx2.far.test, which does not report delivery:\n"
            "    250 2.0.0 Ok: queued as 4XYZ\n") in body
    assert [b.get("Action") for b in dsn_blocks(msg)[1:]] == ["delivered", "relayed"]
    assert all("Will-Retry-Until" not in b for b in dsn_blocks(msg))
    assert returned.get_content_type() == "text/rfc822-headers"


def test_postmaster_copy_of_a_double_bounce() -> None:
    bounced = notice().content
    orig = original(bounced, originator="", envid=None, message_id="N0001.failure@" + MTA)
    report = RecipientReport("alice@example.test", "failed", "5.1.1",
                             diagnostic_code="550 5.1.1 No such user")
    n = notice(reports=(report,), orig=orig, to="postmaster@mail.example.test",
               postmaster_copy=True, queue_id="N0003")
    msg = parse(n)
    assert msg["Subject"] == "Postmaster Copy: Undelivered Mail"
    assert n.message_id == "N0003.postmaster@mail.example.test"
    text, _, returned = parts(msg)
    assert "This is a copy for the postmaster." in text_of(text)
    assert returned.get_content_type() == "message/rfc822"
    assert bounced in n.content
    with pytest.raises(ValueError):
        notice("delay", (RecipientReport("b@far.test", "delayed", "4.4.1"),),
               postmaster_copy=True)


# -- odd originals ---------------------------------------------------------------------------


ODD = {
    "8bit-body": (b"Subject: caf\xc3\xa9?\r\nFrom: a@b.test\r\n\r\nd\xc3\xa9j\xc3\xa0 vu\r\n",
                  "utf-8", b"Subject: caf\xc3\xa9?\r\nFrom: a@b.test\r\n"),
    "latin-1-headers": (b"Subject: Gr\xfc\xdfe\r\n\r\nbody\r\n",
                        "iso-8859-1", b"Subject: Gr\xfc\xdfe\r\n"),
    "no-separator": (b"Subject: only headers\r\nX-A: 1\r\n", "us-ascii",
                     b"Subject: only headers\r\nX-A: 1\r\n"),
    "bare-lf": (b"Subject: unix\nFrom: a@b.test\n\nbody\n", "us-ascii",
                b"Subject: unix\r\nFrom: a@b.test\r\n"),
    "nul-and-escape": (b"Subject: a\x00b\x1b[0m\r\n\r\nbody\r\n", "us-ascii",
                       b"Subject: a\x00b\x1b[0m\r\n"),
    # An empty header section goes back as the empty line that ends it.
    "empty": (b"", "us-ascii", b"\r\n"),
    "body-first": (b"\r\nno headers at all\r\n", "us-ascii", b"\r\n"),
    "overlong-line": (b"Subject: " + b"s" * 1200 + b"\r\n\r\nbody\r\n", "us-ascii",
                      b"Subject: " + b"s" * 1200 + b"\r\n"),
}


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_original_goes_back_as_headers_carried_safely(name: str) -> None:
    content, charset, headers = ODD[name]
    n = notice(orig=original(content))
    n.content.decode("ascii")  # the notice stays 7-bit whatever the original holds
    text, _, returned = parts(parse(n))
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_content_charset() == charset
    assert returned.get_payload(decode=True) == headers
    assert ("Your message is not plain 7-bit text with CRLF line ends, so only its headers are"
            " attached below.") in prose(text)


def test_random_garbage_never_raises() -> None:
    rng = random.Random(7)
    for _ in range(200):
        content = bytes(rng.randrange(256) for _ in range(rng.randrange(2000)))
        n = notice(orig=original(content, message_id="\r\n\xff", envid="\x00e\u00e9"))
        n.content.decode("ascii")
        assert parts(parse(n))[2].get_content_type() in ("text/rfc822-headers",
                                                         "message/rfc822")


# -- addresses, ids, determinism -------------------------------------------------------------


def test_international_addresses() -> None:
    report = RecipientReport("j\u00f6rg@b\u00fccher.test", "failed", "5.1.1",
                             original_recipient="utf-8;j\\x{F6}rg@b\\x{FC}cher.test")
    n = notice(reports=(report,), to="m\u00fcller@example.test")
    msg = parse(n)
    assert msg["To"] == "m\u00fcller@example.test"
    assert "To: m\u00fcller@example.test\r\n".encode() in n.content  # raw UTF-8, no =?..?=
    fields = dsn_blocks(msg)[1]
    assert fields["Final-Recipient"] == "utf-8; j\\x{F6}rg@b\\x{FC}cher.test"
    assert fields["Original-Recipient"] == "utf-8; j\\x{F6}rg@b\\x{FC}cher.test"


def test_same_inputs_same_bytes_and_boundary_avoids_the_content() -> None:
    assert notice().content == notice().content
    clash = CONTENT + b"--N0001.1700000300/mail.example.test\r\n"
    n = notice(orig=original(clash))
    msg = parse(n)
    assert msg.get_boundary() == "N0001.1700000300/mail.example.test/1"
    assert parts(msg)[2].get_content_type() == "message/rfc822"
    assert clash in n.content


def test_many_recipients_text_lists_25_report_lists_all() -> None:
    reports = tuple(RecipientReport(f"r{i}@far.test", "failed", "5.1.1") for i in range(40))
    msg = parse(notice(reports=reports))
    body = text_of(parts(msg)[0])
    assert "<r24@far.test>" in body and "<r25@far.test>" not in body
    assert "... and 15 more recipient(s), all listed in the delivery report." in body
    assert len(dsn_blocks(msg)) == 41


@pytest.mark.parametrize("kw", [
    dict(kind="bounce"),
    dict(reports=()),
    dict(reports=(RecipientReport("b@far.test", "delayed", "4.4.1"),)),  # not a failure
    dict(reports=(RecipientReport("b@far.test", "failed", "2.0.0"),)),
    dict(reports=(RecipientReport("b@far.test", "failed", "5.1"),)),
    dict(to="alice@example.test\r\nBcc: x@y.test"),
    dict(to=""),
    dict(sender="not an address"),
    dict(queue_id="N 1"),
    dict(reporting_mta="mail.example.test>"),
])
def test_inconsistent_arguments_raise(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        notice(**kw)


# -- add_delivery_headers --------------------------------------------------------------------


def test_add_delivery_headers_prepends_exact_bytes() -> None:
    stored = b"Subject: x\r\n\r\nbody\xff\n"  # the rest is left exactly as it is
    assert add_delivery_headers(stored, return_path="alice@example.test",
                                delivered_to="bob@example.test") == (
        b"Return-Path: <alice@example.test>\r\nDelivered-To: bob@example.test\r\n" + stored)


def test_add_delivery_headers_null_sender() -> None:
    assert add_delivery_headers(b"S: x\r\n\r\n", return_path="",
                                delivered_to="postmaster@example.test") == (
        b"Return-Path: <>\r\nDelivered-To: postmaster@example.test\r\nS: x\r\n\r\n")


@pytest.mark.parametrize("kw", [
    dict(return_path="a@b.test\r\nX-Evil: 1", delivered_to="bob@example.test"),
    dict(return_path="a@b.test", delivered_to="bob@example.test\n"),
    dict(return_path="a@b.test\r", delivered_to="bob@example.test"),
])
def test_add_delivery_headers_refuses_line_breaks(kw: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        add_delivery_headers(b"S: x\r\n\r\n", **kw)


def test_every_line_of_a_notice_ends_in_crlf() -> None:
    n = notice(orig=original(b"Subject: a\nb: c\r\rd: e\r\n\r\nbody\n"))
    assert re.search(rb"[^\r]\n|\r[^\n]", n.content) is None
