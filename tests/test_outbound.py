"""Outbound delivery end to end: a real host, the suite's DNS server, smtp-sink as remote MX.

Every MX host listens on one port (mailpool's [outbound] port) at its own loopback address;
the DNS server (tests/dnsserver.py) tells mailpool which is which.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dnsserver import DnsServer
from hosthelp import Host, wait_for
from outhelp import SmtpSink, free_port, needs_sink, outbound_config, sink_envelope

pytestmark = needs_sink

IPS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6")


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture
def port() -> int:
    return free_port(IPS)


@pytest.fixture
def sinks(tmp_path: Path, port: int) -> Iterator[Callable[..., SmtpSink]]:
    started: list[SmtpSink] = []

    def start(ip: str, *options: str) -> SmtpSink:
        sink = SmtpSink(tmp_path, ip, port, list(options))
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()


@pytest.fixture
def outhost(host: Any, dns: DnsServer, port: int) -> Callable[..., Host]:
    def make(extra: str = "", **kw: Any) -> Host:
        h = host(outbound_config(dns.port, port, extra), **kw)
        h.add_user("alice", "alice@example.test", password="pw")
        return h
    return make


def send(h: Host, sender: str, rcpts: list[str], body: str = "hello\r\n",
         subject: str = "test", mail_options: tuple[str, ...] = (),
         rcpt_options: tuple[str, ...] = ()) -> str:
    msg = (f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n\r\n{body}")
    with smtplib.SMTP(*h.smtp, timeout=20) as s:
        s.ehlo("client.example.test")
        s.mail(sender, list(mail_options))
        for r in rcpts:
            code, text = s.rcpt(r, list(rcpt_options))
            assert code == 250, (r, code, text)
        code, text = s.data(msg.encode())
        assert code == 250, text
    return text.decode().rsplit(" ", 1)[-1]


def codes(h: Host, queue_id: str) -> list[str]:
    return [r["code"] for r in h.journal("--queue-id", queue_id)]


def wait_codes(h: Host, queue_id: str, *wanted: str, timeout: float = 30.0) -> list[str]:
    return wait_for(lambda: (c := codes(h, queue_id)) and all(w in c for w in wanted) and c,
                    timeout, what=f"journal codes {wanted} for {queue_id}")


def notices(h: Host, user: str, count: int, timeout: float = 30.0) -> list[email.message.Message]:
    paths = h.wait_delivered(user, count, timeout)
    return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
            for p in paths]


def dsn_fields(msg: email.message.Message) -> list[dict[str, str]]:
    """The per-recipient blocks of a delivery-status part."""
    (status,) = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    return [{k.lower(): str(v) for k, v in b.items()} for b in blocks[1:]]


# --- delivery -------------------------------------------------------------------------


def test_delivers_to_the_best_mx_with_the_whole_trace(outhost, dns, sinks) -> None:
    dns.add("far.test", "MX", "10 mx1.far.test.", "20 mx2.far.test.")
    dns.add("mx1.far.test", "A", "127.0.0.2")
    dns.add("mx2.far.test", "A", "127.0.0.3")
    best, second = sinks("127.0.0.2"), sinks("127.0.0.3")
    h = outhost()
    qid = send(h, "alice@example.test", ["bob@far.test", "carol@far.test"], "one\r\n.two\r\n")
    (dump,) = best.wait_messages(1)
    sender, rcpts, _, message = sink_envelope(dump)
    assert sender == "alice@example.test"
    assert rcpts == ["bob@far.test", "carol@far.test"]
    assert message.endswith(b"\n\none\n.two\n")  # dot-stuffed on the wire, unstuffed there
    assert second.messages() == []
    seen = wait_codes(h, qid, "88")
    assert seen[:6] == ["95", "91", "92", "92", "9T", "99"]  # 95: received for relay
    for code in ("97", "7A", "7H", "P2", "C6", "C1", "C2", "8B", "88", "82"):
        assert code in seen, (code, seen)
    assert seen.count("82") == 2
    wait_for(lambda: not list((h.data / "spool" / "outbound").iterdir()), 10,
             what="outbound queue empty")
    assert not list((h.data / "spool" / "state").iterdir())


def test_falls_back_to_the_next_mx_when_the_best_is_down(outhost, dns, sinks) -> None:
    dns.add("fall.test", "MX", "10 mx1.fall.test.", "20 mx2.fall.test.")
    dns.add("mx1.fall.test", "A", "127.0.0.4")  # nothing listens there
    dns.add("mx2.fall.test", "A", "127.0.0.3")
    second = sinks("127.0.0.3")
    h = outhost()
    qid = send(h, "alice@example.test", ["bob@fall.test"])
    (dump,) = second.wait_messages(1)
    assert sink_envelope(dump)[1] == ["bob@fall.test"]
    wait_codes(h, qid, "88")
    (rec,) = h.journal("--queue-id", qid, "--code", "88")
    assert "mx2.fall.test" in rec["detail"]


def test_implicit_mx_uses_the_domain_address(outhost, dns, sinks) -> None:
    dns.add("plain.test", "A", "127.0.0.2")  # no MX records at all
    sink = sinks("127.0.0.2")
    h = outhost()
    qid = send(h, "alice@example.test", ["bob@plain.test"])
    sink.wait_messages(1)
    wait_codes(h, qid, "88", "82")
    assert ("plain.test", "MX") in dns.queries and ("plain.test", "A") in dns.queries


def test_null_mx_fails_at_once_with_a_notice_and_no_address_lookup(outhost, dns) -> None:
    dns.add("nomail.test", "MX", "0 .")
    h = outhost()
    qid = send(h, "alice@example.test", ["bob@nomail.test"])
    (notice,) = notices(h, "alice", 1)
    assert notice.get_content_type() == "multipart/report"
    assert notice["To"] == "alice@example.test"
    (fields,) = dsn_fields(notice)
    assert fields["final-recipient"] == "rfc822; bob@nomail.test"
    assert fields["action"] == "failed"
    assert fields["status"] == "5.1.10"
    assert "556" in fields["diagnostic-code"]
    seen = wait_codes(h, qid, "83", "87", "7P", "7G")
    assert seen.index("83") < seen.index("87") < seen.index("7G")
    assert not [q for q in dns.queries if q[0] == "nomail.test" and q[1] in ("A", "AAAA")]
    assert not h.queue_files("outbound") and not h.queue_files("retry1")


@pytest.mark.parametrize("problem", ["nxdomain", "servfail"])
def test_dns_failures_are_journaled_8k(outhost, dns, problem: str) -> None:
    name = f"{problem}.test"
    getattr(dns, problem)(name)
    h = outhost()
    qid = send(h, "alice@example.test", [f"bob@{name}"])
    if problem == "nxdomain":  # permanent: a notice at once
        (notice,) = notices(h, "alice", 1)
        assert dsn_fields(notice)[0]["status"] == "5.1.2"
        wait_codes(h, qid, "8K", "83")
    else:  # temporary: the 1st level retry queue
        seen = wait_codes(h, qid, "8K", "8C")
        assert "83" not in seen
    (rec, *_) = h.journal("--queue-id", qid, "--code", "8K")
    assert f"{name} MX" in rec["detail"] and problem.upper() in rec["detail"]


# --- retries, expiry and notices ----------------------------------------------------------


def test_temporary_failures_go_through_both_retry_queues_then_expire(outhost, dns,
                                                                      sinks) -> None:
    dns.add("slow.test", "MX", "10 mx.slow.test.")
    dns.add("mx.slow.test", "A", "127.0.0.2")
    sinks("127.0.0.2", "-r", "rcpt")  # every RCPT: 450, a temporary failure
    # 2 tries in the 1st level a second apart, then the 2nd level every 2 s, and the
    # message expires 9 s after it arrived.
    h = outhost("[retry]\nmax_lifetime = 9.0\n")
    qid = send(h, "alice@example.test", ["bob@slow.test"])
    wait_codes(h, qid, "8C")
    (row,) = [r for r in map(__import__("json").loads,
                             h.cli("queue", "list", "--json").stdout.splitlines())
              if r["queue_id"] == qid]
    assert row["queue_name"] in ("retry1", "outbound")
    assert row["sender"] == "alice@example.test"
    assert row["recipients"][0]["address"] == "bob@slow.test"
    assert "450" in row["recipients"][0]["delay_reason"]
    assert row["next_attempt"] is None or row["next_attempt"] > row["arrival_time"]
    seen = wait_codes(h, qid, "83", timeout=40)
    moves = [c for c in seen if c in ("8C", "8E", "8D", "8F", "83")]
    # two failures into retry1 (each back out with 8E), then retry2, then expiry.
    assert moves[:4] == ["8C", "8E", "8C", "8E"], moves
    assert moves[4] == "8D" and moves[-1] == "83", moves
    assert seen.index("8D") < seen.index("87")  # the delay notice came on entering retry2
    delay, failure = notices(h, "alice", 2, timeout=20)
    assert dsn_fields(delay)[0]["action"] == "delayed"
    assert "will-retry-until" in dsn_fields(delay)[0]
    (fields,) = dsn_fields(failure)
    assert fields["action"] == "failed" and fields["status"].startswith("4.")
    assert "450" in fields["diagnostic-code"]
    wait_for(lambda: not h.cli("queue", "list", "--json").stdout.strip(), 10,
             what="the queue empty after expiry")


def test_a_bounce_is_never_bounced(outhost, dns) -> None:
    dns.add("nomail2.test", "MX", "0 .")
    h = outhost()
    h.add_user("postmaster", "postmaster@example.test")
    with smtplib.SMTP(*h.smtp, timeout=20) as s:
        s.ehlo("client.example.test")
        assert s.mail("<>")[0] == 250
        assert s.rcpt("bob@nomail2.test")[0] == 250
        code, text = s.data(b"Subject: a bounce\r\n\r\nnobody answers this\r\n")
        assert code == 250
    qid = text.decode().rsplit(" ", 1)[-1]
    (copy,) = notices(h, "postmaster", 1)
    assert copy["Subject"].startswith("Postmaster Copy")
    assert copy["To"] == "postmaster@example.test"
    wait_codes(h, qid, "83", "87")
    assert h.maildir_files("alice") == []
    # The postmaster copy itself was delivered locally: nothing more is queued or sent.
    wait_for(lambda: not h.cli("queue", "list", "--json").stdout.strip(), 10,
             what="nothing left queued")


def test_dsn_success_failure_delay_and_ret_hdrs(outhost, dns, sinks) -> None:
    dns.add("dsn.test", "MX", "10 mx.dsn.test.")
    dns.add("mx.dsn.test", "A", "127.0.0.2")
    dns.add("nodsn.test", "MX", "10 mx.nodsn.test.")
    dns.add("mx.nodsn.test", "A", "127.0.0.3")
    dns.add("gone.test", "MX", "0 .")
    with_dsn = sinks("127.0.0.2")
    without = sinks("127.0.0.3", "-N")  # a next hop without DSN
    h = outhost()
    h.add_user("carol", "carol@example.test")
    orcpt = ("ORCPT=rfc822;x+2Bcarol@example.test",)
    # Local delivery confirmed (COD).
    send(h, "alice@example.test", ["carol@example.test"],
         rcpt_options=("NOTIFY=SUCCESS", *orcpt))
    (cod,) = notices(h, "alice", 1)
    (fields,) = dsn_fields(cod)
    assert fields["action"] == "delivered" and fields["status"] == "2.0.0"
    assert fields["original-recipient"] == "rfc822; x+carol@example.test"
    # A next hop with DSN gets the parameters passed on, and sends its own notices.
    send(h, "alice@example.test", ["bob@dsn.test"], mail_options=("RET=HDRS", "ENVID=e1"),
         rcpt_options=("NOTIFY=SUCCESS,FAILURE",))
    (dump,) = with_dsn.wait_messages(1)
    _, _, params, _ = sink_envelope(dump)
    assert "NOTIFY=SUCCESS,FAILURE" in params[0]
    # A next hop without DSN: we say "relayed" ourselves (RFC 3461 5.2.2).
    send(h, "alice@example.test", ["bob@nodsn.test"], rcpt_options=("NOTIFY=SUCCESS",))
    without.wait_messages(1)
    relayed = notices(h, "alice", 2)[-1]
    assert dsn_fields(relayed)[0]["action"] == "relayed"
    # A failure with RET=HDRS carries only the headers; NOTIFY=NEVER gets nothing.
    send(h, "alice@example.test", ["bob@gone.test"], mail_options=("RET=HDRS",),
         rcpt_options=("NOTIFY=FAILURE",), body="secret body\r\n")
    failure = notices(h, "alice", 3)[-1]
    assert dsn_fields(failure)[0]["action"] == "failed"
    types = [p.get_content_type() for p in failure.walk()]
    assert "text/rfc822-headers" in types and "message/rfc822" not in types
    assert b"secret body" not in failure.as_bytes()
    never = send(h, "alice@example.test", ["bob@gone.test"], rcpt_options=("NOTIFY=NEVER",))
    wait_codes(h, never, "83")
    assert len(h.maildir_files("alice")) == 3
