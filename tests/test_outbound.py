"""Outbound delivery end to end: a real host, the suite's DNS server, smtp-sink as remote MX.

Every MX host listens on one port (mailpool's [outbound] port) at its own loopback address;
the DNS server (tests/dnsserver.py) tells mailpool which is which.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import signal
import smtplib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dnsserver import DnsServer
from hosthelp import Host, wait_for
from outhelp import (
    Blackhole,
    SmtpSink,
    established,
    free_port,
    needs_sink,
    now,
    outbound_config,
    sink_envelope,
)

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
    h = outhost('[notices]\nfrom = "mail-admin@example.test"\n'
                'nondelivery_user = "nondelivery"\n')
    h.add_user("nondelivery", "nondelivery@example.test")
    qid = send(h, "alice@example.test", ["bob@nomail.test"])
    (notice,) = notices(h, "alice", 1)
    assert notice.get_content_type() == "multipart/report"
    assert notice["To"] == "alice@example.test"
    assert "mail-admin@example.test" in notice["From"]  # the "responsible person"
    (copy,) = notices(h, "nondelivery", 1)  # the source's NONDELIVERY tracking user
    assert copy["Message-ID"] == notice["Message-ID"]
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
    (row,) = [r for r in map(json.loads,
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


# --- per destination ----------------------------------------------------------------------


def test_per_destination_concurrency_limit(outhost, dns, sinks, port) -> None:
    dns.add("busy.test", "MX", "10 mx.busy.test.")
    dns.add("mx.busy.test", "A", "127.0.0.2")
    sink = sinks("127.0.0.2", "-w", "1")  # a second before each DATA reply
    h = outhost("[outbound]\ninitial_destination_concurrency = 2\n"
                "destination_concurrency_limit = 3\nconnection_cache_time = 0.0\n")
    for n in range(12):
        send(h, "alice@example.test", [f"u{n}@busy.test"])
    peak = 0
    deadline = now() + 60
    while len(sink.messages()) < 12 and now() < deadline:
        peak = max(peak, established("127.0.0.2", port))
        time.sleep(0.02)
    assert len(sink.messages()) == 12
    assert 2 <= peak <= 3, peak  # it grew from 2, never beyond 3


def test_a_dead_destination_does_not_hold_up_a_live_one(outhost, dns, sinks, port) -> None:
    dns.add("dead.test", "MX", "10 mx.dead.test.")
    dns.add("mx.dead.test", "A", "127.0.0.4")
    dns.add("live.test", "MX", "10 mx.live.test.")
    dns.add("mx.live.test", "A", "127.0.0.2")
    hole = Blackhole("127.0.0.4", port)
    live = sinks("127.0.0.2")
    try:
        # Two client slots in all: without the dead-destination rule, mail for the dead
        # domain would hold both for a greeting timeout (5 s) after another.
        h = outhost("[outbound]\ndeliveries_per_job = 2\ndead_destination_pause = 30.0\n"
                    "[pool.smtp-client]\nmaximum_jobs = 1\n")
        dead = [send(h, "alice@example.test", [f"u{n}@dead.test"]) for n in range(8)]
        time.sleep(0.5)
        start = now()
        send(h, "alice@example.test", ["bob@live.test"])
        live.wait_messages(1, timeout=20)
        assert now() - start < 12  # at most one round of greeting timeouts
        held = [r["queue_id"] for r in h.journal("--code", "86")]
        assert set(held) & set(dead)
        tried = [r["queue_id"] for r in h.journal("--code", "8B")
                 if r["queue_id"] in dead]
        assert len(tried) <= 3  # the rest waited: no attempt spent on a dead host
        rows = [json.loads(x) for x in h.cli("queue", "list", "--json").stdout.splitlines()]
        assert {r["queue_id"] for r in rows} >= set(dead)
    finally:
        hole.close()


# --- crashes ---------------------------------------------------------------------------


def client_job_pids(h: Host) -> list[int]:
    pids = [r["pid"] for r in h.journal("--code", "JS") if r.get("entry") == "smtp-client"]
    return [p for p in pids if Path(f"/proc/{p}").exists()]


def test_kill_9_of_a_client_job_mid_delivery(outhost, dns, sinks) -> None:
    dns.add("kill.test", "MX", "10 mx.kill.test.")
    dns.add("mx.kill.test", "A", "127.0.0.2")
    sink = sinks("127.0.0.2", "-w", "3")  # smtp-sink answers DATA (its 354) 3 s late
    h = outhost()
    qid = send(h, "alice@example.test", ["bob@kill.test"])
    wait_codes(h, qid, "8B")
    time.sleep(1.0)  # inside the transaction
    for pid in client_job_pids(h):
        os.kill(pid, signal.SIGKILL)
    # A new job takes the message again once its stored retry time comes (1 s here).
    seen = wait_codes(h, qid, "88", timeout=40)
    assert seen.count("8B") >= 2
    wait_for(lambda: not h.queue_files("outbound") and not h.queue_files("retry1"), 20,
             what="queues empty")
    # The job died waiting for the 354, before any of the message was sent: the retry's
    # copy is the only one.
    delivered = [m for m in sink.messages() if b"bob@kill.test" in m]
    assert len(delivered) == 1


def test_kill_9_of_the_host_mid_retry_keeps_the_schedule(outhost, dns, sinks, tmp_path,
                                                        port) -> None:
    dns.add("later.test", "MX", "10 mx.later.test.")
    dns.add("mx.later.test", "A", "127.0.0.2")
    refusing = sinks("127.0.0.2", "-r", "rcpt")
    h = outhost("[retry]\nfirst_interval = 6.0\n")
    qid = send(h, "alice@example.test", ["bob@later.test"])
    wait_codes(h, qid, "8C")
    (row,) = [json.loads(x) for x in h.cli("queue", "list", "--json").stdout.splitlines()]
    due = row["next_attempt"]
    assert row["queue_name"] == "retry1" and due > now() + 3
    h.kill()
    refusing.stop()
    accepting = SmtpSink(tmp_path, "127.0.0.2", port)
    try:
        h.start()
        (dump,) = accepting.wait_messages(1, timeout=30)
        arrived = now()
        assert arrived >= due - 0.5  # not retried at once after the restart
        assert b"bob@later.test" in dump
        wait_codes(h, qid, "88", "8E")
    finally:
        accepting.stop()


# --- host to host -----------------------------------------------------------------------


def test_host_to_host_with_the_trace_in_both_journals(outhost, host, dns, port) -> None:
    dns.add("far.example", "MX", "10 mx.far.example.")
    dns.add("mx.far.example", "A", "127.0.0.5")
    remote = host(f'[host]\nname = "mx.far.example"\nlocal_domains = ["far.example"]\n'
                  f'[listen]\nsmtp = "127.0.0.5:{port}"\n[smtp]\nmax_message_size = 4000\n',
                  name="remote")
    remote.add_user("zoe", "zoe@far.example")
    h = outhost()
    mid = "hop-1@client.example.test"
    send(h, "alice@example.test", ["zoe@far.example"],
         body="across\r\n", subject=f"hop\r\nMessage-ID: <{mid}>")
    (path,) = remote.wait_delivered("zoe", 1)
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: <alice@example.test>\r\nDelivered-To: zoe@far.example")
    assert data.count(b"Received: from ") == 2  # one per hop
    here = [r["code"] for r in h.journal("--message-id", mid)]
    there = [r["code"] for r in remote.journal("--message-id", mid)]
    assert here[0] == "95" and "88" in here and "82" in here
    assert there[0] == "94" and there[-2:] == ["B8", "B2"]
    # Too big for the remote's SIZE: refused before DATA, permanently, with a notice.
    big = "x" * 70 + "\r\n"
    send(h, "alice@example.test", ["zoe@far.example"], body=big * 80)
    (notice,) = notices(h, "alice", 1)
    (fields,) = dsn_fields(notice)
    assert fields["status"] == "5.3.4" and "SIZE" in fields["diagnostic-code"]
    assert len(remote.maildir_files("zoe")) == 1


# --- relay rules ---------------------------------------------------------------------------

TRICKS = ["u@far.test", "@a.test,@b.test:u@far.test", "u%far.test@example.test",
          "far.test!u@example.test", '"u@far.test"@example.test', "u@[127.0.0.1]",
          "u@[IPv6:::1]", "u@far.test."]


@pytest.mark.parametrize("mode", ["none", "near", "list", "both"])
def test_relay_tricks_never_relay_where_the_mode_forbids_it(host, raw_smtp, mode: str
                                                            ) -> None:
    # near: only near.test may be relayed to; list/both: 127.0.0.0/8 is not listed.
    h = host(f'[relay]\nmode = "{mode}"\nnear_domains = ["near.test"]\n'
             f'networks = ["192.0.2.0/24"]\npercent_hack = true\n', name=f"relay-{mode}")
    c = raw_smtp(h.smtp)
    c.reply()
    c.cmd("EHLO client.example.test")
    assert c.cmd("MAIL FROM:<>")[0] == 250
    for trick in TRICKS:
        code, lines = c.cmd(f"RCPT TO:<{trick}>")
        assert code in (550, 501), (mode, trick, code, lines)
    assert c.cmd("RCPT TO:<Postmaster>")[0] == 250
    near = c.cmd("RCPT TO:<u@near.test>")[0]
    assert near == (250 if mode in ("near", "both") else 550)
    refused = [r for r in h.journal("--code", "9V")]
    assert len(refused) >= 5 and all(r["ip"] == "127.0.0.1" for r in refused)


def test_relay_mode_all_and_listed_clients_may_relay(host, raw_smtp) -> None:
    for extra in ('[relay]\nmode = "all"\n', '[relay]\nnetworks = ["127.0.0.0/8"]\n'):
        h = host(extra)
        c = raw_smtp(h.smtp)
        c.reply()
        c.cmd("EHLO client.example.test")
        assert c.cmd("MAIL FROM:<a@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<@a.test,@b.test:u@far.test>")[0] == 250
        assert c.cmd("RCPT TO:<u%far.test@example.test>")[0] == 550  # hack off: unknown user
        h.stop()


# --- ETRN, flush and the mail router -------------------------------------------------------


def test_etrn_and_flush_release_deferred_mail(outhost, dns, sinks, raw_smtp, tmp_path,
                                              port) -> None:
    dns.add("dialup.test", "MX", "10 mx.dialup.test.")
    dns.add("mx.dialup.test", "A", "127.0.0.2")
    h = outhost('[retry]\nfirst_interval = 600.0\n[etrn]\ndomains = ["dialup.test"]\n'
                '[outbound]\ndead_destination_pause = 600.0\n')
    qids = [send(h, "alice@example.test", [f"u{n}@dialup.test"]) for n in range(2)]
    for qid in qids:
        wait_codes(h, qid, "8C")  # nobody listens yet: deferred for ten minutes
    sink = sinks("127.0.0.2")  # the peer dials in
    c = raw_smtp(h.smtp)
    c.reply()
    c.cmd("EHLO peer.dialup.test")
    assert c.cmd("ETRN")[0] == 501
    assert c.cmd("ETRN elsewhere.test")[0] == 459
    code, lines = c.cmd("ETRN dialup.test")
    assert code == 253 and "2 pending" in lines[0], lines
    sink.wait_messages(2, timeout=20)
    assert c.cmd("ETRN dialup.test")[0] == 251  # nothing left
    assert c.cmd("MAIL FROM:<a@example.test>")[0] == 250
    assert c.cmd("ETRN dialup.test")[0] == 503  # not inside a transaction
    # `queue flush` does the same from the command line.
    sink.stop()
    qid = send(h, "alice@example.test", ["late@dialup.test"])
    wait_codes(h, qid, "8C")
    again = SmtpSink(tmp_path, "127.0.0.2", port)
    try:
        out = h.cli("queue", "flush", "--domain", "dialup.test").stdout
        assert out.startswith("1 message(s)")
        again.wait_messages(1, timeout=20)
    finally:
        again.stop()


def test_router_with_firewall_takes_all_mail_without_mx_lookups(outhost, dns, sinks,
                                                                port) -> None:
    router = sinks("127.0.0.3")
    h = outhost(f'[outbound]\nrouter = "[127.0.0.3]:{port}"\nfirewall = true\n')
    before = len(dns.queries)
    send(h, "alice@example.test", ["a@one.test", "b@two.test"])
    (dump,) = router.wait_messages(1)
    assert sorted(sink_envelope(dump)[1]) == ["a@one.test", "b@two.test"]
    assert dns.queries[before:] == []  # the client never looked up an MX itself


def test_an_unresolvable_router_is_bypassed(outhost, dns, sinks) -> None:
    dns.add("direct.test", "MX", "10 mx.direct.test.")
    dns.add("mx.direct.test", "A", "127.0.0.2")
    sink = sinks("127.0.0.2")
    h = outhost('[outbound]\nrouter = "no-such-router.test"\n')
    qid = send(h, "alice@example.test", ["bob@direct.test"])
    sink.wait_messages(1)
    notes = [r["detail"] for r in h.journal("--queue-id", qid, "--code", "8K")]
    assert any("no-such-router.test" in n and "directly" in n for n in notes), notes


def test_mail_for_a_domain_whose_best_mx_is_this_host_is_a_loop(outhost, dns) -> None:
    dns.add("loop.test", "MX", "10 mail.example.test.")  # our own host.name
    h = outhost()
    send(h, "alice@example.test", ["bob@loop.test"])
    (notice,) = notices(h, "alice", 1)
    assert dsn_fields(notice)[0]["status"] == "5.4.6"


def test_one_connection_carries_several_messages(outhost, dns, sinks) -> None:
    dns.add("reuse.test", "MX", "10 mx.reuse.test.")
    dns.add("mx.reuse.test", "A", "127.0.0.2")
    sink = sinks("127.0.0.2")
    h = outhost("[outbound]\nconnection_cache_time = 10.0\n")
    for n in range(4):
        send(h, "alice@example.test", [f"u{n}@reuse.test"])
        sink.wait_messages(n + 1)
    # smtp-sink -c keeps counters: one session carried the four messages.
    counters = sink.log.read_text().replace("\r", "\n").split()
    sessions = [int(w.split("=")[1]) for w in counters if w.startswith("sess=")]
    assert sessions and max(sessions) == 1, counters[-6:]


def test_client_pool_is_shown_and_changed_like_the_others(outhost) -> None:
    h = outhost()
    entry = h.pool_show()["smtp-client"]
    assert entry["parameters"]["deliveries_per_job"] == 50
    assert "sessions_per_job" not in entry["parameters"]
    h.cli("pool", "change", "smtp-client", "--deliveries-per-job", "3")
    assert h.pool_show()["smtp-client"]["parameters"]["deliveries_per_job"] == 3
    res = h.cli("pool", "change", "smtp-client", "--sessions-per-job", "3", check=False)
    assert res.returncode == 1 and "deliveries_per_job" in res.stderr
    changed = h.journal("--code", "JC")
    assert changed and "deliveries_per_job" in changed[-1]["detail"]


def test_the_scheduler_asks_the_router_for_our_mail_with_etrn(host, dns, port) -> None:
    # The router (a second mailpool) holds mail for example.test while we are away ...
    dns.add("example.test", "MX", "10 mx.example.test.")
    dns.add("mx.example.test", "A", "127.0.0.6")
    router = host(outbound_config(dns.port, port,
                                  '[host]\nname = "isp.far.example"\n'
                                  'local_domains = ["far.example"]\n'
                                  f'[listen]\nsmtp = "127.0.0.5:{port}"\n'
                                  '[relay]\nmode = "all"\n[etrn]\ndomains = ["example.test"]\n'
                                  "[retry]\nfirst_interval = 600.0\n"
                                  "[outbound]\ndead_destination_pause = 600.0\n"),
                  name="isp")
    with smtplib.SMTP(*router.smtp, timeout=20) as s:
        s.sendmail("zoe@far.example", ["alice@example.test"], b"Subject: held\r\n\r\nx\r\n")
    wait_for(lambda: router.journal("--code", "8C"), 20, what="held at the router")
    # ... until we come up: every second the scheduler flushes and sends ETRN.
    h = host(outbound_config(dns.port, port,
                             f'[listen]\nsmtp = "127.0.0.6:{port}"\n'
                             f'[outbound]\nrouter = "[127.0.0.5]:{port}"\nfirewall = true\n'
                             "[etrn]\ninterval = 1.0\n"), start=False)
    h.add_user("alice", "alice@example.test")  # before the router can deliver to us
    h.start()
    (path,) = h.wait_delivered("alice", 1, timeout=30)
    assert b"Subject: held" in path.read_bytes()


# --- smtp-sink's failure switches ------------------------------------------------------------


def test_hard_reject_is_permanent_and_421_is_temporary(outhost, dns, sinks) -> None:
    dns.add("hard.test", "MX", "10 mx.hard.test.")
    dns.add("mx.hard.test", "A", "127.0.0.2")
    dns.add("closing.test", "MX", "10 mx.closing.test.")
    dns.add("mx.closing.test", "A", "127.0.0.3")
    sinks("127.0.0.2", "-f", "rcpt")   # a 5xx to every RCPT
    sinks("127.0.0.3", "-Q", "mail")   # 421 and hang up after MAIL
    h = outhost()
    hard = send(h, "alice@example.test", ["bob@hard.test"])
    closing = send(h, "alice@example.test", ["bob@closing.test"])
    (notice,) = notices(h, "alice", 1)
    (fields,) = dsn_fields(notice)
    assert fields["final-recipient"] == "rfc822; bob@hard.test"
    assert fields["diagnostic-code"].startswith("smtp; 5")  # smtp-sink says 500 5.3.0
    assert fields["remote-mta"] == "dns; mx.hard.test"
    wait_codes(h, hard, "83")
    seen = wait_codes(h, closing, "8C")
    assert "83" not in seen
    (rec, *_) = h.journal("--queue-id", closing, "--code", "8C")
    assert "421" in rec["detail"]


def test_a_lost_reply_after_the_dot_is_retried_and_journaled(outhost, dns, sinks, tmp_path,
                                                            port) -> None:
    dns.add("lost.test", "MX", "10 mx.lost.test.")
    dns.add("mx.lost.test", "A", "127.0.0.2")
    dropping = sinks("127.0.0.2", "-q", ".")  # hangs up after the final dot, no reply
    h = outhost()
    qid = send(h, "alice@example.test", ["bob@lost.test"])
    wait_codes(h, qid, "8C")
    (rec, *_) = h.journal("--queue-id", qid, "--code", "8C")
    assert "may have been delivered" in rec["detail"] and "duplicate" in rec["detail"]
    dropping.stop()
    fine = SmtpSink(tmp_path, "127.0.0.2", port)
    try:
        fine.wait_messages(1, timeout=20)
        wait_codes(h, qid, "88")
    finally:
        fine.stop()


# --- STARTTLS towards next hops -----------------------------------------------------------------


class BrokenTlsPeer:
    """Offers STARTTLS, says 220, then hangs up (a broken TLS stack); a second, plaintext
    session is served normally. Real sockets, one thread."""

    def __init__(self, ip: str, port: int) -> None:
        import threading

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(16)
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                self.session(conn)

    def session(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        conn.sendall(b"220 broken.test ESMTP\r\n")
        data = False
        body = b""
        for line in f:
            if data:
                if line == b".\r\n":
                    self.received.append(body)
                    conn.sendall(b"250 2.0.0 Ok\r\n")
                    data = False
                else:
                    body += line
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-broken.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
            elif verb == b"STAR":
                conn.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                return  # and hang up: the handshake fails
            elif verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                data = True
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                conn.sendall(b"250 2.0.0 Ok\r\n")

    def close(self) -> None:
        self.sock.close()


def test_starttls_to_next_hops_by_policy(outhost, host, dns, sinks, port,
                                          tmp_path) -> None:
    from tlshelp import make_certs

    certs = make_certs(tmp_path / "certs", "mx.tls.example")
    for domain in ("tls.example", "may.example"):
        dns.add(domain, "MX", "10 mx.tls.example.")
    dns.add("mx.tls.example", "A", "127.0.0.5")
    dns.add("wrongname.example", "MX", "10 other.wrongname.example.")
    dns.add("other.wrongname.example", "A", "127.0.0.5")  # the same peer, not its name
    dns.add("plain.example", "MX", "10 mx.plain.example.")
    dns.add("mx.plain.example", "A", "127.0.0.2")
    dns.add("broken.example", "MX", "10 mx.broken.example.")
    dns.add("mx.broken.example", "A", "127.0.0.6")
    sinks("127.0.0.2")  # smtp-sink offers no STARTTLS
    broken = BrokenTlsPeer("127.0.0.6", port)
    peer = host(certs.config() + '[host]\nname = "mx.tls.example"\n'
                'local_domains = ["tls.example", "may.example", "wrongname.example"]\n'
                f'[listen]\nsmtp = "127.0.0.5:{port}"\n', name="tlspeer")
    peer.add_user("zoe", "zoe@tls.example", "zoe@may.example", "zoe@wrongname.example")
    try:
        h = outhost(f'[outbound.tls]\npolicy = "may"\nca_file = "{certs.ca_file}"\n'
                    '[outbound.tls.destinations]\n"tls.example" = "verify"\n'
                    '"wrongname.example" = "verify"\n"plain.example" = "encrypt"\n')
        verified = send(h, "alice@example.test", ["zoe@tls.example"])
        opportunistic = send(h, "alice@example.test", ["zoe@may.example"])
        mismatch = send(h, "alice@example.test", ["zoe@wrongname.example"])
        required = send(h, "alice@example.test", ["bob@plain.example"])
        fallback = send(h, "alice@example.test", ["bob@broken.example"])
        peer.wait_delivered("zoe", 2)
        for qid in (verified, opportunistic):
            (rec,) = wait_for(lambda q=qid: h.journal("--queue-id", q, "--code", "88"), 20,
                              what="88")
            assert "TLS: TLSv1." in rec["detail"], rec
        (rec,) = wait_for(lambda: h.journal("--queue-id", fallback, "--code", "88"), 20,
                          what="88 after the plaintext retry")
        assert "plaintext after failed handshake" in rec["detail"], rec
        assert len(broken.received) == 1
        for qid, words in ((mismatch, "certificate"), (required, "TLS is required")):
            (rec, *_) = wait_for(lambda q=qid: h.journal("--queue-id", q, "--code", "8C"), 20,
                                 what="8C")
            assert words in rec["detail"], rec
        assert len(peer.maildir_files("zoe")) == 2  # nothing went out unverified
    finally:
        broken.close()
