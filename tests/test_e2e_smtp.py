"""End to end over real sockets: `mailpool serve`, smtplib / swaks / a raw client, the
Maildir and the journal (`mailpool journal dump`).

One host serves the whole module (every test uses its own users, addresses or queue
ids, so they do not see each other's mail); tests that need another configuration start
their own. Nothing is timed: every wait polls a condition (hosthelp.wait_for).
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import smtplib
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from hosthelp import MAILPOOL, Host, wait_for

from mailpool.directory import Directory

HOSTNAME = "mail.example.test"
CLIENT = "client.example.test"
MAX_RECIPIENTS = 3
MAX_SIZE = 4096
# No POP in these tests: keep the pop-server entry empty (jobs start on first demand).
CONFIG = f"""
[smtp]
max_recipients = {MAX_RECIPIENTS}
max_message_size = {MAX_SIZE}

[pool.pop-server]
start_jobs = false
"""
USERS = {
    "bob": ["bob@example.test"],
    "carol": ["carol@example.test"],
    "dave": ["dave@other.test"],
    "erin": ["erin@example.test"],
    "multi": [f"m{i}@example.test" for i in range(1, MAX_RECIPIENTS + 2)],
    "big": ["big@example.test"],
    "dots": ["dots@example.test"],
    "gone": ["gone@example.test"],
    "swaks": ["swaks@example.test"],
    "fmt": ["fmt@example.test"],
    "twice": ["twice@example.test"],
}


def expected_codes(recipients: int) -> list[str]:
    """The life of one locally delivered message in the journal (one 92/72/P2/B2 per
    recipient): SMTP server, then bridge, then address resolution and local delivery."""
    return ["94", "91", *["92"] * recipients, "9T", "99", "97",
            "7A", "7H", "71", *["72"] * recipients, *["P2", "B8", "B2"] * recipients]


@pytest.fixture(scope="module")
def mailhost(module_host: Any) -> Host:
    host = module_host(CONFIG, name="e2e")
    host.add_user("bob", "bob@example.test")  # `mailpool user add`, as the issue does it
    # The others straight through the directory API: one CLI run costs ~0.5 s.
    directory = Directory(host.data / "directory.json")
    for name, addresses in USERS.items():
        if name != "bob":
            directory.add_user(name, addresses, None)
    return host


def smtp(host: Host) -> smtplib.SMTP:
    return smtplib.SMTP(*host.smtp, local_hostname=CLIENT, timeout=20)


def status(reply: tuple[int, bytes]) -> tuple[int, str]:
    """(code, enhanced status code) of an smtplib reply."""
    code, text = reply
    return code, text.decode().split(" ", 1)[0]


def send(host: Host, sender: str, recipients: list[str], message: bytes) -> str:
    """Send one message with smtplib; returns the queue id from the 250 reply."""
    with smtp(host) as s:
        s.ehlo()
        assert s.mail(sender)[0] == 250
        for rcpt in recipients:
            assert s.rcpt(rcpt)[0] == 250
        code, text = s.data(message)
        assert code == 250, text
    match = re.search(rb"queued as ([A-Za-z0-9_-]+)", text)
    assert match, text
    return match.group(1).decode()


def files_of(host: Host, user: str, queue_id: str) -> list[Path]:
    return [p for p in host.maildir_files(user) if p.name.split(".")[0] == queue_id]


def wait_journal(host: Host, *args: str, until: Any, what: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def ready() -> bool:
        found[:] = host.journal(*args)
        return bool(until(found))

    wait_for(ready, what=what)
    return found


def wait_message_done(host: Host, message_id: str, recipients: int) -> list[dict[str, Any]]:
    """The message's records, once every recipient's B2 has been journaled."""
    return wait_journal(host, "--message-id", message_id,
                        until=lambda recs: [r["code"] for r in recs].count("B2") >= recipients,
                        what=f"B2 x{recipients} for {message_id}")


def delivery_re(sender: str, recipient: str) -> bytes:
    """Return-Path and Delivered-To, which local delivery puts on top (as Postfix's does)."""
    return (rb"Return-Path: <" + re.escape(sender.encode()) + rb">\r\n"
            rb"Delivered-To: " + re.escape(recipient.encode()) + rb"\r\n")


def received_re(queue_id: str, recipient: str | None) -> bytes:
    """The trace header the SMTP server puts on top (RFC 5321 4.4)."""
    lines = [rb"Received: from " + re.escape(CLIENT.encode()) + rb" \(\[127\.0\.0\.1\]\)",
             rb"\tby " + re.escape(HOSTNAME.encode()) + rb" \(mailpool\) with ESMTP id "
             + queue_id.encode() + (b"" if recipient else b";")]
    if recipient:
        lines.append(rb"\tfor <" + re.escape(recipient.encode()) + rb">;")
    lines.append(rb"\t[A-Z][a-z][a-z], \d\d? [A-Z][a-z][a-z] \d{4} \d\d:\d\d:\d\d [+-]\d{4}")
    return rb"\r\n".join(lines) + rb"\r\n"


# --- the message's life ---------------------------------------------------------------


def test_message_without_message_id_delivered_and_journaled(mailhost: Host) -> None:
    message = (b"From: alice@remote.test\r\nTo: bob@example.test\r\n"
               b"Subject: hello bob\r\n\r\nHello Bob,\r\n.leading dot\r\nbye\r\n")
    with smtp(mailhost) as s:
        assert s.sendmail("alice@remote.test", ["bob@example.test"], message) == {}
    (path,) = mailhost.wait_delivered("bob", 1)
    queue_id = path.name.split(".")[0]
    message_id = f"{queue_id}@{HOSTNAME}"
    data = path.read_bytes()
    header = (delivery_re("alice@remote.test", "bob@example.test")
              + received_re(queue_id, "bob@example.test"))
    # Exactly the message sent, after the delivery and trace headers and the Message-ID it
    # lacked.
    assert re.fullmatch(header + rb"Message-ID: <" + re.escape(message_id.encode())
                        + rb">\r\n" + re.escape(message), data, re.DOTALL), data
    wait_for(lambda: not mailhost.queue_files(), what="incoming queue empty")
    assert mailhost.maildir_files("bob") == [path]

    records = wait_message_done(mailhost, message_id, 1)
    assert [r["code"] for r in records] == expected_codes(1)
    assert mailhost.journal("--message-id", f"<{message_id}>") == records
    assert all(r["queue_id"] == queue_id and r["message_id"] == message_id for r in records)
    by_code = {r["code"]: r for r in records}
    assert by_code["94"]["ip"] == "127.0.0.1"
    assert by_code["91"]["originator"] == "alice@remote.test"
    assert by_code["71"]["originator"] == "alice@remote.test"
    for code in ("92", "72", "P2", "B2"):
        assert by_code[code]["recipient"] == "bob@example.test"
    # What was stored, trace header included (local delivery added its two headers).
    assert by_code["9T"]["size"] == len(data) - len(
        b"Return-Path: <alice@remote.test>\r\nDelivered-To: bob@example.test\r\n")
    assert [r["job"].split("/")[0] for r in records] == ["smtp-server"] * 6 + ["framework"] * 7


def test_two_recipients_message_id_kept(mailhost: Host) -> None:
    message_id = f"{uuid.uuid4().hex}@{CLIENT}"
    message = (f"From: alice@remote.test\r\nTo: carol@example.test, dave@other.test\r\n"
               f"Message-ID: <{message_id}>\r\nSubject: two\r\n\r\nfor both\r\n").encode()
    rcpts = ["carol@example.test", "dave@other.test"]
    queue_id = send(mailhost, "alice@remote.test", rcpts, message)
    for user, rcpt in zip(("carol", "dave"), rcpts, strict=True):
        (path,) = mailhost.wait_delivered(user, 1)
        assert path.name.startswith(queue_id + ".")
        # Two recipients: no "for <...>" clause, and no second Message-ID.
        assert re.fullmatch(delivery_re("alice@remote.test", rcpt)
                            + received_re(queue_id, None) + re.escape(message),
                            path.read_bytes(), re.DOTALL)

    records = wait_message_done(mailhost, message_id, 2)
    assert [r["code"] for r in records] == expected_codes(2)
    assert mailhost.journal("--message-id", f"<{message_id}>") == records
    assert {r["message_id"] for r in records} == {message_id}
    assert {r["queue_id"] for r in records} == {queue_id}
    for code in ("92", "72", "P2", "B2"):
        assert [r["recipient"] for r in records if r["code"] == code] == rcpts
    assert [r["detail"] for r in records if r["code"] == "P2"] == ["POP LclDel"] * 2


def test_journal_dump_filters_and_formats(mailhost: Host) -> None:
    queue_id = send(mailhost, "fmt-sender@remote.test", ["fmt@example.test"],
                    b"Subject: formats\r\n\r\nx\r\n")
    mailhost.wait_delivered("fmt", 1)
    records = wait_journal(mailhost, "--queue-id", queue_id,
                           until=lambda recs: recs and recs[-1]["code"] == "B2",
                           what="B2 of the message")
    assert [r["code"] for r in records] == expected_codes(1)

    # --code alone: every 94 of the journal, ours among them; with --queue-id: just ours.
    all_94 = mailhost.journal("--code", "94")
    assert {r["code"] for r in all_94} == {"94"}
    assert queue_id in {r["queue_id"] for r in all_94}
    only = mailhost.journal("--code", "94,B2", "--queue-id", queue_id)
    assert [r["code"] for r in only] == ["94", "B2"]

    res = mailhost.cli("journal", "dump", "--format", "csv", "--queue-id", queue_id)
    rows = list(csv.reader(io.StringIO(res.stdout)))
    head = rows[0]
    assert head[:5] == ["seq", "time", "type", "code", "job"]
    table = [dict(zip(head, row, strict=True)) for row in rows[1:]]
    assert [row["code"] for row in table] == expected_codes(1)
    assert {row["queue_id"] for row in table} == {queue_id}
    assert table[0]["ip"] == "127.0.0.1"
    assert table[1]["originator"] == "fmt-sender@remote.test"
    assert [row["seq"] for row in table] == [str(r["seq"]) for r in records]

    res = mailhost.cli("journal", "dump", "--format", "text", "--code", "9T",
                       "--queue-id", queue_id)
    (line,) = res.stdout.splitlines()
    assert re.match(rf"\s*{records[3]['seq']} \S+ LG 9T smtp-server/\d+ ", line), line
    assert f"queue_id={queue_id}" in line and f"size={records[3]['size']}" in line


def test_recipient_named_twice_gets_one_copy(mailhost: Host) -> None:
    with smtp(mailhost) as s:
        s.ehlo()
        assert s.mail("a@remote.test")[0] == 250
        for rcpt in ("twice@example.test", "Twice@Example.TEST", "twice@example.test"):
            assert status(s.rcpt(rcpt)) == (250, "2.1.5")
        code, text = s.data(b"Subject: once\r\n\r\nx\r\n")
        assert code == 250
    queue_id = re.search(rb"queued as (\S+)", text).group(1).decode()
    records = wait_journal(mailhost, "--queue-id", queue_id,
                           until=lambda recs: recs and recs[-1]["code"] == "B2", what="B2")
    assert [r["code"] for r in records] == expected_codes(1)
    assert [p.name.split(",")[0] for p in mailhost.maildir_files("twice")] == [
        f"{queue_id}.R0.{HOSTNAME}"]


def test_null_sender_to_postmaster(mailhost: Host) -> None:
    message = b"Subject: bounce-like\r\n\r\nnull sender\r\n"
    with smtp(mailhost) as s:
        s.ehlo()
        assert status(s.docmd("MAIL", "FROM:<>")) == (250, "2.1.0")
        assert status(s.docmd("RCPT", "TO:<Postmaster>")) == (250, "2.1.5")
        code, text = s.data(message)
        assert code == 250
    queue_id = re.search(rb"queued as (\S+)", text).group(1).decode()
    (path,) = wait_for(lambda: files_of(mailhost, "postmaster", queue_id),
                       what="message in the postmaster mailbox")
    assert path.read_bytes().endswith(message)
    records = wait_journal(mailhost, "--queue-id", queue_id,
                           until=lambda recs: recs and recs[-1]["code"] == "B2", what="B2")
    by_code = {r["code"]: r for r in records}
    assert by_code["91"]["originator"] == ""
    assert by_code["92"]["recipient"] == "Postmaster"


def test_swaks(mailhost: Host) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks not installed: tests/install_tools.sh installs the Debian package "
                    "(needs apt-get and root)")
    host, port = mailhost.smtp
    message_id = f"{uuid.uuid4().hex}@{CLIENT}"
    res = subprocess.run(
        [swaks, "--server", host, "--port", str(port), "--helo", CLIENT,
         "--from", "swaks-user@remote.test", "--to", "swaks@example.test",
         "--header", f"Message-Id: <{message_id}>", "--header", "Subject: sent by swaks",
         "--body", "Hello from swaks", "--timeout", "20"],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "250 2.0.0 Ok: queued as" in res.stdout
    (path,) = mailhost.wait_delivered("swaks", 1)
    data = path.read_bytes()
    assert b"Subject: sent by swaks\r\n" in data and b"Hello from swaks" in data
    assert data.count(b"Message-Id:") + data.count(b"Message-ID:") == 1
    records = wait_message_done(mailhost, message_id, 1)
    assert [r["code"] for r in records] == expected_codes(1)


# --- bad input: each error is answered and the session goes on ------------------------


ERROR_CASES = [
    # (commands before, bad command, code, enhanced code)
    ([], "MAIL FROM:<a@remote.test>", 503, "5.5.1"),
    (["EHLO x"], "RCPT TO:<bob@example.test>", 503, "5.5.1"),
    (["EHLO x"], "DATA", 503, "5.5.1"),
    (["EHLO x", "MAIL FROM:<a@remote.test>"], "MAIL FROM:<a@remote.test>", 503, "5.5.1"),
    (["EHLO x", "MAIL FROM:<a@remote.test>"], "DATA", 503, "5.5.1"),
    (["EHLO x"], "MAIL FROM:a@remote.test", 501, "5.5.4"),
    (["EHLO x"], "MAIL TO:<a@remote.test>", 501, "5.5.4"),
    (["EHLO x", "MAIL FROM:<a@remote.test>"], "RCPT TO:bob@example.test", 501, "5.5.4"),
    ([], "EHLO", 501, "5.5.4"),
    (["EHLO x"], "RSET now", 501, "5.5.4"),
    (["EHLO x"], "XYZZY", 500, "5.5.2"),
    (["EHLO x"], "NOOP " + "x" * 600, 500, "5.5.2"),
    (["EHLO x", "MAIL FROM:<a@remote.test>"], "RCPT TO:<nobody@example.test>", 550, "5.1.1"),
    (["EHLO x"], f"MAIL FROM:<a@remote.test> SIZE={MAX_SIZE + 1}", 552, "5.3.4"),
    *[(["EHLO x"], verb, 502, "5.5.1") for verb in ("EXPN bob", "SEND FROM:<a@remote.test>",
                                                    "SOML FROM:<a@remote.test>",
                                                    "SAML FROM:<a@remote.test>", "TURN")],
]


@pytest.mark.parametrize(("before", "command", "code", "enhanced"), ERROR_CASES,
                         ids=[c[1][:24] for c in ERROR_CASES])
def test_error_reply_and_session_goes_on(mailhost: Host, raw_smtp: Any, before: list[str],
                                         command: str, code: int, enhanced: str) -> None:
    c = raw_smtp(mailhost.smtp)
    assert c.reply()[0] == 220
    for line in before:
        assert c.cmd(line)[0] == 250, line
    got = c.cmd(command)
    assert (got[0], got[1][-1].split(" ", 1)[0]) == (code, enhanced), got
    assert c.cmd("NOOP") == (250, ["2.0.0 Ok"])
    # The session is still usable for a new (here: reset) transaction.
    if not before:
        assert c.cmd("EHLO x")[0] == 250
    assert c.cmd("RSET") == (250, ["2.0.0 Ok"])
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd("RSET") == (250, ["2.0.0 Ok"])
    assert c.cmd("QUIT") == (221, ["2.0.0 Bye"])
    assert c.replies_until_eof() == []


def test_relay_refused_is_journaled(mailhost: Host) -> None:
    target = f"{uuid.uuid4().hex}@remote.test"
    with smtp(mailhost) as s:
        s.ehlo()
        assert s.mail("a@remote.test")[0] == 250
        assert status(s.rcpt(target)) == (550, "5.7.1")
        assert status(s.noop()) == (250, "2.0.0")
        assert status(s.rcpt("bob@example.test")) == (250, "2.1.5")
        s.rset()
    records = wait_journal(mailhost, "--code", "9V",
                           until=lambda recs: any(r.get("recipient") == target for r in recs),
                           what="9V for the refused recipient")
    (rec,) = [r for r in records if r.get("recipient") == target]
    assert rec["ip"] == "127.0.0.1"
    assert rec["job"].startswith("smtp-server/")


def test_too_many_recipients(mailhost: Host) -> None:
    addresses = USERS["multi"]
    with smtp(mailhost) as s:
        s.ehlo()
        assert s.mail("a@remote.test")[0] == 250
        for addr in addresses[:MAX_RECIPIENTS]:
            assert status(s.rcpt(addr)) == (250, "2.1.5")
        assert status(s.rcpt(addresses[MAX_RECIPIENTS])) == (452, "4.5.3")
        assert status(s.noop()) == (250, "2.0.0")
        code, text = s.data(b"Subject: many\r\n\r\nthree of four\r\n")
        assert code == 250, text
    queue_id = re.search(rb"queued as (\S+)", text).group(1).decode()
    records = wait_journal(mailhost, "--queue-id", queue_id,
                           until=lambda recs: [r["code"] for r in recs].count("B2") == 3,
                           what="three B2")
    assert [r["recipient"] for r in records if r["code"] == "92"] == addresses[:MAX_RECIPIENTS]


def test_message_too_big(mailhost: Host) -> None:
    big = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * (MAX_SIZE // 72 + 1)
    with smtp(mailhost) as s:
        s.ehlo()
        # Announced with SIZE (smtplib adds it itself from the EHLO SIZE keyword) ...
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            s.sendmail("a@remote.test", ["big@example.test"], big)
        assert refused.value.smtp_code == 552
        assert refused.value.smtp_error.startswith(b"5.3.4")
        # ... and sent without SIZE: the data itself is too big.
        assert s.mail("a@remote.test")[0] == 250
        assert s.rcpt("big@example.test")[0] == 250
        assert status(s.data(big)) == (552, "5.3.4")
        assert status(s.noop()) == (250, "2.0.0")
        # The session goes on: a small message to the same user is accepted.
        assert s.sendmail("a@remote.test", ["big@example.test"], b"Subject: small\r\n\r\n.\r\n"
                          ) == {}
    (path,) = mailhost.wait_delivered("big", 1)
    assert path.read_bytes().endswith(b"Subject: small\r\n\r\n.\r\n")


def test_removed_user_is_refused_and_mailbox_kept(mailhost: Host) -> None:
    send(mailhost, "a@remote.test", ["gone@example.test"], b"Subject: before\r\n\r\nx\r\n")
    (path,) = mailhost.wait_delivered("gone", 1)
    res = mailhost.cli("user", "remove", "gone")
    assert "kept" in res.stdout
    with smtp(mailhost) as s:
        s.ehlo()
        assert s.mail("a@remote.test")[0] == 250
        assert status(s.rcpt("gone@example.test")) == (550, "5.1.1")
        assert status(s.verify("gone@example.test")) == (550, "5.1.1")
        assert status(s.noop()) == (250, "2.0.0")
    assert mailhost.maildir_files("gone") == [path]


def test_vrfy_help_noop_rset(mailhost: Host) -> None:
    with smtp(mailhost) as s:
        s.ehlo()
        assert s.verify("bob@example.test") == (250, b"2.0.0 <bob@example.test>")
        assert status(s.verify("nobody@example.test")) == (550, "5.1.1")
        assert status(s.verify("someone@remote.test")) == (252, "2.0.0")
        assert status(s.verify("bob")) == (252, "2.0.0")
        assert status(s.docmd("VRFY")) == (501, "5.5.4")
        code, text = s.docmd("HELP")
        assert code == 214 and b"HELO EHLO MAIL RCPT DATA" in text
        assert s.noop() == (250, b"2.0.0 Ok")
        assert s.mail("a@remote.test")[0] == 250
        assert s.rcpt("bob@example.test")[0] == 250
        assert s.rset() == (250, b"2.0.0 Ok")
        # RSET dropped the transaction: DATA has no recipients, RCPT no sender.
        assert status(s.docmd("DATA")) == (503, "5.5.1")
        assert status(s.docmd("RCPT", "TO:<bob@example.test>")) == (503, "5.5.1")
        assert s.mail("a@remote.test")[0] == 250


def test_too_many_errors_close_the_session(mailhost: Host, raw_smtp: Any) -> None:
    c = raw_smtp(mailhost.smtp)
    assert c.reply()[0] == 220
    # Exactly as many as the limit: input left unread at close would make the server's
    # kernel reset the connection and drop the 421 still in its send buffer.
    c.send(b"XYZZY\r\n" * 20)
    replies = c.replies_until_eof()
    assert [code for code, _ in replies] == [500] * 20 + [421]
    assert replies[-1][1] == [f"4.7.0 {HOSTNAME} Error: too many errors"]


# --- DATA: only CRLF.CRLF ends a message ---------------------------------------------------


def test_bare_cr_lf_dots_do_not_end_the_message(mailhost: Host, raw_smtp: Any) -> None:
    body = (b"Subject: dots\r\n\r\n"
            b"a\n.\nb\r\n"      # LF . LF
            b"c\r.\rd\r\n"      # CR . CR
            b"e\n.\r\n"         # LF . CRLF: that line did not start with the dot
            b"..stuffed\r\n"    # dot-stuffed by the client
            b"..\r\n"           # a line holding one dot, stuffed
            b"...\r\n"          # two dots, stuffed
            b"end\r\n")
    unstuffed = body.replace(b"\r\n..stuffed", b"\r\n.stuffed").replace(
        b"\r\n..\r\n", b"\r\n.\r\n").replace(b"\r\n...\r\n", b"\r\n..\r\n")
    c = raw_smtp(mailhost.smtp)
    assert c.reply()[0] == 220  # talking before the greeting would be refused (pregreet)
    c.send(b"EHLO " + CLIENT.encode() + b"\r\nMAIL FROM:<a@remote.test>\r\n"
           b"RCPT TO:<dots@example.test>\r\nDATA\r\n")  # RFC 2920 pipelining
    replies = [c.reply() for _ in range(4)]
    assert [code for code, _ in replies] == [250, 250, 250, 354], replies
    c.send(body + b".\r\nQUIT\r\n")
    # One 250 for one message, then QUIT's 221: no part of the body was read as commands.
    replies = c.replies_until_eof()
    assert [code for code, _ in replies] == [250, 221], replies
    queue_id = re.search(r"queued as (\S+)", replies[0][1][0]).group(1)
    (path,) = mailhost.wait_delivered("dots", 1)
    assert path.name.startswith(queue_id + ".")
    data = path.read_bytes()
    assert re.fullmatch(delivery_re("a@remote.test", "dots@example.test")
                        + received_re(queue_id, "dots@example.test")
                        + rb"Message-ID: <[^>]+>\r\n" + re.escape(unstuffed), data, re.DOTALL)


def test_too_long_text_line_refused_after_data(mailhost: Host, raw_smtp: Any) -> None:
    c = raw_smtp(mailhost.smtp)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO x")[0] == 250
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<erin@example.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n")
    assert c.cmd(".") == (500, ["5.5.2 Error: line too long"])
    assert c.cmd("NOOP")[0] == 250
    assert c.cmd("QUIT")[0] == 221
    assert mailhost.maildir_files("erin") == []


# --- a separate host: timeouts ---------------------------------------------------------


def test_silent_client_dropped(host: Any, raw_smtp: Any) -> None:
    h = host("[smtp]\ncommand_timeout = 1.0\n[pool.pop-server]\nstart_jobs = false\n",
             name="timeout")
    c = raw_smtp(h.smtp)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO x")[0] == 250
    # Say nothing: the server gives up after command_timeout and closes (RFC 5321 4.5.3.2).
    assert c.replies_until_eof() == [(421, [f"4.4.2 {HOSTNAME} Error: timeout exceeded"])]


def test_unreadable_directory_is_a_temporary_failure(host: Any, raw_smtp: Any) -> None:
    h = host(name="brokendir")
    h.add_user("carol", "carol@example.test")
    (h.data / "directory.json").write_text("{ not json")  # damaged by hand
    c = raw_smtp(h.smtp)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO x")[0] == 250
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    code, lines = c.cmd("RCPT TO:<carol@example.test>")
    assert code == 451 and lines[0].startswith("4.3.0"), lines  # try later, not "unknown"
    assert c.cmd("NOOP")[0] == 250  # the session goes on


# --- configuration errors ---------------------------------------------------------------


GOOD = """\
[host]
name = "mail.example.test"
local_domains = ["example.test"]

[paths]
data = "var"

[smtp]
max_recipients = 7
"""


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen([*MAILPOOL, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"mailpool {' '.join(args)} did not exit") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def serve_bad_config(tmp_path: Path, line: str) -> str:
    """Run `mailpool serve` on GOOD with `line` in place of its max_recipients; returns
    the one line it prints (after checking it exits non-zero, starts nothing, no traceback)."""
    (tmp_path / "bad.toml").write_text(GOOD.replace("max_recipients = 7", line))
    res = run_cli(tmp_path, "serve", "--config", "bad.toml")
    assert res.returncode != 0
    assert res.stdout == ""
    assert "Traceback" not in res.stderr
    (message,) = res.stderr.splitlines()
    assert not (tmp_path / "var").exists()  # nothing started
    return message


@pytest.mark.parametrize(("line", "key", "value"), [
    ("max_recipents = 12345", "smtp.max_recipents", "12345"),
    ('max_recipients = "seven"', "smtp.max_recipients", "seven"),
    ("max_recipients = 0", "smtp.max_recipients", "0"),
    ("max_recipients = 7\ncommand_timeout = -1.0", "smtp.command_timeout", "-1.0"),
])
def test_serve_with_bad_config_exits_with_one_line(tmp_path: Path, line: str, key: str,
                                                   value: str) -> None:
    message = serve_bad_config(tmp_path, line)
    assert message.startswith("mailpool: bad.toml: ") and key in message, message
    assert value in message, message


def test_config_check_prints_effective_config(tmp_path: Path) -> None:
    (tmp_path / "good.toml").write_text(GOOD)
    res = run_cli(tmp_path, "config", "check", "--config", "good.toml")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "OK" in text.splitlines()[0] and "good.toml" in text.splitlines()[0]
    smtp_table = text.split("[smtp]\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert "max_recipients = 7" in smtp_table  # set in the file
    assert "max_text_line = 1000" in smtp_table  # a default filled in
    for table in ("[host]", "[listen]", "[pop3]", "[journal]", "[pool.smtp-server]",
                  "[pool.pop-server]", "[pool.framework]"):
        assert table in text
