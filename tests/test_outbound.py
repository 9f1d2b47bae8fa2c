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
