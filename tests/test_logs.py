"""What an administrator greps for, on a real host: timestamped log lines for connections,
rejections, accepted messages, deliveries and job deaths; rejections journaled 9R; and the
shipped asyncio content check at work inside the SMTP jobs."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
from typing import Any

import pytest
from hosthelp import Host, wait_for

CHECK = """
[[check]]
function = "mailpool.checks.example:check"
timeout = 5.0
"""
STAMP = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d "


def log_lines(h: Host, pattern: str) -> list[str]:
    return [line for line in h.log_path.read_text().splitlines() if re.search(pattern, line)]


def wait_log(h: Host, pattern: str, what: str) -> list[str]:
    return wait_for(lambda: log_lines(h, pattern), 20, what=what)


@pytest.fixture
def h(host: Any) -> Host:
    started: Host = host(CHECK)
    started.add_user("alice", "alice@example.test")
    return started


def test_session_acceptance_and_delivery_are_logged(h: Host) -> None:
    with smtplib.SMTP(*h.smtp, timeout=10) as s:
        s.ehlo("client.example.test")
        s.sendmail("bob@remote.test", ["alice@example.test"],
                   b"From: bob@remote.test\r\nSubject: hi\r\n\r\nbody\r\n")
    h.wait_delivered("alice", 1)
    connect = wait_log(h, r"smtp-server/\d+\[\d+\]: connect from \[127\.0\.0\.1\]:\d+ on smtp$",
                       "the connect line")
    assert re.match(STAMP, connect[0]), connect[0]
    accepted = wait_log(h, r": \w+: client=\[127\.0\.0\.1\], from=<bob@remote\.test>, nrcpt=1, "
                           r"size=\d+, message-id=<[^>]+>$", "the accepted line")
    qid = re.search(r": (\w+): client=", accepted[0]).group(1)  # type: ignore[union-attr]
    sent = wait_log(h, rf"framework/\d+\[\d+\]: {qid}: to=<alice@example\.test>, relay=local, "
                       r"delay=[\d.]+, status=sent \(delivered to mailbox alice\)$",
                    "the delivery line")
    assert re.match(STAMP, sent[0])
    wait_log(h, r"disconnect from \[127\.0\.0\.1\] messages=1 rejected=0$", "the disconnect")


def test_rejections_are_logged_and_journaled(h: Host) -> None:
    with smtplib.SMTP(*h.smtp, timeout=10) as s:
        s.ehlo("client.example.test")
        s.mail("bob@remote.test")
        code, text = s.rcpt("nobody@example.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, _ = s.rcpt("alice@example.test")
        assert code == 250
        # The example check refuses a message without From:.
        code, text = s.data(b"Subject: no from\r\n\r\nbody\r\n")
        assert (code, text) == (550, b"5.6.0 Message has no From header")
    line = wait_log(h, r"NOQUEUE: reject: RCPT from \[127\.0\.0\.1\]: 550 5\.1\.1 "
                       r"<nobody@example\.test>: Recipient address rejected: User unknown in "
                       r"local recipient table; from=<bob@remote\.test> "
                       r"to=<nobody@example\.test> helo=<client\.example\.test>$",
                    "the RCPT rejection line")
    assert re.match(STAMP, line[0])
    wait_log(h, r"NOQUEUE: reject: DATA from \[127\.0\.0\.1\]: 550 5\.6\.0 Message has no From "
                r"header; from=<bob@remote\.test> to=<> helo=<client\.example\.test>$",
             "the DATA rejection line")
    wait_log(h, r"disconnect from \[127\.0\.0\.1\] messages=0 rejected=2$", "the disconnect")
    records = wait_for(lambda: len(h.journal("--code", "9R")) >= 2 and h.journal("--code", "9R"),
                       10, what="two 9R records")
    rcpt, data = records
    assert rcpt["recipient"] == "nobody@example.test" and rcpt["ip"] == "127.0.0.1"
    assert rcpt["originator"] == "bob@remote.test"
    assert rcpt["detail"].startswith("RCPT 550 5.1.1 <nobody@example.test>: Recipient address")
    assert data["detail"] == "DATA 550 5.6.0 Message has no From header"
    ow = h.journal("--code", "OW")
    assert [r["detail"] for r in ow] == ["refused by mailpool.checks.example:check: "
                                         "550 5.6.0 Message has no From header"]


def test_example_check_quarantines_marked_mail(h: Host) -> None:
    with smtplib.SMTP(*h.smtp, timeout=10) as s:
        s.ehlo("client.example.test")
        s.sendmail("bob@remote.test", ["alice@example.test"],
                   b"From: bob@remote.test\r\nX-Spam-Flag: YES\r\n\r\nbuy now\r\n")
    wait_for(lambda: h.queue_files("quarantine"), 10, what="the message in quarantine")
    assert h.maildir_files("alice") == []
    (record,) = h.journal("--code", "OW")
    assert record["detail"] == ("kept in quarantine: mailpool.checks.example:check: "
                                "marked X-Spam-Flag: YES")
    qid = record["queue_id"]
    # Released by the operator, it is delivered (not checked again).
    h.cli("queue", "release", qid)
    h.wait_delivered("alice", 1)


def test_a_job_killed_by_a_signal_is_logged(h: Host) -> None:
    (js,) = [r for r in h.journal("--code", "JS") if r["entry"] == "framework"][:1]
    os.kill(js["pid"], signal.SIGKILL)
    wait_log(h, rf"framework/\d+ \(pid {js['pid']}\) ended: killed by signal 9 \(SIGKILL\) "
                r"\(crash\)$", "the job death line")
    ended = wait_for(lambda: [r for r in h.journal("--code", "JE") if r["pid"] == js["pid"]],
                     10, what="the JE record")
    assert ended[0]["reason"] == "killed by signal 9 (SIGKILL)"


def test_lines_also_go_to_syslog(host: Any) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(0.5)
        port = receiver.getsockname()[1]
        h: Host = host(f'[log]\nsyslog = true\nsyslog_address = "127.0.0.1:{port}"\n'
                       'syslog_facility = "mail"\n')
        with smtplib.SMTP(*h.smtp, timeout=10) as s:
            s.noop()
        got: list[bytes] = []

        def connect_line() -> bool:
            try:
                got.append(receiver.recv(65536))
            except TimeoutError:
                pass
            return any(b"connect from [127.0.0.1]" in d for d in got)

        wait_for(connect_line, 20, what="the connect line over syslog")
        line = next(d for d in got if b"connect from [127.0.0.1]" in d)
        # <PRI>: facility mail (2) * 8 + info (6) = 22; then the ident with the job's pid.
        assert re.match(rb"<22>mailpool/smtp-server/\d+\[\d+\]: connect from ", line), line
