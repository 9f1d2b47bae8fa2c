"""The operator's queue tools (postqueue / postsuper / postcat for mailpool), on a real host."""

from __future__ import annotations

import json
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest
from dnsserver import DnsServer
from hosthelp import Host, wait_for
from outhelp import SmtpSink, free_port, outbound_config


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        server.servfail("stuck.test")  # temporary: mail for it waits in retry1
        yield server


def send(h: Host, rcpt: str, subject: str = "queued") -> str:
    with smtplib.SMTP(*h.smtp, timeout=10) as s:
        s.ehlo("client.example.test")
        s.mail("alice@example.test")
        s.rcpt(rcpt)
        code, text = s.data(f"Subject: {subject}\r\n\r\nbody line\r\n".encode())
        assert code == 250
    return text.decode().rsplit(" ", 1)[-1]


def rows(h: Host, *args: str) -> list[dict[str, Any]]:
    out = h.cli("queue", "list", "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


def where(h: Host, qid: str) -> str | None:
    found = [r["queue_name"] for r in rows(h) if r["queue_id"] == qid]
    return found[0] if found else None


def test_show_hold_release_requeue_delete(host: Any, dns: DnsServer) -> None:
    h = host(outbound_config(dns.port, free_port(), "[retry]\nfirst_interval = 600.0\n"))
    h.add_user("alice", "alice@example.test")
    qid = send(h, "bob@stuck.test")
    wait_for(lambda: where(h, qid) == "retry1", 20, what="the message in retry1")
    shown = h.cli("queue", "show", qid).stdout
    assert f"queue_id: {qid}" in shown and "sender: alice@example.test" in shown
    assert "recipient: bob@stuck.test [pending: " in shown and "try again" in shown
    assert "Subject: queued" in shown and "body line" in shown
    assert h.cli("queue", "show", qid, "--headers").stdout.strip().endswith("Subject: queued")
    assert h.cli("queue", "show", qid, "--body").stdout == "body line\n"
    assert "on hold" in h.cli("queue", "hold", qid).stdout
    assert where(h, qid) == "hold"
    h.cli("queue", "release", qid)
    wait_for(lambda: where(h, qid) == "retry1", 20, what="released, deferred again")
    assert "back on the incoming queue" in h.cli("queue", "requeue", qid).stdout
    wait_for(lambda: where(h, qid) == "retry1", 20, what="requeued, deferred again")
    codes = [r["code"] for r in h.journal("--queue-id", qid)]
    for code in ("QH", "QR", "QQ"):
        assert code in codes, codes
    # ALL: everything on hold, then everything deleted.
    other = send(h, "carol@stuck.test")
    wait_for(lambda: where(h, other) == "retry1", 20, what="a second message deferred")
    out = h.cli("queue", "hold", "ALL").stdout
    assert qid in out and other in out
    assert {r["queue_name"] for r in rows(h)} == {"hold"}
    out = h.cli("queue", "delete", "ALL").stdout
    assert qid in out and other in out and rows(h) == []
    assert len(h.journal("--code", "QD")) == 2
    res = h.cli("queue", "delete", qid, check=False)
    assert res.returncode == 1 and "no such message" in res.stderr


def test_list_and_show_work_with_the_host_stopped(host: Any, dns: DnsServer) -> None:
    h = host(outbound_config(dns.port, free_port(), "[retry]\nfirst_interval = 600.0\n"))
    h.add_user("alice", "alice@example.test")
    qid = send(h, "dave@stuck.test")
    wait_for(lambda: where(h, qid) == "retry1", 20, what="deferred")
    h.stop()
    assert where(h, qid) == "retry1"
    assert f"queue_id: {qid}" in h.cli("queue", "show", qid).stdout
    res = h.cli("queue", "hold", qid, check=False)
    assert res.returncode == 1 and "no running mailpool" in res.stderr
    assert h.cli("queue", "list").stdout.startswith("-Queue ID-")


def test_release_and_requeue_never_deliver_a_recipient_twice(host: Any, dns: DnsServer,
                                                             tmp_path: Any) -> None:
    port = free_port(("127.0.0.1", "127.0.0.2"))
    dns.add("ok.test", "MX", "10 mx.ok.test.")
    dns.add("mx.ok.test", "A", "127.0.0.2")
    sink = SmtpSink(tmp_path, "127.0.0.2", port)
    try:
        h = host(outbound_config(dns.port, port, "[retry]\nfirst_interval = 600.0\n"))
        with smtplib.SMTP(*h.smtp, timeout=10) as s:
            s.ehlo("client.example.test")
            s.sendmail("alice@example.test", ["bob@ok.test", "carol@stuck.test"],
                       b"Subject: two\r\n\r\nbody\r\n")
        sink.wait_messages(1)
        qid = wait_for(lambda: [r["queue_id"] for r in rows(h) if r["queue_name"] == "retry1"],
                       20, what="the message deferred for carol")[0]
        shown = h.cli("queue", "show", qid).stdout
        assert "recipient: bob@ok.test [delivered: " in shown
        assert "recipient: carol@stuck.test [pending: " in shown
        # Held on its way out, released: back to the outbound queue with its state.
        h.cli("queue", "hold", qid)
        assert h.cli("queue", "release", qid).stdout
        qr = wait_for(lambda: h.journal("--code", "QR"), 10, what="QR")
        assert qr[-1]["detail"] == "released by the operator to outbound"
        wait_for(lambda: where(h, qid) == "retry1" and
                 "attempts: 2" in h.cli("queue", "show", qid).stdout, 20,
                 what="a second attempt for carol only")
        # Requeued: through the framework again with carol alone.
        h.cli("queue", "requeue", qid)
        wait_for(lambda: where(h, qid) == "retry1", 20, what="requeued, deferred again")
        shown = h.cli("queue", "show", qid).stdout
        assert "bob@ok.test" not in shown.split("*** MESSAGE CONTENTS ***")[0]
        assert len(sink.messages()) == 1  # bob got it once
    finally:
        sink.stop()
