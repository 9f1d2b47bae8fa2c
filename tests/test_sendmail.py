"""Mail from programs: the `sendmail` command (Postfix's options and exit codes) and the
source's send-mail API (QtmmSendMail), end to end on a real host: the message enters the
incoming queue durably, is delivered to the Maildir byte for byte as expected, and is
journaled EH E1 E2 ET by the framework.

`sendmail` runs as its own process (`python -m mailpool.sendmail`, what the console-script
alias runs) fed through a pipe; the API runs in this process. Refusals need no host: they are
checked against a configuration whose data directory no host serves.
"""

from __future__ import annotations

import io
import os
import pwd
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hosthelp import MAILPOOL, Host, config_text, wait_for

from mailpool.config import load_config
from mailpool.directory import Directory
from mailpool.framework.spool import Spool
from mailpool.journal.reader import iter_records
from mailpool.sendmail import parse_address_list, read_message
from mailpool.sendmail_api import BCC, CC, NORMAL, Recipient, SendMailError, send_mail
from mailpool.submit import split_header

SENDMAIL = [sys.executable, "-m", "mailpool.sendmail"]
HOSTNAME = "mail.example.test"
MAX_SIZE = 4096
CONFIG = f"""
[smtp]
max_message_size = {MAX_SIZE}

[pool.pop-server]
start_jobs = false
"""
USERS = ["bob", "carol", "dave", "erin", "frank", "gina", "hank", "ivan", "judy", "kim",
         "lou", "max", "ned", "olga"]
LOGIN = pwd.getpwuid(os.getuid()).pw_name
UID = os.getuid()
DATE_RE = rb"[A-Z][a-z][a-z], \d\d? [A-Z][a-z][a-z] \d{4} \d\d:\d\d:\d\d [+-]\d{4}"


@pytest.fixture(scope="module")
def mailhost(module_host: Any) -> Host:
    host = module_host(CONFIG, name="sendmail")
    directory = Directory(host.data / "directory.json")
    for name in USERS:
        directory.add_user(name, [f"{name}@example.test"], None)
    directory.add_user("dave2", ["dave@other.test"], None)
    return host


@pytest.fixture
def idle_config(tmp_path: Path) -> Path:
    """A configuration no host runs on (and its users): for refusals and for queuing."""
    path = tmp_path / "idle.toml"
    path.write_text(config_text(CONFIG))
    Directory(tmp_path / "var" / "directory.json").add_user("bob", ["bob@example.test"], None)
    return path


def sendmail(config: Path | None, *args: str, data: bytes = b"",
             env: dict[str, str] | None = None,
             command: list[str] = SENDMAIL) -> subprocess.CompletedProcess[bytes]:
    argv = [*command, *args] + (["--config", str(config)] if config is not None else [])
    environment = {**os.environ, "NAME": "Cron Daemon", **(env or {})}
    return subprocess.run(argv, input=data, capture_output=True, timeout=60, env=environment)


def delivered(host: Host, user: str, count: int = 1) -> list[bytes]:
    return [p.read_bytes() for p in host.wait_delivered(user, count)]


def queue_id_of(host: Host, user: str) -> str:
    (path,) = host.wait_delivered(user, 1)
    return path.name.split(".")[0]


def records(host: Host, queue_id: str) -> list[Any]:
    return [r for r in iter_records(host.data / "journal")
            if r.fields.get("queue_id") == queue_id]


def wait_codes(host: Host, queue_id: str, last: str, count: int) -> list[str]:
    """The queue id's journal codes, once `last` is there `count` times."""
    return wait_for(lambda: (codes := [r.code for r in records(host, queue_id)]).count(last)
                    >= count and codes, what=f"{last} x{count} for {queue_id}")


def one_line_error(res: subprocess.CompletedProcess[bytes]) -> str:
    text = res.stderr.decode()
    assert text.count("\n") == 1 and text.startswith("sendmail: "), text
    assert "Traceback" not in text
    return text


def local_received(queue_id: str, protocol: bytes = b"local") -> bytes:
    return (rb"Received: from local \(uid " + str(UID).encode() + rb"\)\r\n"
            rb"\tby mail\.example\.test \(mailpool\) with " + protocol + rb" id "
            + queue_id.encode() + rb";\r\n\t" + DATE_RE + rb"\r\n")


# --- pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "addresses"), [
    ("bob@example.test", ["bob@example.test"]),
    ("Bob <bob@example.test>, carol", ["bob@example.test", "carol"]),
    ('"Smith, J" <j@x.test> (comment, with comma)', ["j@x.test"]),
    ("team: a@x.test, b@x.test;, c@x.test", ["a@x.test", "b@x.test", "c@x.test"]),
    ("undisclosed-recipients:;", []),
    ("<>", [""]),
    ("<@relay.test:u@x.test>", ["u@x.test"]),
    ("x@[IPv6:::1]", ["x@[IPv6:::1]"]),
    ("not an address", ["not an address"]),
])
def test_address_lists_read_as_postfix_reads_arguments(text: str, addresses: list[str]) -> None:
    assert parse_address_list(text) == addresses


def test_header_section_split_keeps_folded_fields_whole() -> None:
    msg = b"To: a@x.test\r\nBcc: b@x.test,\r\n c@x.test\r\nSubject: s\r\n\r\nBcc: body\r\n"
    header = split_header(msg)
    assert header.fields == (b"To: a@x.test\r\n", b"Bcc: b@x.test,\r\n c@x.test\r\n",
                             b"Subject: s\r\n")
    assert header.ended and header.body == b"Bcc: body\r\n"
    assert header.values("bcc") == ["b@x.test, c@x.test"]
    assert header.without("bcc").join() == (b"To: a@x.test\r\nSubject: s\r\n\r\n"
                                            b"Bcc: body\r\n")
    # No empty line: the header section ends at the first line that is not a field, and
    # the message gets the empty line back when it is joined.
    plain = split_header(b"Subject: s\r\nhello\r\n")
    assert not plain.ended and plain.body == b"hello\r\n"
    assert plain.plus(b"Date: d\r\n").join() == b"Subject: s\r\nDate: d\r\n\r\nhello\r\n"


def test_input_ends_at_a_lone_dot_unless_i_and_mbox_from_lines_go() -> None:
    raw = b"From someone Mon Jan  1 00:00:00 2024\nSubject: x\n\na\n.\nb\n"
    assert read_message(io.BytesIO(raw), dot_ends=True, limit=100) == b"Subject: x\n\na\n"
    assert read_message(io.BytesIO(raw), dot_ends=False, limit=100) == (
        b"Subject: x\n\na\n.\nb\n")
    assert read_message(io.BytesIO(b"a\n."), dot_ends=True, limit=100) == b"a\n"
    assert read_message(io.BytesIO(b"a\n.."), dot_ends=True, limit=100) == b"a\n.."


# --- sendmail -------------------------------------------------------------------------------


def test_recipients_as_arguments_get_trace_id_from_and_date(mailhost: Host) -> None:
    message = b"Subject: arguments\nX-Seq: 1\n\nline one\n.\nline three\n"
    res = sendmail(mailhost.config_path, "-i", "bob@example.test", "carol", data=message)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"" and res.stderr == b""
    queue_id = queue_id_of(mailhost, "bob")
    for user in ("bob", "carol"):
        (copy,) = delivered(mailhost, user)
        expected = (
            rb"Return-Path: <" + LOGIN.encode() + rb"@example\.test>\r\n"
            rb"Delivered-To: " + user.encode() + rb"@example\.test\r\n"
            + local_received(queue_id)
            + rb"Message-ID: <" + queue_id.encode() + rb"@mail\.example\.test>\r\n"
            rb"Subject: arguments\r\nX-Seq: 1\r\n"
            rb"From: Cron Daemon <" + LOGIN.encode() + rb"@example\.test>\r\n"
            rb"Date: " + DATE_RE + rb"\r\n"
            rb"\r\nline one\r\n\.\r\nline three\r\n")
        assert re.fullmatch(expected, copy), copy
    codes = wait_codes(mailhost, queue_id, "B2", 2)
    # The framework journals the send-mail entries first (the SMTP server's 94 91 92 ...
    # are for SMTP mail), then the pass as for any message.
    assert codes == ["EH", "E1", "E2", "E2", "ET", "7A", "7H", "71", "72", "72",
                     "P2", "B8", "B2", "P2", "B8", "B2"]
    recs = {r.code: r.fields for r in records(mailhost, queue_id)}
    assert recs["EH"]["detail"] == "sendmail"
    assert recs["E1"]["originator"] == f"{LOGIN}@example.test"
    assert [r.fields["recipient"] for r in records(mailhost, queue_id) if r.code == "E2"] == [
        "bob@example.test", "carol@example.test"]
    assert recs["ET"]["size"] == len(copy) - len(
        f"Return-Path: <{LOGIN}@example.test>\r\nDelivered-To: carol@example.test\r\n")


def test_a_lone_dot_ends_the_message_unless_i_or_oi(mailhost: Host) -> None:
    message = b"Subject: dots\nFrom: me@example.test\nDate: x\n\nbefore\n.\nafter\n"
    assert sendmail(mailhost.config_path, "dave@example.test", data=message).returncode == 0
    assert sendmail(mailhost.config_path, "-oi", "erin@example.test",
                    data=message).returncode == 0
    (cut,) = delivered(mailhost, "dave")
    (whole,) = delivered(mailhost, "erin")
    assert cut.endswith(b"Subject: dots\r\nFrom: me@example.test\r\nDate: x\r\n\r\n"
                        b"before\r\n")
    assert whole.endswith(b"Date: x\r\n\r\nbefore\r\n.\r\nafter\r\n")


def test_t_takes_to_cc_and_bcc_adds_arguments_and_removes_bcc(mailhost: Host) -> None:
    message = (b"From: App <app@example.test>\n"
               b"To: Frank <frank@example.test>\n"
               b"Cc: gina@example.test, \"Hank, H.\" <hank@example.test>\n"
               b"Bcc: ivan@example.test,\n  dave@other.test\n"
               b"Subject: extracted\n"
               b"Date: Mon, 1 Jan 2024 00:00:00 +0000\n"
               b"\n"
               b"Bcc: in the body stays\n")
    res = sendmail(mailhost.config_path, "-t", "-f", "app@example.test", "judy",
                   data=message)
    assert res.returncode == 0, res.stderr
    headers = (b"From: App <app@example.test>\r\n"
               b"To: Frank <frank@example.test>\r\n"
               b"Cc: gina@example.test, \"Hank, H.\" <hank@example.test>\r\n"
               b"Subject: extracted\r\n"
               b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
               b"\r\n"
               b"Bcc: in the body stays\r\n")
    for user in ("frank", "gina", "hank", "ivan", "dave2", "judy"):
        (copy,) = delivered(mailhost, user)
        assert copy.endswith(b"@mail.example.test>\r\n" + headers), copy
        assert copy.startswith(b"Return-Path: <app@example.test>\r\n")
        assert b"ivan@" not in copy.replace(b"Delivered-To: ivan@", b"")


def test_f_and_full_name_make_the_sender_and_from(mailhost: Host) -> None:
    res = sendmail(mailhost.config_path, "-f", "<robot@elsewhere.test>", "-F", "Jö Bot",
                   "kim", data=b"Subject: who\n\nbody\n")
    assert res.returncode == 0, res.stderr
    (copy,) = delivered(mailhost, "kim")
    assert copy.startswith(b"Return-Path: <robot@elsewhere.test>\r\n")
    assert b"\r\nSubject: who\r\nFrom: =?utf-8?q?J=C3=B6_Bot?= <robot@elsewhere.test>\r\n" \
        in copy
    # A From: in the message is left alone; -f <> is the null sender (no From: added).
    res = sendmail(mailhost.config_path, "-f", "<>", "-F", "Ignored", "lou",
                   data=b"Subject: null\n\nbody\n")
    assert res.returncode == 0, res.stderr
    (copy,) = delivered(mailhost, "lou")
    assert copy.startswith(b"Return-Path: <>\r\n")
    assert b"From:" not in copy and b"Ignored" not in copy


def test_bs_speaks_smtp_on_stdin_and_stdout(mailhost: Host) -> None:
    proc = subprocess.Popen([*SENDMAIL, "-bs", "--config", str(mailhost.config_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline() == b"220 mail.example.test ESMTP mailpool\r\n"
    # The rest at once, bare LF line ends and all, as a script writes it.
    proc.stdin.write(b"EHLO script.example.test\n"
                     b"MAIL FROM:<cron@example.test>\n"
                     b"RCPT TO:<max@example.test>\n"
                     b"RCPT TO:<nobody@example.test>\n"
                     b"DATA\n"
                     b"Subject: over smtp\n\n..dot-stuffed\nlast\n.\n"
                     b"QUIT\n")
    proc.stdin.close()
    out = proc.stdout.read().decode()
    assert proc.wait(30) == 0
    queue_id = queue_id_of(mailhost, "max")
    assert out == (
        "250-mail.example.test\r\n"
        f"250-SIZE {MAX_SIZE}\r\n"
        "250-8BITMIME\r\n"
        "250-PIPELINING\r\n"
        "250-ENHANCEDSTATUSCODES\r\n"
        "250 HELP\r\n"
        "250 2.1.0 Ok\r\n"
        "250 2.1.5 Ok\r\n"
        "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown in local "
        "recipient table\r\n"
        "354 End data with <CR><LF>.<CR><LF>\r\n"
        f"250 2.0.0 Ok: queued as {queue_id}\r\n"
        "221 2.0.0 Bye\r\n")
    (copy,) = delivered(mailhost, "max")
    assert re.fullmatch(rb"Return-Path: <cron@example\.test>\r\nDelivered-To: max@example\.test"
                        rb"\r\n" + local_received(queue_id, b"ESMTP")
                        + rb"Message-ID: <" + queue_id.encode() + rb"@mail\.example\.test>\r\n"
                        rb"Subject: over smtp\r\n\r\n\.dot-stuffed\r\nlast\r\n", copy), copy
    assert wait_codes(mailhost, queue_id, "B2", 1)[:4] == ["EH", "E1", "E2", "ET"]


def test_mailpool_sendmail_is_the_same_command(mailhost: Host) -> None:
    res = sendmail(mailhost.config_path, "-oi", "ned", data=b"Subject: sub\n\nx\n",
                   command=[*MAILPOOL, "sendmail"])
    assert res.returncode == 0, res.stderr
    (copy,) = delivered(mailhost, "ned")
    assert re.search(rb"\r\nSubject: sub\r\nFrom: Cron Daemon <" + LOGIN.encode()
                     + rb"@example\.test>\r\nDate: " + DATE_RE + rb"\r\n\r\nx\r\n\Z", copy)
    res = sendmail(mailhost.config_path, "-Z", "ned", command=[*MAILPOOL, "sendmail"])
    assert res.returncode == 64
    one_line_error(res)


def test_mailpool_config_from_the_environment(mailhost: Host) -> None:
    res = sendmail(None, "olga", data=b"Subject: env\n\nx\n",
                   env={"MAILPOOL_CONFIG": str(mailhost.config_path)})
    assert res.returncode == 0, res.stderr
    assert delivered(mailhost, "olga")[0].endswith(b"\r\n\r\nx\r\n")


@pytest.mark.parametrize(("args", "code", "error"), [
    (["-Z", "bob"], 64, "-Z: unknown option"),
    (["-bp"], 64, "unsupported: -bp"),
    (["-bs", "-t"], 64, "-t can be used only in delivery mode"),
    (["-bs", "bob"], 64, "stand-alone mode requires no recipient"),
    (["-q"], 64, "-q:"),
    (["-B", "BINARYMIME", "bob"], 64, "-B option needs 8BITMIME or 7BIT"),
    (["-N", "sometimes", "bob"], 64, "-N 'sometimes'"),
    ([], 64, "recipient addresses must be given as arguments or with -t"),
    (["not an address"], 65, "bad address syntax"),
    (["bob@@example.test"], 65, "bad address syntax"),
    (["-f", "a b@example.test", "bob"], 65, "sender 'a b@example.test': bad address syntax"),
    (["x" * 250 + "@example.test"], 65, "longer than 256 bytes"),
    (["nosuch@example.test"], 67, "<nosuch@example.test>: User unknown"),
    (["-t"], 65, "no recipient addresses found in message header"),
])
def test_refusals_exit_with_sysexits_and_queue_nothing(idle_config: Path, args: list[str],
                                                       code: int, error: str) -> None:
    res = sendmail(idle_config, *args, data=b"Subject: no\n\nx\n")
    assert res.returncode == code, res.stderr
    assert error in one_line_error(res)
    assert not list((idle_config.parent / "var" / "spool" / "incoming").glob("*"))


def test_ignored_options_are_accepted(idle_config: Path) -> None:
    res = sendmail(idle_config, "-oem", "-odb", "-v", "-Am", "-U", "-L", "label", "-oi",
                   "bob", data=b"Subject: ok\n\nx\n")
    assert res.returncode == 0, res.stderr
    assert res.stderr == b""  # one -v says nothing, as in Postfix
    assert len(list((idle_config.parent / "var" / "spool" / "incoming").glob("*"))) == 1


def test_too_big_and_config_and_queue_failures(idle_config: Path, tmp_path: Path) -> None:
    res = sendmail(idle_config, "bob", data=b"Subject: big\n\n" + b"x" * MAX_SIZE)
    assert res.returncode == 65
    assert "exceeds the limit of 4096 bytes" in one_line_error(res)
    res = sendmail(tmp_path / "missing.toml", "bob", data=b"x\n")
    assert res.returncode == 78
    assert "missing.toml: cannot read" in one_line_error(res)
    # The queue cannot be written (its tmp directory is a file): a temporary failure.
    spool = idle_config.parent / "var" / "spool"
    spool.mkdir(parents=True)
    (spool / "tmp").write_text("not a directory")
    res = sendmail(idle_config, "bob", data=b"Subject: q\n\nx\n")
    assert res.returncode == 75
    assert "cannot write the incoming queue" in one_line_error(res)


def test_with_the_host_stopped_mail_waits_and_goes_when_it_starts(host: Any) -> None:
    h = host(CONFIG, name="stopped")
    Directory(h.data / "directory.json").add_user("pat", ["pat@example.test"], None)
    h.stop()
    res = sendmail(h.config_path, "-vv", "pat", data=b"Subject: later\n\nx\n")
    assert res.returncode == 0, res.stderr
    queue_id = re.fullmatch(r"sendmail: queued as (\S+)\n", res.stderr.decode()).group(1)
    assert [p.name for p in h.queue_files("incoming")] == [queue_id]
    assert h.maildir_files("pat") == []
    h.start()
    (path,) = h.wait_delivered("pat", 1)
    assert path.name.startswith(queue_id + ".")
    assert wait_codes(h, queue_id, "B2", 1)[:4] == ["EH", "E1", "E2", "ET"]
    assert h.queue_files("incoming") == []


# --- the send-mail API (QtmmSendMail) -------------------------------------------------------


def mime_file(directory: Path, content: bytes, name: str = "note.mime") -> Path:
    path = directory / name
    path.write_bytes(content)
    return path


def test_api_queues_the_file_as_is_unlinks_it_and_journals_eh(mailhost: Host,
                                                              tmp_path: Path) -> None:
    note = (b"From: App <app@example.test>\n"
            b"To: bob@example.test\n"
            b"Cc: carol@example.test\n"
            b"Subject: report\n"
            b"Message-ID: <report-1@app.example.test>\n"
            b"MIME-Version: 1.0\n"
            b"Content-Type: text/plain; charset=us-ascii\n"
            b"\n"
            b"Totals attached.\n")
    path = mime_file(tmp_path, note)
    # Delivered to fresh users: earlier tests have their own.
    Directory(mailhost.data / "directory.json").add_user("api1", ["api1@example.test"], None)
    Directory(mailhost.data / "directory.json").add_user("api2", ["api2@example.test"], None)
    Directory(mailhost.data / "directory.json").add_user("api3", ["api3@example.test"], None)
    queue_id = send_mail(path, "app@example.test",
                         [Recipient("api1@example.test", NORMAL),
                          Recipient("api2@example.test", CC),
                          Recipient("api3@example.test", BCC)],
                         config=mailhost.config_path)
    assert not path.exists()  # the framework's built-in exit unlinks it in the source
    for user in ("api1", "api2", "api3"):
        (copy,) = delivered(mailhost, user)
        assert re.fullmatch(rb"Return-Path: <app@example\.test>\r\nDelivered-To: "
                            + user.encode() + rb"@example\.test\r\n" + local_received(queue_id)
                            + re.escape(note.replace(b"\n", b"\r\n")), copy), copy
    codes = wait_codes(mailhost, queue_id, "B2", 3)
    assert codes == ["EH", "E1", "E2", "E2", "E2", "ET", "7A", "7H", "71", "72", "72", "72",
                     *["P2", "B8", "B2"] * 3]
    recs = records(mailhost, queue_id)
    assert recs[0].fields["detail"] == "api"
    assert recs[0].fields["message_id"] == "report-1@app.example.test"
    assert recs[1].fields["originator"] == "app@example.test"
    assert [r.fields["recipient"] for r in recs[2:5]] == [
        "api1@example.test", "api2@example.test", "api3@example.test"]
    assert recs[5].fields["size"] == len(copy) - len(
        b"Return-Path: <app@example.test>\r\nDelivered-To: api3@example.test\r\n")


GOOD = [Recipient("bob@example.test", NORMAL)]


@pytest.mark.parametrize(("name", "originator", "recipients", "content", "message_id",
                          "text"), [
    ("/nonexistent/note.mime", "a@example.test", GOOD, None, "CPFA0A9",
     "The object was not found."),
    ("note.mime", "a@example.test", GOOD, None, "CPFA0CE",
     "The path name parameter that was specified resulted in an error."),
    ("/" + "d" * 255, "a@example.test", GOOD, None, "CPFA0CE", None),
    ("{dir}", "a@example.test", GOOD, None, "CPFA0CE", None),
    ("", "a@example.test", GOOD, None, "CPF3C12", None),
    ("{file}", "", GOOD, b"S: x\n\nb\n", "CPF3C12", "The length of data is not valid."),
    ("{file}", "a" * 245 + "@example.test", GOOD, b"S: x\n\nb\n", "CPF3C12", None),
    ("{file}", "a@example.test", [Recipient("b" * 245 + "@example.test")], b"S: x\n\nb\n",
     "CPF3C12", None),
    ("{file}", "a@example.test", [], b"S: x\n\nb\n", "CPF3C88",
     "The number of variable length records 0 is not valid."),
    ("{file}", "a@example.test", [Recipient("bob@example.test", 3)], b"S: x\n\nb\n",
     "CPF3C17", "An error occurred with input data parameter."),
    ("{file}", "a@example.test", [Recipient("bob@example.test", NORMAL, reserved=1)],
     b"S: x\n\nb\n", "CPF3C39", "The value for the reserved field is not valid."),
    ("{file}", "a@example.test", [Recipient("bob@example.test", format_name="ADDT0200")],
     b"S: x\n\nb\n", "CPF3C21", "The format name (ADDT0200) is not valid."),
    ("{file}", "a@example.test", [Recipient("bob at example.test")], b"S: x\n\nb\n",
     "CPF3C17", None),
    ("{file}", "not an address", GOOD, b"S: x\n\nb\n", "CPF3C17", None),
    ("{file}", "a@example.test", GOOD, b"Subject: no end of header\n", "CPF3C17", None),
    ("{file}", "a@example.test", GOOD, b"S: x\n\n" + b"y" * MAX_SIZE, "CPF3E0A",
     "The resource limits were exceeded."),
])
def test_api_errors_carry_the_source_identifiers(idle_config: Path, tmp_path: Path,
                                                 name: str, originator: str,
                                                 recipients: list[Recipient],
                                                 content: bytes | None, message_id: str,
                                                 text: str | None) -> None:
    (tmp_path / "adir").mkdir()
    path = mime_file(tmp_path, content or b"S: x\n\nb\n")
    name = name.format(dir=tmp_path / "adir", file=path)
    with pytest.raises(SendMailError) as info:
        send_mail(name, originator, recipients, config=load_config(idle_config))
    assert info.value.message_id == message_id
    if text is not None:
        assert info.value.text == text
    assert str(info.value).startswith(f"{message_id}: {info.value.text} (")
    assert path.exists()  # not taken: the caller still has it
    assert not list((idle_config.parent / "var" / "spool" / "incoming").glob("*"))


def test_api_without_a_host_queues_for_the_next_start(idle_config: Path,
                                                      tmp_path: Path) -> None:
    path = mime_file(tmp_path, b"Subject: s\r\n\r\nbody\r\n")
    queue_id = send_mail(path, "a@example.test", GOOD, config=idle_config)
    incoming = idle_config.parent / "var" / "spool" / "incoming"
    assert [p.name for p in incoming.glob("*")] == [queue_id]
    assert not path.exists()


def test_dsn_options_go_into_the_envelope(idle_config: Path) -> None:
    res = sendmail(idle_config, "-vv", "-N", "success,failure", "-R", "hdrs", "-V", "env-1",
                   "bob", data=b"Subject: dsn\n\nx\n")
    assert res.returncode == 0, res.stderr
    queue_id = res.stderr.decode().split()[-1]
    envelope = Spool(idle_config.parent / "var" / "spool").load_envelope("incoming", queue_id)
    assert (envelope.notify, envelope.ret, envelope.envid, envelope.source) == (
        ["SUCCESS,FAILURE"], "HDRS", "env-1", "sendmail")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run as one user for another")
def test_root_queues_files_the_host_user_can_read(idle_config: Path) -> None:
    """A host started as root runs as [host] user and owns the spool: mail root submits must
    be that user's, or the framework could not read it."""
    spool = Spool(idle_config.parent / "var" / "spool")
    nobody = pwd.getpwnam("nobody")
    for path in (spool.root, *spool.root.iterdir()):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    res = sendmail(idle_config, "-vv", "bob", data=b"Subject: owner\n\nx\n")
    assert res.returncode == 0, res.stderr
    queue_id = res.stderr.decode().split()[-1]
    st = os.stat(spool.path("incoming", queue_id))
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
